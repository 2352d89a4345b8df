"""Engine values to wire values and back: what changes when a trace's values cross the network.

Most values travel as they are (tensors, numbers, strings, containers). Four kinds are translated,
on both sides by the same rules:
- envoys (`layer = model.layers[5]` used inside a trace) travel as `ModuleRef(path)` and are
  resolved against the server's own copy of the model; modules themselves never travel; so do a
  module's `.source` and its operations (`...attn.source.attention_interface_0`);
- Hugging Face `ModelOutput`s travel as a `Record` of their fields and are rebuilt on the client;
- a name bound in the trace without `.save()` travels as a `Placeholder` and comes back as the
  same `NotSaved` object a local run gives;
- a value that cannot travel (a key-value cache object inside a model output, a function the
  trace defined) comes back as an `Unavailable` stand-in that says why when used.
"""

from __future__ import annotations

import importlib
import types
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..errors import NNsightError
from ..tracing.cache import Cache, CachedCall, CacheEntry
from ..tracing.envoy import Envoy
from ..tracing.nested import TRUNCATED, leaves, map_structure
from ..tracing.operations import OperationEnvoy, SourceEnvoy
from ..tracing.saving import NotSaved
from .codec.wire import FunctionSource, ModuleRef, Placeholder, Record

_LEAVES = (
    type(None),
    bool,
    int,
    float,
    complex,
    str,
    bytes,
    torch.Tensor,
    np.ndarray,
    torch.dtype,
    torch.Size,
    torch.device,
    type(...),
    slice,
    FunctionSource,
    ModuleRef,
    Placeholder,
)


class Unavailable(NotSaved):
    """A value the server could not send back; any use says which and why."""

    def _fail(self, *_: Any, **__: Any) -> Any:
        raise NNsightError(
            f"`{self._name}` was not sent back from the remote run: {self._line}. "
            "Save the tensors you need from it instead (for example `out.logits.save()`)."
        )

    def __repr__(self) -> str:
        return f"<not sent back from the remote run: {self._name} ({self._line})>"


def to_wire(value: Any, *, name: str = "value", root: Any = None, lenient: bool = False) -> Any:
    """Translate a value for the codec (see the module docstring).

    With `lenient` (results), a value that cannot travel becomes a stand-in instead of an error.
    """
    return map_structure(value, lambda leaf: _leaf_to_wire(leaf, name, root, lenient), exact=True)


def _leaf_to_wire(value: Any, name: str, root: Any, lenient: bool) -> Any:
    if isinstance(value, Envoy):
        if root is not None and value._root is not root:
            raise NNsightError(f"`{name}` refers to a module of a different model than the one being traced remotely.")
        return ModuleRef(value._path)
    if isinstance(value, (SourceEnvoy, OperationEnvoy)):
        return _source_ref(value, name, root, lenient)
    if isinstance(value, Unavailable):
        return Placeholder("omitted", value._name, value._line or "")
    if isinstance(value, NotSaved):
        return Placeholder("not_saved", value._name, "")
    if isinstance(value, Cache):
        entries = {
            path: [
                {
                    "output": to_wire(c.output, name=name, root=root, lenient=lenient),
                    "inputs": to_wire(c.inputs, name=name, root=root, lenient=lenient),
                    "step": c.step,
                    "call": c.call,
                    "per_step": entry.per_step,
                }
                for c in entry.calls
            ]
            for path, entry in value._entries.items()
        }
        return Record(Cache.__module__, "Cache", entries)
    if _is_model_output(value):
        fields = {}
        for key, field_value in value.items():
            fields[key] = to_wire(field_value, name=f"{name}.{key}", root=root, lenient=True)
        return Record(type(value).__module__, type(value).__qualname__, fields)
    if lenient and not _travels(value):
        return Placeholder("omitted", name, f"{type(value).__name__} objects are not sent")
    return value


