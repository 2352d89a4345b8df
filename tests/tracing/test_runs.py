"""Shaping a run: repeated module calls, tracer.stop(), caches and scans."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor

import nnsight_jupyter
from nnsight_jupyter import NNsight
from nnsight_jupyter.errors import ModuleNotReachedError
from nnsight_jupyter.tracing.scan import TensorInfo

from .conftest import first_tensor, reference_run


def test_each_call_of_a_looped_module_is_addressable(looped):
    model = NNsight(looped)
    x = torch.randn(2, 6, generator=torch.Generator().manual_seed(0))
    ref_out, _, _ = reference_run(looped, x, ["block"])
    assert len(ref_out["block"]) == 3
    with torch.no_grad(), model.trace(x):
        first = model.block.output.save()
        second = model.block.next().output.save()
        third = model.block.call(2).output.save()
    for got, expected in zip([first, second, third], ref_out["block"]):
        assert torch.equal(got, expected)


def test_patching_one_call_of_a_looped_module(looped):
    model = NNsight(looped)
    x = torch.randn(2, 6, generator=torch.Generator().manual_seed(0))
    seen = []

    def edit(out):
        seen.append(1)
        return out * 0 if len(seen) == 2 else out

    _, _, expected = reference_run(looped, x, [], edit={"block": edit})
    with torch.no_grad(), model.trace(x):
        model.block.call(1).output = model.block.call(1).output * 0
        out = model.output.save()
    assert torch.allclose(out, expected)


def test_asking_for_a_call_that_does_not_happen(looped):
    model = NNsight(looped)
    with pytest.raises(ModuleNotReachedError, match=r"model\.block ran 3 time\(s\).*call 5 was requested"):
        with model.trace(torch.randn(1, 6)):
            model.block.call(5).output.save()


def test_iter_in_a_trace_reads_each_call_of_a_looped_module(looped):
    """In a single-pass trace nnsight counts a module's calls: `tracer.iter[i]` reads call i."""
    model = NNsight(looped)
    x = torch.randn(2, 6, generator=torch.Generator().manual_seed(0))
    ref_out, ref_in, _ = reference_run(looped, x, ["block"])
    with torch.no_grad(), model.trace(x) as tracer:
        kept = nnsight_jupyter.save([])
        for step in tracer.iter[0:3]:
            if step == 1:
                second_input = model.block.input.save()
            kept.append(model.block.output)
    assert len(kept) == 3
    for got, expected in zip(kept, ref_out["block"], strict=True):
        assert torch.equal(got, expected)
    assert torch.equal(second_input, first_tensor(ref_in["block"][1]))


def test_iter_in_a_trace_patches_the_chosen_call(looped):
    model = NNsight(looped)
    x = torch.randn(2, 6, generator=torch.Generator().manual_seed(0))
    calls = []

    def edit(out):
        calls.append(1)
        return out * 0 if len(calls) == 2 else out

    _, _, expected = reference_run(looped, x, [], edit={"block": edit})
    with torch.no_grad(), model.trace(x) as tracer:
        for _ in tracer.iter[1]:
            model.block.output = model.block.output * 0
        out = model.output.save()
    assert torch.equal(out, expected)
    with torch.no_grad(), model.trace(x) as tracer:
        with tracer.iter[1]:  # nnsight's block spelling
            model.block.output = model.block.output * 0
        out = model.output.save()
    assert torch.equal(out, expected)


def test_iter_past_a_modules_last_call_says_how_many_there_were(looped):
    model = NNsight(looped)
    x = torch.randn(1, 6)
    with torch.no_grad():
        plain = looped(x)
    message = r"model\.block ran 3 time\(s\).*call 3 was requested.*tracer\.iter"
    with pytest.raises(ModuleNotReachedError, match=message):
        with model.trace(x) as tracer:
            for _ in tracer.iter[3]:
                model.block.output.save()
    with torch.no_grad():
        assert torch.equal(looped(x), plain)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in looped.modules())


