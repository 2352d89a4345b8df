/**
 * TensorView: a tensor's summary (shape, dtype, device, statistics, histogram) and a heatmap of
 * one 2-D slice, with a slider for every other dimension.
 *
 * State (from `nnsight_jupyter/widgets/tensor_view.py`): `shape`, `dtype`, `device`, `stats`,
 * `hist` + `hist_counts`, the displayed `rows_axis` / `cols_axis` and `index`, the `tile` size,
 * the first tile (`window` + `window_data`), `labels` ({dim: names}) and `tokens` when the tensor
 * came from a language-model trace. Other tiles are asked for with
 * `{kind: "tiles", index, rows_axis, cols_axis, tiles: [[row, col], ...]}` and arrive as one buffer each.
 */

import { asDataView, Numbers, typed } from "./core/binary";
import { colourbar, histogram } from "./core/histogram";
import { scaleFor, Scale } from "./core/colour";
import { h } from "./core/dom";
import { formatExact, formatInt, formatNumber, tokenText } from "./core/format";
import { Heatmap } from "./core/heatmap";
import { isDark, onThemeChange } from "./core/theme";
import { DataSource } from "./source";

interface Stats {
  min: number; max: number; mean: number; std: number;
  nan: number; posinf: number; neginf: number; count: number;
}

interface Tokens {
  axes: number[];
  batch_axis: number | null;
  rows: string[][];
}

interface Window {
  index: number[];
  rows_axis: number;
  cols_axis: number;
  dtype: string;
  range: [number, number] | null;
}

function dims(shape: number[], rowsAxis: number, colsAxis: number): [number, number] {
  return [rowsAxis >= 0 ? shape[rowsAxis] : 1, colsAxis >= 0 ? shape[colsAxis] : 1];
}

