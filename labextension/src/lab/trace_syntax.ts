/**
 * CodeMirror 6 decorations for `%%trace` cells: the header line gets `cm-nnsight-trace-header`
 * and each of its parts a class (`-magic`, `-model`, `-prompt`, `-flag`, `-value`); the body is
 * left to the notebook's Python highlighting. Only the first line is read, on each change.
 */

import { RangeSetBuilder } from "@codemirror/state";
import { Decoration, DecorationSet, EditorView, ViewPlugin, ViewUpdate } from "@codemirror/view";
import { traceHeaderTokens } from "./trace_header";

const header = Decoration.line({ class: "cm-nnsight-trace-header" });
const marks = {
  magic: Decoration.mark({ class: "cm-nnsight-trace-magic" }),
  model: Decoration.mark({ class: "cm-nnsight-trace-model" }),
  prompt: Decoration.mark({ class: "cm-nnsight-trace-prompt" }),
  flag: Decoration.mark({ class: "cm-nnsight-trace-flag" }),
  value: Decoration.mark({ class: "cm-nnsight-trace-value" }),
};

function decorate(view: EditorView): DecorationSet {
  const builder = new RangeSetBuilder<Decoration>();
  const line = view.state.doc.line(1);
  const tokens = traceHeaderTokens(line.text);
  if (tokens.length) {
    builder.add(line.from, line.from, header);
    for (const t of tokens) builder.add(line.from + t.from, line.from + t.to, marks[t.kind]);
  }
  return builder.finish();
}

export const traceHighlight = [
  ViewPlugin.fromClass(
    class {
      decorations: DecorationSet;
      constructor(view: EditorView) {
        this.decorations = decorate(view);
      }
      update(update: ViewUpdate) {
        if (update.docChanged) this.decorations = decorate(update.view);
      }
    },
    { decorations: (v) => v.decorations },
  ),
  EditorView.baseTheme({
    ".cm-nnsight-trace-header": { backgroundColor: "var(--jp-layout-color2)" },
    ".cm-nnsight-trace-magic": { color: "var(--jp-mirror-editor-keyword-color)", fontWeight: "bold" },
    ".cm-nnsight-trace-model": { color: "var(--jp-mirror-editor-def-color)", fontWeight: "bold" },
    ".cm-nnsight-trace-prompt": { color: "var(--jp-mirror-editor-string-color)" },
    ".cm-nnsight-trace-flag": { color: "var(--jp-mirror-editor-builtin-color)" },
    ".cm-nnsight-trace-value": { color: "var(--jp-mirror-editor-number-color)" },
  }),
];
