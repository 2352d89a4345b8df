/**
 * Colour scales for heatmaps, histograms and previews.
 *
 * Values that straddle 0 get a diverging scale centred on 0 (blue below, red above), everything
 * else a sequential one (viridis). Each palette is a list of stops interpolated linearly in sRGB
 * into a 256-entry table, the same way `nnsight_jupyter/widgets/static.py` builds the colours of
 * the static PNG fallback, so the picture in a saved notebook matches the live view. The dark
 * theme swaps the diverging palette for one whose centre is dark, so that near-zero values sink
 * into the background instead of glaring white.
 */

export type RGB = [number, number, number];

const hex = (s: string): RGB => [1, 3, 5].map((i) => parseInt(s.slice(i, i + 2), 16)) as RGB;

export const PALETTES: Record<string, RGB[]> = {
  diverging: "#053061 #2166ac #4393c3 #92c5de #d1e5f0 #f7f7f7 #fddbc7 #f4a582 #d6604d #b2182b #67001f"
    .split(" ").map(hex),
  "diverging-dark": "#d1e5f0 #92c5de #4393c3 #2166ac #1a3d66 #2b2b2b #6b1f24 #b2182b #d6604d #f4a582 #fddbc7"
    .split(" ").map(hex),
  sequential: "#440154 #472d7b #3b528b #2c728e #21918c #28ae80 #5ec962 #addc30 #fde725".split(" ").map(hex),
};

/** Colour of NaN cells: outside every palette, so a NaN never passes for a value. */
export const NAN_COLOUR: RGB = [224, 64, 251];

export const LEVELS = 256;

/** The palette as LEVELS RGB triples (flat). */
export function lookupTable(stops: RGB[]): Uint8Array {
  const lut = new Uint8Array(LEVELS * 3);
  const segments = stops.length - 1;
  for (let i = 0; i < LEVELS; i++) {
    const t = (i / (LEVELS - 1)) * segments;
    const k = Math.min(Math.floor(t), segments - 1);
    const f = t - k;
    for (let c = 0; c < 3; c++) {
      lut[i * 3 + c] = Math.floor(stops[k][c] + (stops[k + 1][c] - stops[k][c]) * f + 0.5);
    }
  }
  return lut;
}

const tables = new Map<string, Uint8Array>();
function table(name: string): Uint8Array {
  let lut = tables.get(name);
  if (!lut) tables.set(name, (lut = lookupTable(PALETTES[name])));
  return lut;
}

export class Scale {
  readonly lut: Uint8Array;

  constructor(
    readonly kind: "diverging" | "sequential",
    readonly lo: number,
    readonly hi: number,
    readonly dark: boolean,
  ) {
    this.lut = table(kind === "diverging" && dark ? "diverging-dark" : kind);
  }

  /** Table index of `value` (-1 for NaN); values outside [lo, hi] take the end colours. */
  index(value: number): number {
    if (Number.isNaN(value)) return -1;
    const span = this.hi - this.lo;
    const t = span > 0 ? (value - this.lo) / span : 0.5;
    const i = Math.floor(t * (LEVELS - 1) + 0.5);
    return i < 0 ? 0 : i > LEVELS - 1 ? LEVELS - 1 : i;
  }

  rgb(value: number): RGB {
    const i = this.index(value);
    if (i < 0) return NAN_COLOUR;
    return [this.lut[i * 3], this.lut[i * 3 + 1], this.lut[i * 3 + 2]];
  }

  css(value: number): string {
    const [r, g, b] = this.rgb(value);
    return `rgb(${r}, ${g}, ${b})`;
  }

  /** A CSS gradient running through the palette from lo to hi. */
  gradient(direction = "to right"): string {
    const steps: string[] = [];
    for (let i = 0; i <= 16; i++) {
      const k = Math.round((i / 16) * (LEVELS - 1)) * 3;
      steps.push(`rgb(${this.lut[k]}, ${this.lut[k + 1]}, ${this.lut[k + 2]}) ${(i / 16) * 100}%`);
    }
    return `linear-gradient(${direction}, ${steps.join(", ")})`;
  }
}

/**
 * The scale for values in [min, max]: diverging and symmetric around 0 when they straddle it,
 * sequential otherwise. Infinite bounds are ignored (they take the end colours).
 */
export function scaleFor(min: number, max: number, dark: boolean): Scale {
  const lo = Number.isFinite(min) ? min : 0;
  const hi = Number.isFinite(max) ? max : lo;
  if (lo < 0 && hi > 0) {
    const limit = Math.max(-lo, hi);
    return new Scale("diverging", -limit, limit, dark);
  }
  return new Scale("sequential", lo, hi, dark);
}
