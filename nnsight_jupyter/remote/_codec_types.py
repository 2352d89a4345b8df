"""Per-type helpers for the wire codec in :mod:`nnsight_jupyter.remote.protocol`.

This module knows how one tensor, array or function turns into wire pieces and back; it knows
nothing about paths, envelopes or versions. Problems while encoding raise :class:`Unsupported`
(which ``protocol`` turns into a ``ProtocolError`` naming where the value sits); problems while
decoding raise ``ValueError`` (which ``protocol`` reports as a malformed message).
"""

from __future__ import annotations

import ast
import contextlib
import ctypes
import functools
import inspect
import io
import math
import mmap
import os
import reprlib
import textwrap
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

MAX_DIMS = 64
"""Most dimensions a decoded tensor or array may claim (numpy's own limit)."""

_HUGEPAGE_MIN_BYTES = 4 * 2**20
BUFFER_ALIGNMENT = 64
"""Tensor and array bytes start at multiples of this in a message's buffer section."""
ADOPT_MIN_BYTES = 2**20
"""A decoded tensor at least this large may use the received buffer in place (see `tensor_from_wire`)."""

_TORCH_DTYPE_NAMES = (
    "bool",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "int8",
    "int16",
    "int32",
    "int64",
    "float16",
    "bfloat16",
    "float32",
    "float64",
    "complex32",
    "complex64",
    "complex128",
    "float8_e4m3fn",
    "float8_e4m3fnuz",
    "float8_e5m2",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
    "float4_e2m1fn_x2",
)

TORCH_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name) for name in _TORCH_DTYPE_NAMES if hasattr(torch, name)
}
"""Wire name to dtype, for every dtype whose elements are plain bytes on CPU.

Quantized dtypes (which also need a scale and zero point) and the bit/sub-byte placeholder
dtypes (which have no CPU kernels) are left out on purpose.
"""

TORCH_DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in TORCH_DTYPES.items()}

NUMPY_DTYPES: dict[str, np.dtype[Any]] = {
    key: np.dtype(key)
    for key in (
        "|b1",
        "|u1",
        "<u2",
        "<u4",
        "<u8",
        "|i1",
        "<i2",
        "<i4",
        "<i8",
        "<f2",
        "<f4",
        "<f8",
        "<c8",
        "<c16",
    )
}
"""Little-endian ``dtype.str`` to dtype, for the numeric numpy dtypes with a fixed layout."""


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


def tensor_to_wire(tensor: torch.Tensor) -> tuple[str, list[int], memoryview]:
    """Return the dtype name, shape and a byte view of ``tensor``'s values.

    Gradient tracking is dropped (the values are sent detached). A contiguous CPU tensor is
    viewed in place; others are first copied to CPU, with conjugate and negative views
    resolved and the elements laid out row-major.
    """
    if tensor.is_meta:
        raise Unsupported(
            tensor,
            "a meta tensor has no values to send; send real data, or only its .shape",
        )
    if tensor.is_quantized:
        raise Unsupported(tensor, "quantized tensors are not supported; send tensor.dequantize()")
    if tensor.layout is not torch.strided:
        raise Unsupported(
            tensor,
            f"tensors with layout {tensor.layout} are not supported; send tensor.to_dense()",
        )
    name = TORCH_DTYPE_NAMES.get(tensor.dtype)
    if name is None:
        raise Unsupported(tensor, f"tensors of dtype {tensor.dtype} are not supported")
    try:
        plain = tensor.detach().cpu().resolve_conj().resolve_neg().contiguous()
        raw = plain.reshape(-1).view(torch.uint8).numpy()
    except RuntimeError as exc:
        raise Unsupported(tensor, f"the tensor's values cannot be read ({exc})") from None
    return name, list(plain.shape), memoryview(raw)


