/**
 * A small histogram (SVG bars coloured by the view's scale), with the bin under the mouse named.
 * Each bar carries `data-count`, `data-lo` and `data-hi`, so what it draws can be read back.
 */

import { Scale } from "./colour";
import { h, svg } from "./dom";
import { formatCount, formatInt, formatNumber } from "./format";

export interface HistogramData {
  counts: ArrayLike<number>;
  lo: number;
  hi: number;
  /** How many values the counts come from, when they are a sample of a larger tensor. */
  sampled?: number | null;
  total: number;
}

export function histogram(data: HistogramData, scale: Scale, width = 180, height = 44): HTMLElement {
  const bins = data.counts.length;
  const peak = Math.max(1, ...Array.from(data.counts));
  const plot = svg("svg", { width, height, viewBox: `0 0 ${width} ${height}`, class: "nnsj-hist-plot" });
  const caption = h("div", { class: "nnsj-hist-caption" });
  const base = data.sampled
    ? `${formatCount(data.sampled)} of ${formatCount(data.total)} values, sampled`
    : `${formatInt(data.total)} values`;
  caption.textContent = base;
  const barW = width / Math.max(bins, 1);
  const span = data.hi - data.lo;
  for (let i = 0; i < bins; i++) {
    const count = data.counts[i];
    const lo = data.lo + (span * i) / bins;
    const hi = data.lo + (span * (i + 1)) / bins;
    const barH = count > 0 ? Math.max(1, (Math.sqrt(count) / Math.sqrt(peak)) * (height - 2)) : 0;
    const bar = svg("rect", {
      x: i * barW, y: height - barH, width: Math.max(barW - 0.5, 0.5), height: barH,
      fill: scale.css((lo + hi) / 2), "data-count": count, "data-lo": lo, "data-hi": hi,
    });
    const hit = svg("rect", { x: i * barW, y: 0, width: barW, height, fill: "transparent" });
    hit.addEventListener("mouseenter", () => {
      caption.textContent = `[${formatNumber(lo)}, ${formatNumber(hi)}): ${formatInt(count)}`;
    });
    hit.addEventListener("mouseleave", () => (caption.textContent = base));
    plot.append(bar, hit);
  }
  return h("div", { class: "nnsj-hist", title: "histogram (bar height: square root of the count)" }, plot, caption);
}

/** A horizontal colour bar with the scale's ends (and 0 for a diverging scale). */
export function colourbar(scale: Scale): HTMLElement {
  const bar = h("div", { class: "nnsj-colourbar-bar" });
  bar.style.background = scale.gradient();
  const ticks = h("div", { class: "nnsj-colourbar-ticks" },
    h("span", { text: formatNumber(scale.lo) }),
    scale.kind === "diverging" ? h("span", { text: "0" }) : null,
    h("span", { text: formatNumber(scale.hi) }));
  return h("div", { class: "nnsj-colourbar", "data-lo": scale.lo, "data-hi": scale.hi, "data-kind": scale.kind },
    bar, ticks);
}
