"""The real deployment path: the bundled SmolLM2 served as a LanguageModel, with text inputs."""

from __future__ import annotations

import pytest
import torch
from starlette.testclient import TestClient

from nnsight_jupyter.models.language import LanguageModel
from nnsight_jupyter.remote.execute import run_request
from nnsight_jupyter.remote.protocol import TraceRequest
from nnsight_jupyter.remote.server.app import create_app
from nnsight_jupyter.remote.server.config import parse_model_specs
from nnsight_jupyter.tracing.record import last_trace

from .conftest import Client, _wait_ready, make_config, threads_like_workers

pytestmark = pytest.mark.slow


def test_smollm2_trace_and_generate_match_a_local_run(tmp_path):
    config = make_config(tmp_path, None, models=parse_model_specs("smollm2"), max_job_memory_bytes=2 * 2**30)
    trace = TraceRequest("smollm2", "h = model.model.layers[3].output.save()\n"
                                    "logits = model.lm_head.output[0, -1].save()\nprint(h.shape)",
                         {"kind": "trace", "inputs": ["The capital of France is"]})
    generate = TraceRequest("smollm2", "ids = tracer.result.save()",
                            {"kind": "generate", "inputs": ["Hello, my name is"], "kwargs": {"max_new_tokens": 4},
                             "tracer_name": "tracer"})
    # A one-token prompt and each generation step multiply a single row by each weight matrix:
    # the products that round differently when the two sides hold the weights at other offsets.
    one_token = TraceRequest("smollm2", "logits = model.lm_head.output.save()",
                             {"kind": "trace", "inputs": [[504]]})
    steps = TraceRequest("smollm2", "steps = save([])\nfor step in tracer.all():\n"
                                    "    steps.append(model.lm_head.output)\n",
                         {"kind": "generate", "inputs": ["The capital of France is"],
                          "kwargs": {"max_new_tokens": 3}, "tracer_name": "tracer",
                          "modules": {"save": "nnsight_jupyter.save"}})
    stream = TraceRequest("smollm2", "chunks = save([])\nfor step in tracer.iter[:3]:\n"
                                     "    chunks.append(model.generator.streamer.output)\n",
                          {"kind": "generate", "inputs": ["The capital of France is"],
                           "kwargs": {"max_new_tokens": 3}, "tracer_name": "tracer",
                           "modules": {"save": "nnsight_jupyter.save"}})
    with TestClient(create_app(config)) as http:
        client = Client(http, "unused")
        _wait_ready(http, {})
        sandbox = http.get("/models").json()["models"][0]["replicas"][0]["sandbox"]["active"]
        assert any(layer.startswith("weights read-only") for layer in sandbox)
        remote = [client.run(trace), client.run(generate), client.run(trace), client.run(one_token), client.run(steps),
                  client.run(stream)]
    local_model = LanguageModel("smollm2")
    with threads_like_workers():
        local = [run_request(local_model, request) for request in (trace, generate, trace, one_token, steps, stream)]
    assert all(r.error is None for r in remote + local), [r.error for r in remote + local]
    assert torch.equal(remote[3].saved["logits"], local[3].saved["logits"])
    assert len(remote[4].saved["steps"]) == 3
    for remote_step, local_step in zip(remote[4].saved["steps"], local[4].saved["steps"], strict=True):
        assert torch.equal(remote_step, local_step)
    assert torch.allclose(remote[0].saved["logits"], local[0].saved["logits"], atol=1e-4)
    assert torch.equal(remote[1].saved["ids"], local[1].saved["ids"])
    # The tokens as generate streams them: the prompt, then one per step, as a plain streamer receives them.
    streamed = []
    recorder = type("Recorder", (), {"put": lambda self, v: streamed.append(v.clone()), "end": lambda self: None})()
    prompt_ids = local_model.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad(), threads_like_workers():
        local_model._model.generate(prompt_ids, max_new_tokens=3, do_sample=False, streamer=recorder,
                                    pad_token_id=local_model.tokenizer.pad_token_id)
    chunks = remote[5].saved["chunks"]
    assert [tuple(c.shape) for c in chunks] == [tuple(prompt_ids.shape), (1,), (1,)]
    for remote_chunk, local_chunk, plain in zip(chunks, local[5].saved["chunks"], streamed, strict=False):
        assert torch.equal(remote_chunk, local_chunk) and torch.equal(remote_chunk, plain)
    assert torch.equal(remote[0].saved["logits"], remote[2].saved["logits"])
    assert remote[0].logs == ["torch.Size([1, 5, 576])"]
    # What the notebook views need of the trace comes back with it; the server keeps none of it.
    ids = local_model.tokenizer("The capital of France is", return_tensors="pt").input_ids
    assert torch.equal(remote[0].trace["input_ids"], ids)
    assert remote[0].trace["marks"] == {"model.layers.3": "saved", "lm_head": "saved"}
    assert last_trace(local_model) is None
