/**
 * PatchingHeatmap: a patching sweep's metric per cell (layers down, positions or heads across),
 * on a diverging scale centred on the corrupted baseline, so white is "no change" and the clean
 * baseline's colour is "fully restored".
 *
 * State (from `nnsight_jupyter/widgets/patching_heatmap.py`): `dims`, `shape`, `labels`
 * ({dim: text per index}), `position_tokens` ([position, clean token, corrupted token] per
 * position, exactly: labels draw whitespace tokens as symbols, titles and hover quote them), `site`,
 * `metric`, both baselines and their top tokens, `values` (float32 per cell, row-major) and
 * `computed` (a byte per cell), `done`, `running`, `interrupted`. A running sweep replaces
 * `values` / `computed` as chunks finish. Clicking a cell asks `{kind: "top", index}` for that
 * patched run's top tokens.
 *
 * Cells not computed yet are drawn in the heatmap's "missing" colour: each cell is its own tile,
 * and a tile of a cell still to come is never delivered.
 */

import { asDataView, Numbers, typed } from "./core/binary";
import { Scale } from "./core/colour";
import { h } from "./core/dom";
import { barColours, exportButtons, GridPicture } from "./core/export";
import { formatExact, formatNumber, tokenExact, tokenText } from "./core/format";
import { Heatmap } from "./core/heatmap";
import { isDark, onThemeChange } from "./core/theme";
import css from "./analysis.css";
import { DataSource } from "./source";

const STYLE_ID = "nnsight-jupyter-analysis-css";

/** The analysis views' own stylesheet, put into the page once. */
export function ensureAnalysisStyles(doc: Document): void {
  const existing = doc.getElementById(STYLE_ID);
  if (existing) {
    if (existing.textContent !== css) existing.textContent = css;
    return;
  }
  const style = doc.createElement("style");
  style.id = STYLE_ID;
  style.textContent = css;
  doc.head.append(style);
}

type Tokens = [string, number][];

/** A token and its probability as a small row. */
export function tokenRows(tokens: Tokens, role: string): HTMLElement {
  return h("ol", { class: "nnsj-tokens", "data-role": role },
    ...tokens.map(([text, p]) => h("li", { "data-token": text, "data-prob": p },
      h("code", { text: JSON.stringify(tokenText(text)).slice(1, -1) || "\u00a0" }),
      h("span", { class: "nnsj-muted", text: formatNumber(p, 3) }))));
}