def test_stop_ends_the_forward_after_the_module(arch):
    model = NNsight(arch.module)
    x = arch.make_input(1)
    ref_out, _, _ = reference_run(arch.module, x, [arch.early])
    later = []
    handle = arch.module.get_submodule(arch.final).register_forward_hook(lambda *a: later.append(1))
    try:
        with torch.no_grad(), model.trace(x) as tracer:
            early = first_tensor(model.resolve(arch.early).output).save()
            tracer.stop()
    finally:
        handle.remove()
    assert later == []
    assert torch.equal(early, first_tensor(ref_out[arch.early][0]))
    after = []
    handle = arch.module.get_submodule(arch.final).register_forward_hook(lambda *a: after.append(1))
    try:
        with torch.no_grad(), model.trace(x):
            model.resolve(arch.early).output
    finally:
        handle.remove()
    assert after == [1]  # without stop the whole model runs


def test_stop_reports_values_it_cut_off(gpt2):
    model = NNsight(gpt2.module)
    with pytest.raises(ModuleNotReachedError, match=r"tracer\.stop\(\) ended the forward pass at model\.transformer\.h\[0\]"):
        with model.trace() as tracer:
            with tracer.invoke(gpt2.make_input(1)):
                model.transformer.h[0].output
                tracer.stop()
            with tracer.invoke(gpt2.make_input(1)):
                model.lm_head.output.save()


def test_cache_records_every_module(arch):
    model = NNsight(arch.module)
    x = arch.make_input(2)
    paths = [p for p, _ in arch.module.named_modules()]
    ref_out, _, _ = reference_run(arch.module, x, paths)
    with torch.no_grad(), model.trace(x) as tracer:
        cache = tracer.cache()
    ran = [p for p in paths if ref_out[p]]
    assert set(cache) == set(ran)
    for p in ran:
        assert torch.equal(first_tensor(cache[p].output), first_tensor(ref_out[p][0]))
    assert torch.equal(first_tensor(cache[f"model.{arch.late}"].output), first_tensor(ref_out[arch.late][0]))


def test_cache_of_selected_modules_with_inputs_and_tree_access(gpt2):
    model = NNsight(gpt2.module)
    x = gpt2.make_input(1)
    ref_out, ref_in, _ = reference_run(gpt2.module, x, ["transformer.h.1", "lm_head"])
    out, cache = model.run_with_cache(x, modules=[model.transformer.h[1], "model.lm_head"], include_inputs=True)
    assert set(cache) == {"transformer.h.1", "lm_head"}
    assert torch.equal(cache.transformer.h[1].output, ref_out["transformer.h.1"][0])
    assert torch.equal(cache["lm_head"].input, ref_in["lm_head"][0][0][0])
    assert torch.allclose(out.logits, ref_out["lm_head"][0])
    assert not cache["lm_head"].output.requires_grad


def test_cache_sees_edits_made_in_the_trace(gpt2):
    model = NNsight(gpt2.module)
    x = gpt2.make_input(1)
    with torch.no_grad(), model.trace(x) as tracer:
        cache = tracer.cache(modules=[model.transformer.h[0]])
        model.transformer.h[0].output[:] = 1.0
    assert torch.equal(cache["transformer.h.0"].output, torch.ones(1, 7, 32))


def test_cache_records_every_call_of_a_looped_module(looped):
    model = NNsight(looped)
    x = torch.randn(1, 6)
    ref_out, _, _ = reference_run(looped, x, ["block"])
    _, cache = model.run_with_cache(x)
    assert [c.call for c in cache["block"].calls] == [0, 1, 2]
    for call, expected in zip(cache["block"].calls, ref_out["block"]):
        assert torch.equal(call.output, expected)


def test_scan_gives_shapes_without_real_compute(arch):
    model = NNsight(arch.module)
    x = arch.make_input(2)
    paths = [p for p, _ in arch.module.named_modules()]
    ref_out, _, _ = reference_run(arch.module, x, paths)
    fakes = []
    handle = arch.module.get_submodule(arch.late).register_forward_hook(
        lambda mod, args, out: fakes.append(isinstance(first_tensor(out), FakeTensor))
    )
    try:
        shapes = model.scan(x)
    finally:
        handle.remove()
    assert fakes == [True]
    for p in paths:
        if ref_out[p]:
            info = shapes[p].output
            expected = first_tensor(ref_out[p][0])
            got = _first_info(info)
            assert got.shape == tuple(expected.shape), p
            assert got.dtype == expected.dtype, p
    assert list(shapes)[0] == ""  # the root runs first
    assert "model" in repr(shapes)


def _first_info(info):
    while not isinstance(info, TensorInfo):
        info = next(v for v in info.values() if isinstance(v, (TensorInfo, tuple, dict))) if isinstance(
            info, dict) else info[0]
    return info
