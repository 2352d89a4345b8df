"""The values the wire carries besides plain data: module references, records, placeholders, function sources.

Each is a frozen dataclass the codec encodes as one extension type (see `protocol.py`), and
decoding never runs anything for them. `Unsupported` is how the encoder says a value cannot be
sent, and `unsupported_reason` what to send instead.
"""

from __future__ import annotations

import functools
import io
import types
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["FunctionSource", "ModuleRef", "Placeholder", "Record", "Unsupported", "unsupported_reason"]

_PLAIN_TYPES = (int, float, str, bytes, list, tuple, dict, set, frozenset)
_CALLABLE_TYPES = (
    types.BuiltinFunctionType,
    types.MethodType,
    types.MethodWrapperType,
    types.WrapperDescriptorType,
    functools.partial,
)


class Unsupported(Exception):
    """``value`` cannot be encoded, for the human-readable ``reason``; ``path`` says where."""

    def __init__(self, value: object, reason: str, path: str | None = None) -> None:
        super().__init__(reason)
        self.value = value
        self.reason = reason
        self.path = path


@dataclass(frozen=True)
class FunctionSource:
    """A user function as it travels: its name and source text, never compiled on decode.

    ``name`` is the function's ``__name__`` (``"<lambda>"`` for lambdas). ``source`` is a
    dedented ``def`` block, decorators included, or a lambda expression alone. Only the text
    travels: names the function reads from globals or from an enclosing function must reach
    the server some other way (for a trace, as variables).
    """

    name: str
    source: str


@dataclass(frozen=True)
class ModuleRef:
    """A module of the served model, by its dotted path ('' is the model itself).

    Modules never travel: a variable holding an envoy (`layer = model.layers[5]`) is sent as its
    path and the server resolves it against its own copy of the model.
    """

    path: str


@dataclass(frozen=True)
class Record:
    """A structured result (a Hugging Face ModelOutput) as its class name and fields.

    Decoding never imports or instantiates the class; the client rebuilds known output types
    itself (see `remote.values`).
    """

    module: str
    qualname: str
    fields: dict


@dataclass(frozen=True)
class Placeholder:
    """A value that is not sent back: an unsaved name, or a field that cannot travel.

    `kind` is "not_saved" (the name was bound in the trace without `.save()`) or "omitted"
    (e.g. a key-value cache inside a model output); `detail` says which and why.
    """

    kind: str
    name: str
    detail: str


def unsupported_reason(value: object) -> str:
    """Explain why ``value`` cannot be sent and suggest what to send instead."""
    name = _type_name(value)
    if isinstance(value, torch.nn.Module):
        hint = (
            "modules stay on the server: refer to them by path inside the trace "
            "(e.g. model.transformer.h[0]) instead of passing them in"
        )
    elif isinstance(value, types.ModuleType):
        hint = "import it inside the trace instead"
    elif isinstance(value, type):
        hint = "classes cannot be sent; send plain data (a dict, list or tensor) instead"
    elif isinstance(value, io.IOBase):
        hint = "read its contents and send them as str or bytes"
    elif isinstance(value, Iterator):
        hint = "materialize it first, e.g. list(value)"
    elif isinstance(value, np.generic):
        hint = "send value.item() or np.asarray(value)"
    elif isinstance(value, _CALLABLE_TYPES):
        hint = (
            "only plain functions defined in your own code travel (as source); call this one inside the trace instead"
        )
    elif isinstance(value, torch.Tensor):
        hint = "send a plain tensor, e.g. value.as_subclass(torch.Tensor)"
    elif isinstance(value, np.ndarray):
        hint = "send a plain array, e.g. np.asarray(value)"
    elif isinstance(value, _PLAIN_TYPES):
        plain = next(kind for kind in _PLAIN_TYPES if isinstance(value, kind))
        hint = f"it subclasses {plain.__name__}; send {plain.__name__}(value) instead"
    else:
        hint = "send a tensor, array, number, string, or a list/tuple/dict of those instead"
    return f"values of type {name} are not supported; {hint}"


def _type_name(value: object) -> str:
    kind = type(value)
    module = kind.__module__
    return kind.__qualname__ if module == "builtins" else f"{module}.{kind.__qualname__}"
