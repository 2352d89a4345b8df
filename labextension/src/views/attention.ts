/**
 * AttentionView: thumbnails of every head of one layer, and one head's pattern large with the
 * query tokens down and the key tokens across.
 *
 * Hovering a thumbnail shows that head large, clicking it locks it. In the large pattern,
 * hovering a cell names the query, the key and the probability; the token strip under it colours
 * every key by how much the hovered query attends to it, and clicking a query token locks it.
 *
 * State (from `nnsight_jupyter/widgets/attention.py`): `layers`, `tokens`, `n_heads`,
 * `prev_scores` / `first_scores` ([layer][head]), the shown `layer` (an index into `layers`) and
 * `head`, and `pattern`: that layer's `[head, query, key]` float32. Another layer is asked for
 * with `{kind: "layer", index}` and arrives as one buffer.
 */

import { asDataView, Numbers, typed } from "./core/binary";
import { Scale } from "./core/colour";
import { h } from "./core/dom";
import { formatExact, formatNumber, tokenText } from "./core/format";
import { colourbar } from "./core/histogram";
import { Heatmap } from "./core/heatmap";
import { isDark, onThemeChange } from "./core/theme";
import { ensureAnalysisStyles } from "./patching_heatmap";
import { DataSource } from "./source";

const show = (text: string) => JSON.stringify(tokenText(text)).slice(1, -1);

