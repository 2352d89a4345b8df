"""Errors point at the user's line, say what to do, and leave the model exactly as it was."""

from __future__ import annotations

import traceback

import pytest
import torch
from torch import nn

from nnsight_jupyter import NNsight
from nnsight_jupyter.errors import ModuleNotReachedError, ModulePathError, OutOfOrderError

from .conftest import assert_same_state, engine_state, reference_run


def _user_frames(exc: BaseException) -> list[traceback.FrameSummary]:
    return [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == __file__]


def _engine_frames_after_user_code(exc: BaseException) -> list[str]:
    frames = traceback.extract_tb(exc.__traceback__)
    body_seen = False
    engine = []
    for f in frames:
        if f.filename == __file__ and f.name == "<module>":
            body_seen = True
        elif body_seen and "nnsight_jupyter" in f.filename:
            engine.append(f"{f.filename}:{f.lineno}")
    return engine


def test_exception_in_user_code_points_at_the_users_line(gpt2):
    model = NNsight(gpt2.module)
    x = gpt2.make_input(1)
    with pytest.raises(RuntimeError) as info:
        with model.trace(x):
            hidden = model.transformer.h[0].output
            bad = hidden @ torch.ones(3)  # the failing line
    frames = _user_frames(info.value)
    assert "the failing line" in frames[-1].line or "torch.ones(3)" in frames[-1].line
    assert _engine_frames_after_user_code(info.value) == []
    text = "".join(traceback.format_exception(info.value))
    assert "During handling of the above exception" not in text


def test_model_error_after_a_bad_patch_is_raised_and_model_restored(gpt2):
    model = NNsight(gpt2.module)
    x = gpt2.make_input(1)
    before = engine_state(gpt2.module)
    with pytest.raises(RuntimeError):
        with model.trace(x):
            model.transformer.h[0].output = torch.zeros(1, 7, 5)
            model.lm_head.output.save()
    assert_same_state(before, engine_state(gpt2.module))


def test_out_of_order_request_fails_at_the_line_and_says_what_to_do(gpt2):
    model = NNsight(gpt2.module)
    with pytest.raises(OutOfOrderError, match=r"model\.transformer\.h\[0\]\.output was requested after the forward "
                                              r"pass had already computed it.*model\.transformer\.h\[2\]\.output"):
        with model.trace(gpt2.make_input(1)):
            late = model.transformer.h[2].output
            early = model.transformer.h[0].output  # asked too late


def test_out_of_order_traceback_ends_at_the_users_line(gpt2):
    model = NNsight(gpt2.module)
    try:
        with model.trace(gpt2.make_input(1)):
            late = model.transformer.h[2].output
            early = model.transformer.h[0].output  # asked too late
    except OutOfOrderError as exc:
        frames = traceback.extract_tb(exc.__traceback__)
        assert "asked too late" in frames[-1].line
    else:
        pytest.fail("no error")


class WithUnused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(4, 4)
        self.unused = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


def test_module_that_never_runs_is_named_with_what_ran():
    model = NNsight(WithUnused())
    with pytest.raises(ModuleNotReachedError, match=r"model\.unused\.output was never computed.*Modules that ran: "
                                                    r"model, model\.used"):
        with model.trace(torch.randn(1, 4)):
            model.unused.output.save()


def test_unknown_module_path_suggests_the_right_name(gpt2):
    model = NNsight(gpt2.module)
    with pytest.raises(ModulePathError, match=r"no attribute or child module 'hh'.*Did you mean 'h'"):
        model.transformer.hh
    with pytest.raises(AttributeError):
        model.transformer.h[0].atn
    with pytest.raises(ModulePathError, match="index 7 is out of range"):
        model.transformer.h[7]


def test_probing_a_private_name_looks_for_no_suggestions(gpt2, monkeypatch):
    """`getattr(envoy, "_repr_html_", None)` and the like, as libraries probe objects, answer at once:
    module paths are never private, so no close names are searched for."""
    import difflib

    model = NNsight(gpt2.module)
    monkeypatch.setattr(difflib, "get_close_matches", lambda *a, **k: pytest.fail("suggestions were searched"))
    assert getattr(model.transformer, "_repr_html_", None) is None
    assert not hasattr(model, "__array__")
    with pytest.raises(ModulePathError, match=r"transformer \(GPT2Model\) has no attribute '_nope'"):
        model.transformer._nope


@pytest.mark.parametrize("failure", ["user", "model", "not_reached", "interrupt", "interrupt_in_model", "backward"])
def test_model_is_exactly_as_before_after_any_error(gpt2, failure):
    model = NNsight(gpt2.module)
    x = gpt2.make_input(1)
    before = engine_state(gpt2.module)
    expected, _, _ = reference_run(gpt2.module, x, ["transformer.h.1"])
    if failure == "interrupt_in_model":
        handle = gpt2.module.transformer.h[1].register_forward_hook(lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
        before = engine_state(gpt2.module)
    with pytest.raises((Exception, KeyboardInterrupt)):
        with model.trace(x):
            h = model.transformer.h[0].output
            h[:] = h * 2
            if failure == "user":
                raise ValueError("boom")
            if failure == "model":
                model.transformer.h[1].output = torch.zeros(3)
            if failure == "not_reached":
                model.lm_head.output
                model.transformer.h[1].output
            if failure == "interrupt":
                raise KeyboardInterrupt
            if failure == "backward":
                model.output.logits.sum().backward()
                raise ValueError("after backward")
            model.lm_head.output.save()
    assert_same_state(before, engine_state(gpt2.module))
    if failure == "interrupt_in_model":
        handle.remove()
    with torch.no_grad(), model.trace(x):
        again = model.transformer.h[1].output.save()
    assert torch.equal(again, expected["transformer.h.1"][0])


def test_names_bound_by_a_failed_trace_are_restored(gpt2):
    model = NNsight(gpt2.module)
    x = gpt2.make_input(1)
    ns = {"model": model, "x": x, "torch": torch, "kept": "old value"}
    source = (
        "with model.trace(x):\n"
        "    kept = model.transformer.h[0].output.save()\n"
        "    fresh = 1\n"
        "    raise ValueError('stop here')\n"
    )
    with pytest.raises(ValueError, match="stop here"):
        exec(compile(source, "<failed-trace>", "exec"), ns)
    assert ns["kept"] == "old value"
    assert "fresh" not in ns
    assert "__nnsight_save__" not in ns
