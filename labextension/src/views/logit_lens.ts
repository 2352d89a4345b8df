/**
 * LogitLens: a table of layers x positions per prompt, each cell the layer's top next token
 * coloured by its probability; hover lists the top-k. With a target token, "target probability"
 * and "target rank" colour every cell by where that token stands. Two prompts sit side by side
 * on the same colour scale.
 *
 * State (from `nnsight_jupyter/widgets/logit_lens.py`): `panels` (per prompt: `title`, `layers`,
 * `tokens`, `k`, `top_ids` int32 and `top_probs` float32 `[layer, position, k]`, and `target`,
 * `target_probs`, `target_ranks` `[layer, position]` when a target was given), `vocab` (text of
 * every id named) and the starting `mode`. A cell is a `<td>` with `data-layer` and `data-pos`.
 */

import { asDataView, Numbers, typed } from "./core/binary";
import { Scale } from "./core/colour";
import { h } from "./core/dom";
import { barColours, exportButtons, GridPicture } from "./core/export";
import { formatInt, formatNumber, tokenExact, tokenText } from "./core/format";
import { colourbar } from "./core/histogram";
import { isDark, onThemeChange } from "./core/theme";
import { ensureAnalysisStyles } from "./patching_heatmap";
import { DataSource } from "./source";

interface Panel {
  title: string;
  layers: number[];
  tokens: string[];
  k: number;
  top_ids: DataView;
  top_probs: DataView;
  target: string | null;
  target_probs: DataView | null;
  target_ranks: DataView | null;
}

interface Data {
  panel: Panel;
  ids: Numbers;
  probs: Numbers;
  targetProbs: Numbers | null;
  targetRanks: Numbers | null;
}

type Mode = "top" | "target_prob" | "target_rank";

const show = (text: string) => JSON.stringify(tokenText(text)).slice(1, -1);

/** Black or white text, whichever reads better on `rgb`. */
function ink([r, g, b]: [number, number, number]): string {
  return 0.2126 * r + 0.7152 * g + 0.0722 * b > 140 ? "#111111" : "#ffffff";
}

