// Bundle the views into one ES module that anywidget loads: ../nnsight_jupyter/widgets/static/views.js.
//   node build.mjs            one minified build
//   node build.mjs --watch    rebuild on change (unminified, with inline source maps)
import * as esbuild from "esbuild";
import { fileURLToPath } from "node:url";

const watch = process.argv.includes("--watch");
const options = {
  entryPoints: [fileURLToPath(new URL("./src/views/anywidget.ts", import.meta.url))],
  outfile: fileURLToPath(new URL("../nnsight_jupyter/widgets/static/views.js", import.meta.url)),
  bundle: true,
  format: "esm",
  target: "es2020",
  loader: { ".css": "text" },
  minify: !watch,
  sourcemap: watch ? "inline" : false,
  legalComments: "none",
  logLevel: "info",
};

if (watch) {
  const context = await esbuild.context(options);
  await context.watch();
} else {
  await esbuild.build(options);
}
