/** Small pictures of a tensor for tables: a sparkline (1-D) or a mini heatmap (2-D). */

import { Scale } from "./colour";
import { svg } from "./dom";

/** A line through `values` (NaN leaves a gap), scaled to its own range. */
export function sparkline(values: ArrayLike<number>, width = 120, height = 22): SVGElement {
  const plot = svg("svg", { width, height, viewBox: `0 0 ${width} ${height}`, class: "nnsj-spark" });
  const finite = Array.from(values).filter(Number.isFinite);
  if (!finite.length) return plot;
  const lo = Math.min(...finite);
  const hi = Math.max(...finite);
  const n = values.length;
  let d = "";
  let pen = false;
  for (let i = 0; i < n; i++) {
    const v = values[i];
    if (!Number.isFinite(v)) {
      pen = false;
      continue;
    }
    const x = n > 1 ? (i / (n - 1)) * (width - 2) + 1 : width / 2;
    const y = hi > lo ? height - 2 - ((v - lo) / (hi - lo)) * (height - 4) : height / 2;
    d += `${pen ? "L" : "M"}${x.toFixed(1)},${y.toFixed(1)}`;
    pen = true;
  }
  plot.append(svg("path", { d, fill: "none", "stroke-width": 1.2, class: "nnsj-spark-line" }));
  return plot;
}

/** `values` ([rows x cols], row-major) as a small canvas, one block of pixels per value. */
export function miniHeatmap(values: ArrayLike<number>, rows: number, cols: number, scale: Scale,
                            width = 120, height = 22): HTMLCanvasElement {
  const canvas = document.createElement("canvas");
  canvas.className = "nnsj-mini";
  canvas.width = cols;
  canvas.height = rows;
  canvas.style.width = `${Math.min(width, cols * 12)}px`;
  canvas.style.height = `${Math.min(height, rows * 12)}px`;
  const ctx = canvas.getContext("2d")!;
  const image = ctx.createImageData(cols, rows);
  for (let i = 0; i < rows * cols; i++) {
    const [r, g, b] = scale.rgb(values[i]);
    image.data.set([r, g, b, 255], i * 4);
  }
  ctx.putImageData(image, 0, 0);
  return canvas;
}
