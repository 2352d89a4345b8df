"""`with loss.backward():` inside a trace, checked against plain autograd on the same model and input."""

from __future__ import annotations

import pytest
import torch

from nnsight_jupyter import NNsight
from nnsight_jupyter.errors import OutOfOrderError


def _loss(out):
    return out.logits[:, -1].logsumexp(-1).sum()


def _plain_grads(module, x, paths, *, zero_at=None, loss_fn=_loss):
    """Gradients of the outputs of `paths` from forward hooks and `Tensor.register_hook`, no engine involved."""
    grads = {}
    handles = []

    def capture(path):
        def hook(mod, args, out):
            def on_grad(g):
                grads[path] = g.detach().clone()
                if path == zero_at:
                    return torch.zeros_like(g)
                return None

            out.register_hook(on_grad)

        return hook

    for path in paths:
        handles.append(module.get_submodule(path).register_forward_hook(capture(path)))
    try:
        loss_fn(module(x)).backward()
    finally:
        for h in handles:
            h.remove()
        module.zero_grad(set_to_none=True)
    return grads


def _model_is_clean(module):
    assert "grad" not in torch.Tensor.__dict__, "the .grad property must come off after the block"
    assert all(p.grad is None for p in module.parameters())
    assert all(not m._forward_hooks and not m._backward_hooks for m in module.modules())


def test_grads_read_in_reverse_order_equal_plain_autograd(gpt2):
    x = gpt2.make_input(2)
    paths = ["transformer.h.0", "transformer.h.2"]
    expected = _plain_grads(gpt2.module, x, paths)
    model = NNsight(gpt2.module)
    with model.trace(x):
        h0 = model.transformer.h[0].output
        h2 = model.transformer.h[2].output
        loss = _loss(model.output)
        with loss.backward():
            g2 = h2.grad.save()
            g0 = h0.grad.save()
    assert torch.equal(g2, expected["transformer.h.2"])
    assert torch.equal(g0, expected["transformer.h.0"])
    gpt2.module.zero_grad(set_to_none=True)
    _model_is_clean(gpt2.module)


def test_assigning_a_grad_changes_the_grads_of_earlier_layers(gpt2):
    x = gpt2.make_input(1)
    paths = ["transformer.h.0", "transformer.h.1"]
    expected = _plain_grads(gpt2.module, x, paths, zero_at="transformer.h.1")
    clean = _plain_grads(gpt2.module, x, paths)
    model = NNsight(gpt2.module)
    with model.trace(x):
        h0 = model.transformer.h[0].output
        h1 = model.transformer.h[1].output
        loss = _loss(model.output)
        with loss.backward():
            before = h1.grad.clone().save()
            h1.grad = torch.zeros_like(h1.grad)
            after = h1.grad.save()
            g0 = h0.grad.save()
        wte_grad = model.transformer.wte.weight.grad.clone().save()
    gpt2.module.zero_grad(set_to_none=True)
    assert torch.equal(before, clean["transformer.h.1"])
    assert torch.count_nonzero(after) == 0
    assert not torch.allclose(g0, clean["transformer.h.0"])
    assert torch.equal(g0, expected["transformer.h.0"])
    assert wte_grad.abs().sum() > 0  # the pass went on to the parameters


def test_out_of_order_grad_is_an_error_at_the_line_and_leaves_the_model_clean(gpt2):
    x = gpt2.make_input(1)
    model = NNsight(gpt2.module)
    with pytest.raises(OutOfOrderError, match="reverse order of the forward pass") as info:
        with model.trace(x):
            h0 = model.transformer.h[0].output
            h2 = model.transformer.h[2].output
            loss = _loss(model.output)
            with loss.backward():
                h0.grad.save()
                h2.grad.save()  # the line the error points at
    assert info.traceback[-1].statement.lines[0].strip() == "h2.grad.save()  # the line the error points at"
    _model_is_clean(gpt2.module)


def test_exception_inside_the_block_stops_the_pass_and_leaves_the_model_clean(gpt2):
    x = gpt2.make_input(1)
    model = NNsight(gpt2.module)
    with pytest.raises(ZeroDivisionError):
        with model.trace(x):
            h1 = model.transformer.h[1].output
            loss = _loss(model.output)
            with loss.backward():
                h1.grad.save()
                raise ZeroDivisionError("inside the block")
    _model_is_clean(gpt2.module)
    expected = _plain_grads(gpt2.module, x, ["transformer.h.1"])
    with model.trace(x):
        h1 = model.transformer.h[1].output
        with _loss(model.output).backward():
            g1 = h1.grad.save()
    gpt2.module.zero_grad(set_to_none=True)
    assert torch.equal(g1, expected["transformer.h.1"])


def test_several_backward_passes_in_one_trace(gpt2):
    x = gpt2.make_input(1)
    out = gpt2.module(x)
    h_ref = {}
    handle = gpt2.module.transformer.h[1].register_forward_hook(lambda m, a, o: h_ref.setdefault("h", o))
    out = gpt2.module(x)
    handle.remove()
    first = torch.autograd.grad(out.logits[:, -1, 3].sum(), h_ref["h"], retain_graph=True)[0]
    second = torch.autograd.grad(out.logits[:, 0, 5].sum(), h_ref["h"])[0]
    model = NNsight(gpt2.module)
    with model.trace(x):
        h1 = model.transformer.h[1].output
        logits = model.output.logits
        with logits[:, -1, 3].sum().backward(retain_graph=True):
            a = h1.grad.save()
        with logits[:, 0, 5].sum().backward():
            b = h1.grad.save()
    gpt2.module.zero_grad(set_to_none=True)
    assert torch.equal(a, first)
    assert torch.equal(b, second)


def test_each_invoke_reads_the_grad_of_its_own_rows(gpt2):
    x = gpt2.make_input(2)
    expected = _plain_grads(gpt2.module, x, ["transformer.h.1"])["transformer.h.1"]
    model = NNsight(gpt2.module)
    with model.trace() as tracer:
        with tracer.invoke(x[:1]):
            h_a = model.transformer.h[1].output
            loss = _loss(model.output)
            with loss.backward(retain_graph=True):  # one batched forward: the graph is shared
                g_a = h_a.grad.save()
        with tracer.invoke(x[1:]):
            h_b = model.transformer.h[1].output
            loss = _loss(model.output)
            with loss.backward():
                g_b = h_b.grad.save()
    gpt2.module.zero_grad(set_to_none=True)
    assert torch.equal(g_a, expected[:1])
    assert torch.equal(g_b, expected[1:])