def tensor_from_wire(
    dtype_name: object, shape: object, offset: object, buffers: memoryview, *, adopt: bool = False
) -> torch.Tensor:
    """Build a writable tensor that owns a copy of its bytes from the buffer section.

    With ``adopt=True`` the caller hands over ``buffers`` (writable memory nothing else uses): a
    tensor of at least ``ADOPT_MIN_BYTES`` whose bytes are suitably aligned then wraps them in
    place instead of copying. It keeps the whole buffer alive, which is why small tensors, which
    would pin a large buffer for little gain, are still copied.
    """
    dtype = TORCH_DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
    if dtype is None:
        raise ValueError(f"unknown tensor dtype {reprlib.repr(dtype_name)}")
    dims = _check_shape(shape)
    count = math.prod(dims)
    if count == 0:
        return torch.empty(dims, dtype=dtype)
    view = _buffer_slice(buffers, offset, count * dtype.itemsize)
    if adopt and view.nbytes >= ADOPT_MIN_BYTES and not view.readonly and _address(view) % BUFFER_ALIGNMENT == 0:
        return torch.frombuffer(view, dtype=dtype).reshape(dims)
    data = owned_copy(view)
    return torch.frombuffer(data, dtype=dtype).reshape(dims)


def _address(view: memoryview) -> int:
    """Where the view's first byte is in memory (to check alignment)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(view)) if not view.readonly else -1


def array_to_wire(array: np.ndarray[Any, Any]) -> tuple[str, list[int], memoryview]:
    """Return the little-endian dtype string, shape and a byte view of ``array``'s values."""
    little = array.dtype.newbyteorder("<")
    key = little.str
    if key not in NUMPY_DTYPES:
        raise Unsupported(
            array,
            f"numpy arrays of dtype {array.dtype} are not supported; "
            "send a bool, integer, float or complex array",
        )
    plain = np.asarray(array, dtype=little, order="C")
    return key, list(plain.shape), memoryview(plain.reshape(-1).view(np.uint8))


def array_from_wire(
    dtype_key: object, shape: object, offset: object, buffers: memoryview
) -> np.ndarray[Any, Any]:
    """Build a writable numpy array holding a copy of its bytes from the buffer section."""
    dtype = NUMPY_DTYPES.get(dtype_key) if isinstance(dtype_key, str) else None
    if dtype is None:
        raise ValueError(f"unknown numpy dtype {reprlib.repr(dtype_key)}")
    dims = _check_shape(shape)
    count = math.prod(dims)
    if count == 0:
        return np.empty(dims, dtype=dtype)
    data = owned_copy(_buffer_slice(buffers, offset, count * dtype.itemsize))
    return np.frombuffer(data, dtype=dtype).reshape(dims)


def fresh_buffer(size: int) -> bytearray | mmap.mmap:
    """Writable zeroed memory for ``size`` bytes, in transparent huge pages when it is large."""
    if size < _HUGEPAGE_MIN_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return bytearray(size)
    try:
        mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError:
        return bytearray(size)
    with contextlib.suppress(OSError):
        mapping.madvise(mmap.MADV_HUGEPAGE)
    return mapping


def aligned_buffer(size: int, offset: int) -> memoryview:
    """``size`` bytes of fresh writable memory placed so that byte ``offset`` sits on a
    `BUFFER_ALIGNMENT` boundary (for receiving a message whose buffer section starts there)."""
    buffer = fresh_buffer(size + BUFFER_ALIGNMENT)
    view = memoryview(buffer)
    pad = -(_address(view) + offset) % BUFFER_ALIGNMENT
    return view[pad:pad + size]


def owned_copy(view: memoryview) -> bytearray | mmap.mmap:
    """Copy ``view`` into fresh writable memory that nothing else references.

    Copies of 4 MiB and more go to an anonymous private mapping advised to use 2 MiB
    transparent huge pages. Memory that large usually comes fresh from the kernel, and faulting
    it in 4 KiB pages costs more than the copy itself: on a 64 MiB tensor the mapping makes
    decoding about 2.5 times faster than a ``bytearray``. Smaller copies use ``bytearray``.
    ``torch.frombuffer`` and ``np.frombuffer`` keep the buffer alive for as long as the tensor
    or array that wraps it; such tensors cannot be resized in place (``resize_``).
    """
    if view.nbytes < _HUGEPAGE_MIN_BYTES:
        return bytearray(view)
    buffer = fresh_buffer(view.nbytes)
    with memoryview(buffer) as target:
        copy_into(target, view)
    return buffer


