/**
 * The header of a `%%trace` cell split into what the editor colours: the magic, the model, the
 * prompts (quoted strings or notebook names) and the flags with their values. Pure, so it is
 * tested under node; `trace_syntax.ts` turns the tokens into CodeMirror decorations.
 */

export type HeaderTokenKind = "magic" | "model" | "prompt" | "flag" | "value";

export interface HeaderToken {
  kind: HeaderTokenKind;
  from: number;
  to: number;
}

const VALUED_FLAGS = new Set(["--max-new-tokens", "--timeout"]);

/** Tokens of `line` when it is a `%%trace` header, else []. Offsets are within `line`. */
export function traceHeaderTokens(line: string): HeaderToken[] {
  const start = /^\s*%%trace(?=\s|$)/.exec(line);
  if (!start) return [];
  const tokens: HeaderToken[] = [{ kind: "magic", from: start[0].length - 7, to: start[0].length }];
  const word = /"(?:[^"\\]|\\.)*"?|'(?:[^'\\]|\\.)*'?|\S+/g;
  word.lastIndex = start[0].length;
  let sawModel = false;
  let expectValue = false;
  for (let m = word.exec(line); m; m = word.exec(line)) {
    const text = m[0];
    const span = { from: m.index, to: m.index + text.length };
    if (expectValue) {
      tokens.push({ kind: "value", ...span });
      expectValue = false;
    } else if (text.startsWith("--")) {
      const [flag] = text.split("=", 1);
      tokens.push({ kind: "flag", ...span });
      expectValue = VALUED_FLAGS.has(flag) && !text.includes("=");
    } else if (!sawModel) {
      tokens.push({ kind: "model", ...span });
      sawModel = true;
    } else {
      tokens.push({ kind: "prompt", ...span });
    }
  }
  return tokens;
}

/** The model named in a `%%trace` cell's header, or null when the cell is not one. */
export function traceModel(cellText: string): string | null {
  const first = cellText.split("\n", 1)[0];
  const model = traceHeaderTokens(first).find((t) => t.kind === "model");
  return model ? first.slice(model.from, model.to) : null;
}
