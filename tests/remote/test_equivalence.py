"""The same trace run locally and through the remote path gives bit-identical saved values.

`remote="local"` sends the request through the codec, runs it with the server's `run_request`
and sends the result back through the codec: everything a server does except the network.
"""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import nnsight_jupyter
from nnsight_jupyter import NNsight

from .identical import assert_identical
from nnsight_jupyter.errors import NotSavedError, OutOfOrderError
from nnsight_jupyter.errors import RemoteTraceError


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=3, n_embd=32, n_head=4, vocab_size=97, n_positions=64, bos_token_id=0, eos_token_id=0)
    return NNsight(GPT2LMHeadModel(cfg).eval(), remote_id="tiny-gpt2")


def _both(run):
    local, remote = run(False), run("local")
    assert local.keys() == remote.keys()
    return local, remote


X = torch.randint(1, 97, (2, 6), generator=torch.Generator().manual_seed(1))
Y = torch.randint(1, 97, (1, 6), generator=torch.Generator().manual_seed(2))


def test_save_and_derived_values(model):
    def run(remote):
        with model.trace(X, remote=remote):
            h = model.transformer.h[1].output.save()
            mean = h.mean(-1).save()
            out = model.output.save()
        return {"h": h, "mean": mean, "logits": out.logits, "type": type(out).__name__}

    local, remote = _both(run)
    for key in local:
        assert_identical(local[key], remote[key])


def test_patching_in_place_and_whole_value(model):
    layer = model.transformer.h[0]
    scale = 1.5

    def run(remote):
        with model.trace(X, remote=remote):
            h = layer.output
            h[:, -1] = 0
            model.transformer.h[1].output = model.transformer.h[1].output * scale
            model.transformer.h[2].input = model.transformer.h[2].input + 1
            logits = model.lm_head.output.save()
        return {"logits": logits}

    local, remote = _both(run)
    assert_identical(local, remote)


def test_invokes_with_cross_invoke_sharing(model):
    def run(remote):
        with model.trace(remote=remote) as tracer:
            with tracer.invoke(X):
                donor = model.transformer.h[1].output[:, -1]
                a = model.lm_head.output.save()
            with tracer.invoke(Y):
                model.transformer.h[1].output[:, -1] = donor[:1]
                b = model.lm_head.output.save()
            with tracer.invoke():
                everything = model.lm_head.output.save()
        return {"a": a, "b": b, "all": everything}

    local, remote = _both(run)
    assert_identical(local, remote)


def test_generation_with_step_interventions(model):
    def run(remote):
        with model.generate(Y, max_new_tokens=4, do_sample=False, pad_token_id=0, remote=remote) as tracer:
            per_step = nnsight_jupyter.save([])
            for step in tracer.iter[1:3]:
                model.transformer.h[0].output[:] += 1.0
                per_step.append(model.lm_head.output)
            ids = tracer.result.save()
        return {"steps": per_step, "ids": ids}

    local, remote = _both(run)
    assert_identical(local, remote)


def test_gradients(model):
    def run(remote):
        with model.trace(X, remote=remote):
            h = model.transformer.h[1].output
            h.retain_grad()
            model.output.logits.logsumexp(-1).sum().backward()
            grad = h.grad.save()
        model._model.zero_grad(set_to_none=True)
        return {"grad": grad}

    local, remote = _both(run)
    assert_identical(local, remote)


def test_backward_context(model):
    def run(remote):
        with model.trace(X, remote=remote):
            h0 = model.transformer.h[0].output
            h2 = model.transformer.h[2].output
            loss = model.output.logits.logsumexp(-1).sum()
            with loss.backward():
                g2 = h2.grad.save()
                h2.grad = g2 * 2
                g0 = h0.grad.save()
        model._model.zero_grad(set_to_none=True)
        return {"g0": g0, "g2": g2}

    local, remote = _both(run)
    assert_identical(local, remote)


def test_skip(model):
    def run(remote):
        with model.trace(X, remote=remote):
            model.transformer.h[1].skip(model.transformer.h[1].input * 0.5)
            h1 = model.transformer.h[1].output.save()
            logits = model.lm_head.output.save()
        return {"h1": h1, "logits": logits}

    local, remote = _both(run)
    assert_identical(local, remote)


def test_iter_over_the_calls_of_a_looped_module():
    from tests.tracing.conftest import LoopedBlock

    torch.manual_seed(0)
    looped = NNsight(LoopedBlock().eval(), remote_id="looped")
    x = torch.randn(2, 6, generator=torch.Generator().manual_seed(3))

    def run(remote):
        with torch.no_grad(), looped.trace(x, remote=remote) as tracer:
            calls = nnsight_jupyter.save([])
            for step in tracer.iter[0:3]:
                if step == 1:
                    looped.block.output = looped.block.output * 0
                calls.append(looped.block.output)
            out = looped.output.save()
        return {"calls": calls, "out": out}

    local, remote = _both(run)
    assert len(local["calls"]) == 3 and not local["calls"][1].any()
    assert_identical(local, remote)


def test_barrier(model):
    def run(remote):
        with model.trace(remote=remote) as tracer:
            barrier = tracer.barrier(2)
            with tracer.invoke(X[:1]):
                emb = model.transformer.wte.output
                barrier()
            with tracer.invoke(Y):
                model.transformer.wte.output
                barrier()
                model.transformer.wte.output = emb
                logits = model.lm_head.output.save()
        return {"logits": logits}

    local, remote = _both(run)
    assert_identical(local, remote)


