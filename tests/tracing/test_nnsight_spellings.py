"""Small things code written for nnsight relies on: what `.to()` returns and the built-in kinds of errors."""

from __future__ import annotations

import pytest
import torch

from nnsight_jupyter import NNsight


def test_to_returns_the_wrapper_and_moves_the_module(gpt2):
    model = NNsight(gpt2.module)
    moved = model.to(torch.float64)
    assert moved is model
    assert all(p.dtype == torch.float64 for p in gpt2.module.parameters())
    x = gpt2.make_input(1)
    with torch.no_grad(), model.to(torch.float32).trace(x):
        out = model.output.logits.save()
    with torch.no_grad():
        assert torch.equal(out, gpt2.module(x).logits)


def test_nested_invokes_and_a_trace_without_input_are_value_errors(gpt2):
    model = NNsight(gpt2.module)
    with pytest.raises(ValueError, match="invokes cannot be nested"):
        with model.trace() as tracer:
            with tracer.invoke(gpt2.make_input(1)):
                with tracer.invoke(gpt2.make_input(1)):
                    pass
    with pytest.raises(ValueError, match="This trace has no input"):
        with model.trace():
            model.output.save()
