"""Several invokes batched into one forward pass, each with its own rows, sharing values."""

from __future__ import annotations

import pytest
import torch

import nnsight_jupyter
from nnsight_jupyter import NNsight
from nnsight_jupyter.errors import InvokeError, TraceError

from ..numerics import assert_rounding_close
from .conftest import first_tensor, reference_run


def test_invokes_run_as_one_batch_and_each_sees_its_rows(arch):
    model = NNsight(arch.module)
    a, b = arch.make_input(1), arch.make_input(2)
    forward_calls = []
    handle = arch.module.register_forward_hook(lambda mod, args, out: forward_calls.append(args[0].shape[0]))
    late = model.resolve(arch.late)
    try:
        with torch.no_grad(), model.trace() as tracer:
            with tracer.invoke(a):
                la = first_tensor(late.output).save()
            with tracer.invoke(b):
                lb = first_tensor(late.output).save()
            with tracer.invoke():
                everything = first_tensor(late.output).save()
    finally:
        handle.remove()
    assert forward_calls == [3]  # one forward over the whole batch
    assert la.shape[0] == 1 and lb.shape[0] == 2 and everything.shape[0] == 3
    # The same batch of 3 through plain hooks: same shapes, so each invoke's rows are exact.
    batch, _, _ = reference_run(arch.module, torch.cat([a, b]), [arch.late])
    batch_late = first_tensor(batch[arch.late][0])
    assert torch.equal(la, batch_late[:1]) and torch.equal(lb, batch_late[1:])
    # Each prompt run alone: batches of 1 and 2 against 3, equal up to float32 rounding.
    ref_a, _, _ = reference_run(arch.module, a, [arch.late])
    ref_b, _, _ = reference_run(arch.module, b, [arch.late])
    assert_rounding_close(la, first_tensor(ref_a[arch.late][0]), depth=arch.depth, width=arch.width)
    assert_rounding_close(lb, first_tensor(ref_b[arch.late][0]), depth=arch.depth, width=arch.width)
    assert torch.allclose(everything, torch.cat([la, lb]), atol=0)


def test_patch_prompt_b_with_prompt_a_activation_in_one_pass(gpt2):
    model = NNsight(gpt2.module)
    a, b = gpt2.make_input(1), gpt2.make_input(1)
    ref_a, _, _ = reference_run(gpt2.module, a, ["transformer.h.1"])
    act = ref_a["transformer.h.1"][0]

    def put(out):
        out = out.clone()
        out[:, -1] = act[:, -1]
        return out

    _, _, expected_b = reference_run(gpt2.module, b, [], edit={"transformer.h.1": put})
    with torch.no_grad(), model.trace() as tracer:
        with tracer.invoke(a):
            source = model.transformer.h[1].output[:, -1]
            logits_a = model.lm_head.output.save()
        with tracer.invoke(b):
            model.transformer.h[1].output[:, -1] = source
            logits_b = model.lm_head.output.save()
    # The trace ran a batch of 2, the references batches of 1: equal up to float32 rounding.
    assert_rounding_close(logits_b, expected_b.logits, depth=gpt2.depth, width=gpt2.width)
    _, _, clean_a = reference_run(gpt2.module, a, [])
    assert_rounding_close(logits_a, clean_a.logits, depth=gpt2.depth, width=gpt2.width)
    # The same batch of 2 through plain hooks, patching row 1 with row 0: exact.
    def put_row(out):
        out = out.clone()
        out[1, -1] = out[0, -1]
        return out

    _, _, batch = reference_run(gpt2.module, torch.cat([a, b]), [], edit={"transformer.h.1": put_row})
    assert torch.equal(torch.cat([logits_a, logits_b]), batch.logits)


def test_later_invoke_reads_a_name_from_an_earlier_one_at_a_later_layer(gpt2):
    model = NNsight(gpt2.module)
    a, b = gpt2.make_input(1), gpt2.make_input(1)
    with torch.no_grad(), model.trace() as tracer:
        with tracer.invoke(a):
            early = model.transformer.h[0].output.clone()
        with tracer.invoke(b):
            model.transformer.h[2].output[:] = early
            seen = model.transformer.h[2].output.save()
    # The trace's batch of 2 through plain hooks: same shapes, so row 0's value arrives exactly.
    batch, _, _ = reference_run(gpt2.module, torch.cat([a, b]), ["transformer.h.0"])
    assert torch.equal(seen, batch["transformer.h.0"][0][:1])
    # Against a run of prompt a alone (batch of 1): equal up to float32 rounding.
    ref_a, _, _ = reference_run(gpt2.module, a, ["transformer.h.0"])
    assert_rounding_close(seen, ref_a["transformer.h.0"][0], depth=gpt2.depth, width=gpt2.width)