def _source_ref(value: Any, name: str, root: Any, lenient: bool) -> Any:
    """`module.source` and its operations travel by path, like envoys (`transformer.h.0.attn.source.x_0`)."""
    source = value if isinstance(value, SourceEnvoy) else value._source
    if root is not None and source._root is not root:
        raise NNsightError(f"`{name}` refers to operations of a different model than the one being traced remotely.")
    if source._callee:
        if lenient:
            return Placeholder("omitted", name, "the .source of an operation is only known inside its trace")
        raise NNsightError(
            f"`{name}` is the .source of an operation, which is known only inside the trace that reached it; "
            "spell it out inside the remote trace (`op.source.name_0.output`)."
        )
    return ModuleRef(value._path)


def result_to_wire(name: str, value: Any) -> Any:
    """Like `to_wire`, for values coming back: functions and objects that cannot travel become stand-ins."""
    if isinstance(value, types.FunctionType):
        return Placeholder("omitted", name, "functions defined inside a remote trace stay on the server")
    return to_wire(value, name=name, lenient=True)


def from_wire(value: Any, *, root: Any = None, compile_function: Callable[[FunctionSource], Any] | None = None) -> Any:
    """Translate a decoded value back into engine values."""
    return map_structure(value, lambda leaf: _leaf_from_wire(leaf, root, compile_function), exact=True)


def _leaf_from_wire(value: Any, root: Any, compile_function: Callable[[FunctionSource], Any] | None) -> Any:
    kind = type(value)
    if kind is ModuleRef:
        if root is None:
            raise NNsightError("A module reference arrived where no model is available to resolve it.")
        return root.resolve(value.path)
    if kind is Placeholder:
        return NotSaved(value.name) if value.kind == "not_saved" else Unavailable(value.name, value.detail)
    if kind is Record:
        fields = {k: from_wire(v, root=root, compile_function=compile_function) for k, v in value.fields.items()}
        return _rebuild_record(value, fields, root)
    if kind is FunctionSource:
        if compile_function is None:
            return value
        return compile_function(value)
    return value


def _travels(value: Any) -> bool:
    """Whether every leaf of `value` is something the codec sends (in containers at most 50 deep)."""
    return all(leaf is not TRUNCATED and _leaf_travels(leaf) for leaf in leaves(value, exact=True, max_depth=50))


def _leaf_travels(value: Any) -> bool:
    if isinstance(value, (Envoy, Cache, SourceEnvoy, OperationEnvoy)) or _is_model_output(value):
        return True
    kind = type(value)
    return kind in _LEAVES or kind is torch.nn.Parameter or isinstance(value, (NotSaved, types.FunctionType))


def _is_model_output(value: Any) -> bool:
    cls = type(value)
    return isinstance(value, dict) and any(
        base.__name__ == "ModelOutput" and base.__module__.startswith("transformers.") for base in cls.__mro__
    )


def _rebuild_record(record: Record, fields: dict, root: Any = None) -> Any:
    """Rebuild a transformers ModelOutput or a Cache by name; anything else stays a plain dict."""
    if record.module == Cache.__module__ and record.qualname == "Cache":
        return _rebuild_cache(fields, root)
    if (
        (record.module == "transformers.modeling_outputs" or record.module.startswith("transformers.models."))
        and all(part.isidentifier() for part in record.module.split("."))
        and record.qualname.isidentifier()
    ):
        try:
            cls = getattr(importlib.import_module(record.module), record.qualname, None)
        except ImportError:
            cls = None
        if isinstance(cls, type) and _is_model_output_class(cls):
            return cls(**fields)
    return dict(fields)


def _is_model_output_class(cls: type) -> bool:
    return any(b.__name__ == "ModelOutput" and b.__module__.startswith("transformers.") for b in cls.__mro__)


def _rebuild_cache(entries: dict, root: Any = None) -> Cache:
    cache = Cache(root if isinstance(root, Envoy) else None, include_inputs=True, detach=True)
    for path, calls in entries.items():
        per_step = bool(calls and calls[0].get("per_step", False))
        entry = cache._entries[path] = CacheEntry(path, per_step=per_step)
        for call in calls:
            inputs = call.get("inputs")
            entry.calls.append(
                CachedCall(
                    call.get("output"),
                    tuple(inputs) if inputs is not None else None,
                    int(call.get("step", 0)),
                    int(call.get("call", 0)),
                )
            )
    return cache
