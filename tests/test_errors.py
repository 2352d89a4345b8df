"""Every public exception lives in `errors.py`, and every error a server reports has a class there."""

from __future__ import annotations

import ast
import builtins
import importlib
import pkgutil
from pathlib import Path

import pytest

import nnsight_jupyter
from nnsight_jupyter import errors

PACKAGE = Path(nnsight_jupyter.__file__).parent


def _all_modules() -> list[str]:
    names = []
    for info in pkgutil.walk_packages([str(PACKAGE)], "nnsight_jupyter."):
        if info.name.endswith("__main__"):
            continue
        names.append(info.name)
    return names


def _subclasses(cls: type) -> set[type]:
    found = set()
    for sub in cls.__subclasses__():
        found.add(sub)
        found |= _subclasses(sub)
    return found


def test_every_public_exception_is_defined_in_errors():
    for name in _all_modules():
        if name.endswith(".widgets.job_status") or ".widgets." in name:
            continue
        importlib.import_module(name)
    outside = sorted(f"{c.__module__}.{c.__qualname__}" for c in _subclasses(errors.NNsightError)
                     if c.__module__ != errors.__name__ and not c.__module__.startswith("tests"))
    assert outside == []


def test_the_remote_table_holds_every_class_of_errors_and_the_builtins():
    defined = {name: value for name, value in vars(errors).items()
               if isinstance(value, type) and issubclass(value, errors.NNsightError)}
    for name, cls in defined.items():
        assert errors.REMOTE_ERRORS[name] is cls
        assert errors.wire_name(cls) == name
    for name in ("IndexError", "KeyError", "ValueError", "RuntimeError", "ZeroDivisionError"):
        assert errors.REMOTE_ERRORS[name] is getattr(builtins, name)
    assert errors.REMOTE_ERRORS["TimeoutError"] is errors.RemoteTimeout
    assert errors.REMOTE_ERRORS["MemoryError"] is errors.MemoryLimitExceeded
    with pytest.raises(ValueError, match="REMOTE_ERRORS"):
        errors.wire_name(type("Unknown", (Exception,), {}))


def _server_sources() -> list[Path]:
    return sorted((PACKAGE / "remote").rglob("*.py"))


def test_every_type_name_the_server_reports_goes_through_the_table():
    """The server names its errors with `wire_name(Class)`; no type name is written out as a string."""
    named: list[str] = []
    for path in _server_sources():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            callee = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            if callee in ("TraceErrorInfo", "_finish_error") and node.args:
                first = node.args[0]
                assert not isinstance(first, ast.Constant), f"{path.name}:{node.lineno} names an error by a string"
                if callee == "_finish_error" and isinstance(first, ast.Name):
                    named.append(first.id)
            if callee == "wire_name" and node.args and isinstance(node.args[0], ast.Name) and node.args[0].id != "kind":
                named.append(node.args[0].id)
    assert {"ModelModifiedError", "WorkerDied", "MemoryLimitExceeded", "ModelLoadError", "ResultTooLarge",
            "TimeoutError", "MemoryError", "ServerError", "ModelUnavailable", "ServerRestarted",
            "JobStopped", "ProtocolError"} <= set(named)
    for name in named:
        assert name in errors.REMOTE_ERRORS, name


@pytest.mark.parametrize("name", sorted(errors.REMOTE_ERRORS))
def test_each_reported_name_arrives_as_its_class(name):
    error = errors.from_remote(name, "what happened", "  File \"<cell>\", line 2\n")
    expected = errors.REMOTE_ERRORS[name]
    try:
        expected("what happened")
        buildable = expected is not errors.RemoteTraceError
    except TypeError:  # needs more than a message (UnicodeDecodeError, RemoteServerError, ...)
        buildable = False
    if not buildable:
        assert isinstance(error, errors.RemoteTraceError) and error.type_name == name
        return
    assert type(error) is expected
    assert str(error) == "what happened" or name in ("KeyError",)
    assert "<cell>" in "\n".join(error.__notes__)


def test_an_unknown_name_arrives_as_a_remote_trace_error():
    error = errors.from_remote("MyOwnError", "boom", "tb")
    assert isinstance(error, errors.RemoteTraceError) and error.type_name == "MyOwnError" and "boom" in str(error)
