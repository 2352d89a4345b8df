"""Turn a trace written in the notebook into a `TraceRequest`, and a `TraceResult` back into names.

The request carries only what the body needs: its source (with its place in the user's file, so
remote tracebacks show the user's line numbers), the values of the names it reads, and how to
call the model. Names that refer to the model are sent as names, envoys as module paths, and
allowlisted modules (`torch`, `math`, ...) as module names to import on the server.
"""

from __future__ import annotations

import ast
import builtins
import types
from typing import TYPE_CHECKING, Any

import torch

from ..errors import NNsightError, from_remote
from ..tracing.envoy import Envoy
from ..tracing.saving import save
from .protocol import TraceRequest, TraceResult
from .values import from_wire, to_wire

if TYPE_CHECKING:
    from ..tracing.backend import TraceCall
    from ..tracing.source import Block


def read_names(block: Block) -> set[str]:
    """Every name the body loads (anywhere inside it)."""
    names: set[str] = set()
    for stmt in block.body:
        for node in ast.walk(stmt):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
                names.add(node.id)
    return names


def build_request(call: TraceCall, *, timeout: float | None = None) -> TraceRequest:
    """The request for one trace: the body's source, the values of the names it reads, the model call."""
    model = call.model
    block = call.block
    ns = call.namespace
    model_id = getattr(model, "remote_id", None)
    if not model_id:
        raise NNsightError(
            "This model has no name a server could load it by. Remote traces need a model loaded by name, "
            'e.g. LanguageModel("smollm2"), or NNsight(module, remote_id="name-the-server-uses").'
        )
    variables, modules, model_names = _names_read(block, ns, model)
    text, first_line = block.remote_source()
    options: dict[str, Any] = {
        "kind": "session" if call.options.get("session") else "generate" if call.generate else "trace",
        "inputs": to_wire(list(call.args), name="inputs", root=model),
        "kwargs": to_wire({**call.kwargs, **call.generate_kwargs}, name="kwargs", root=model),
        "model_names": model_names or ["model"],
        "tracer_name": block.as_name,
        "modules": modules,
        "filename": block.filename,
        "first_line": first_line,
        # The trace runs on the server in the grad mode it would run in here (`with torch.no_grad():`
        # around it builds no autograd graph there either: about 3.5 ms of a 95 ms SmolLM2 trace).
        "grad": torch.is_grad_enabled(),
    }
    if timeout is not None:
        options["timeout"] = float(timeout)
    edits = getattr(model, "_edits", ())
    if edits:
        options["edits"] = [_edit_on_the_wire(edit, model) for edit in edits]
    aliases = vars(model).get("_rename_aliases")
    if aliases:
        options["aliases"] = [list(entry) for entry in aliases]
    return TraceRequest(model_id=str(model_id), source=text, options=options, variables=variables)


def _names_read(block: Block, ns: Any, model: Any) -> tuple[dict[str, Any], dict[str, str], list[str]]:
    """The values of the names `block` reads, the allowlisted modules among them, and its names for the model."""
    variables: dict[str, Any] = {}
    modules: dict[str, str] = {}
    model_names: list[str] = []
    for name in sorted(read_names(block)):
        if name == block.as_name:
            continue
        try:
            value = ns[name]
        except KeyError:
            continue
        if value is model:
            model_names.append(name)
        elif value is save:
            modules[name] = "nnsight_jupyter.save"
        elif isinstance(value, types.ModuleType):
            modules[name] = value.__name__
        elif name in builtins.__dict__ and value is builtins.__dict__[name]:
            continue
        elif isinstance(value, Envoy) or not name.startswith("__"):
            variables[name] = to_wire(value, name=name, root=model)
    return variables, modules, model_names


def _edit_on_the_wire(edit: Any, model: Any) -> dict[str, Any]:
    """A `model.edit()` block for the server: its source, place, and the values of the names it reads."""
    variables, modules, model_names = _names_read(edit.block, edit.namespace(model), model)
    text, first_line = edit.block.remote_source()
    return {
        "source": text,
        "first_line": first_line,
        "filename": edit.block.filename,
        "variables": variables,
        "modules": modules,
        "model_names": model_names or ["model"],
    }


def apply_result(result: TraceResult, model: Any) -> dict[str, Any]:
    """The names a remote run bound, as a local run would have bound them; raises the trace's error."""
    for line in result.logs:
        print(line)
    if result.error is not None:
        raise from_remote(result.error.type_name, result.error.message, result.error.traceback)
    return {name: from_wire(value, root=model) for name, value in result.saved.items()}