export function renderLogitLens(el: HTMLElement, source: DataSource): () => void {
  ensureAnalysisStyles(el.ownerDocument);
  const vocab = source.get<Record<string, string>>("vocab");
  const data: Data[] = source.get<Panel[]>("panels").map((panel) => ({
    panel,
    ids: typed(asDataView(panel.top_ids), "int32"),
    probs: typed(asDataView(panel.top_probs), "float32"),
    targetProbs: panel.target_probs ? typed(asDataView(panel.target_probs), "float32") : null,
    targetRanks: panel.target_ranks ? typed(asDataView(panel.target_ranks), "int32") : null,
  }));
  const target = data[0].panel.target;
  let mode: Mode = (source.get<string>("mode") as Mode) ?? "top";
  if (!target) mode = "top";
  const word = (id: number) => vocab[String(id)] ?? String(id);
  // Ranks are coloured on a log scale, from rank 1 (brightest) to the worst rank shown.
  let worstRank = 1;
  data.forEach((d) => d.targetRanks?.forEach((r) => (worstRank = Math.max(worstRank, r))));

  const root = h("div", { class: "nnsj-view nnsj-lens", "data-view": "logit_lens" });
  el.append(root);
  const tip = h("div", { class: "nnsj-lens-tip", role: "tooltip" });
  const pair = h("div", { class: "nnsj-lens-pair" });
  const legend = h("div", { class: "nnsj-legend" });
  const modeSelect = h("select", { "data-role": "mode", "aria-label": "colour by" },
    h("option", { value: "top", text: "top token (its probability)" }),
    target ? h("option", { value: "target_prob", text: `probability of ${show(target)}` }) : null,
    target ? h("option", { value: "target_rank", text: `rank of ${show(target)}` }) : null);
  modeSelect.value = mode;
  const status = h("div", { class: "nnsj-status" });
  const buttons = exportButtons(() => `logit_lens_${mode}`, () => picture(0), (error) => {
    status.classList.add("nnsj-error");
    status.textContent = error.message;
  });
  root.append(h("div", { class: "nnsj-header" },
    h("div", { class: "nnsj-header-left" },
      h("div", { class: "nnsj-title" }, h("b", { text: "logit lens" }),
        h("span", { class: "nnsj-tag", text: `top ${data[0].panel.k}` })),
      h("div", { class: "nnsj-controls" }, h("label", { class: "nnsj-control" }, "colour by ", modeSelect))),
    h("div", { class: "nnsj-header-right" }, buttons)),
    pair, h("div", { class: "nnsj-footer" }, legend, status), tip);

  const scale = () => new Scale("sequential", 0, 1, isDark(root));
  /** The cell's number on the 0..1 colour scale, and its text. */
  const cell = (d: Data, l: number, p: number): { t: number; text: string } => {
    const n = d.panel.tokens.length;
    const at = l * n + p;
    if (mode === "target_prob" && d.targetProbs) {
      return { t: d.targetProbs[at], text: formatNumber(d.targetProbs[at], 2) };
    }
    if (mode === "target_rank" && d.targetRanks) {
      const rank = d.targetRanks[at];
      const t = worstRank > 1 ? 1 - Math.log(rank) / Math.log(worstRank) : 1;
      return { t, text: formatInt(rank) };
    }
    const k = d.panel.k;
    return { t: d.probs[at * k], text: show(word(d.ids[at * k])) };
  };
  const describe = (d: Data, l: number, p: number): string => {
    const n = d.panel.tokens.length;
    const k = d.panel.k;
    const at = l * n + p;
    const lines = [`layer ${d.panel.layers[l]} · position ${p} "${show(d.panel.tokens[p])}"`];
    for (let i = 0; i < k; i++) {
      lines.push(`${String(i + 1).padStart(2)}. "${show(word(d.ids[at * k + i]))}"  ` +
        `${formatNumber(d.probs[at * k + i], 4)}`);
    }
    if (target && d.targetProbs && d.targetRanks) {
      lines.push(`"${show(target)}": probability ${formatNumber(d.targetProbs[at], 4)}, ` +
        `rank ${formatInt(d.targetRanks[at])}`);
    }
    return lines.join("\n");
  };

  const draw = () => {
    const s = scale();
    root.dataset.mode = mode;
    pair.replaceChildren(...data.map((d, index) => {
      const n = d.panel.tokens.length;
      const head = h("tr", {}, h("th", { text: "layer" }),
        ...d.panel.tokens.map((t, p) =>
          h("th", { "data-pos": p, title: `${p} ${tokenExact(t)}` }, h("span", { text: `${p} ${show(t)}` }))));
      const body = d.panel.layers.map((layer, l) => h("tr", {}, h("th", { text: String(layer) }),
        ...Array.from({ length: n }, (_, p) => {
          const { t, text } = cell(d, l, p);
          const rgb = s.rgb(t);
          const td = h("td", { "data-layer": l, "data-pos": p, text });
          td.style.background = `rgb(${rgb.join(", ")})`;
          td.style.color = ink(rgb);
          return td;
        })));
      const table = h("table", { class: "nnsj-lens-grid", "data-panel": index },
        h("thead", {}, head), h("tbody", {}, ...body));
      table.addEventListener("mousemove", (event) => {
        const td = (event.target as HTMLElement).closest("td");
        if (!td) {
          tip.style.display = "none";
          return;
        }
        const l = Number(td.dataset.layer);
        const p = Number(td.dataset.pos);
        tip.textContent = describe(d, l, p);
        tip.style.display = "block";
        tip.dataset.panel = String(index);
        tip.dataset.layer = String(l);
        tip.dataset.pos = String(p);
        const x = Math.min(event.clientX + 14, window.innerWidth - tip.offsetWidth - 4);
        tip.style.left = `${x}px`;
        tip.style.top = `${event.clientY + 18}px`;
      });
      table.addEventListener("mouseleave", () => (tip.style.display = "none"));
      return h("div", { class: "nnsj-lens-panel" },
        data.length > 1 ? h("div", { class: "nnsj-ph-where", text: d.panel.title }) : null, table);
    }));
    const bar = colourbar(s);
    if (mode === "target_rank") {
      bar.querySelector(".nnsj-colourbar-ticks")!.replaceChildren(
        h("span", { text: `rank ${formatInt(worstRank)}` }), h("span", { text: "rank 1" }));
    }
    legend.replaceChildren(bar);
  };
  draw();
  modeSelect.addEventListener("change", () => {
    mode = modeSelect.value as Mode;
    draw();
  });

  const picture = (index: number): GridPicture => {
    const d = data[index];
    const s = new Scale("sequential", 0, 1, false);
    return {
      title: `logit lens: ${mode === "top" ? "top token"
        : mode === "target_prob" ? `P(${show(target ?? "")})` : `rank of ${show(target ?? "")}`}`,
      rows: d.panel.layers.map((l) => `layer ${l}`),
      cols: d.panel.tokens.map((t, p) => `${p} ${show(t)}`),
      fill: (l, p) => s.css(cell(d, l, p).t),
      value: (l, p) => cell(d, l, p).t,
      text: (l, p) => cell(d, l, p).text,
      bar: { colours: barColours((t) => s.css(t)), ticks: [[0, "0"], [1, "1"]] },
    };
  };

  const stopTheme = onThemeChange(root, draw);
  return () => {
    stopTheme();
    root.remove();
  };
}
