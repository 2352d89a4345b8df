"""`model.edit()`: interventions kept for later traces, checked against a plain forward hook doing the same."""

from __future__ import annotations

import torch

from nnsight_jupyter import NNsight


def _zeroed_mlp_logits(gpt2, x):
    handle = gpt2.module.transformer.h[1].mlp.register_forward_hook(lambda m, a, out: torch.zeros_like(out))
    try:
        with torch.no_grad():
            return gpt2.module(x).logits
    finally:
        handle.remove()


def test_edit_applies_to_the_edited_model_only(gpt2):
    x = gpt2.make_input(2)
    expected = _zeroed_mlp_logits(gpt2, x)
    with torch.no_grad():
        clean = gpt2.module(x).logits
    model = NNsight(gpt2.module)
    with model.edit() as edited:
        model.transformer.h[1].mlp.output[:] = 0
    assert edited is not model
    with torch.no_grad(), edited.trace(x):
        seen = edited.transformer.h[1].mlp.output.clone().save()  # the body sees the edited value
        logits = edited.output.logits.save()
    with torch.no_grad(), model.trace(x):
        untouched = model.output.logits.save()
    assert torch.count_nonzero(seen) == 0
    assert torch.equal(logits, expected)
    assert torch.equal(untouched, clean)


def test_inplace_edit_and_clear_edits(gpt2):
    x = gpt2.make_input(1)
    expected = _zeroed_mlp_logits(gpt2, x)
    with torch.no_grad():
        clean = gpt2.module(x).logits
    model = NNsight(gpt2.module)
    layer = model.transformer.h[1]
    with model.edit(inplace=True):
        layer.mlp.output[:] = 0
    for _ in range(2):  # every later trace runs the edit
        with torch.no_grad(), model.trace(x):
            logits = model.output.logits.save()
        assert torch.equal(logits, expected)
    model.clear_edits()
    with torch.no_grad(), model.trace(x):
        logits = model.output.logits.save()
    assert torch.equal(logits, clean)
