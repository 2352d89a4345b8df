/**
 * A list that keeps only its visible rows in the DOM, so 10,000 rows scroll like 30.
 *
 * Rows have one fixed height; the list owns a scrolling element with a spacer of the full height
 * and re-renders the visible window (plus a margin) on scroll, reusing row elements. The root
 * carries `data-count` (all rows) and `data-first` (index of the first rendered row).
 */

import { h, perFrame } from "./dom";

export interface VirtualListOptions {
  rowHeight: number;
  /** Height of the scrolling area (the list is shorter when it has fewer rows). */
  height: number;
  count: number;
  render(index: number, row: HTMLElement): void;
  overscan?: number;
}

export class VirtualList {
  readonly root: HTMLDivElement;
  private spacer: HTMLDivElement;
  private pool: HTMLDivElement[] = [];
  private schedule: () => void;
  /** Bumped whenever the rows' data changes; a row already showing its index at this version is kept. */
  private version = 0;

  constructor(private options: VirtualListOptions) {
    this.spacer = h("div", { class: "nnsj-vlist-spacer" });
    this.root = h("div", { class: "nnsj-vlist", role: "list" }, this.spacer);
    this.schedule = perFrame(() => this.draw());
    this.root.addEventListener("scroll", this.schedule, { passive: true });
    this.setCount(options.count);
  }

  setCount(count: number): void {
    this.options.count = count;
    this.version++;
    const full = count * this.options.rowHeight;
    this.spacer.style.height = `${full}px`;
    this.root.style.height = `${Math.min(full, this.options.height) + 2}px`;
    this.root.dataset.count = String(count);
    this.draw();
  }

  /** Render the visible rows again (after the data behind them changed). */
  refresh(): void {
    this.version++;
    this.draw();
  }

  scrollToIndex(index: number): void {
    const { rowHeight } = this.options;
    const top = index * rowHeight;
    if (top < this.root.scrollTop || top + rowHeight > this.root.scrollTop + this.root.clientHeight) {
      this.root.scrollTop = Math.max(0, top - this.root.clientHeight / 3);
    }
    this.draw();
  }

  private draw(): void {
    const { rowHeight, count, overscan = 8 } = this.options;
    const viewH = this.root.clientHeight || this.options.height;
    const first = Math.max(0, Math.floor(this.root.scrollTop / rowHeight) - overscan);
    const last = Math.min(count, Math.ceil((this.root.scrollTop + viewH) / rowHeight) + overscan);
    const needed = Math.max(last - first, 0);
    while (this.pool.length < needed) {
      const row = h("div", { class: "nnsj-vlist-row", role: "listitem" });
      row.style.height = `${rowHeight}px`;
      this.pool.push(row);
      this.root.append(row);
    }
    for (const extra of this.pool.splice(needed)) extra.remove();
    // Row `index` always lives in pool[index % size], so rows still in view after a scroll are kept.
    const size = this.pool.length;
    for (let index = first; index < last; index++) {
      const row = this.pool[index % size];
      const key = `${index}:${this.version}`;
      if (row.dataset.key === key) continue;
      row.dataset.key = key;
      row.style.top = `${index * rowHeight}px`;
      row.dataset.index = String(index);
      this.options.render(index, row);
    }
    this.root.dataset.first = String(first);
  }
}
