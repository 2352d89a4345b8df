import assert from "node:assert/strict";
import { test } from "node:test";
import { completionHandOver, isTraceCell, traceCompletionOrder } from "../src/lab/trace_completion";

// As the kernel sends them for `model.transformer.h[0].`: children in forward order, then the rest.
const kernel = ["ln_1", "attn", "ln_2", "mlp", "output", "input", "load_state_dict"];
const rank = (name: string) => kernel.indexOf(name) < 0 ? Infinity : kernel.indexOf(name);
const order = (items: string[], query: string) => traceCompletionOrder(items, query, (s) => s, rank);

test("names starting with the query come first, each group in the kernel's order", () => {
  // `model.transformer.w` after JupyterLab filled in "w": it sorts the tie alphabetically.
  const children = ["wte", "wpe", "drop", "h", "ln_f"];
  const byForward = (s: string) => children.indexOf(s);
  assert.deepEqual(traceCompletionOrder(["wpe", "wte"], "w", (s) => s, byForward), ["wte", "wpe"]);
  // What JupyterLab keeps for the query "l" (score, then alphabet): the kernel's names that contain it after.
  assert.deepEqual(order(["ln_1", "ln_2", "load_state_dict", "mlp"], "l"), ["ln_1", "ln_2", "load_state_dict", "mlp"]);
  assert.deepEqual(order(["load_state_dict", "mlp", "ln_2", "ln_1"], "l"), ["ln_1", "ln_2", "load_state_dict", "mlp"]);
});

test("the header's models keep the registry's order where JupyterLab would sort them", () => {
  const header = ["smollm2", "gpt2", "gpt"];
  const byHeader = (s: string) => header.indexOf(s);
  assert.deepEqual(traceCompletionOrder(["gpt", "gpt2"], "gpt", (s) => s, byHeader), ["gpt2", "gpt"]);
});

test("items the kernel did not send (the document's words) follow the kernel's, in the order given", () => {
  assert.deepEqual(order(["trace", "mlp", "%%", "attn"], ""), ["attn", "mlp", "trace", "%%"]);
});

test("only %%trace cells are re-ranked", () => {
  assert.equal(isTraceCell('%%trace gpt "hi"\nmodel.x'), true);
  assert.equal(isTraceCell("  %%trace"), true);
  assert.equal(isTraceCell("%%tracer x"), false);
  assert.equal(isTraceCell("x = 1\n%%trace gpt"), false);
  assert.equal(isTraceCell(undefined), false);
});

test("the completer is handed over to the highest-ranked other provider with a model of its own", () => {
  const self = "nnsight-jupyter:trace-completion-order";
  const factory = () => undefined;
  const ours = { identifier: self, rank: 1001, modelFactory: factory };
  const kernel = { identifier: "CompletionProvider:kernel", rank: 550 };
  const debuggerProvider = { identifier: "DebuggerCompletionProvider", rank: 1000 };
  const lsp = { identifier: "lsp", rank: 1000, modelFactory: factory };
  const other = { identifier: "other", rank: 700, modelFactory: factory };
  const disabled = { identifier: "disabled", rank: -1, modelFactory: factory };
  // JupyterLab alone: no other provider has a model, so none is handed over to.
  assert.equal(completionHandOver([ours, kernel, debuggerProvider], self), undefined);
  assert.equal(completionHandOver([ours, kernel, debuggerProvider, other, lsp], self), lsp);
  assert.equal(completionHandOver([lsp, other, ours], self), lsp);
  assert.equal(completionHandOver([ours, disabled], self), undefined);
});
