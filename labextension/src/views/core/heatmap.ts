/**
 * A canvas heatmap over a grid of any size, drawn from tiles fetched on demand.
 *
 * The grid (rows x cols) scrolls natively; only the visible cells are drawn, one canvas pixel per
 * cell scaled up without smoothing, so a 4096 x 4096 slice costs what its visible part costs.
 * Values arrive in fixed-size tiles through `fetch` (a kernel request for a tensor slice, or a
 * lookup into local data for small grids); tiles already present are drawn at once, others as
 * they arrive. Row and column labels are DOM elements for the visible range (tokens, indices),
 * which keeps them crisp, selectable and readable by tests and screen readers.
 *
 * The root element carries its geometry and progress as data attributes (`data-rows`,
 * `data-cell-width`, `data-drawn`, ...): the browser tests use them to find a cell on screen.
 */

import { Numbers } from "./binary";
import { Scale } from "./colour";
import { h, perFrame } from "./dom";
import { cssVar } from "./theme";

export interface HeatmapOptions {
  rows: number;
  cols: number;
  /** Rows and columns per tile. */
  tile: [number, number];
  /**
   * Values of the given tiles ([tileRow, tileCol] each), row-major and clipped at the grid's edge,
   * in the same order. All tiles missing from one draw are asked for at once: one round trip to a
   * kernel instead of one per tile.
   */
  fetch(tiles: [number, number][]): Promise<Numbers[]>;
  scale(): Scale;
  /** Label of a row or column, or null for a plain index tick. */
  rowLabel?(row: number): string | null;
  colLabel?(col: number): string | null;
  /** The label's title (hover text), when it should say more than the label: the exact token. */
  rowTitle?(row: number): string;
  colTitle?(col: number): string;
  /**
   * Cells with no value to show (attention a causal mask forbids): drawn hatched over the page's
   * background, never in the scale's colours, so a masked cell does not pass for a value of 0.
   */
  masked?(row: number, col: number): boolean;
  /** Tooltip text for a cell (value is undefined while its tile is loading). */
  describe(row: number, col: number, value: number | undefined): string;
  /** Largest height of the scrolling area in CSS pixels. */
  maxHeight?: number;
  /** Called after every draw in which all visible tiles were present. */
  onDrawn?(): void;
  onError?(error: Error): void;
}

const MIN_CELL = 3;
const MAX_CELL = 48;
const LABEL_CHARS = 16;

function nice(step: number): number {
  const p = 10 ** Math.floor(Math.log10(step));
  for (const m of [1, 2, 5, 10]) if (m * p >= step) return m * p;
  return 10 * p;
}

function short(text: string): string {
  return text.length > LABEL_CHARS ? text.slice(0, LABEL_CHARS - 1) + "…" : text;
}

export class Heatmap {
  readonly root: HTMLDivElement;
  private scroll: HTMLDivElement;
  private stage: HTMLDivElement;
  private spacer: HTMLDivElement;
  private canvas: HTMLCanvasElement;
  private rowBox: HTMLDivElement;
  private colBox: HTMLDivElement;
  private cursor: HTMLDivElement;
  private tooltip: HTMLDivElement;
  private tiles = new Map<string, Numbers>();
  private pending = new Set<string>();
  private generation = 0;
  private cw = 8;
  private ch = 8;
  private labelW = 0;
  private headerH = 0;
  private resize: ResizeObserver;
  private visible: IntersectionObserver;
  private hover: { row: number; col: number } | null = null;
  private retryDelay = 0;
  private retryTimer: ReturnType<typeof setTimeout> | undefined;
  readonly schedule: () => void;

