"""`with model.session():` traces that share values without saving; checked against plain hooks."""

from __future__ import annotations

import pytest
import torch

from nnsight_jupyter import NNsight
from nnsight_jupyter.errors import NotSavedError


def _patched_reference(gpt2, source, target):
    """Logits of `target` with block 1's last-position output taken from a run on `source`, by plain hooks."""
    kept = {}
    block = gpt2.module.transformer.h[1]

    def keep(mod, args, out):
        kept["h"] = out.detach().clone()

    def patch(mod, args, out):
        out = out.clone()
        out[:, -1] = kept["h"][:, -1]
        return out

    with torch.no_grad():
        handle = block.register_forward_hook(keep)
        gpt2.module(source)
        handle.remove()
        handle = block.register_forward_hook(patch)
        logits = gpt2.module(target).logits
        handle.remove()
    return logits


def test_traces_in_a_session_share_unsaved_values(gpt2):
    a, b = gpt2.make_input(1), gpt2.make_input(1)
    expected = _patched_reference(gpt2, a, b)
    model = NNsight(gpt2.module)
    with torch.no_grad(), model.session():
        with model.trace(a):
            h = model.transformer.h[1].output  # not saved
        with model.trace(b):
            model.transformer.h[1].output[:, -1] = h[:, -1]
            logits = model.output.logits.save()
    assert torch.equal(logits, expected)
    with pytest.raises(NotSavedError):  # the session's edge filters what was not saved
        h.shape  # noqa: B018


def run_session_in_a_function(model, a, b):
    with model.session():
        with model.trace(a):
            h = model.transformer.h[1].output
        with model.trace(b):
            model.transformer.h[1].output[:, -1] = h[:, -1]
            logits = model.output.logits.save()
    return logits


def test_a_session_inside_a_function(gpt2):
    a, b = gpt2.make_input(1), gpt2.make_input(1)
    expected = _patched_reference(gpt2, a, b)
    with torch.no_grad():
        assert torch.equal(run_session_in_a_function(NNsight(gpt2.module), a, b), expected)
