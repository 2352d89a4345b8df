"""Arrays a trace builds stay inside the memory they were built from.

numpy and torch can build views from raw strides, offsets and addresses, and not every way of
doing so checks that the view stays inside its buffer (measured with numpy 2.4 and torch 2.13):

- ``numpy.lib.stride_tricks.as_strided`` checks nothing;
- ``numpy.ndarray(shape, buffer=b, offset=-n)`` (and ``recarray``, ``char.chararray``,
  ``rec.array``... built on it) accepts a negative offset and reads before the buffer;
- numpy reads any object's ``__array_interface__`` / ``__array_struct__``: a raw address, shape
  and strides, with no buffer to check them against;
- ``Tensor.set_(storage, offset, size, stride)`` checks nothing, and shrinking a storage
  (``untyped_storage().resize_(0)``) leaves its views pointing at freed memory.

With any of these a job reads (or writes) the worker's heap. The sandbox closes them here:

- every value a numpy function or class returns to trace code (through the module proxies of
  ``sandbox.py``) is checked by :func:`check_array`: an array that does not own its memory must
  lie inside the buffer its chain of bases ends in (an owning array, a ``bytes``-like object or a
  tensor's storage); ``type(array)`` gives the checked class too;
- classes made in a trace may not define the array protocols or attribute hooks through which an
  object could hand numpy an address (:data:`PROTOCOL_NAMES`), whether made by ``class``,
  ``type(name, bases, namespace)`` or a metaclass reached through a module (:func:`check_class`);
- the torch methods that point a tensor at arbitrary storage or shrink storage under its views
  (``set_``, ``resize_``, ``untyped_storage``...) are refused by name (``policy.py``).

``torch.as_strided``, ``torch.frombuffer``, ``numpy.frombuffer`` and
``numpy.ndarray(strides=...)`` check bounds themselves and are left as they are.

Cost: trace code pays only on numpy calls (a wrapper and, for a view, two address reads,
about 2 microseconds); torch calls, which the engine and models make, pay nothing.
"""

from __future__ import annotations

import builtins
import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .policy import SandboxViolation

__all__ = [
    "PROTOCOL_NAMES",
    "SafeType",
    "check_array",
    "check_class",
    "guard_class",
    "guard_numpy",
    "safe_build_class",
]

PROTOCOL_NAMES = frozenset(
    {"__array_interface__", "__array_struct__", "__cuda_array_interface__", "__getattr__", "__getattribute__"}
)
"""Names a class made in a trace may not define: numpy reads raw addresses through the first
three, and the attribute hooks could answer for them."""


def _dummy_array_class() -> type | None:
    """The helper class ``as_strided`` keeps its source array in (``.base``)."""
    try:
        from numpy.lib._stride_tricks_impl import DummyArray
    except ImportError:  # other numpy layouts
        return None
    return DummyArray


_DummyArray = _dummy_array_class()


def _span(array: np.ndarray) -> tuple[int, int]:
    """The lowest byte address ``array`` reads and one past the highest."""
    start = array.__array_interface__["data"][0]
    low = high = start
    for count, stride in zip(array.shape, array.strides):
        if stride > 0:
            high += (count - 1) * stride
        else:
            low += (count - 1) * stride
    return low, high + array.itemsize


def _buffer_span(obj: Any) -> tuple[int, int] | None:
    """The memory at the end of ``obj``'s chain of bases, or None if it cannot be placed."""
    for _ in range(256):
        if isinstance(obj, np.ndarray):
            if obj.base is None:
                return _span(obj) if obj.size else None
            obj = obj.base
            continue
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            return storage.data_ptr(), storage.data_ptr() + storage.nbytes()
        if _DummyArray is not None and type(obj) is _DummyArray:
            obj = getattr(obj, "base", None)
            continue
        try:
            raw = np.frombuffer(obj, dtype=np.uint8)
        except (TypeError, ValueError, BufferError):
            return None
        return _span(raw) if raw.size else None
    return None


def _check_one(array: np.ndarray, where: str) -> None:
    if array.base is None or array.size == 0:
        return
    low, high = _span(array)
    buffer = _buffer_span(array.base)
    if buffer is not None and buffer[0] <= low and high <= buffer[1]:
        return
    if buffer is None:
        detail = "memory that belongs to no array, bytes object or tensor the trace made"
    else:
        size = buffer[1] - buffer[0]
        detail = f"bytes {low - buffer[0]} to {high - buffer[0]} of a {size}-byte buffer"
    raise SandboxViolation(
        f"{where} made a view that reads {detail}: views with strides or offsets must stay inside the "
        "array they are made from in remote traces (use slicing, reshape or "
        "numpy.lib.stride_tricks.sliding_window_view)"
    )