def test_invokes_in_a_loop_capture_each_iteration(gpt2):
    model = NNsight(gpt2.module)
    inputs = [gpt2.make_input(1) for _ in range(3)]
    with torch.no_grad(), model.trace() as tracer:
        outs = nnsight_jupyter.save([])
        for i, x in enumerate(inputs):
            with tracer.invoke(x):
                model.transformer.h[i].output[:] = 0.0
                outs.append(model.lm_head.output)
    assert len(outs) == 3
    for i, x in enumerate(inputs):
        # Each input alone (batch of 1) against the trace's batch of 3: equal up to float32 rounding.
        _, _, expected = reference_run(gpt2.module, x, [], edit={f"transformer.h.{i}": lambda o: o * 0.0})
        assert_rounding_close(outs[i], expected.logits, depth=gpt2.depth, width=gpt2.width)


def test_invoke_with_a_trace_input_is_refused(gpt2):
    model = NNsight(gpt2.module)
    with pytest.raises(InvokeError, match="already has an input"):
        with model.trace(gpt2.make_input(1)) as tracer:
            with tracer.invoke(gpt2.make_input(1)):
                pass


def test_trace_without_any_input_says_what_to_do(gpt2):
    model = NNsight(gpt2.module)
    with pytest.raises(TraceError, match="has no input"):
        with model.trace():
            pass


def test_invoke_after_reading_values_is_refused(gpt2):
    model = NNsight(gpt2.module)
    with pytest.raises(InvokeError, match="must come before"):
        with model.trace() as tracer:
            with tracer.invoke(gpt2.make_input(1)):
                pass
            h = model.transformer.h[0].output
            with tracer.invoke(gpt2.make_input(1)):
                pass


def test_inputs_that_cannot_be_batched_are_explained(gpt2):
    model = NNsight(gpt2.module)
    with pytest.raises(InvokeError, match=r"Cannot batch argument 0 .*\(1, 7\), \(1, 5\)"):
        with model.trace() as tracer:
            with tracer.invoke(gpt2.make_input(1)):
                pass
            with tracer.invoke(gpt2.make_input(1)[:, :5]):
                pass


def test_repeating_a_shared_name_trace_at_module_level_uses_this_runs_value(gpt2):
    """A name left from an earlier run (a NotSaved placeholder) must not stand in for this run's."""
    model = NNsight(gpt2.module)
    a, b = gpt2.make_input(1), gpt2.make_input(1)
    ns = {"model": model, "a": a, "b": b, "torch": torch, "results": []}
    source = (
        "for pos in range(2):\n"
        "    with model.trace() as tracer:\n"
        "        with tracer.invoke(a):\n"
        "            h = model.transformer.h[0].output[0, pos]\n"
        "        with tracer.invoke(b):\n"
        "            model.transformer.h[0].output[0, pos] = h\n"
        "            logits = model.lm_head.output.save()\n"
        "    results.append(logits)\n"
    )
    exec(compile(source, "<module-level loop>", "exec"), ns)
    ref_a, _, _ = reference_run(gpt2.module, a, ["transformer.h.0"])
    for pos, got in enumerate(ns["results"]):
        def put(out, pos=pos):
            out = out.clone()
            out[0, pos] = ref_a["transformer.h.0"][0][0, pos]
            return out

        _, _, expected = reference_run(gpt2.module, b, [], edit={"transformer.h.0": put})
        # Batch of 1 against the trace's batch of 2: equal up to float32 rounding.
        assert_rounding_close(got, expected.logits, depth=gpt2.depth, width=gpt2.width)


def test_a_list_made_in_one_invoke_is_used_by_invokes_opened_in_a_loop(gpt2):
    model = NNsight(gpt2.module)
    a, b = gpt2.make_input(1), gpt2.make_input(1)
    with torch.no_grad(), model.trace() as tracer:
        with tracer.invoke(a):
            h = model.transformer.h[0].output[0]
            firsts = nnsight_jupyter.save([])
        for pos in range(2):
            with tracer.invoke(b):
                model.transformer.h[0].output[0, pos] = h[pos]
                firsts.append(model.lm_head.output[0, -1, 0].item())
    ref_a, _, _ = reference_run(gpt2.module, a, ["transformer.h.0"])
    for pos in range(2):
        def put(out, pos=pos):
            out = out.clone()
            out[0, pos] = ref_a["transformer.h.0"][0][0, pos]
            return out

        _, _, expected = reference_run(gpt2.module, b, [], edit={"transformer.h.0": put})
        # Batch of 1 against the trace's batch of 3: equal up to float32 rounding.
        assert_rounding_close(torch.tensor([firsts[pos]]), expected.logits[0, -1, :1],
                              depth=gpt2.depth, width=gpt2.width)