def joined_bytes(parts: list[bytes | memoryview]) -> bytes:
    """``b"".join(parts)``, built in transparent huge pages when the message is large.

    ``b"".join`` writes into memory fresh from the kernel, which it faults in 4 KiB pages: for
    64 MiB that costs about three times the copy itself. Here a large message is made as an
    uninitialised ``bytes`` object (``PyBytes_FromStringAndSize(NULL, n)``, the C API's way to
    build one in place), its pages are advised to be huge before anything touches them, and the
    parts are copied in with `copy_into`. Callers still get plain ``bytes``. Where native calls
    are refused (a sandboxed server worker) or the C API is not there, ``b"".join`` is used.
    """
    size = sum(memoryview(part).nbytes for part in parts)
    if size < _HUGEPAGE_MIN_BYTES:
        return b"".join(parts)
    native = _native_bytes()
    if native is None:
        return b"".join(parts)
    new_bytes, madvise = native
    try:
        data = new_bytes(None, size)
        start = int(np.frombuffer(data, dtype=np.uint8).ctypes.data)
        first = -(-start // _HUGE_PAGE) * _HUGE_PAGE
        last = (start + size) // _HUGE_PAGE * _HUGE_PAGE
        if last > first and _MADV_HUGEPAGE is not None:
            madvise(first, last - first, _MADV_HUGEPAGE)  # only advice: a failure changes nothing
        target = memoryview((ctypes.c_ubyte * size).from_address(start)).cast("B")
    except (OSError, RuntimeError):  # a sandbox's audit hook refuses ctypes calls
        global _native_bytes_calls
        _native_bytes_calls = False
        return b"".join(parts)
    with target:
        position = 0
        for part in parts:
            with memoryview(part) as piece, piece.cast("B") as flat:
                copy_into(target[position:position + flat.nbytes], flat)
                position += flat.nbytes
    return data


_HUGE_PAGE = 2 * 2**20
_MADV_HUGEPAGE: int | None = getattr(mmap, "MADV_HUGEPAGE", None)
_native_bytes_calls: Any = None
"""``(PyBytes_FromStringAndSize, madvise)`` as ctypes functions, or False where they cannot be used."""


def _native_bytes() -> Any:
    global _native_bytes_calls
    if _native_bytes_calls is None:
        try:
            new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
            new_bytes.restype = ctypes.py_object
            new_bytes.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
            madvise = ctypes.CDLL(None, use_errno=True).madvise
            madvise.restype = ctypes.c_int
            madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        except (AttributeError, OSError, RuntimeError):
            _native_bytes_calls = False
        else:
            _native_bytes_calls = (new_bytes, madvise)
    return _native_bytes_calls or None


_SPLIT_COPY_MIN_BYTES = 16 * 2**20
_SPLIT_COPY_PIECE_BYTES = 8 * 2**20
_copy_threads: Any = None
"""Threads that copy the other pieces of a large copy: an executor, or False where this process
may not start threads (a sandboxed server worker)."""


def copy_into(target: memoryview, source: memoryview) -> None:
    """``target[:] = source``; a copy of 16 MiB or more is split across the CPUs this process may use.

    Copying into fresh memory is bound by page faults, which the kernel serves on several cores
    at once: two threads copy 64 MiB in about 60% of the time one takes. NumPy releases the GIL
    while it copies.
    """
    size = source.nbytes
    helpers = 0
    if size >= _SPLIT_COPY_MIN_BYTES:
        helpers = min(_usable_cpus() - 1, 3, size // _SPLIT_COPY_PIECE_BYTES - 1)
    pool = _copy_pool() if helpers > 0 else None
    if pool is None:
        target[:] = source
        return
    dst = np.frombuffer(target, dtype=np.uint8)
    src = np.frombuffer(source, dtype=np.uint8)
    step = -(-size // (helpers + 1))
    step += -step % 4096  # pieces start on page boundaries
    futures = []
    try:
        for start in range(step, size, step):
            futures.append(pool.submit(np.copyto, dst[start:start + step], src[start:start + step]))
    except (OSError, RuntimeError):
        pass  # the pieces not handed over are copied below
    done = step * (len(futures) + 1)
    np.copyto(dst[:step], src[:step])
    if done < size:
        np.copyto(dst[done:], src[done:])
    for future in futures:
        future.result()


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _copy_pool() -> Any:
    global _copy_threads
    if _copy_threads is None:
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(max_workers=3, thread_name_prefix="nnsj-copy")
        try:
            pool.submit(int).result()  # starting a thread can be refused (sandboxed workers)
        except (OSError, RuntimeError):
            pool.shutdown(wait=False)
            pool = False
        _copy_threads = pool
    return _copy_threads or None


def _check_shape(shape: object) -> list[int]:
    if type(shape) is not list or len(shape) > MAX_DIMS:
        raise ValueError(
            f"bad shape {reprlib.repr(shape)}: expected a list of at most {MAX_DIMS} sizes"
        )
    for size in shape:
        if type(size) is not int or size < 0 or size >= 2**63:
            raise ValueError(
                f"bad shape {reprlib.repr(shape)}: sizes must be integers in [0, 2**63)"
            )
    return shape


def _buffer_slice(buffers: memoryview, offset: object, nbytes: int) -> memoryview:
    if type(offset) is not int or offset < 0 or offset + nbytes > buffers.nbytes:
        raise ValueError(
            f"value claims {nbytes} bytes at offset {reprlib.repr(offset)}, "
            f"but the buffer section holds {buffers.nbytes} bytes"
        )
    return buffers[offset : offset + nbytes]


def function_to_wire(function: types.FunctionType) -> FunctionSource:
    """Return the name and source text of a user-defined function or lambda.

    A ``def`` travels as its dedented block (decorators included). A lambda travels as the
    lambda expression alone, cut out of its line with :mod:`ast`, so ``f = lambda x: x * 2``
    sends ``lambda x: x * 2``.
    """
    code = function.__code__
    if code.co_name == "<lambda>":
        return FunctionSource("<lambda>", _lambda_source(function))
    try:
        source = inspect.getsource(function)
    except (OSError, TypeError) as exc:
        raise Unsupported(function, _no_source(function.__qualname__, exc)) from None
    return FunctionSource(function.__name__, textwrap.dedent(source))


def _lambda_source(function: types.FunctionType) -> str:
    code = function.__code__
    try:
        lines, _ = inspect.findsource(function)
    except (OSError, TypeError) as exc:
        raise Unsupported(function, _no_source("<lambda>", exc)) from None
    text = "".join(lines)
    try:
        tree = ast.parse(text)
    except SyntaxError:
        raise Unsupported(
            function,
            f"the file holding this lambda ({code.co_filename}) no longer parses, so its "
            "source cannot be cut out; re-run the cell that defines it",
        ) from None
    candidates = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Lambda) and node.lineno == code.co_firstlineno
    ]
    if len(candidates) > 1:
        spans = [span for span in _code_spans(code) if span[:2] != span[2:]]
        holding = [node for node in candidates if spans and _body_holds(node, spans)]
        if holding:
            candidates = [max(holding, key=_body_start)]
    if len(candidates) != 1:
        raise Unsupported(
            function,
            f"cannot tell which lambda on line {code.co_firstlineno} of {code.co_filename} "
            "this is; give it a name with def, or put it on a line of its own",
        )
    segment = ast.get_source_segment(text, candidates[0])
    if segment is None:
        raise Unsupported(function, _no_source("<lambda>", "no source segment"))
    return f"({segment})" if "\n" in segment else segment


def _code_spans(code: types.CodeType) -> Iterator[tuple[int, int, int, int]]:
    """Yield (line, column, end line, end column) for each instruction that has a position."""
    for line, end_line, column, end_column in getattr(code, "co_positions", list)():
        if None not in (line, end_line, column, end_column):
            yield line, column, end_line, end_column


def _body_holds(node: ast.Lambda, spans: list[tuple[int, int, int, int]]) -> bool:
    body = node.body
    start = (body.lineno, body.col_offset)
    end = (body.end_lineno, body.end_col_offset)
    return all(start <= span[:2] and span[2:] <= end for span in spans)


def _body_start(node: ast.Lambda) -> tuple[int, int]:
    return node.body.lineno, node.body.col_offset


def _no_source(name: str, cause: object) -> str:
    return (
        f"the source code of function {name!r} is not available ({cause}); functions travel "
        "as source text, so define it in a notebook cell or a .py file (not with exec or in "
        "the plain Python prompt), or write its body inside the trace instead"
    )


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
            "only plain functions defined in your own code travel (as source); "
            "call this one inside the trace instead"
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
