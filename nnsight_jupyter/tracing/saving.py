"""What survives a trace: saved values, and loud placeholders for everything else that held tensors.

A trace body runs beside the forward pass, so a name bound there may hold a view into a buffer the
model later overwrites, or a value from the middle of an edit. Only values marked with `.save()`
(or `nnsight_jupyter.save(...)`) are handed back as they are, and so are containers whose tensors
were all saved. A name that held an unsaved tensor is replaced by `NotSaved`, which raises
`NotSavedError` on any use, instead of silently keeping a stale value from an earlier run. Plain
Python values (numbers, strings, functions) are handed back as they are: they cannot go stale.
"""

from __future__ import annotations

from typing import Any

import torch
from greenlet import getcurrent

from ..errors import NNsightError, NotSavedError
from .nested import leaves


def save(value: Any) -> Any:
    """Mark `value` to be kept after the trace, and return it unchanged.

    Inside a trace, `x.save()` does the same for any value; use this function for values that
    have no `.save()` of their own in code outside the trace body (helpers, lambdas)::

        with model.trace("Hello"):
            norms = nnsight_jupyter.save([])
            for layer in model.layers:
                norms.append(layer.output.norm())
    """
    m = getattr(getcurrent(), "_nnsight_jupyter_mediator", None)
    if m is None:
        raise NNsightError(
            "save() only works inside a trace: call it on a value inside `with model.trace(...):`. "
            "Outside a trace every value is already yours to keep."
        )
    m.interleaver.saved[id(value)] = value
    return value


def tensor_save(self: torch.Tensor) -> torch.Tensor:
    """`Tensor.save` (installed by `runtime.install_trace_hooks`)."""
    m = getattr(getcurrent(), "_nnsight_jupyter_mediator", None)
    if m is None:
        other = getattr(object, "save", None)  # another tracing library's `.save()` on every object
        if other is not None:
            return other(self)
        return save(self)
    m.interleaver.saved[id(self)] = self
    return self


def holds_unsaved_tensor(value: Any, saved: dict[int, Any], depth: int = 3) -> bool:
    """Whether `value` is, or contains, a tensor that was not saved (a list of saved tensors is fine).

    Containers are looked into `depth` levels deep; a saved container is not looked into.
    """
    if id(value) in saved:
        return False
    if isinstance(value, torch.Tensor):
        return True
    for leaf in leaves(value, max_depth=depth, skip=lambda v: id(v) in saved):
        if isinstance(leaf, torch.Tensor):
            return True
    return False


class NotSaved:
    """Stands in for a name that held tensors inside a trace but was not saved."""

    __slots__ = ("_name", "_line")

    def __init__(self, name: str, line: str | None = None) -> None:
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_line", line)

    def _fail(self, *_: Any, **__: Any) -> Any:
        where = f" ({self._line})" if self._line else ""
        raise NotSavedError(
            f"`{self._name}` was set inside the trace{where} but not saved, so it holds no value now. "
            f"Inside the trace, write `{self._name} = ....save()` (or `nnsight_jupyter.save(...)` for "
            "lists and other Python objects) and run it again."
        )

    def __getattr__(self, item: str) -> Any:
        if item.startswith("__") and item.endswith("__"):
            raise AttributeError(item)
        return self._fail()

    def __repr__(self) -> str:
        return f"<not saved: `{self._name}` was set inside a trace without .save()>"

    def _raise(self, *_: Any, **__: Any) -> Any:
        return self._fail()

    __str__ = _raise
    __setattr__ = _raise
    __call__ = _raise
    __iter__ = _raise
    __len__ = _raise
    __bool__ = _raise
    __getitem__ = _raise
    __setitem__ = _raise
    __contains__ = _raise
    __format__ = _raise
    __float__ = _raise
    __int__ = _raise
    __index__ = _raise
    __array__ = _raise
    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = _raise
    __truediv__ = __rtruediv__ = __floordiv__ = __rfloordiv__ = __matmul__ = __rmatmul__ = _raise
    __pow__ = __rpow__ = __mod__ = __rmod__ = __neg__ = __pos__ = __abs__ = _raise
    __lt__ = __le__ = __gt__ = __ge__ = _raise
    __and__ = __or__ = __xor__ = __invert__ = _raise
    __eq__ = _raise
    __ne__ = _raise
    __hash__ = None

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        for arg in list(args) + list((kwargs or {}).values()):
            if isinstance(arg, NotSaved):
                return arg._fail()
        return NotImplemented