  constructor(private options: HeatmapOptions) {
    this.canvas = h("canvas", { class: "nnsj-hm-canvas" });
    this.rowBox = h("div", { class: "nnsj-hm-rows" });
    this.colBox = h("div", { class: "nnsj-hm-cols" });
    this.cursor = h("div", { class: "nnsj-hm-cursor" });
    this.tooltip = h("div", { class: "nnsj-hm-tooltip", role: "tooltip" });
    this.stage = h("div", { class: "nnsj-hm-stage" }, this.canvas, this.rowBox, this.colBox, this.cursor);
    this.spacer = h("div", { class: "nnsj-hm-spacer" });
    this.scroll = h("div", { class: "nnsj-hm-scroll", tabindex: 0 }, this.stage, this.spacer);
    // The tooltip belongs to the root, not the clipped scrolling area, so a narrow heatmap's
    // read-out is not cut off.
    this.root = h("div", { class: "nnsj-heatmap" }, this.scroll, this.tooltip);
    this.schedule = perFrame(() => this.draw());
    this.scroll.addEventListener("scroll", this.schedule, { passive: true });
    this.stage.addEventListener("mousemove", (e) => this.onMove(e));
    this.stage.addEventListener("mouseleave", () => this.setHover(null));
    this.resize = new ResizeObserver(() => this.layout());
    this.resize.observe(this.root);
    // A notebook skips the layout of cells out of view, so a draw asked for then finds no size;
    // draw again when the heatmap comes into view.
    this.visible = new IntersectionObserver((entries) => {
      if (entries.some((e) => e.isIntersecting)) this.schedule();
    });
    this.visible.observe(this.root);
    this.layout();
  }

  /** New data for the same kind of grid (another slice): drops the tiles and refetches. */
  reset(changes: Partial<HeatmapOptions>, tiles?: Map<string, Numbers>): void {
    this.options = { ...this.options, ...changes };
    this.generation++;
    this.tiles = tiles ?? new Map();
    this.pending.clear();
    this.root.dataset.drawn = "";
    this.layout();
  }

  /** Put a tile that arrived by other means (the first tile in a view's state). */
  setTile(tileRow: number, tileCol: number, values: Numbers): void {
    this.tiles.set(`${tileRow},${tileCol}`, values);
    this.schedule();
  }

  value(row: number, col: number): number | undefined {
    const [tr, tc] = this.options.tile;
    const tile = this.tiles.get(`${Math.floor(row / tr)},${Math.floor(col / tc)}`);
    if (!tile) return undefined;
    const c0 = Math.floor(col / tc) * tc;
    const width = Math.min(tc, this.options.cols - c0);
    return tile[(row % tr) * width + (col - c0)];
  }

  destroy(): void {
    this.resize.disconnect();
    this.visible.disconnect();
    clearTimeout(this.retryTimer);
    this.generation++;
    this.root.remove();
  }

  private layout(): void {
    const { rows, cols } = this.options;
    const rowText = this.options.rowLabel && rows > 0 && this.options.rowLabel(0) !== null;
    const colText = this.options.colLabel && cols > 0 && this.options.colLabel(0) !== null;
    let longest = String(Math.max(rows - 1, 0)).length;
    if (rowText) {
      for (let r = 0; r < Math.min(rows, 4096); r++) {
        longest = Math.max(longest, short(this.options.rowLabel!(r) ?? "").length);
      }
    }
    this.labelW = Math.min(8 + longest * 7, 150);
    let colLongest = 0;
    if (colText) {
      for (let c = 0; c < Math.min(cols, 4096); c++) {
        colLongest = Math.max(colLongest, short(this.options.colLabel!(c) ?? "").length);
      }
    }
    this.headerH = colText ? Math.min(10 + colLongest * 7, 120) : 18;
    const available = Math.max((this.root.clientWidth || 800) - this.labelW - 16, 100);
    let cw = Math.floor(available / Math.max(cols, 1));
    cw = Math.max(MIN_CELL, Math.min(MAX_CELL, cw));
    if (colText) cw = Math.max(cw, 14);
    let ch = rowText ? 18 : Math.max(MIN_CELL, Math.min(cw, 24));
    if (rows <= 4 && !rowText) ch = Math.max(ch, 24);
    this.cw = cw;
    this.ch = ch;
    const totalW = this.labelW + cols * cw;
    const totalH = this.headerH + rows * ch;
    const height = Math.min(totalH + 2, this.options.maxHeight ?? 420);
    this.scroll.style.height = `${height + (totalW > available + this.labelW + 16 ? 14 : 0)}px`;
    this.scroll.style.maxWidth = `${totalW + 16}px`;
    this.spacer.style.width = `${totalW}px`;
    this.spacer.style.height = `${totalH}px`;
    Object.assign(this.root.dataset, {
      rows: String(rows), cols: String(cols), cellWidth: String(cw), cellHeight: String(ch),
      labelWidth: String(this.labelW), headerHeight: String(this.headerH),
    });
    this.schedule();
  }

