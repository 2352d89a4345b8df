"""`with model.scan(x):` runs a block beside a fake-tensor run; shapes checked against a real run with hooks."""

from __future__ import annotations

import torch

from nnsight_jupyter import NNsight


def test_scan_block_reads_shapes_without_computing(gpt2):
    x = gpt2.make_input(3)
    seen = {}
    handle = gpt2.module.transformer.h[1].register_forward_hook(lambda m, a, out: seen.setdefault("h1", out))
    with torch.no_grad():
        gpt2.module(x)
    handle.remove()
    model = NNsight(gpt2.module)
    with model.scan(x):
        shape = model.transformer.h[1].output.shape
        dtype = model.transformer.h[1].output.dtype
        fake = type(model.lm_head.output).__name__
    assert tuple(shape) == tuple(seen["h1"].shape) and dtype == seen["h1"].dtype
    assert fake == "FakeTensor"
    assert all(not isinstance(p, torch._subclasses.fake_tensor.FakeTensor) for p in gpt2.module.parameters())


def test_scan_call_is_still_the_table_of_shapes(gpt2):
    x = gpt2.make_input(2)
    model = NNsight(gpt2.module)
    shapes = model.scan(x)
    with torch.no_grad():
        out = gpt2.module(x)
    assert shapes["model.lm_head"].output.shape == tuple(out.logits.shape)
    assert "transformer.h.0" in shapes and len(shapes) == len(list(shapes))
