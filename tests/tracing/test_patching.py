"""Editing values: in-place edits and whole-value assignment of outputs and inputs."""

from __future__ import annotations

import torch

from nnsight_jupyter import NNsight

from .conftest import first_tensor, reference_run


def _zero_last(out):
    t = first_tensor(out).clone()
    t[:, -1] = 0
    return t if isinstance(out, torch.Tensor) else (t, *out[1:])


def test_in_place_edit_changes_the_rest_of_the_forward(arch):
    model = NNsight(arch.module)
    x = arch.make_input(2)
    ref_out, _, ref_result = reference_run(arch.module, x, [arch.late], edit={arch.early: _zero_last})
    early, late = model.resolve(arch.early), model.resolve(arch.late)
    with torch.no_grad(), model.trace(x):
        first_tensor(early.output)[:, -1] = 0
        late_out = late.output.save()
        result = model.output.save()
    assert torch.allclose(first_tensor(late_out), first_tensor(ref_out[arch.late][0]), atol=1e-6)
    assert torch.allclose(first_tensor(result), first_tensor(ref_result), atol=1e-5)
    _, _, clean = reference_run(arch.module, x, [])
    assert not torch.allclose(first_tensor(result), first_tensor(clean))


def test_in_place_scale_and_copy(gpt2):
    model = NNsight(gpt2.module)
    x = gpt2.make_input(2)
    other = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(5))

    def edit(out):
        out = out.clone() * 1.5
        out[:] = other
        return out

    _, _, expected = reference_run(gpt2.module, x, [], edit={"transformer.h.1": edit})
    with torch.no_grad(), model.trace(x):
        h = model.transformer.h[1].output
        h *= 1.5
        h[:] = other
        logits = model.lm_head.output.save()
    assert torch.allclose(logits, expected.logits, atol=1e-5)


def test_whole_value_assignment_of_output(arch):
    model = NNsight(arch.module)
    x = arch.make_input(2)

    def replace(out):
        t = first_tensor(out) * 0.5 + 1.0
        return t if isinstance(out, torch.Tensor) else (t, *out[1:])

    ref_out, _, ref_result = reference_run(arch.module, x, [arch.early, arch.late], edit={arch.early: replace})
    early = model.resolve(arch.early)
    with torch.no_grad(), model.trace(x):
        out = early.output
        if isinstance(out, torch.Tensor):
            early.output = out * 0.5 + 1.0
        else:
            early.output = (out[0] * 0.5 + 1.0, *out[1:])
        seen = first_tensor(early.output).save()
        result = model.output.save()
    assert torch.allclose(seen, first_tensor(ref_out[arch.early][0]), atol=1e-6)
    assert torch.allclose(first_tensor(result), first_tensor(ref_result), atol=1e-5)


def test_input_assignment(gpt2):
    model = NNsight(gpt2.module)
    x = gpt2.make_input(1)

    def edit_input(args):
        return (args[0] * 0.0, *args[1:])

    ref_out, _, expected = reference_run(gpt2.module, x, ["transformer.h.2"], edit_input={"transformer.h.2": edit_input})
    with torch.no_grad(), model.trace(x):
        model.transformer.h[2].input = model.transformer.h[2].input * 0.0
        h2 = model.transformer.h[2].output.save()
        logits = model.lm_head.output.save()
    assert torch.allclose(h2, ref_out["transformer.h.2"][0], atol=1e-6)
    assert torch.allclose(logits, expected.logits, atol=1e-5)


def test_inputs_assignment_with_args_and_kwargs(gpt2):
    model = NNsight(gpt2.module)
    x = gpt2.make_input(1)
    ref_out, ref_in, _ = reference_run(gpt2.module, x, ["transformer.ln_f"], edit_input={
        "transformer.ln_f": lambda args: (args[0] + 3.0,)})
    with torch.no_grad(), model.trace(x):
        args, kwargs = model.transformer.ln_f.inputs
        model.transformer.ln_f.inputs = ((args[0] + 3.0,), kwargs)
        normed = model.transformer.ln_f.output.save()
    assert torch.allclose(normed, ref_out["transformer.ln_f"][0], atol=1e-5)


def test_patch_then_read_same_module_sees_the_patch(gpt2):
    model = NNsight(gpt2.module)
    x = gpt2.make_input(1)
    with torch.no_grad(), model.trace(x):
        model.transformer.h[0].output = torch.zeros(1, 7, 32)
        after = model.transformer.h[0].output.save()
        nxt = model.transformer.h[1].input.save()
    assert torch.equal(after, torch.zeros(1, 7, 32))
    assert torch.equal(nxt, torch.zeros(1, 7, 32))


def test_swapping_an_early_output_for_a_late_one_reads_a_later_module(gpt2):
    """The reading of layer 0 happens before layer 2 runs; a logit lens on layer 0 uses ad-hoc calls."""
    model = NNsight(gpt2.module)
    x = gpt2.make_input(1)
    ref_out, _, _ = reference_run(gpt2.module, x, ["transformer.h.0"])
    with torch.no_grad():
        expected = gpt2.module.lm_head(gpt2.module.transformer.ln_f(ref_out["transformer.h.0"][0]))
    calls = []
    handle = gpt2.module.lm_head.register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad(), model.trace(x):
            h0 = model.transformer.h[0].output
            lens = model.lm_head(model.transformer.ln_f(h0)).save()
            final = model.lm_head.output.save()
    finally:
        handle.remove()
    assert torch.allclose(lens, expected, atol=1e-5)
    assert final.shape == lens.shape
    assert len(calls) == 2  # once ad hoc, once in the real forward: the ad-hoc call did not consume it
