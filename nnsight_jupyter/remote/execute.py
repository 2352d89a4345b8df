"""Run a trace request through the engine: the server's half of `remote=True`.

The request carries the trace body's source, the values of the names it reads, and how to call
the model. This module compiles the body with the same compiler a local `with` block uses and runs
it with the same `run_block`, so a remote run and a local run produce the same values by
construction. What the server adds around it (a sandbox's builtins and source checks, a log
sink) comes in as arguments.

Options understood (all optional except `kind`):
    kind               "trace", "generate", "session" (a block of traces run on the server), or
                       "analysis": a named analysis of `nnsight_jupyter.analysis` (option `analysis`),
                       called with the variable `arguments`; the source is unused
    inputs, kwargs     positional and keyword inputs of `model.trace(...)` / `model.generate(...)`
    model_names        names the body uses for the model itself (default ["model"])
    tracer_name        the name after `as` in the client's `with` statement
    modules            {name: module name} of allowlisted modules the body reads (e.g. torch); the
                       names "nnsight_jupyter" and "nnsight_jupyter.save" give the body `save`
    filename, first_line  where the body sits in the client's file or cell, for tracebacks
    aliases            [holder path, alias, relative path] of the client's `rename=`, added for this run only
"""

from __future__ import annotations

import builtins as _builtins
import functools
import io
import linecache
import traceback
import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ..tracing.record import take_record
from ..tracing.renaming import add_aliases
from ..tracing.saving import save
from ..tracing.source import SAVE_NAME, USER_CODES, compile_source
from ..tracing.tracer import run_block, user_traceback
from .protocol import TraceErrorInfo, TraceRequest, TraceResult
from .values import from_wire, result_to_wire

if TYPE_CHECKING:
    from ..models.base import NNsight


def run_request(
    model: NNsight,
    request: TraceRequest,
    *,
    builtins: dict | None = None,
    validate: Callable[[str], None] | None = None,
    on_log: Callable[[str], None] | None = None,
    importer: Callable[[str], Any] | None = None,
) -> TraceResult:
    """Run one request against `model`; problems in the user's code come back in `result.error`."""
    logs: list[str] = []
    options = request.options
    filename = str(options.get("filename") or "<remote trace>")
    first_line = int(options.get("first_line") or 1)
    registered = _register_source(filename, request.source, first_line)
    try:
        if validate is not None:
            _validated(validate, request.source)
        analysis = options.get("kind") == "analysis"
        grad = bool(options.get("grad", True))  # the client's grad mode (requests that do not say: on)
        block = None if analysis else _compiled_body(request.source, filename, first_line)
        ns: dict[str, Any] = {"__builtins__": builtins if builtins is not None else _builtins.__dict__}
        ns["print"] = _printer(logs, on_log)
        for name, module_name in dict(options.get("modules") or {}).items():
            if module_name in _ENGINE_API:
                ns[name] = _ENGINE_API[module_name]
            elif "." not in module_name:
                ns[name] = (importer or __import__)(module_name)
            else:
                ns[name] = _import_path(module_name, importer)

        def compile_function(fn: Any) -> Any:
            if validate is not None:
                validate(fn.source)
            code = compile(
                fn.source,
                f"<function {fn.name}>",
                "exec" if not fn.source.startswith("lambda") else "eval",
                dont_inherit=True,
            )
            USER_CODES.add(code)
            if fn.source.startswith("lambda"):
                return eval(code, ns)
            exec(code, ns)
            return ns[fn.name]

        variables = from_wire(request.variables, root=model, compile_function=compile_function)
        ns.update(variables)
        for name in options.get("model_names") or ["model"]:
            ns[str(name)] = model
        if analysis:
            from ..analysis.remote import run_named

            value = run_named(model, options.get("analysis"), ns.get("arguments"), ns["print"])
            return TraceResult(saved={"result": result_to_wire("result", value)}, logs=logs, error=None)
        if options.get("kind") == "session":
            from ..tracing.session import run_session

            ns[SAVE_NAME] = save
            with torch.set_grad_enabled(grad):
                bound = run_session(model, block, ns)
            saved = {name: result_to_wire(name, value) for name, value in bound.items()}
            return TraceResult(saved=saved, logs=logs, error=None)
        inputs = tuple(from_wire(options.get("inputs") or [], root=model))
        kwargs = dict(from_wire(options.get("kwargs") or {}, root=model))
        if options.get("kind", "trace") == "generate":
            tracer = model.generate(*inputs, **kwargs)
        else:
            tracer = model.trace(*inputs, **kwargs)
        tracer_name = options.get("tracer_name")
        if tracer_name:
            ns[str(tracer_name)] = tracer
        undo_aliases = add_aliases(model, [(str(a[0]), str(a[1]), str(a[2])) for a in options.get("aliases") or []])
        edits_before = model.__dict__.get("_edits")
        try:
            if options.get("edits"):
                edits = [_received_edit(model, e, ns, validate, compile_function, importer) for e in options["edits"]]
                object.__setattr__(model, "_edits", tuple(edits))
            with torch.set_grad_enabled(grad):
                bound = run_block(tracer, block, ns, module_level=False)
        finally:
            if edits_before is None:
                model.__dict__.pop("_edits", None)
            else:
                object.__setattr__(model, "_edits", edits_before)
            undo_aliases()
        skip = {str(tracer_name)} if tracer_name else set()
        kept = {name: value for name, value in bound.items() if name not in skip}
        saved = {name: result_to_wire(name, value) for name, value in kept.items()}
        record = take_record(model)
        trace = record.summary(kept) if record is not None else None
        return TraceResult(saved=saved, logs=logs, error=None, trace=trace)
    except BaseException as exc:  # the server must answer, whatever the user's code raised
        if isinstance(exc, (SystemExit, GeneratorExit)):
            exc = RuntimeError(f"{type(exc).__name__} raised inside the trace")
        return TraceResult(saved={}, logs=logs, error=_error_info(exc))
    finally:
        take_record(model)  # the next job, perhaps another user's, must not find this one's token ids
        if registered:
            linecache.cache.pop(filename, None)