export function renderTensorView(el: HTMLElement, source: DataSource): () => void {
  const shape = source.get<number[]>("shape");
  const dtype = source.get<string>("dtype");
  const name = source.get<string>("name");
  const stats = source.get<Stats | null>("stats");
  const tokens = source.get<Tokens | null>("tokens");
  const integer = source.get<boolean>("integer");
  const [tileRows, tileCols] = source.get<[number, number]>("tile");
  let rowsAxis = source.get<number>("rows_axis");
  let colsAxis = source.get<number>("cols_axis");
  const index = [...source.get<number[]>("index")];
  const root = h("div", { class: "nnsj-view nnsj-tensor", "data-view": "tensor" });
  el.append(root);

  const dark = () => isDark(root);
  // Colours follow the whole tensor's range (slices compare), the shown slice's range, or the
  // tensor's 1st-99th percentiles (a few huge outliers then take the end colours instead of
  // washing everything else out).
  let colourBy: "tensor" | "slice" | "percentiles" = "tensor";
  let sliceRange: [number, number] | null = source.get<Window | null>("window")?.range ?? null;
  const percentiles = source.get<[number, number] | null>("percentiles");
  const makeScale = (): Scale => {
    let range: [number, number] = [stats?.min ?? 0, stats?.max ?? 0];
    if (colourBy === "slice" && sliceRange) range = sliceRange;
    if (colourBy === "percentiles" && percentiles) range = percentiles;
    return scaleFor(range[0], range[1], dark());
  };
  let scale: Scale = makeScale();

  // ----- header -----
  const title = h("div", { class: "nnsj-title" },
    name ? h("b", { class: "nnsj-name", text: name }) : null,
    h("span", { class: "nnsj-shape", text: `Tensor[${shape.join(", ")}]` }),
    h("span", { class: "nnsj-tag", "data-field": "dtype", text: dtype }),
    h("span", { class: "nnsj-tag", "data-field": "device", text: source.get<string>("device") }));
  const statLine = h("div", { class: "nnsj-stats" });
  const note = source.get<string>("note");
  if (stats) {
    const stat = (key: string, label: string, value: string, warn = false) =>
      h("span", { class: warn ? "nnsj-stat nnsj-warn" : "nnsj-stat" },
        h("span", { class: "nnsj-stat-label", text: label }), " ",
        h("span", { "data-stat": key, text: value }));
    statLine.append(
      stat("min", "min", formatNumber(stats.min)),
      stat("max", "max", formatNumber(stats.max)),
      stat("mean", "mean", formatNumber(stats.mean)),
      stat("std", "std", formatNumber(stats.std)),
      stat("nan", "NaN", formatInt(stats.nan), stats.nan > 0),
      stat("inf", "±inf", formatInt(stats.posinf + stats.neginf), stats.posinf + stats.neginf > 0));
  }
  const headerRight = h("div", { class: "nnsj-header-right" });
  const header = h("div", { class: "nnsj-header" },
    h("div", { class: "nnsj-header-left" }, title, statLine,
      note ? h("div", { class: "nnsj-note", text: note }) : null),
    headerRight);
  root.append(header);

  const drawHistogram = () => {
    const hist = source.get<{ lo: number; hi: number; sampled: number | null; total: number } | null>("hist");
    const counts = source.get<DataView | null>("hist_counts");
    headerRight.replaceChildren();
    if (hist && counts) {
      const whole = scaleFor(stats?.min ?? 0, stats?.max ?? 0, dark());
      headerRight.append(histogram({ ...hist, counts: typed(asDataView(counts), "float64") }, whole));
    }
  };
  drawHistogram();

  if (shape.length === 0 || !stats || stats.count === 0) {
    if (shape.length === 0 && stats) {
      root.append(h("div", { class: "nnsj-scalar", "data-field": "value", text: formatExact(stats.mean, integer) }));
    }
    return () => root.remove();
  }

  // ----- controls: which dims are rows / columns, a slider for each other dim -----
  const controls = h("div", { class: "nnsj-controls" });
  const status = h("div", { class: "nnsj-status" });
  root.append(controls);

  const tokenRow = (batch: number): string[] | null => {
    if (!tokens) return null;
    return tokens.rows[Math.min(batch, tokens.rows.length - 1)] ?? null;
  };
  const batchFor = (row: number, col: number): number => {
    if (!tokens || tokens.batch_axis === null) return 0;
    if (tokens.batch_axis === rowsAxis) return row;
    if (tokens.batch_axis === colsAxis) return col;
    return index[tokens.batch_axis];
  };
  const labels = source.get<Record<string, string[]>>("labels") ?? {};
  const axisLabel = (axis: number) => (other: number): string | null => {
    if (axis < 0) return "";  // the one row of a 1-D tensor needs no label
    if (labels[String(axis)]) return labels[String(axis)][other] ?? "";
    if (axis < 0 || !tokens || !tokens.axes.includes(axis)) return null;
    if (tokens.batch_axis !== null && (tokens.batch_axis === rowsAxis || tokens.batch_axis === colsAxis)) return null;
    const row = tokenRow(tokens.batch_axis === null ? 0 : index[tokens.batch_axis]);
    return row ? `${other}: ${tokenText(row[other] ?? "")}` : null;
  };
  const position = (row: number, col: number): number[] => {
    const at = [...index];
    if (rowsAxis >= 0) at[rowsAxis] = row;
    if (colsAxis >= 0) at[colsAxis] = col;
    return at;
  };
  const describe = (row: number, col: number, value: number | undefined): string => {
    const at = position(row, col);
    let text = `${name || "x"}[${at.join(", ")}] = ${value === undefined ? "…" : formatExact(value, integer)}`;
    const named = at.map((i, axis) => labels[String(axis)]?.[i]).filter((t) => t !== undefined);
    if (named.length) text += `  (${named.join(", ")})`;
    if (tokens) {
      const batch = batchFor(row, col);
      const words = tokenRow(batch);
      const parts = tokens.axes.map((axis) => `${at[axis]}: "${tokenText(words?.[at[axis]] ?? "")}"`);
      if (parts.length && words) text += `  ${parts.join(" → ")}`;
    }
    return text;
  };

  let fetchStarted = 0;
  const fetchTiles = (tiles: [number, number][]): Promise<Numbers[]> => {
    const ask = { kind: "tiles", index: [...index], rows_axis: rowsAxis, cols_axis: colsAxis, tiles };
    return source.request(ask).then((reply) => {
      sliceRange = (reply.content.range as [number, number] | null) ?? null;
      if (colourBy === "slice") recolour();
      return reply.buffers.map((b) => typed(b, String(reply.content.dtype)));
    });
  };

  const [rows0, cols0] = dims(shape, rowsAxis, colsAxis);
  const heatmap = new Heatmap({
    rows: rows0, cols: cols0, tile: [tileRows, tileCols], fetch: fetchTiles,
    scale: () => scale, rowLabel: axisLabel(rowsAxis), colLabel: axisLabel(colsAxis), describe,
    onDrawn: () => {
      root.dataset.index = JSON.stringify(index);
      root.dataset.axes = `${rowsAxis},${colsAxis}`;
      if (fetchStarted) {
        root.dataset.sliceMs = (performance.now() - fetchStarted).toFixed(1);
        fetchStarted = 0;
      }
      status.classList.remove("nnsj-error");
      status.textContent = summaryText();
    },
    onError: (error) => {
      status.classList.add("nnsj-error");
      status.textContent = error.message;
    },
  });
  const summaryText = () => {
    const [r, c] = dims(shape, rowsAxis, colsAxis);
    const fixed = index.map((v, axis) => (axis === rowsAxis || axis === colsAxis ? ":" : String(v)));
    return `slice [${fixed.join(", ")}]: ${formatInt(r)} × ${formatInt(c)}`;
  };
  const first = source.get<Window>("window");
  const firstData = source.get<DataView | null>("window_data");
  if (first && firstData) heatmap.setTile(0, 0, typed(asDataView(firstData), first.dtype));

  const legend = h("div", { class: "nnsj-legend" }, colourbar(scale));
  root.append(heatmap.root, h("div", { class: "nnsj-footer" }, legend, status));

  const recolour = () => {
    scale = makeScale();
    legend.replaceChildren(colourbar(scale));
    drawHistogram();
    heatmap.schedule();
  };

  const reload = () => {
    const [rows, cols] = dims(shape, rowsAxis, colsAxis);
    fetchStarted = performance.now();
    heatmap.reset({ rows, cols, rowLabel: axisLabel(rowsAxis), colLabel: axisLabel(colsAxis) });
  };

  const buildControls = () => {
    controls.replaceChildren();
    if (shape.length >= 2) {
      const choose = (label: string, current: number, set: (axis: number) => void) => {
        const select = h("select", { class: "nnsj-axis", "aria-label": label, "data-role": label });
        shape.forEach((size, axis) => {
          const option = h("option", { value: axis, text: `dim ${axis} (${size})` });
          if (axis === current) option.selected = true;
          select.append(option);
        });
        select.addEventListener("change", () => set(Number(select.value)));
        return h("label", { class: "nnsj-control" }, label + " ", select);
      };
      controls.append(
        choose("rows", rowsAxis, (axis) => {
          if (axis === colsAxis) colsAxis = rowsAxis;
          rowsAxis = axis;
          buildControls();
          reload();
        }),
        choose("columns", colsAxis, (axis) => {
          if (axis === rowsAxis) rowsAxis = colsAxis;
          colsAxis = axis;
          buildControls();
          reload();
        }));
    }
    const colour = h("select", { class: "nnsj-colour-by", "aria-label": "colour range", "data-role": "colour" },
      h("option", { value: "tensor", text: "whole tensor" }), h("option", { value: "slice", text: "this slice" }),
      percentiles ? h("option", { value: "percentiles", text: "1st–99th percentile" }) : null);
    colour.value = colourBy;
    colour.addEventListener("change", () => {
      colourBy = colour.value as typeof colourBy;
      recolour();
    });
    controls.append(h("label", { class: "nnsj-control" }, "colours ", colour));
    shape.forEach((size, axis) => {
      if (axis === rowsAxis || axis === colsAxis) return;
      const slider = h("input", {
        type: "range", min: 0, max: size - 1, value: index[axis], class: "nnsj-slider",
        "data-axis": axis, "aria-label": `index along dim ${axis}`, disabled: size <= 1,
      });
      const number = h("input", {
        type: "number", min: 0, max: size - 1, value: index[axis], class: "nnsj-index", "data-axis": axis,
        "aria-label": `index along dim ${axis}`,
      });
      const set = (value: number) => {
        const v = Math.max(0, Math.min(size - 1, Math.round(value)));
        if (!Number.isFinite(v) || v === index[axis]) return;
        index[axis] = v;
        slider.value = number.value = String(v);
        reload();
      };
      slider.addEventListener("input", () => set(Number(slider.value)));
      number.addEventListener("change", () => set(Number(number.value)));
      number.addEventListener("keydown", (event) => {
        if (event.key === "Enter") set(Number(number.value));
      });
      const tokenName = tokens && tokens.axes.includes(axis) ? " (position)" : "";
      controls.append(h("label", { class: "nnsj-control" }, `dim ${axis}${tokenName} `, slider, " ", number,
        h("span", { class: "nnsj-muted", text: ` / ${size}` })));
    });
  };
  buildControls();

  const stopTheme = onThemeChange(root, recolour);
  return () => {
    stopTheme();
    heatmap.destroy();
    root.remove();
  };
}
