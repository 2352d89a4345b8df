"""`.skip(value)`: a module's forward does not run and `value` is its output; checked against plain hooks."""

from __future__ import annotations

import pytest
import torch

from nnsight_jupyter import NNsight
from nnsight_jupyter.errors import OutOfOrderError


def _count_calls(module):
    calls = []
    handle = module.register_forward_pre_hook(lambda mod, args: calls.append(1))
    return calls, handle


def _plain_logits_with_block_replaced(gpt2, x, index, value_fn):
    """Logits when block `index` returns value_fn(its input), by a plain forward hook."""
    handle = gpt2.module.transformer.h[index].register_forward_hook(lambda m, args, out: value_fn(args[0]))
    try:
        with torch.no_grad():
            return gpt2.module(x).logits
    finally:
        handle.remove()


def test_skip_uses_the_value_and_does_not_run_the_module(gpt2):
    x = gpt2.make_input(2)
    expected = _plain_logits_with_block_replaced(gpt2, x, 1, lambda h: h)
    model = NNsight(gpt2.module)
    calls, handle = _count_calls(gpt2.module.transformer.h[1].attn)
    try:
        with torch.no_grad(), model.trace(x):
            h0 = model.transformer.h[0].output
            model.transformer.h[1].skip(h0)
            h1 = model.transformer.h[1].output.save()
            logits = model.output.logits.save()
    finally:
        handle.remove()
    assert calls == []
    assert h1 is h0 or torch.equal(h1, h0)
    assert torch.equal(logits, expected)


def test_skip_in_one_invoke_replaces_only_its_rows(gpt2):
    x = gpt2.make_input(2)
    skipped = _plain_logits_with_block_replaced(gpt2, x, 1, lambda h: h)
    with torch.no_grad():
        clean = gpt2.module(x).logits
    model = NNsight(gpt2.module)
    with torch.no_grad(), model.trace() as tracer:
        with tracer.invoke(x[:1]):
            model.transformer.h[1].skip(model.transformer.h[1].input)
            a = model.output.logits.save()
        with tracer.invoke(x[1:]):
            b = model.output.logits.save()
    assert torch.equal(a, skipped[:1])
    assert torch.equal(b, clean[1:])


def test_skip_after_the_module_ran_is_a_clear_error(gpt2):
    x = gpt2.make_input(1)
    model = NNsight(gpt2.module)
    with pytest.raises(OutOfOrderError, match=r"transformer\.h\[0\]\.skip\(\) came after"):
        with model.trace(x):
            h1 = model.transformer.h[1].output
            model.transformer.h[0].skip(h1)
    with torch.no_grad(), model.trace(x):  # the model runs normally afterwards
        out = model.output.logits.save()
    with torch.no_grad():
        assert torch.equal(out, gpt2.module(x).logits)