# A notebook sends the same body again each time a cell is re-run; a worker's job process keeps the
# checked and compiled bodies, so a repeated body skips the syntax-tree check, the rewrite and
# `compile`. Measured on the tiny test model, in one process, 60 alternating rounds: a sandboxed
# `run_request` took 0.7-1.1 ms more than the same trace run locally before, 0.2-0.3 ms after.
# A body that fails its check is not kept (an exception is never cached), so it fails every time.
COMPILED_BODIES = 256


@functools.lru_cache(maxsize=COMPILED_BODIES)
def _validated(validate: Callable[[str], None], source: str) -> None:
    validate(source)


@functools.lru_cache(maxsize=COMPILED_BODIES)
def _compiled_body(source: str, filename: str, first_line: int) -> Any:
    return compile_source(source, filename, first_line=first_line)


def _received_edit(
    model: Any,
    wire: dict,
    base: dict,
    validate: Callable[[str], None] | None,
    compile_function: Callable[[Any], Any],
    importer: Callable[[str], Any] | None,
) -> Any:
    """A `model.edit()` block sent with a trace, for this run only: checked and compiled like the body."""
    from ..tracing.edits import Edit

    source = str(wire.get("source") or "")
    if validate is not None:
        validate(source)
    block = compile_source(
        source, str(wire.get("filename") or "<remote edit>"), first_line=int(wire.get("first_line") or 1)
    )
    ns = {"__builtins__": base["__builtins__"], "print": base["print"]}
    for name, module_name in dict(wire.get("modules") or {}).items():
        if module_name in _ENGINE_API:
            ns[name] = _ENGINE_API[module_name]
        elif "." not in module_name:
            ns[name] = (importer or __import__)(module_name)
        else:
            ns[name] = _import_path(module_name, importer)
    ns.update(from_wire(wire.get("variables") or {}, root=model, compile_function=compile_function))
    for name in wire.get("model_names") or ["model"]:
        ns[str(name)] = model
    return Edit(block, ns, {}, model)


_ENGINE_API = {
    "nnsight_jupyter": types.SimpleNamespace(save=save),
    "nnsight_jupyter.save": save,
}
"""What a trace body may use of this package by name: `nnsight_jupyter.save(...)`."""


def _printer(logs: list[str], on_log: Callable[[str], None] | None) -> Callable[..., None]:
    def remote_print(*args: Any, sep: str = " ", end: str = "\n", **_: Any) -> None:
        buffer = io.StringIO()
        _builtins.print(*args, sep=sep, end=end, file=buffer)
        for line in buffer.getvalue().splitlines():
            logs.append(line)
            if on_log is not None:
                on_log(line)

    return remote_print


def _import_path(dotted: str, importer: Callable[[str], Any] | None) -> Any:
    module = (importer or __import__)(dotted)
    for part in dotted.split(".")[1:]:
        module = getattr(module, part)
    return module


def _register_source(filename: str, source: str, first_line: int) -> bool:
    """Let tracebacks show the user's lines, unless this process already knows the file (a simulation)."""
    if linecache.getlines(filename):
        return False
    lines = ["\n"] * (first_line - 1) + [line + "\n" for line in source.splitlines()]
    linecache.cache[filename] = (sum(map(len, lines)), None, lines, filename)
    return True


def _error_info(exc: BaseException) -> TraceErrorInfo:
    exc = user_traceback(exc)
    tb = exc.__traceback__
    if tb is not None and tb.tb_frame.f_code in USER_CODES:
        text = "".join(traceback.format_exception(exc))
    else:
        text = "".join(traceback.format_exception_only(exc))
    return TraceErrorInfo(type(exc).__name__, str(exc), text)
