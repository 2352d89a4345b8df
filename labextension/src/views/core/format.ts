/** Number formatting shared by every view: short for headers, exact enough for hover. */

/** `digits` significant digits, without trailing zeros; exponent form for very large or small values. */
export function formatNumber(value: number, digits = 4): string {
  if (Number.isNaN(value)) return "NaN";
  if (value === Infinity) return "inf";
  if (value === -Infinity) return "-inf";
  if (value === 0) return "0";
  const abs = Math.abs(value);
  if (abs >= 1e-4 && abs < 10 ** digits) {
    const text = value.toPrecision(digits);
    return text.includes(".") ? text.replace(/\.?0+$/, "") : text;
  }
  const [mantissa, exponent] = value.toExponential(digits - 1).split("e");
  const m = mantissa.includes(".") ? mantissa.replace(/\.?0+$/, "") : mantissa;
  return `${m}e${exponent}`;
}

/** A float32 value as written in full (7 significant digits), for hover read-outs. */
export function formatExact(value: number, integer = false): string {
  if (integer && Number.isFinite(value)) return String(Math.round(value));
  return formatNumber(value, 7);
}

/** 1234567 -> "1.23M", 950 -> "950". */
export function formatCount(value: number): string {
  if (value < 1000) return String(value);
  const units = ["K", "M", "B", "T"];
  let v = value;
  let unit = "";
  for (const u of units) {
    if (v < 1000) break;
    v /= 1000;
    unit = u;
  }
  return `${v >= 100 ? v.toFixed(0) : v >= 10 ? v.toFixed(1) : v.toFixed(2)}${unit}`;
}

/** 12345 -> "12,345". */
export function formatInt(value: number): string {
  return Math.round(value).toLocaleString("en-US");
}

const WHITESPACE: Record<string, string> = { " ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍" };

/**
 * A token as a label: a token of whitespace alone is drawn as symbols (␣ space, ↵ newline,
 * ⇥ tab, ␍ carriage return, · any other), so it is never a blank label; in other tokens only
 * newlines, tabs and carriage returns are (they would break the line), and " Paris" keeps its
 * plain leading space. `tokenExact` gives the token itself, for titles and hover.
 */
export function tokenText(token: string): string {
  if (token.length > 0 && /^\s+$/.test(token)) return Array.from(token, (c) => WHITESPACE[c] ?? "·").join("");
  return token.replace(/[\n\t\r]/g, (c) => WHITESPACE[c]);
}

/** The token exactly, quoted with JSON's escapes: `" "`, `"\\n"`, `"\\t"`. */
export function tokenExact(token: string): string {
  return JSON.stringify(token);
}
