import assert from "node:assert/strict";
import { test } from "node:test";
import {
  canCancel, compact, healthLabel, jobLabel, pathWithRoot, Pending, rootForCell, saveLine, saveName, sweepTemplate, traceCell,
  versionMismatch,
} from "../src/lab/protocol";

test("an answer settles the request with its id, and only that one", async () => {
  const pending = new Pending(1000);
  const a = pending.add();
  const b = pending.add();
  assert.notEqual(a.id, b.id);
  const buffer = new DataView(new ArrayBuffer(4));
  assert.equal(pending.settle({ id: b.id, ok: true, value: 2 }, [buffer]), true);
  assert.equal(pending.settle({ id: "unknown", ok: true }, []), false);
  const answer = await b.answer;
  assert.equal(answer.content.value, 2);
  assert.equal(answer.buffers[0], buffer);
  assert.equal(pending.size, 1);
  pending.settle({ id: a.id, ok: false, error: "KeyError: 'x'" }, []);
  await assert.rejects(a.answer, /KeyError: 'x'/);
  assert.equal(pending.size, 0);
});

test("a request with no answer times out, and failAll rejects what waits", async () => {
  const pending = new Pending(20);
  await assert.rejects(pending.add().answer, /No answer from the kernel/);
  const waiting = new Pending(1000).add();
  const p2 = new Pending(1000);
  const c = p2.add();
  p2.failAll("the kernel restarted");
  await assert.rejects(c.answer, /the kernel restarted/);
  assert.equal(p2.size, 0);
  void waiting.answer.catch(() => undefined);
});

test("module paths use `model` inside a %%trace cell and the notebook name elsewhere", () => {
  assert.equal(rootForCell('%%trace smollm2 "hi"\nx = 1', "smollm2"), "model");
  assert.equal(rootForCell("  %%trace gpt\n", "gpt"), "model");
  assert.equal(rootForCell("x = 1\n%%trace", "gpt"), "gpt");
  assert.equal(rootForCell("%%tracefoo", "gpt"), "gpt");
  assert.equal(pathWithRoot("smollm2.model.layers[0].mlp", "model"), "model.model.layers[0].mlp");
  assert.equal(pathWithRoot("model.layers[3]", "lm"), "lm.layers[3]");
});

test("save lines bind a name derived from the path", () => {
  assert.equal(saveName("model.model.layers[3].mlp"), "model_layers_3_mlp");
  assert.equal(saveName("model.layers[-1]"), "layers_m1");
  assert.equal(saveName("model"), "out");
  assert.equal(saveName("model.h['0']"), "h_0");
  assert.equal(saveLine("model.layers[0]"), "layers_0 = model.layers[0].output.save()");
});

test("a %%trace cell quotes its prompt as a Python string", () => {
  const cell = traceCell("smollm2", 'say "hi"\\');
  assert.equal(cell.split("\n")[0], '%%trace smollm2 "say \\"hi\\"\\\\"');
});

test("the sweep template uses a notebook variable as is and loads a name only %%trace knows", () => {
  const own = sweepTemplate("gpt", true);
  assert.match(own, /^sweep = live_sweep\(gpt, clean, corrupted, /m);
  assert.doesNotMatch(own, /LanguageModel/);
  const alias = sweepTemplate("smollm2", false);
  assert.match(alias, /^model = LanguageModel\("smollm2"\)$/m);
  assert.match(alias, /^sweep = live_sweep\(model, clean, corrupted, /m);
  // A Hugging Face id goes in as a Python string, quotes and all.
  assert.match(sweepTemplate('org/a"b', false), /^model = LanguageModel\("org\/a\\"b"\)$/m);
});

test("server lines say whether it answers, its version, or why not", () => {
  const host = { host: "http://h:1", source: "configured" };
  assert.equal(healthLabel(host), "checking…");
  assert.equal(healthLabel({ ...host, status: "ok", package_version: "0.1.0" }), "ok (server 0.1.0)");
  assert.equal(healthLabel({ ...host, status: "unreachable", error: "ConnectError: refused" }),
    "unreachable: ConnectError: refused");
  assert.equal(healthLabel({ ...host, status: "error" }), "error: no reason given");
});

test("job lines say where a queued job stands and why one failed", () => {
  const job = { job_id: "j", model: "m", host: "h" };
  assert.equal(jobLabel({ ...job, status: "queued", position: 0 }), "queued (1st in line)");
  assert.equal(jobLabel({ ...job, status: "queued", position: 1 }), "queued (2nd in line)");
  assert.equal(jobLabel({ ...job, status: "queued", position: 10 }), "queued (11th in line)");
  assert.equal(jobLabel({ ...job, status: "queued", position: 21 }), "queued (22nd in line)");
  assert.equal(jobLabel({ ...job, status: "error", error: "out of memory" }), "failed: out of memory");
  assert.equal(jobLabel({ ...job, status: "running" }), "running");
  assert.equal(canCancel({ ...job, status: "queued" }), true);
  assert.equal(canCancel({ ...job, status: "completed" }), false);
});

test("versions differ only when the release or protocol does", () => {
  assert.equal(versionMismatch("0.1.0", "0.1.0", 1), null);
  assert.equal(versionMismatch("0.1.0.dev3", "0.1.0", 1), null);
  const message = versionMismatch("0.2.0", "0.1.0", 1);
  assert.match(message!, /kernel runs nnsight-jupyter 0\.2\.0.*extension 0\.1\.0/);
  assert.match(message!, /pip install -U nnsight-jupyter/);
  assert.notEqual(versionMismatch("0.1.0", "0.1.0", 2), null);
});

test("counts are compact", () => {
  assert.equal(compact(999), "999");
  assert.equal(compact(134_515_008), "134.5M");
  assert.equal(compact(2000), "2K");
});