  private draw(): void {
    const { rows, cols, tile } = this.options;
    const viewW = this.scroll.clientWidth;
    const viewH = this.scroll.clientHeight;
    if (viewW === 0 || viewH === 0) {
      this.retryDraw();
      return;
    }
    this.retryDelay = 0;
    this.stage.style.width = `${viewW}px`;
    this.stage.style.height = `${viewH}px`;
    this.spacer.style.marginTop = `${-viewH}px`;
    const sl = this.scroll.scrollLeft;
    const st = this.scroll.scrollTop;
    const cw = this.cw;
    const ch = this.ch;
    const areaW = Math.max(viewW - this.labelW, 0);
    const areaH = Math.max(viewH - this.headerH, 0);
    const c0 = Math.min(Math.floor(sl / cw), cols);
    const c1 = Math.min(cols, Math.ceil((sl + areaW) / cw));
    const r0 = Math.min(Math.floor(st / ch), rows);
    const r1 = Math.min(rows, Math.ceil((st + areaH) / ch));

    const dpr = window.devicePixelRatio || 1;
    const canvas = this.canvas;
    canvas.style.left = `${this.labelW}px`;
    canvas.style.top = `${this.headerH}px`;
    canvas.style.width = `${areaW}px`;
    canvas.style.height = `${areaH}px`;
    if (canvas.width !== Math.round(areaW * dpr) || canvas.height !== Math.round(areaH * dpr)) {
      canvas.width = Math.round(areaW * dpr);
      canvas.height = Math.round(areaH * dpr);
    }
    const ctx = canvas.getContext("2d")!;
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, areaW, areaH);