def check_array(value: Any, where: str) -> Any:
    """Return ``value`` if every array in it stays inside its buffer; else raise SandboxViolation."""
    if isinstance(value, np.ndarray):
        _check_one(value, where)
    elif isinstance(value, (tuple, list)):
        for item in value:
            if isinstance(item, np.ndarray):
                _check_one(item, where)
    return value


def check_class(cls: type) -> type:
    """Refuse a class made in a trace that defines one of :data:`PROTOCOL_NAMES`."""
    defined = sorted(PROTOCOL_NAMES.intersection(vars(cls)))
    if defined:
        raise SandboxViolation(
            f"class {cls.__name__!r} defines {', '.join(defined)}: classes in remote traces may not define "
            f"{', '.join(sorted(PROTOCOL_NAMES))} (numpy would read raw memory addresses through them); "
            "pass data as arrays or tensors"
        )
    return cls


class _CheckedClassMeta(type):
    """The class of a stand-in for a real class: ``isinstance`` and attributes go to the real one,
    calls go through a check."""

    _nnsj_real: type
    _nnsj_check: Callable[[Any], Any]

    def __instancecheck__(cls, obj: Any) -> bool:
        return isinstance(obj, cls._nnsj_real)

    def __subclasscheck__(cls, sub: type) -> bool:
        return issubclass(sub, cls._nnsj_real)

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        return cls._nnsj_check(cls._nnsj_real(*args, **kwargs))

    def __getattr__(cls, name: str) -> Any:
        return getattr(cls._nnsj_real, name)

    def __repr__(cls) -> str:
        return repr(cls._nnsj_real)


def _stand_in(real: type, check: Callable[[Any], Any]) -> type:
    return _CheckedClassMeta(real.__name__, (), {"_nnsj_real": real, "_nnsj_check": staticmethod(check)})


def _checked_made_class(made: Any) -> Any:
    return check_class(made) if isinstance(made, type) else made


_GUARDED: dict[int, tuple[Any, Any]] = {}


def _cached(value: Any, make: Callable[[], Any]) -> Any:
    entry = _GUARDED.get(id(value))
    if entry is not None and entry[0] is value:
        return entry[1]
    guarded = make()
    _GUARDED[id(value)] = (value, guarded)
    return guarded


def guard_class(cls: Any) -> Any:
    """What trace code gets for the class ``cls``: a checked stand-in for metaclasses and numpy arrays."""
    if not isinstance(cls, type):
        return cls
    if cls is type:
        return SafeType
    if issubclass(cls, type):
        return _cached(cls, lambda: _stand_in(cls, _checked_made_class))
    if issubclass(cls, np.ndarray):
        where = f"{cls.__module__.partition('.')[0]}.{cls.__name__}"
        return _cached(cls, lambda: _stand_in(cls, lambda made: check_array(made, where)))
    return cls


def guard_numpy(value: Any, where: str) -> Any:
    """What trace code gets for ``where`` (a numpy attribute): functions that check what they return."""
    if isinstance(value, type):
        return guard_class(value)
    if isinstance(value, np.ufunc) or not callable(value):
        return value

    def make() -> Callable[..., Any]:
        @functools.wraps(value)
        def checked(*args: Any, **kwargs: Any) -> Any:
            return check_array(value(*args, **kwargs), where)

        return checked

    return _cached(value, make)


class _TypeMeta(type):
    def __instancecheck__(cls, obj: Any) -> bool:
        return isinstance(obj, type)

    def __subclasscheck__(cls, sub: type) -> bool:
        return issubclass(sub, type)

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if len(args) == 1 and not kwargs:
            return guard_class(type(args[0]))
        return _checked_made_class(type(*args, **kwargs))

    def __repr__(cls) -> str:
        return repr(type)


class SafeType(metaclass=_TypeMeta):
    """The ``type`` builtin of trace code: ``type(x)`` gives checked stand-ins (:func:`guard_class`),
    and a class made with ``type(name, bases, namespace)`` is checked like a ``class`` statement."""


def safe_build_class(func: Any, name: str, *bases: Any, **kwargs: Any) -> Any:
    """The ``__build_class__`` of trace code: a ``class`` statement, then :func:`check_class`."""
    return _checked_made_class(builtins.__build_class__(func, name, *bases, **kwargs))
