/**
 * AttentionView: thumbnails of every head of one layer, and one head's pattern large with the
 * query tokens down and the key tokens across.
 *
 * Hovering a thumbnail shows that head large, clicking it locks it. In the large pattern,
 * hovering a cell names the query, the key and the probability; the token strip under it colours
 * every key by how much the hovered query attends to it, and clicking a query token locks it.
 * Cells the causal mask hides are hatched and read "masked".
 *
 * State (from `nnsight_jupyter/widgets/attention.py`): `layers`, `tokens`, `n_heads`, `mask`,
 * `prev_scores` / `first_scores` (float32 [layer, head]), the shown `layer` (an index into
 * `layers`) and `head`, `thumb_size` and `thumbs` (uint8 [head, size, size] of the shown layer,
 * 0..254 for probabilities, 255 masked), `tile` (the side of the large pattern's tiles) and
 * `preload` (float32 top-left tiles of the heads in `preload_heads`), and the first tokens of
 * `n_tokens`. Everything else is asked for: `{kind: "tiles", layer, head, tiles}`,
 * `{kind: "row", layer, head, query}`, `{kind: "layer", index}` (that layer's thumbnails) and
 * `{kind: "tokens", start}` (the next chunk of tokens, asked for one after another once the view
 * is drawn; labels read "…" until theirs arrive).
 */

import { asDataView, Numbers, typed } from "./core/binary";
import { Scale } from "./core/colour";
import { h } from "./core/dom";
import { formatExact, formatNumber, tokenExact, tokenText } from "./core/format";
import { colourbar } from "./core/histogram";
import { Heatmap } from "./core/heatmap";
import { isDark, onThemeChange } from "./core/theme";
import { ensureAnalysisStyles } from "./patching_heatmap";
import { DataSource } from "./source";

const MASKED = 255;
const MAX_TILES = 16;

