"""`tracer.barrier(n)`: invokes meet before going on; checked against plain hooks that copy an activation."""

from __future__ import annotations

import pytest
import torch

from nnsight_jupyter import NNsight
from nnsight_jupyter.errors import ModuleNotReachedError


def _copied_embedding_reference(gpt2, a, b):
    """Logits of prompt b run (in one batch after a) with prompt a's token embeddings, by a plain forward hook."""

    def copy_row(module, args, out):
        out = out.clone()
        out[1] = out[0]
        return out

    handle = gpt2.module.transformer.wte.register_forward_hook(copy_row)
    with torch.no_grad():
        logits = gpt2.module(torch.cat([a, b])).logits
    handle.remove()
    return logits[1:]


def test_barrier_lets_one_invoke_patch_in_another_invokes_value_at_the_same_module(gpt2):
    a, b = gpt2.make_input(1), gpt2.make_input(1)
    expected = _copied_embedding_reference(gpt2, a, b)
    model = NNsight(gpt2.module)
    order = []
    with torch.no_grad(), model.trace() as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke(a):
            emb = model.transformer.wte.output
            order.append("a read")
            barrier()
            order.append("a after")
        with tracer.invoke(b):
            model.transformer.wte.output
            order.append("b read")
            barrier()
            order.append("b after")
            model.transformer.wte.output = emb
            logits = model.output.logits.save()
    assert order.index("a after") > order.index("b read") and order.index("b after") > order.index("a read")
    assert torch.equal(logits, expected)


def test_a_barrier_not_every_invoke_reaches_is_reported(gpt2):
    model = NNsight(gpt2.module)
    with pytest.raises(ModuleNotReachedError, match=r"tracer.barrier\(3\) was called by 2 of the 3"):
        with model.trace() as tracer:
            barrier = tracer.barrier(3)
            with tracer.invoke(gpt2.make_input(1)):
                barrier()
            with tracer.invoke(gpt2.make_input(1)):
                barrier()
