"""A job process keeps the bodies it has checked and compiled: a repeated body is neither checked nor
compiled again, gives the same values as the first run and as plain forward hooks, and a body that
fails its check fails every time."""

from __future__ import annotations

import uuid

import pytest
import torch

from nnsight_jupyter.remote import execute
from nnsight_jupyter.remote.execute import run_request
from nnsight_jupyter.remote.server import sandbox
from nnsight_jupyter.remote.server.policy import SandboxViolation

from .server.conftest import tokens, trace_request
from .server.tiny_models import tiny_gpt2


def test_a_repeated_body_is_checked_and_compiled_once_and_gives_the_same_values(monkeypatch):
    model = tiny_gpt2()
    compiled, checked = [], []
    real_compile, real_validate = execute.compile_source, sandbox.validate
    monkeypatch.setattr(execute, "compile_source", lambda *a, **k: compiled.append(a[0]) or real_compile(*a, **k))

    def validate(source: str) -> None:
        checked.append(source)
        real_validate(source)

    marker = uuid.uuid4().hex  # a body no earlier test sent, so nothing is cached for it yet
    source = f"# {marker}\nh = model.transformer.h[1].output.save()"
    seen = []
    hook = model._model.transformer.h[1].register_forward_hook(lambda m, a, o: seen.append(o.detach().clone()))
    try:
        results = [run_request(model, trace_request(source, tokens(seed)), validate=validate) for seed in (1, 2, 1)]
    finally:
        hook.remove()
    assert all(r.error is None for r in results), [r.error for r in results]
    assert compiled == [source] and checked == [source]
    for result, plain in zip(results, seen, strict=True):
        assert torch.equal(result.saved["h"], plain)
    assert torch.equal(results[0].saved["h"], results[2].saved["h"])

    other = source + "\nlogits = model.lm_head.output.save()"
    assert run_request(model, trace_request(other, tokens(1)), validate=validate).error is None
    assert compiled == [source, other] and checked == [source, other]


def test_a_body_that_fails_its_check_fails_every_time():
    model = tiny_gpt2()
    source = f"# {uuid.uuid4().hex}\nx = model.__class__"
    for _ in range(3):
        result = run_request(model, trace_request(source, tokens(1)), validate=sandbox.validate)
        assert result.error is not None and result.error.type_name == SandboxViolation.__name__, result.error


@pytest.mark.parametrize("kind", ["same body, other file", "same body, other first line"])
def test_the_cache_keys_on_the_file_and_line_a_traceback_names(kind):
    """A body's code carries the file and line the user's traceback points at, so both are part of the key."""
    model = tiny_gpt2()
    source = f"# {uuid.uuid4().hex}\nx = 1 / 0"
    first = run_request(model, trace_request(source, tokens(1), filename="cell-1", first_line=1))
    options = {"filename": "cell-2", "first_line": 1} if kind == "same body, other file" else {
        "filename": "cell-1", "first_line": 5}
    second = run_request(model, trace_request(source, tokens(1), **options))
    assert "ZeroDivisionError" in first.error.type_name and "ZeroDivisionError" in second.error.type_name
    where = f'"{options["filename"]}", line {options["first_line"] + 1}'
    assert where in second.error.traceback, second.error.traceback