def test_rename_aliases_travel_with_the_trace():
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=3, n_embd=32, n_head=4, vocab_size=97, n_positions=64, bos_token_id=0, eos_token_id=0)
    renamed = NNsight(GPT2LMHeadModel(cfg).eval(), remote_id="tiny-gpt2", rename={"transformer.h": "layers",
                                                                                  "mlp": "ffn"})

    def run(remote):
        with renamed.trace(X, remote=remote):
            ffn = renamed.layers[1].ffn.output.save()
            logits = renamed.lm_head.output.save()
        return {"ffn": ffn, "logits": logits}

    local, remote = _both(run)
    assert_identical(local, remote)
    assert "layers" not in renamed._model.__dict__


def test_session_is_one_job(model, monkeypatch):
    from nnsight_jupyter.remote import backends

    jobs = []
    real = backends.remote_backend

    def counting(remote):
        backend = real(remote)
        execute = backend.execute

        def counted(call):
            jobs.append(call.block)
            return execute(call)

        backend.execute = counted
        return backend

    monkeypatch.setattr(backends, "remote_backend", counting)

    def run(remote):
        with model.session(remote=remote):
            with model.trace(X[:1]):
                h = model.transformer.h[1].output
            with model.trace(Y):
                model.transformer.h[1].output[:, -1] = h[:, -1]
                logits = model.lm_head.output.save()
        return {"logits": logits}

    local, remote = _both(run)
    assert_identical(local, remote)
    assert len(jobs) == 1


def test_edits_travel_with_each_trace(model):
    factor = 0.5
    with model.edit() as edited:
        model.transformer.h[1].mlp.output[:] = model.transformer.h[1].mlp.output * factor

    def run(remote):
        with edited.trace(X, remote=remote):
            mlp = edited.transformer.h[1].mlp.output.clone().save()
            logits = edited.lm_head.output.save()
        return {"mlp": mlp, "logits": logits}

    local, remote = _both(run)
    assert_identical(local, remote)
    with model.trace(X):
        plain = model.transformer.h[1].mlp.output.clone().save()
    assert torch.equal(local["mlp"], plain * factor)


def test_iter_block(model):
    def run(remote):
        with model.generate(Y, max_new_tokens=4, do_sample=False, pad_token_id=0, remote=remote) as tracer:
            per_step = nnsight_jupyter.save([])
            with tracer.iter[1:3]:
                model.transformer.h[0].output[:] += 1.0
                per_step.append(model.lm_head.output)
            ids = tracer.result.save()
        return {"per_step": per_step, "ids": ids}

    local, remote = _both(run)
    assert len(local["per_step"]) == 2
    assert_identical(local, remote)


def test_cache(model):
    def run(remote):
        with model.trace(X, remote=remote) as tracer:
            cache = tracer.cache(include_inputs=True)
        return {path: (cache[path].output, cache[path].inputs) for path in cache}

    local, remote = _both(run)
    for path in local:
        local_tensors, remote_tensors = _tensors(local[path]), _tensors(remote[path])
        assert len(local_tensors) == len(remote_tensors) > 0, path
        for a, b in zip(local_tensors, remote_tensors):
            assert_identical(a, b)
    with pytest.raises(Exception, match="not sent back from the remote run"):
        remote[""][0].past_key_values.get_seq_length()


def test_cache_options_per_step_and_root_spelling(model):
    def run(remote):
        with model.generate(Y, max_new_tokens=3, do_sample=False, pad_token_id=0, remote=remote) as tracer:
            cache = tracer.cache(modules=["model.transformer.h.1"], include_inputs=True, dtype=torch.float64)
        entry = cache.model.transformer.h[1]
        return {"outputs": entry.output, "inputs": entry.input}

    local, remote = _both(run)
    assert len(local["outputs"]) == 3 and local["outputs"][0].dtype == torch.float64
    assert_identical(local, remote)


def _tensors(value):
    """Every tensor inside a value, in order (cache objects that stay on the server are skipped)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def test_notebook_function_and_printing(model, capsys):
    def double(t):
        return t * 2

    def run(remote):
        with model.trace(X, remote=remote):
            h = double(model.transformer.h[0].output).save()
            print("norm", round(float(h.detach().norm()), 3))
        return {"h": h}

    local, remote = _both(run)
    assert_identical(local, remote)
    printed = capsys.readouterr().out.splitlines()
    assert printed.count(printed[0]) == 2 and printed[0].startswith("norm ")


def test_unsaved_names_fail_the_same_way(model):
    with model.trace(X, remote="local"):
        h = model.transformer.h[0].output
    with pytest.raises(NotSavedError, match="`h` was set inside the trace"):
        h + 1


def test_errors_come_back_as_the_same_exception_with_the_users_line(model):
    with pytest.raises(OutOfOrderError) as info:
        with model.trace(X, remote="local"):
            late = model.transformer.h[2].output
            early = model.transformer.h[0].output  # too late
    note = "\n".join(getattr(info.value, "__notes__", []))
    assert "too late" in note and "Remote traceback" in note
    with pytest.raises(RemoteTraceError, match="CustomProblem"):
        with model.trace(X, remote="local"):
            class CustomProblem(Exception):
                pass
            raise CustomProblem("boom")


def test_model_without_a_name_cannot_go_remote():
    net = NNsight(torch.nn.Linear(2, 2))
    with pytest.raises(Exception, match="no name a server could load it by"):
        with net.trace(torch.randn(1, 2), remote="local"):
            net.output.save()