export function renderAttention(el: HTMLElement, source: DataSource): () => void {
  ensureAnalysisStyles(el.ownerDocument);
  const layers = source.get<number[]>("layers");
  const firstTokens = source.get<string[]>("tokens");
  // Notebooks saved before `n_tokens` existed hold every token in `tokens`.
  const n = source.get<number | undefined>("n_tokens") || firstTokens.length;
  const tokens: (string | undefined)[] = Array.from({ length: n }, (_, i) => firstTokens[i]);
  const text = (i: number) => (tokens[i] === undefined ? "…" : tokenText(tokens[i]!));
  const exact = (i: number) => (tokens[i] === undefined ? "…" : tokenExact(tokens[i]!));
  const heads = source.get<number>("n_heads");
  const prev = typed(asDataView(source.get("prev_scores")), "float32");
  const first = typed(asDataView(source.get("first_scores")), "float32");
  const side = source.get<number>("thumb_size");
  const tileSide = source.get<number>("tile");
  const masked = (q: number, k: number) => k > q;  // the only mask the view is given: "causal"
  let layer = source.get<number>("layer");
  let locked = source.get<number>("head");
  let shown = locked;
  let query: number | null = null;
  let lockedQuery: number | null = null;
  const thumbCache = new Map<number, Numbers>([[layer, typed(asDataView(source.get("thumbs")), "uint8")]]);
  /** Tiles of the large pattern, by `layer/head/tileRow,tileCol`; rows of it by `layer/head/query`. */
  const tiles = new Map<string, Numbers>();
  const rows = new Map<string, Numbers>();
  {
    const preload = typed(asDataView(source.get("preload")), "float32");
    const t = Math.min(tileSide, n);
    source.get<number[]>("preload_heads").forEach((head, i) =>
      tiles.set(`${layer}/${head}/0,0`, preload.subarray(i * t * t, (i + 1) * t * t)));
  }
  const scale = () => new Scale("sequential", 0, 1, isDark(root));
  const score = (scores: Numbers, head: number) => scores[layer * heads + head];

  const root = h("div", { class: "nnsj-view nnsj-attention", "data-view": "attention" });
  el.append(root);
  const layerSelect = h("select", { "data-role": "layer", "aria-label": "layer" },
    ...layers.map((l, i) => h("option", { value: i, text: `layer ${l}` })));
  layerSelect.value = String(layer);
  const status = h("div", { class: "nnsj-status" });
  const fail = (error: Error) => {
    status.classList.add("nnsj-error");
    status.textContent = error.message;
  };
  const headTitle = h("div", { class: "nnsj-ph-where" });
  root.append(h("div", { class: "nnsj-header" },
    h("div", { class: "nnsj-header-left" },
      h("div", { class: "nnsj-title" }, h("b", { text: "attention" }),
        h("span", { class: "nnsj-tag", text: `${heads} heads × ${n} tokens` })),
      h("div", { class: "nnsj-controls" }, h("label", { class: "nnsj-control" }, "layer ", layerSelect)))));

  // ----- thumbnails -----
  const thumbs = h("div", { class: "nnsj-attn-thumbs" });
  const drawThumb = (canvas: HTMLCanvasElement, head: number) => {
    const data = thumbCache.get(layer);
    if (!data) return;
    canvas.width = side;
    canvas.height = side;
    const image = new ImageData(side, side);
    const s = scale();
    const blank = isDark(root) ? 30 : 245;
    for (let i = 0; i < side * side; i++) {
      const v = data[head * side * side + i];
      const [r, g, b] = v === MASKED ? [blank, blank, blank] : s.rgb(v / 254);
      image.data[i * 4] = r; image.data[i * 4 + 1] = g; image.data[i * 4 + 2] = b; image.data[i * 4 + 3] = 255;
    }
    canvas.getContext("2d")!.putImageData(image, 0, 0);
  };
  const buildThumbs = () => {
    thumbs.replaceChildren(...Array.from({ length: heads }, (_, head) => {
      const canvas = h("canvas", {});
      drawThumb(canvas, head);
      const p = score(prev, head);
      const f = score(first, head);
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

  // ----- the large pattern, in tiles asked for as they come into view -----
  const describe = (q: number, k: number, value: number | undefined) =>
    `head ${shown} · query ${q} ${exact(q)} → key ${k} ${exact(k)}\n` +
    (masked(q, k) ? "masked (a token sees only itself and the ones before it)"
      : value === undefined ? "…" : `attention ${formatExact(value)}`);
  const fetchTiles = (wanted: [number, number][]): Promise<Numbers[]> => {
    const at = { layer, head: shown };
    const key = ([r, c]: [number, number]) => `${at.layer}/${at.head}/${r},${c}`;
    // A tile right of the diagonal holds only keys after their queries: every cell is masked and
    // never drawn, so it is filled here instead of asked for.
    wanted.filter(([r, c]) => c > r && !tiles.has(key([r, c]))).forEach(([r, c]) => {
      const rows = Math.min(tileSide, n - r * tileSide), cols = Math.min(tileSide, n - c * tileSide);
      tiles.set(key([r, c]), new Float32Array(rows * cols));
    });
    const missing = wanted.filter((t) => !tiles.has(key(t)));
    const batches: [number, number][][] = [];
    for (let i = 0; i < missing.length; i += MAX_TILES) batches.push(missing.slice(i, i + MAX_TILES));
    return Promise.all(batches.map((batch) =>
      source.request({ kind: "tiles", layer: at.layer, head: at.head, tiles: batch }).then((reply) =>
        batch.forEach((t, i) => tiles.set(key(t), typed(reply.buffers[i], "float32"))))))
      .then(() => wanted.map((t) => tiles.get(key(t))!));
  };
  const known = () => {
    const map = new Map<string, Numbers>();
    const prefix = `${layer}/${shown}/`;
    tiles.forEach((values, key) => {
      if (key.startsWith(prefix)) map.set(key.slice(prefix.length), values);
    });
    return map;
  };
  const label = (i: number) => `${i} ${text(i)}`;
  const title = (i: number) => `${i} ${exact(i)}`;
  const heatmap = new Heatmap({
    rows: n, cols: n, tile: [tileSide, tileSide],
    fetch: fetchTiles, scale, describe, maxHeight: 520, masked,
    rowLabel: label, colLabel: label, rowTitle: title, colTitle: title,
    onDrawn: () => {
      root.dataset.shown = String(shown);
      root.dataset.layer = String(layer);
    },
    onError: fail,
  });

  // ----- the hovered (or locked) query's row, as a strip of key tokens -----
  const strip = h("div", { class: "nnsj-attn-strip", "data-role": "tokens" });
  /** The query's attention over every key: from the tiles when they are all here, else asked for. */
  const rowOf = (q: number): Numbers | Promise<Numbers> => {
    const key = `${layer}/${shown}/${q}`;
    const cached = rows.get(key);
    if (cached) return cached;
    const out = new Float32Array(n);
    let complete = true;
    for (let k = 0; k <= q && complete; k++) {
      const v = heatmap.value(q, k);
      if (v === undefined) complete = false;
      else out[k] = v;
    }
    if (complete) return out;
    return source.request({ kind: "row", layer, head: shown, query: q }).then((reply) => {
      const values = typed(reply.buffers[0], "float32");
      rows.set(key, values);
      return values;
    });
  };
  const drawStrip = () => {
    const q = query ?? lockedQuery;
    const at = `${layer}/${shown}/${q}`;
    const paint = (values: Numbers | null) => {
      if (`${layer}/${shown}/${query ?? lockedQuery}` !== at) return;  // the mouse moved on
      const s = scale();
      strip.replaceChildren(
        h("span", { class: "nnsj-muted", text: q === null ? "hover a token: " : `query ${q} attends to: ` }),
        ...tokens.map((_, k) => {
          const span = h("span", {
            class: k === q ? "nnsj-attn-token nnsj-selected" : "nnsj-attn-token", "data-pos": k,
            text: text(k) || "\u00a0", title: `${k} ${exact(k)}`,
          });
          if (q !== null && values && !masked(q, k)) {
            const v = values[k];
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
    if (q === null) return paint(null);
    const values = rowOf(q);
    if (values instanceof Promise) values.then(paint, fail);
    else paint(values);
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
    headTitle.textContent = `layer ${layers[layer]}, head ${head}: ` +
      `previous-token ${formatNumber(score(prev, head), 3)}, ` +
      `first-token ${formatNumber(score(first, head), 3)}`;
    heatmap.reset({}, known());
    drawStrip();
  };
  const legend = h("div", { class: "nnsj-legend" }, colourbar(scale()));
  root.append(h("div", { class: "nnsj-attn-body" }, thumbs,
    h("div", { class: "nnsj-attn-main" }, headTitle, heatmap.root, strip,
      h("div", { class: "nnsj-footer" }, legend, status))));
  buildThumbs();
  showHead(locked);

  // ----- the rest of the tokens, a chunk at a time -----
  let closed = false;
  const tokensLoaded = (count: number) => (root.dataset.tokens = count >= n ? "all" : String(count));
  const loadTokens = (start: number): void => {
    tokensLoaded(start);
    if (start >= n || closed) return;
    source.request({ kind: "tokens", start }).then((reply) => {
      const chunk = (reply.content as { tokens: string[] }).tokens;
      if (closed) return;
      if (!chunk.length) return fail(new Error(`the kernel sent no tokens from ${start}`));
      chunk.forEach((t, i) => (tokens[start + i] = t));
      const next = start + chunk.length;
      if (next >= n) heatmap.reset({}, known());  // the labels' width, from every label
      else heatmap.schedule();
      drawStrip();
      loadTokens(next);
    }, fail);
  };
  loadTokens(firstTokens.length);

  layerSelect.addEventListener("change", () => {
    const index = Number(layerSelect.value);
    const done = () => {
      layer = index;
      buildThumbs();
      showHead(locked);
    };
    if (thumbCache.has(index)) return done();
    status.textContent = "loading…";
    source.request({ kind: "layer", index }).then((reply) => {
      thumbCache.set(index, typed(reply.buffers[0], "uint8"));
      status.textContent = "";
      done();
    }, fail);
  });

  const stopTheme = onThemeChange(root, () => {
    legend.replaceChildren(colourbar(scale()));
    buildThumbs();
    heatmap.schedule();
    drawStrip();
  });
  return () => {
    closed = true;
    stopTheme();
    heatmap.destroy();
    root.remove();
  };
}
