"""Gradients inside a trace, checked against `register_full_backward_hook` on the same model."""

from __future__ import annotations

import torch

from nnsight_jupyter import NNsight

from .conftest import first_tensor


def _reference_grads(module, x, paths, loss_fn, zero_at=None):
    """Gradients w.r.t. module outputs from plain backward hooks (and optionally zero one of them)."""
    grads = {}
    handles = []
    for path in paths + ([zero_at] if zero_at else []):
        sub = module.get_submodule(path)

        def hook(mod, grad_input, grad_output, path=path):
            grads.setdefault(path, grad_output[0].detach().clone())

        handles.append(sub.register_full_backward_hook(hook))
    if zero_at:
        sub = module.get_submodule(zero_at)
        handles.append(sub.register_forward_hook(
            lambda mod, args, out: out.register_hook(lambda g: torch.zeros_like(g)) and None))
    try:
        out = module(x)
        loss_fn(out).backward()
    finally:
        for h in handles:
            h.remove()
        module.zero_grad(set_to_none=True)
    return grads


def test_retain_grad_and_backward_inside_the_trace(arch):
    model = NNsight(arch.module)
    x = arch.make_input(2)
    x = x.float().requires_grad_() if x.is_floating_point() else x

    def loss_fn(out):
        return first_tensor(out).pow(2).mean()

    expected = _reference_grads(arch.module, x, [arch.late], loss_fn)
    late = model.resolve(arch.late)
    with model.trace(x):
        hidden = first_tensor(late.output)
        hidden.retain_grad()
        hidden = hidden.save()
        loss = first_tensor(model.output).pow(2).mean()
        loss.backward()
    arch.module.zero_grad(set_to_none=True)
    assert hidden.grad is not None
    assert torch.allclose(hidden.grad, expected[arch.late], atol=1e-6, rtol=1e-4)


def test_modifying_a_gradient_changes_earlier_gradients(gpt2):
    model = NNsight(gpt2.module)
    x = gpt2.make_input(1)

    def loss_fn(out):
        return out.logits[:, -1].logsumexp(-1).sum()

    clean = _reference_grads(gpt2.module, x, ["transformer.h.0"], loss_fn)
    zeroed = _reference_grads(gpt2.module, x, ["transformer.h.0"], loss_fn, zero_at="transformer.h.1")
    with model.trace(x):
        h0 = model.transformer.h[0].output
        h0.retain_grad()
        h0 = h0.save()
        h1 = model.transformer.h[1].output
        h1.register_hook(lambda g: torch.zeros_like(g))
        loss = model.output.logits[:, -1].logsumexp(-1).sum()
        loss.backward()
    gpt2.module.zero_grad(set_to_none=True)
    assert not torch.allclose(zeroed["transformer.h.0"], clean["transformer.h.0"])
    assert torch.allclose(h0.grad, zeroed["transformer.h.0"], atol=1e-6)


def test_gradient_of_a_patched_run(gpt2):
    model = NNsight(gpt2.module)
    x = gpt2.make_input(1)
    with model.trace(x):
        h = model.transformer.h[1].output
        h[:, 0] = 0.0
        h.retain_grad()
        h = h.save()
        model.output.logits.sum().backward()
    gpt2.module.zero_grad(set_to_none=True)
    assert h.grad.shape == h.shape
    assert h.grad.abs().sum() > 0
