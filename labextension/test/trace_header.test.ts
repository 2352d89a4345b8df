import assert from "node:assert/strict";
import { test } from "node:test";
import { traceHeaderTokens, traceModel } from "../src/lab/trace_header";

const parts = (line: string) => traceHeaderTokens(line).map((t) => [t.kind, line.slice(t.from, t.to)]);

test("a %%trace header splits into magic, model, prompts, flags and values", () => {
  assert.deepEqual(parts('%%trace smollm2 "The capital of France is" prompts --max-new-tokens 5 --remote --timeout=30'), [
    ["magic", "%%trace"], ["model", "smollm2"], ["prompt", '"The capital of France is"'], ["prompt", "prompts"],
    ["flag", "--max-new-tokens"], ["value", "5"], ["flag", "--remote"], ["flag", "--timeout=30"],
  ]);
});

test("quoted prompts keep their spaces and escaped quotes; an open quote runs to the end", () => {
  assert.deepEqual(parts(`%%trace gpt2 'it\\'s here' "a b`), [
    ["magic", "%%trace"], ["model", "gpt2"], ["prompt", "'it\\'s here'"], ["prompt", '"a b'],
  ]);
});

test("other lines are not headers", () => {
  assert.deepEqual(traceHeaderTokens("%%tracer x"), []);
  assert.deepEqual(traceHeaderTokens("x = 1  # %%trace"), []);
  assert.deepEqual(parts("%%trace"), [["magic", "%%trace"]]);
  assert.equal(traceModel('%%trace smollm2 "hi"\nmodel.x'), "smollm2");
  assert.equal(traceModel("print(1)"), null);
});
