// Build the front-end:
//  - the views as one ES module that anywidget loads: ../nnsight_jupyter/widgets/static/views.js;
//  - the JupyterLab extension's code as lib/index.js (views included, styles as text), with
//    JupyterLab's own packages left as imports for `jupyter-builder`, which shares them with the page;
//  - the unit tests of the pure modules as lib/test/*.test.mjs (run by `npm test`).
//   node build.mjs            one minified build
//   node build.mjs --watch    rebuild on change (unminified, with inline source maps)
//   node build.mjs --tests    only the unit tests
import * as esbuild from "esbuild";
import { readdirSync } from "node:fs";
import { fileURLToPath } from "node:url";

const watch = process.argv.includes("--watch");
const testsOnly = process.argv.includes("--tests");
const here = (path) => fileURLToPath(new URL(path, import.meta.url));
const common = {
  bundle: true,
  format: "esm",
  target: "es2020",
  loader: { ".css": "text" },
  legalComments: "none",
  logLevel: "info",
};

const views = {
  ...common,
  entryPoints: [here("./src/views/anywidget.ts")],
  outfile: here("../nnsight_jupyter/widgets/static/views.js"),
  minify: !watch,
  sourcemap: watch ? "inline" : false,
};

const extension = {
  ...common,
  entryPoints: [here("./src/lab/index.ts")],
  outfile: here("./lib/index.js"),
  // Provided by JupyterLab at run time (module federation singletons).
  external: ["@jupyterlab/*", "@lumino/*", "@codemirror/*", "@jupyter/*", "react", "react-dom", "yjs"],
  minify: false,
  sourcemap: watch ? "inline" : false,
};

const tests = {
  ...common,
  entryPoints: readdirSync(here("./test")).filter((f) => f.endsWith(".test.ts")).map((f) => here(`./test/${f}`)),
  outdir: here("./lib/test"),
  outExtension: { ".js": ".mjs" },
  platform: "node",
  logLevel: "warning",
};

const builds = testsOnly ? [tests] : [views, extension];
if (watch) {
  for (const options of builds) await (await esbuild.context(options)).watch();
} else {
  await Promise.all(builds.map((options) => esbuild.build(options)));
}
