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
    """The problems ``change`` causes; the quick fingerprint must see every one of them."""
    baseline = Baseline(model)
    assert baseline.check() == []
    change()
    try:
        problems = baseline.check()
        if problems:
            quick = baseline._quick
            assert not quick.same(quick.take(), baseline._quick_value), "the quick check missed a change"
        return problems
    finally:
        undo()
        assert baseline.check() == []
        assert baseline._quick.same(baseline._quick.take(), baseline._quick_value)


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


def _swap(obj, name, value):
    """A change and its undo that set ``obj.name`` to ``value`` and back (or delete it again)."""
    missing = object()
    before = getattr(obj, name, missing)

    def undo():
        if before is missing:
            delattr(obj, name)
        else:
            setattr(obj, name, before)

    return (lambda: setattr(obj, name, value)), undo


def test_every_kind_of_change_is_seen_by_both_checks(model):
    net = model._model
    linear = net.transformer.h[0].attn.c_attn
    weight = linear.weight
    hooks = []

    def view_weight():
        weight.data = weight.data.view(-1)  # same storage and version, another shape

    def unview_weight():
        weight.data = weight.data.view(32, 96)

    def add_public_drop_private():
        linear.__dict__["_nnsj_private"] = 1
        baseline = Baseline(model)
        del linear.__dict__["_nnsj_private"]
        linear.nnsj_public = 2
        return baseline.check()

    class Subclass(type(linear)):
        pass

    cases = {
        "in place": (lambda: torch.no_grad()(weight.add_)(0), None),
        "parameter replaced": _swap(linear, "weight", torch.nn.Parameter(weight.detach().clone())),
        "buffer replaced": (lambda: net.transformer.h[0].attn.register_buffer("nnsj_buffer", torch.ones(2)),
                            lambda: net.transformer.h[0].attn._buffers.pop("nnsj_buffer")),
        "reshaped in place": (view_weight, unview_weight),
        "requires_grad": (lambda: weight.requires_grad_(False), lambda: weight.requires_grad_(True)),
        "tensor hook": (lambda: hooks.append(weight.register_hook(lambda grad: grad)), lambda: hooks.pop().remove()),
        "public attribute added": _swap(linear, "nnsj_public", 1),
        "public attribute replaced": _swap(linear, "nx", 12345678),
        "class swapped": _swap(linear, "__class__", Subclass),
        "method replaced on a model class": _swap(type(net.transformer.h[0]), "forward", lambda self, *a, **k: None),
        "config attribute replaced": _swap(net.config, "n_layer", 99),
        "wrapper attribute": (lambda: vars(model).__setitem__("nnsj_public", object()),
                              lambda: vars(model).pop("nnsj_public")),
    }
    for name, (change, undo) in cases.items():
        if undo is None:  # a version bump cannot be undone: check it on a fresh baseline and stop there
            baseline = Baseline(model)
            change()
            assert baseline.check() and not baseline._quick.same(baseline._quick.take(), baseline._quick_value), name
            continue
        assert _restored(model, change, undo), name
    linear.__dict__.pop("nnsj_public", None)
    assert add_public_drop_private(), "a public attribute added while a private one went was missed"
    del linear.nnsj_public


def test_a_harmless_private_change_takes_the_full_check_once(model, monkeypatch):
    baseline = Baseline(model)
    full = []
    real = baseline._differences
    monkeypatch.setattr(baseline, "_differences", lambda: full.append(1) or real())
    assert baseline.check() == [] and full == []
    model._model.transformer.h[1].mlp._nnsj_cache = object()  # what a module may do lazily in a forward
    try:
        assert baseline.check() == [] and full == [1]
        assert baseline.check() == [] and full == [1], "the new fingerprint is used from then on"
        model._model.transformer.h[1].mlp.nnsj_public = 1
        assert baseline.check() == ["module transformer.h.1.mlp was replaced or its attributes changed"]
    finally:
        del model._model.transformer.h[1].mlp._nnsj_cache
        model._model.transformer.h[1].mlp.__dict__.pop("nnsj_public", None)


_AUDITED_CHECK = """
import sys
from nnsight_jupyter.remote.server.integrity import Baseline
from tests.remote.server.tiny_models import tiny_gpt2
baseline = Baseline(tiny_gpt2())
events = []
sys.addaudithook(lambda event, args: events.append(event))
problems = baseline.check()
print(len(events), problems)
"""


def test_the_quick_check_raises_no_audit_events():
    """A job process's audit hook receives every audit event: the check after each job raises none
    (each ``id()`` call raises one, and a check by ids made thousands)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    out = subprocess.run([sys.executable, "-c", _AUDITED_CHECK], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "[]"]
