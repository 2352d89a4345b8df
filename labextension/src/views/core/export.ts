/**
 * Pictures of a labelled grid for papers and slides: an SVG drawn from the data (not a screenshot
 * of the canvas, which holds only the visible part), and a PNG rendered from that SVG at twice its
 * size. Each cell is one `<rect>` carrying `data-row`, `data-col` and `data-value`, so what was
 * exported can be read back and checked.
 */

export interface GridPicture {
  title: string;
  rows: string[];
  cols: string[];
  /** Fill colour of a cell (CSS), or null for a cell with no value yet. */
  fill(row: number, col: number): string | null;
  value(row: number, col: number): number;
  /** Text written in a cell (the logit lens' tokens), if any. */
  text?(row: number, col: number): string;
  /** The colour bar: CSS colours from low to high and the numbers under it. */
  bar?: { colours: string[]; ticks: [number, string][] };
}

const FONT = "font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 11px";

function esc(text: string): string {
  return text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");
}

/** The grid as an SVG document (light background, so it reads the same in any viewer). */
export function gridSvg(p: GridPicture): { svg: string; width: number; height: number } {
  const withText = Boolean(p.text);
  const cw = withText ? 64 : Math.max(14, Math.min(32, Math.floor(720 / Math.max(p.cols.length, 1))));
  const ch = withText ? 22 : Math.max(14, Math.min(24, cw));
  const longestRow = Math.max(1, ...p.rows.map((r) => r.length));
  const longestCol = Math.max(1, ...p.cols.map((c) => c.length));
  const left = 10 + Math.min(longestRow, 24) * 7;
  const top = 28 + Math.min(longestCol, 24) * 7;
  const gridW = p.cols.length * cw;
  const gridH = p.rows.length * ch;
  const barH = p.bar ? 40 : 0;
  const width = left + gridW + 12;
  const height = top + gridH + barH + 12;
  const out: string[] = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}">`,
    `<rect width="${width}" height="${height}" fill="#ffffff"/>`,
    `<text x="4" y="16" style="${FONT}; font-size: 13px" fill="#1f2328">${esc(p.title)}</text>`,
  ];
  p.rows.forEach((label, r) => {
    out.push(`<text x="${left - 6}" y="${top + r * ch + ch / 2 + 4}" text-anchor="end" style="${FONT}" ` +
      `fill="#59636e" xml:space="preserve">${esc(label.slice(0, 24))}</text>`);
  });
  p.cols.forEach((label, c) => {
    const x = left + c * cw + cw / 2 + 4;
    out.push(`<text transform="translate(${x} ${top - 6}) rotate(-90)" style="${FONT}" fill="#59636e" ` +
      `xml:space="preserve">${esc(label.slice(0, 24))}</text>`);
  });
  for (let r = 0; r < p.rows.length; r++) {
    for (let c = 0; c < p.cols.length; c++) {
      const fill = p.fill(r, c);
      const value = p.value(r, c);
      out.push(`<rect x="${left + c * cw}" y="${top + r * ch}" width="${cw}" height="${ch}" ` +
        `fill="${fill ?? "#e0e0e0"}" stroke="#ffffff" stroke-width="1" data-row="${r}" data-col="${c}" ` +
        `data-value="${Number.isFinite(value) ? value : String(value)}"/>`);
      if (p.text) {
        const t = p.text(r, c);
        out.push(`<text x="${left + c * cw + cw / 2}" y="${top + r * ch + ch / 2 + 4}" text-anchor="middle" ` +
          `style="${FONT}; font-size: 10px" fill="#1f2328" xml:space="preserve">${esc(t.slice(0, 9))}</text>`);
      }
    }
  }
  if (p.bar) {
    const y = top + gridH + 12;
    const w = Math.min(240, Math.max(gridW, 120));
    const stops = p.bar.colours.map((c, i) =>
      `<stop offset="${(i / (p.bar!.colours.length - 1)) * 100}%" stop-color="${c}"/>`);
    out.push(`<defs><linearGradient id="bar">${stops.join("")}</linearGradient></defs>`,
      `<rect x="${left}" y="${y}" width="${w}" height="8" fill="url(#bar)"/>`);
    for (const [at, label] of p.bar.ticks) {
      out.push(`<text x="${left + at * w}" y="${y + 22}" text-anchor="middle" style="${FONT}" fill="#59636e">` +
        `${esc(label)}</text>`);
    }
  }
  out.push("</svg>");
  return { svg: out.join(""), width, height };
}

/** PNG bytes of an SVG document, drawn at `scale` times its size. */
export async function svgToPng(svg: string, width: number, height: number, scale = 2): Promise<Blob> {
  const url = URL.createObjectURL(new Blob([svg], { type: "image/svg+xml" }));
  try {
    const image = new Image();
    image.src = url;
    await image.decode();
    const canvas = document.createElement("canvas");
    canvas.width = Math.round(width * scale);
    canvas.height = Math.round(height * scale);
    const ctx = canvas.getContext("2d")!;
    ctx.scale(scale, scale);
    ctx.drawImage(image, 0, 0, width, height);
    return await new Promise<Blob>((done, fail) =>
      canvas.toBlob((blob) => (blob ? done(blob) : fail(new Error("the PNG could not be made"))), "image/png"));
  } finally {
    URL.revokeObjectURL(url);
  }
}

/** Save `data` as a file through the browser's download. */
export function download(data: Blob, name: string): void {
  const url = URL.createObjectURL(data);
  const link = document.createElement("a");
  link.href = url;
  link.download = name;
  link.style.display = "none";
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

/** Buttons "PNG" and "SVG" that export `picture()` under `name`. */
export function exportButtons(
  name: () => string,
  picture: () => GridPicture,
  onError: (e: Error) => void,
): HTMLElement {
  const box = document.createElement("span");
  box.className = "nnsj-export";
  for (const kind of ["svg", "png"] as const) {
    const button = document.createElement("button");
    button.className = "nnsj-button";
    button.dataset.export = kind;
    button.title = `save the picture as ${kind.toUpperCase()}`;
    button.textContent = kind.toUpperCase();
    button.addEventListener("click", () => {
      const { svg, width, height } = gridSvg(picture());
      if (kind === "svg") {
        download(new Blob([svg], { type: "image/svg+xml" }), `${name()}.svg`);
      } else {
        svgToPng(svg, width, height).then((blob) => download(blob, `${name()}.png`), onError);
      }
    });
    box.append(button);
  }
  return box;
}

/** Colour-bar stops of a scale, for `GridPicture.bar`. */
export function barColours(css: (t: number) => string, steps = 16): string[] {
  return Array.from({ length: steps + 1 }, (_, i) => css(i / steps));
}