export function renderPatchingHeatmap(el: HTMLElement, source: DataSource): () => void {
  ensureAnalysisStyles(el.ownerDocument);
  const dims = source.get<string[]>("dims");
  const shape = source.get<number[]>("shape");
  const labels = source.get<Record<string, string[]>>("labels");
  const positionTokens = source.get<[number, string, string][] | undefined>("position_tokens") ?? [];
  const site = source.get<string>("site");
  const clean = source.get<number>("clean_baseline");
  const corrupted = source.get<number>("corrupted_baseline");
  const baselineTop = source.get<{ clean: Tokens; corrupted: Tokens }>("baseline_top");
  const rows = shape[0];
  const cols = shape.length >= 2 ? shape[1] : 1;
  const depth = shape.length >= 3 ? shape[2] : 1;
  let slab = 0;  // index along the third axis
  let values: Numbers = new Float32Array(0);
  let computed: Numbers = new Uint8Array(0);
  const read = () => {
    values = typed(asDataView(source.get("values")), "float32");
    computed = typed(asDataView(source.get("computed")), "uint8");
  };
  read();
  const flat = (r: number, c: number) => (r * cols + c) * depth + slab;

  const root = h("div", { class: "nnsj-view nnsj-patching", "data-view": "patching_heatmap" });
  el.append(root);
  const metricEl = h("span", { class: "nnsj-name", "data-field": "metric" });
  const summary = h("div", { class: "nnsj-stats" },
    h("span", { class: "nnsj-stat" }, h("span", { class: "nnsj-stat-label", text: "clean " }),
      h("span", { "data-field": "clean", text: formatExact(clean) })),
    h("span", { class: "nnsj-stat" }, h("span", { class: "nnsj-stat-label", text: "corrupted " }),
      h("span", { "data-field": "corrupted", text: formatExact(corrupted) })));
  const progress = h("span", { class: "nnsj-stat", "data-field": "progress" });
  summary.append(progress);
  const status = h("div", { class: "nnsj-status" });
  const buttons = exportButtons(() => `patching_${site}_${dims.join("_")}`, () => picture(), (error) => {
    status.classList.add("nnsj-error");
    status.textContent = error.message;
  });
  root.append(h("div", { class: "nnsj-header" },
    h("div", { class: "nnsj-header-left" },
      h("div", { class: "nnsj-title" }, h("b", { text: `${site} patching` }), metricEl,
        h("span", { class: "nnsj-tag", text: `${dims.join(" × ")}` })),
      summary),
    h("div", { class: "nnsj-header-right" }, buttons)));

  // ----- colours: diverging around the corrupted baseline, reaching the clean one or the largest change -----
  const makeScale = (): Scale => {
    let limit = Math.abs(clean - corrupted);
    for (let i = 0; i < values.length; i++) {
      if (computed[i] && Number.isFinite(values[i])) limit = Math.max(limit, Math.abs(values[i] - corrupted));
    }
    if (!(limit > 0) || !Number.isFinite(limit)) limit = 1;
    return new Scale("diverging", corrupted - limit, corrupted + limit, isDark(root));
  };
  let scale = makeScale();

  /** A position's tokens, each through `show` (symbols for the label, quoted for titles), once if they agree. */
  const position = (i: number, show: (token: string) => string): string | undefined => {
    const entry = positionTokens[i];
    if (!entry) return undefined;
    const [p, a, b] = entry;
    return a === b ? `${p} ${show(a)}` : `${p} ${show(a)} / ${show(b)}`;
  };
  const label = (dim: string | undefined, i: number): string => {
    if (!dim) return "all positions";
    return (dim === "position" ? position(i, tokenText) : undefined) ?? labels[dim]?.[i] ?? String(i);
  };
  const title = (dim: string | undefined, i: number): string =>
    (dim === "position" ? position(i, tokenExact) : undefined) ?? label(dim, i);
  const where = (r: number, c: number) => {
    const parts = [title(dims[0], r)];
    if (dims[1]) parts.push(dims[1] === "position" ? `position ${title(dims[1], c)}` : label(dims[1], c));
    if (dims[2]) parts.push(label(dims[2], slab));
    return parts.join(", ");
  };
  const describe = (r: number, c: number, value: number | undefined): string => {
    if (value === undefined) return `${where(r, c)}\nnot computed yet`;
    const span = clean - corrupted;
    const share = span !== 0 ? `  (${formatNumber(((value - corrupted) / span) * 100, 3)}% of the way to clean)` : "";
    return `${where(r, c)}\n${metricEl.textContent || "metric"} = ${formatExact(value)}${share}\n` +
      `clean ${formatExact(clean)} · corrupted ${formatExact(corrupted)}`;
  };
  const tileMap = () => {
    const map = new Map<string, Numbers>();
    for (let r = 0; r < rows; r++) {
      for (let c = 0; c < cols; c++) {
        if (computed[flat(r, c)]) map.set(`${r},${c}`, new Float32Array([values[flat(r, c)]]));
      }
    }
    return map;
  };
  const heatmap = new Heatmap({
    rows, cols, tile: [1, 1],
    fetch: () => new Promise<Numbers[]>(() => undefined),  // a cell still to come arrives with the next state
    scale: () => scale,
    rowLabel: (i) => label(dims[0], i), colLabel: (i) => label(dims[1], i),
    rowTitle: (i) => title(dims[0], i), colTitle: (i) => title(dims[1], i), describe,
    onDrawn: () => {
      root.dataset.drawn = String(Number(root.dataset.drawn ?? 0) + 1);
    },
  });
  heatmap.reset({}, tileMap());

  // ----- colour bar with both baselines marked -----
  const legend = h("div", { class: "nnsj-legend nnsj-ph-legend" });
  const drawLegend = () => {
    const bar = h("div", { class: "nnsj-colourbar-bar" });
    bar.style.background = scale.gradient();
    const at = (v: number) => `${((v - scale.lo) / (scale.hi - scale.lo)) * 100}%`;
    const mark = (v: number, name: string) => {
      const m = h("span", { class: "nnsj-ph-mark", "data-mark": name, title: `${name} ${formatExact(v)}` });
      m.style.left = at(v);
      return m;
    };
    legend.replaceChildren(h("div",
      { class: "nnsj-colourbar", "data-lo": scale.lo, "data-hi": scale.hi, "data-kind": scale.kind },
      h("div", { class: "nnsj-ph-bar" }, bar, mark(corrupted, "corrupted"), mark(clean, "clean")),
      h("div", { class: "nnsj-colourbar-ticks" }, h("span", { text: formatNumber(scale.lo) }),
        h("span", { text: `${formatNumber(corrupted)} corrupted` }), h("span", { text: formatNumber(scale.hi) }))));
  };
  drawLegend();

  // ----- a third axis (heads of a layer x position x head sweep) -----
  const controls = h("div", { class: "nnsj-controls" });
  if (depth > 1) {
    const slider = h("input", { type: "range", min: 0, max: depth - 1, value: 0, class: "nnsj-slider", "data-axis": 2,
      "aria-label": dims[2] });
    const shown = h("span", { class: "nnsj-muted", text: label(dims[2], 0) });
    slider.addEventListener("input", () => {
      slab = Number(slider.value);
      shown.textContent = label(dims[2], slab);
      heatmap.reset({ describe }, tileMap());
    });
    controls.append(h("label", { class: "nnsj-control" }, `${dims[2]} `, slider, " ", shown));
  }

  // ----- details of a clicked cell -----
  const details = h("div", { class: "nnsj-ph-details" },
    h("div", { class: "nnsj-ph-col" }, h("div", { class: "nnsj-muted", text: "clean run" }),
      tokenRows(baselineTop.clean, "clean")),
    h("div", { class: "nnsj-ph-col" }, h("div", { class: "nnsj-muted", text: "corrupted run" }),
      tokenRows(baselineTop.corrupted, "corrupted")));
  const chosen = h("div", { class: "nnsj-ph-col nnsj-ph-chosen", "data-role": "chosen" },
    h("div", { class: "nnsj-muted", text: "click a cell for its patched run's top tokens" }));
  details.prepend(chosen);
  let asked = 0;
  heatmap.root.addEventListener("click", () => {
    const d = heatmap.root.dataset;
    if (d.hoverRow === undefined || d.hoverCol === undefined) return;
    const r = Number(d.hoverRow);
    const c = Number(d.hoverCol);
    const index = shape.length === 1 ? [r] : shape.length === 2 ? [r, c] : [r, c, slab];
    const ticket = ++asked;
    chosen.dataset.index = "";
    source.request({ kind: "top", index }).then((reply) => {
      if (ticket !== asked) return;
      const content = reply.content as { computed: boolean; value?: number; tokens: Tokens };
      chosen.replaceChildren(h("div", { class: "nnsj-ph-where", text: where(r, c) }),
        content.computed
          ? h("div", {}, h("span", { class: "nnsj-muted", text: "patched: " }),
              h("span", { "data-field": "value", text: formatExact(content.value ?? NaN) }))
          : h("div", { class: "nnsj-muted", text: "not computed yet" }),
        tokenRows(content.tokens, "patched"));
      chosen.dataset.index = JSON.stringify(index);
    }, (error: Error) => {
      status.classList.add("nnsj-error");
      status.textContent = error.message;
    });
  });

  const progressText = () => {
    const total = rows * cols * depth;
    const done = source.get<number>("done");
    const running = source.get<boolean>("running");
    progress.textContent = `${done} / ${total} cells` + (running ? " · running…" : "") +
      (source.get<boolean>("interrupted") ? " · interrupted" : "");
    root.dataset.done = String(done);
    root.dataset.running = String(running);
    metricEl.textContent = source.get<string>("metric");
  };
  progressText();
  root.append(controls, heatmap.root, h("div", { class: "nnsj-footer" }, legend, status), details);

  const picture = (): GridPicture => ({
    title: `${site} patching: ${metricEl.textContent} ` +
      `(clean ${formatNumber(clean)}, corrupted ${formatNumber(corrupted)})`,
    rows: Array.from({ length: rows }, (_, r) => label(dims[0], r)),
    cols: Array.from({ length: cols }, (_, c) => label(dims[1], c)),
    fill: (r, c) =>
      (computed[flat(r, c)] ? new Scale("diverging", scale.lo, scale.hi, false).css(values[flat(r, c)]) : null),
    value: (r, c) => (computed[flat(r, c)] ? values[flat(r, c)] : NaN),
    bar: {
      colours: barColours((t) => new Scale("diverging", 0, 1, false).css(t)),
      ticks: [[0, formatNumber(scale.lo)], [0.5, formatNumber(corrupted)], [1, formatNumber(scale.hi)]],
    },
  });

  const refresh = () => {
    read();
    scale = makeScale();
    drawLegend();
    progressText();
    heatmap.reset({}, tileMap());
  };
  const stops = [
    source.on("values", refresh),
    source.on("computed", refresh),
    source.on("done", progressText),
    source.on("running", progressText),
    source.on("metric", progressText),
  ];
  const stopTheme = onThemeChange(root, () => {
    scale = makeScale();
    drawLegend();
    heatmap.schedule();
  });
  return () => {
    stops.forEach((stop) => stop());
    stopTheme();
    heatmap.destroy();
    root.remove();
  };
}