    let complete = true;
    const missingTiles: [number, number][] = [];
    const w = c1 - c0;
    const hgt = r1 - r0;
    if (w > 0 && hgt > 0) {
      const image = new ImageData(w, hgt);
      const px = image.data;
      const scale = this.options.scale();
      const lut = scale.lut;
      this.root.dataset.palette = scale.kind + (scale.dark && scale.kind === "diverging" ? "-dark" : "");
      const [tr, tc] = tile;
      const missing = this.missingColour();
      const masked = this.options.masked;
      for (let tRow = Math.floor(r0 / tr); tRow * tr < r1; tRow++) {
        for (let tCol = Math.floor(c0 / tc); tCol * tc < c1; tCol++) {
          const key = `${tRow},${tCol}`;
          const values = this.tiles.get(key);
          if (!values) {
            complete = false;
            if (!this.pending.has(key)) missingTiles.push([tRow, tCol]);
          }
          const rowStart = Math.max(r0, tRow * tr);
          const rowEnd = Math.min(r1, (tRow + 1) * tr);
          const colStart = Math.max(c0, tCol * tc);
          const colEnd = Math.min(c1, (tCol + 1) * tc);
          const width = Math.min(tc, cols - tCol * tc);
          for (let r = rowStart; r < rowEnd; r++) {
            let o = ((r - r0) * w + (colStart - c0)) * 4;
            const base = (r - tRow * tr) * width - tCol * tc;
            for (let c = colStart; c < colEnd; c++, o += 4) {
              let rgb0: number, rgb1: number, rgb2: number;
              if (masked && masked(r, c)) {
                px[o + 3] = 0;  // left clear; the hatching below fills it
                continue;
              } else if (!values) {
                [rgb0, rgb1, rgb2] = missing;
              } else {
                const i = scale.index(values[base + c]);
                if (i < 0) {
                  rgb0 = 224; rgb1 = 64; rgb2 = 251;
                } else {
                  rgb0 = lut[i * 3]; rgb1 = lut[i * 3 + 1]; rgb2 = lut[i * 3 + 2];
                }
              }
              px[o] = rgb0; px[o + 1] = rgb1; px[o + 2] = rgb2; px[o + 3] = 255;
            }
          }
        }
      }
      const off = document.createElement("canvas");
      off.width = w;
      off.height = hgt;
      off.getContext("2d")!.putImageData(image, 0, 0);
      ctx.imageSmoothingEnabled = false;
      ctx.drawImage(off, 0, 0, w, hgt, c0 * cw - sl, r0 * ch - st, w * cw, hgt * ch);
      if (masked) this.hatch(ctx, masked, r0, r1, c0, c1, sl, st);
      if (cw >= 10 && ch >= 10) {
        ctx.strokeStyle = cssVar(this.root, "--jp-layout-color0", "#ffffff");
        ctx.lineWidth = 1;
        ctx.beginPath();
        for (let c = c0; c <= c1; c++) {
          const x = Math.round(c * cw - sl) + 0.5;
          ctx.moveTo(x, r0 * ch - st);
          ctx.lineTo(x, r1 * ch - st);
        }
        for (let r = r0; r <= r1; r++) {
          const y = Math.round(r * ch - st) + 0.5;
          ctx.moveTo(c0 * cw - sl, y);
          ctx.lineTo(c1 * cw - sl, y);
        }
        ctx.stroke();
      }
    }
    if (missingTiles.length) this.request(missingTiles);
    this.drawLabels(r0, r1, c0, c1, sl, st, areaW, areaH);
    this.placeCursor();
    if (complete) {
      this.root.dataset.drawn = String(this.generation);
      this.options.onDrawn?.();
    }
  }

  /** Hatch the masked cells of the visible range, a run of masked cells per row at a time. */
  private hatch(ctx: CanvasRenderingContext2D, masked: (row: number, col: number) => boolean,
                r0: number, r1: number, c0: number, c1: number, sl: number, st: number): void {
    const tile = document.createElement("canvas");
    tile.width = tile.height = 6;
    const t = tile.getContext("2d")!;
    t.strokeStyle = cssVar(this.root, "--jp-border-color1", "#bdbdbd");
    t.lineWidth = 1.5;
    t.beginPath();
    t.moveTo(-1, 7);
    t.lineTo(7, -1);
    t.stroke();
    const lines = ctx.createPattern(tile, "repeat");
    const background = cssVar(this.root, "--jp-layout-color2", "#eeeeee");
    const { cw, ch } = this;
    let count = 0;
    for (let r = r0; r < r1; r++) {
      for (let c = c0; c < c1; c++) {
        if (!masked(r, c)) continue;
        let end = c + 1;
        while (end < c1 && masked(r, end)) end++;
        const x = c * cw - sl;
        const y = r * ch - st;
        ctx.fillStyle = background;
        ctx.fillRect(x, y, (end - c) * cw, ch);
        if (lines) {
          ctx.fillStyle = lines;
          ctx.fillRect(x, y, (end - c) * cw, ch);
        }
        count += end - c;
        c = end;
      }
    }
    this.root.dataset.maskedShown = String(count);
  }

  /**
   * The heatmap has no size: hidden for a moment (JupyterLab hides the page while it swaps themes)
   * or in a collapsed output. Try again later, less and less often.
   */
  private retryDraw(): void {
    if (!this.root.isConnected || this.retryTimer !== undefined) return;
    this.retryDelay = Math.min(Math.max(this.retryDelay * 2, 50), 2000);
    this.retryTimer = setTimeout(() => {
      this.retryTimer = undefined;
      this.schedule();
    }, this.retryDelay);
  }

  private missingColour(): [number, number, number] {
    const text = cssVar(this.root, "--jp-border-color2", "#e0e0e0");
    const m = text.match(/^#([0-9a-f]{6})$/i);
    if (m) return [1, 3, 5].map((i) => parseInt(text.slice(i, i + 2), 16)) as [number, number, number];
    return [200, 200, 200];
  }

  private drawLabels(r0: number, r1: number, c0: number, c1: number, sl: number, st: number,
                     areaW: number, areaH: number): void {
    const { rowLabel, colLabel } = this.options;
    const rowNodes: HTMLElement[] = [];
    this.rowBox.style.top = `${this.headerH}px`;
    this.rowBox.style.width = `${this.labelW}px`;
    this.rowBox.style.height = `${areaH}px`;
    const rowText = rowLabel && rowLabel(0) !== null;
    const rowStep = rowText && this.ch >= 12 ? 1 : nice(Math.ceil(16 / this.ch));
    for (let r = Math.ceil(r0 / rowStep) * rowStep; r < r1; r += rowStep) {
      const text = rowText ? rowLabel!(r) ?? "" : String(r);
      const title = this.options.rowTitle?.(r) ?? text;
      const node = h("div", { class: "nnsj-hm-label", "data-row": r, title, text: rowText ? short(text) : text });
      node.style.top = `${r * this.ch - st}px`;
      node.style.height = `${this.ch}px`;
      node.style.lineHeight = `${this.ch}px`;
      if (!rowText && rowStep > 1) node.style.height = node.style.lineHeight = "12px";
      rowNodes.push(node);
    }
    this.rowBox.replaceChildren(...rowNodes);

    const colNodes: HTMLElement[] = [];
    this.colBox.style.left = `${this.labelW}px`;
    this.colBox.style.height = `${this.headerH}px`;
    this.colBox.style.width = `${areaW}px`;
    const colText = colLabel && colLabel(0) !== null;
    const colStep = colText ? 1 : nice(Math.ceil(36 / this.cw));
    for (let c = Math.ceil(c0 / colStep) * colStep; c < c1; c += colStep) {
      const text = colText ? colLabel!(c) ?? "" : String(c);
      const node = h("div", {
        class: colText ? "nnsj-hm-label nnsj-hm-vertical" : "nnsj-hm-label nnsj-hm-tick",
        "data-col": c, title: this.options.colTitle?.(c) ?? text, text: colText ? short(text) : text,
      });
      node.style.left = `${c * this.cw - sl}px`;
      node.style.width = colText ? `${this.cw}px` : "";
      colNodes.push(node);
    }
    this.colBox.replaceChildren(...colNodes);
  }

  private request(tiles: [number, number][]): void {
    const keys = tiles.map(([r, c]) => `${r},${c}`);
    keys.forEach((key) => this.pending.add(key));
    const generation = this.generation;
    this.options.fetch(tiles).then(
      (values) => {
        if (generation !== this.generation) return;
        keys.forEach((key, i) => {
          this.pending.delete(key);
          this.tiles.set(key, values[i]);
        });
        this.draw();  // at once: the values are here, waiting for the next frame adds up to 16 ms
      },
      (error: Error) => {
        if (generation !== this.generation) return;
        keys.forEach((key) => this.pending.delete(key));
        this.options.onError?.(error);
      },
    );
  }

  private onMove(event: MouseEvent): void {
    const box = this.stage.getBoundingClientRect();
    const x = event.clientX - box.left - this.labelW + this.scroll.scrollLeft;
    const y = event.clientY - box.top - this.headerH + this.scroll.scrollTop;
    const col = Math.floor(x / this.cw);
    const row = Math.floor(y / this.ch);
    const inside = event.clientX - box.left >= this.labelW && event.clientY - box.top >= this.headerH;
    if (!inside || row < 0 || col < 0 || row >= this.options.rows || col >= this.options.cols) {
      this.setHover(null);
      return;
    }
    this.setHover({ row, col });
    const tip = this.tooltip;
    const area = this.root.getBoundingClientRect();
    const px = event.clientX - area.left;
    const py = event.clientY - area.top;
    tip.style.left = `${Math.max(0, Math.min(px + 14, area.width - tip.offsetWidth - 4))}px`;
    tip.style.top = `${py + 18 + tip.offsetHeight > area.height ? py - tip.offsetHeight - 8 : py + 18}px`;
  }

  private setHover(cell: { row: number; col: number } | null): void {
    this.hover = cell;
    this.placeCursor();
  }

  private placeCursor(): void {
    const cell = this.hover;
    if (!cell) {
      this.cursor.style.display = "none";
      this.tooltip.style.display = "none";
      delete this.root.dataset.hoverRow;
      delete this.root.dataset.hoverCol;
      return;
    }
    const left = this.labelW + cell.col * this.cw - this.scroll.scrollLeft;
    const top = this.headerH + cell.row * this.ch - this.scroll.scrollTop;
    Object.assign(this.cursor.style, {
      display: "block", left: `${left}px`, top: `${top}px`, width: `${this.cw}px`, height: `${this.ch}px`,
    });
    this.tooltip.style.display = "block";
    this.tooltip.textContent = this.options.describe(cell.row, cell.col, this.value(cell.row, cell.col));
    this.root.dataset.hoverRow = String(cell.row);
    this.root.dataset.hoverCol = String(cell.col);
  }
}
