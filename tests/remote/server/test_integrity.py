"""The after-job check: what a job may not leave behind is noticed, and what it may is reset."""

from __future__ import annotations

import multiprocessing

import pytest
import torch

from nnsight_jupyter.remote.server.integrity import Baseline, protect_weights, reset_shared_state

from .tiny_models import tiny_gpt2


@pytest.fixture
def model():
    return tiny_gpt2()


def _restored(model, change, undo) -> list[str]:
    baseline = Baseline(model)
    assert baseline.check() == []
    change()
    try:
        return baseline.check()
    finally:
        undo()
        assert baseline.check() == []


def test_in_place_edit(model):
    weight = model._model.transformer.h[0].attn.c_attn.weight
    problems = Baseline(model)
    with torch.no_grad():
        weight.add_(1)
    assert problems.check() == ["parameter transformer.h.0.attn.c_attn.weight was modified in place"]


def test_hooks_modules_classes_and_globals(model):
    block = model._model.transformer.h[0]
    handle = []
    assert "module transformer.h.0 gained or lost hooks" in _restored(
        model, lambda: handle.append(block.register_forward_hook(lambda *a: None)), lambda: handle[0].remove())
    original = block.mlp
    assert any("module transformer.h.0.mlp" in p for p in _restored(
        model, lambda: setattr(block, "mlp", torch.nn.Identity()), lambda: setattr(block, "mlp", original)))
    assert any("train and eval" in p for p in _restored(model, block.train, block.eval))
    assert _restored(model, lambda: setattr(torch.Tensor, "nnsj_probe", 1),
                     lambda: delattr(torch.Tensor, "nnsj_probe")) == ["class torch.Tensor was changed"]
    hooks = []
    assert any("global module hook" in p for p in _restored(
        model, lambda: hooks.append(torch.nn.modules.module.register_module_forward_hook(lambda *a: None)),
        lambda: hooks[0].remove()))
    assert any("envoy tree" in p for p in _restored(
        model, lambda: model._aliases.__setitem__("x", "transformer"), lambda: model._aliases.pop("x")))


def test_reset_shared_state(model):
    baseline = Baseline(model)
    model._model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    torch.set_grad_enabled(False)
    try:
        reset_shared_state(baseline)
        assert torch.is_grad_enabled()
        assert all(p.grad is None for p in model._model.parameters())
        assert baseline.check() == []
    finally:
        torch.set_grad_enabled(True)


def _write_protected(connection) -> None:
    model = tiny_gpt2()
    connection.send_bytes((protect_weights(model) or "").encode())
    x = torch.tensor([[1, 2, 3]])
    model._model(x)
    connection.send_bytes(b"forward ok")
    model._model.transformer.h[0].attn.c_attn.weight.data.zero_()
    connection.send_bytes(b"write went through")


def test_weights_are_read_only_after_protection():
    context = multiprocessing.get_context("forkserver")
    parent, child = context.Pipe()
    process = context.Process(target=_write_protected, args=(child,))
    process.start()
    child.close()
    messages = []
    while parent.poll(60):
        try:
            messages.append(parent.recv_bytes().decode())
        except EOFError:
            break
    process.join(10)
    assert messages[0].startswith("weights read-only") and messages[1] == "forward ok"
    assert len(messages) == 2 and process.exitcode == -11