export function renderAttention(el: HTMLElement, source: DataSource): () => void {
  ensureAnalysisStyles(el.ownerDocument);
  const layers = source.get<number[]>("layers");
  const tokens = source.get<string[]>("tokens");
  const heads = source.get<number>("n_heads");
  const prev = source.get<number[][]>("prev_scores");
  const first = source.get<number[][]>("first_scores");
  const n = tokens.length;
  let layer = source.get<number>("layer");
  let locked = source.get<number>("head");
  let shown = locked;
  let query: number | null = null;
  let lockedQuery: number | null = null;
  const cache = new Map<number, Numbers>();
  cache.set(layer, typed(asDataView(source.get("pattern")), "float32"));
  const scale = () => new Scale("sequential", 0, 1, isDark(root));
  const values = () => cache.get(layer);
  const at = (head: number, q: number, k: number) => values()![(head * n + q) * n + k];

  const root = h("div", { class: "nnsj-view nnsj-attention", "data-view": "attention" });
  el.append(root);
  const layerSelect = h("select", { "data-role": "layer", "aria-label": "layer" },
    ...layers.map((l, i) => h("option", { value: i, text: `layer ${l}` })));
  layerSelect.value = String(layer);
  const status = h("div", { class: "nnsj-status" });
  const headTitle = h("div", { class: "nnsj-ph-where" });
  root.append(h("div", { class: "nnsj-header" },
    h("div", { class: "nnsj-header-left" },
      h("div", { class: "nnsj-title" }, h("b", { text: "attention" }),
        h("span", { class: "nnsj-tag", text: `${heads} heads × ${n} tokens` })),
      h("div", { class: "nnsj-controls" }, h("label", { class: "nnsj-control" }, "layer ", layerSelect)))));

  // ----- thumbnails -----
  const thumbs = h("div", { class: "nnsj-attn-thumbs" });
  const drawThumb = (canvas: HTMLCanvasElement, head: number) => {
    const data = values();
    if (!data) return;
    canvas.width = n;
    canvas.height = n;
    const image = new ImageData(n, n);
    const s = scale();
    for (let q = 0; q < n; q++) {
      for (let k = 0; k < n; k++) {
        const [r, g, b] = k > q ? [0, 0, 0].map(() => (isDark(root) ? 30 : 245)) as [number, number, number] : s.rgb(at(head, q, k));
        const o = (q * n + k) * 4;
        image.data[o] = r; image.data[o + 1] = g; image.data[o + 2] = b; image.data[o + 3] = 255;
      }
    }
    canvas.getContext("2d")!.putImageData(image, 0, 0);
  };
  const buildThumbs = () => {
    thumbs.replaceChildren(...Array.from({ length: heads }, (_, head) => {
      const canvas = h("canvas", {});
      drawThumb(canvas, head);
      const p = prev[layer][head];
      const f = first[layer][head];
      const box = h("div", {
        class: head === locked ? "nnsj-attn-thumb nnsj-selected" : "nnsj-attn-thumb",
        "data-head": head, "data-prev": p, "data-first": f, title: `head ${head}: click to keep it open`,
      }, canvas, h("div", { text: `head ${head}` }),
        h("div", { class: "nnsj-attn-score", text: `prev ${formatNumber(p, 2)} · first ${formatNumber(f, 2)}` }));
      box.addEventListener("mouseenter", () => showHead(head));
      box.addEventListener("mouseleave", () => showHead(locked));
      box.addEventListener("click", () => {
        locked = head;
        thumbs.querySelectorAll(".nnsj-attn-thumb").forEach((t) =>
          t.classList.toggle("nnsj-selected", Number((t as HTMLElement).dataset.head) === head));
        root.dataset.locked = String(head);
        showHead(head);
      });
      return box;
    }));
  };

  // ----- the large pattern -----
  const describe = (q: number, k: number, value: number | undefined) =>
    `head ${shown} · query ${q} "${show(tokens[q])}" → key ${k} "${show(tokens[k])}"\n` +
    (value === undefined ? "…" : k > q ? "masked (a token sees only the ones before it)" : `attention ${formatExact(value)}`);
  const slice = (): Numbers => {
    const data = values();
    return data ? data.subarray(shown * n * n, (shown + 1) * n * n) : new Float32Array(n * n);
  };
  const heatmap = new Heatmap({
    rows: n, cols: n, tile: [n, n],
    fetch: () => Promise.resolve([slice()]),
    scale, describe, maxHeight: 520,
    rowLabel: (q) => `${q} ${tokenText(tokens[q])}`, colLabel: (k) => `${k} ${tokenText(tokens[k])}`,
    onDrawn: () => {
      root.dataset.shown = String(shown);
      root.dataset.layer = String(layer);
    },
  });
  const strip = h("div", { class: "nnsj-attn-strip", "data-role": "tokens" });
  const drawStrip = () => {
    const q = query ?? lockedQuery;
    const s = scale();
    strip.replaceChildren(h("span", { class: "nnsj-muted", text: q === null ? "hover a token: " : `query ${q} attends to: ` }),
      ...tokens.map((t, k) => {
        const span = h("span", {
          class: k === q ? "nnsj-attn-token nnsj-selected" : "nnsj-attn-token", "data-pos": k,
          text: show(t) || "\u00a0",
        });
        if (q !== null && k <= q && values()) {
          const v = at(shown, q, k);
          const rgb = s.rgb(v);
          span.style.background = `rgb(${rgb.join(", ")})`;
          span.style.color = 0.2126 * rgb[0] + 0.7152 * rgb[1] + 0.0722 * rgb[2] > 140 ? "#111111" : "#ffffff";
          span.dataset.value = String(v);
        }
        span.addEventListener("mouseenter", () => { query = k; drawStrip(); });
        span.addEventListener("mouseleave", () => { query = null; drawStrip(); });
        span.addEventListener("click", () => { lockedQuery = lockedQuery === k ? null : k; drawStrip(); });
        return span;
      }));
    root.dataset.query = q === null ? "" : String(q);
  };
  heatmap.root.addEventListener("mousemove", () => {
    const row = heatmap.root.dataset.hoverRow;
    const next = row === undefined ? null : Number(row);
    if (next !== query) {
      query = next;
      drawStrip();
    }
  });
  heatmap.root.addEventListener("mouseleave", () => { query = null; drawStrip(); });
  heatmap.root.addEventListener("click", () => {
    const row = heatmap.root.dataset.hoverRow;
    if (row !== undefined) {
      lockedQuery = lockedQuery === Number(row) ? null : Number(row);
      drawStrip();
    }
  });

  const showHead = (head: number) => {
    shown = head;
    headTitle.textContent = `layer ${layers[layer]}, head ${head}: previous-token ${formatNumber(prev[layer][head], 3)}, ` +
      `first-token ${formatNumber(first[layer][head], 3)}`;
    heatmap.reset({}, new Map([["0,0", slice()]]));
    drawStrip();
  };
  const legend = h("div", { class: "nnsj-legend" }, colourbar(scale()));
  root.append(h("div", { class: "nnsj-attn-body" }, thumbs,
    h("div", { class: "nnsj-attn-main" }, headTitle, heatmap.root, strip, h("div", { class: "nnsj-footer" }, legend, status))));
  buildThumbs();
  showHead(locked);

  layerSelect.addEventListener("change", () => {
    const index = Number(layerSelect.value);
    const done = () => {
      layer = index;
      buildThumbs();
      showHead(locked);
    };
    if (cache.has(index)) return done();
    status.textContent = "loading…";
    source.request({ kind: "layer", index }).then((reply) => {
      cache.set(index, typed(reply.buffers[0], "float32"));
      status.textContent = "";
      done();
    }, (error: Error) => {
      status.classList.add("nnsj-error");
      status.textContent = error.message;
    });
  });

  const stopTheme = onThemeChange(root, () => {
    legend.replaceChildren(colourbar(scale()));
    buildThumbs();
    heatmap.schedule();
    drawStrip();
  });
  return () => {
    stopTheme();
    heatmap.destroy();
    root.remove();
  };
}
