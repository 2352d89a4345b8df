/**
 * SavedValues: what a trace saved, one row per name (shape, dtype, a sparkline or a mini heatmap,
 * a short summary); clicking a row opens that value's TensorView under it.
 *
 * State (from `nnsight_jupyter/widgets/saved_values.py`): `rows` (name, kind, shape, dtype,
 * summary, preview shape) and `previews`, one float32 buffer holding every row's preview. Opening
 * a row asks `{kind: "open", name}`; the reply is that tensor's view state, and the opened view's
 * own requests travel through this table with `target: name`.
 */

import { asDataView, typed } from "./core/binary";
import { scaleFor } from "./core/colour";
import { h } from "./core/dom";
import { miniHeatmap, sparkline } from "./core/preview";
import { isDark, onThemeChange } from "./core/theme";
import { DataSource, putBuffers, StateSource } from "./source";
import { renderTensorView } from "./tensor_view";

interface SavedRow {
  name: string;
  kind: "tensor" | "value";
  shape: number[] | null;
  dtype: string;
  summary: string;
  preview: [number, number] | null;
  offset: number;
  openable: boolean;
}

export function renderSavedValues(el: HTMLElement, source: DataSource): () => void {
  const rows = source.get<SavedRow[]>("rows");
  const previewBuffer = source.get<DataView | null>("previews");
  const previews = previewBuffer ? typed(asDataView(previewBuffer), "float32") : new Float32Array(0);
  const root = h("div", { class: "nnsj-view nnsj-saved", "data-view": "saved_values" });
  el.append(root);
  const title = source.get<string>("title");
  if (title) root.append(h("div", { class: "nnsj-title", text: title }));
  if (!rows.length) {
    root.append(h("div", { class: "nnsj-muted", text: "nothing was saved" }));
    return () => root.remove();
  }
  const table = h("table", { class: "nnsj-table" });
  table.append(h("thead", null, h("tr", null, ...["name", "shape", "dtype", "preview", "summary"].map(
    (t) => h("th", { text: t })))));
  const body = h("tbody");
  table.append(body);
  root.append(table);
  const cleanups = new Map<string, () => void>();

  const drawPreview = (row: SavedRow, cell: HTMLElement) => {
    cell.replaceChildren();
    if (!row.preview) return;
    const [pr, pc] = row.preview;
    const values = previews.subarray(row.offset, row.offset + pr * pc);
    if (pr === 1) {
      cell.append(sparkline(values));
      return;
    }
    let lo = Infinity;
    let hi = -Infinity;
    for (const v of values) if (Number.isFinite(v)) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
    cell.append(miniHeatmap(values, pr, pc, scaleFor(lo, hi, isDark(root))));
  };
  const previewCells: [SavedRow, HTMLElement][] = [];

  rows.forEach((row) => {
    const preview = h("td", { class: "nnsj-preview" });
    drawPreview(row, preview);
    previewCells.push([row, preview]);
    const tr = h("tr", { class: row.openable ? "nnsj-row nnsj-openable" : "nnsj-row", "data-name": row.name },
      h("td", null, row.openable ? h("span", { class: "nnsj-twisty", text: "▸" }) : null,
        h("b", { class: "nnsj-name", text: row.name })),
      h("td", { "data-field": "shape", text: row.shape ? `[${row.shape.join(", ")}]` : "" }),
      h("td", { "data-field": "dtype", text: row.dtype }),
      preview,
      h("td", { class: "nnsj-summary", "data-field": "summary", text: row.summary }));
    body.append(tr);
    if (!row.openable) return;
    const holder = h("tr", { class: "nnsj-open-row", "data-name": row.name });
    const cell = h("td", { colspan: 5 });
    holder.append(cell);
    holder.style.display = "none";
    body.append(holder);
    tr.addEventListener("click", () => {
      const twisty = tr.querySelector(".nnsj-twisty")!;
      if (holder.style.display !== "none") {
        holder.style.display = "none";
        twisty.textContent = "▸";
        return;
      }
      holder.style.display = "";
      twisty.textContent = "▾";
      if (cleanups.has(row.name)) return;
      cell.replaceChildren(h("div", { class: "nnsj-muted", text: "loading…" }));
      cleanups.set(row.name, () => undefined);
      source.request({ kind: "open", name: row.name }).then(
        (reply) => {
          const state = putBuffers(
            reply.content.state as Record<string, unknown>,
            reply.content.buffer_paths as (string | number)[][],
            reply.buffers);
          const sub = new StateSource(state, (content, buffers) =>
            source.request({ ...content, target: row.name }, buffers));
          cell.replaceChildren();
          cleanups.set(row.name, renderTensorView(cell, sub));
        },
        (error: Error) => {
          cleanups.delete(row.name);
          cell.replaceChildren(h("div", { class: "nnsj-error", text: error.message }));
        });
    });
  });
  const stopTheme = onThemeChange(root, () => previewCells.forEach(([row, cell]) => drawPreview(row, cell)));
  return () => {
    stopTheme();
    cleanups.forEach((f) => f());
    root.remove();
  };
}
