"""Tensors and numpy arrays as they travel: a dtype name, a shape, and their bytes in the buffer section.

Encoding views the values' memory in place (a CPU, contiguous tensor is not copied). Decoding
copies each value into fresh memory it owns (`memory.owned_copy`), or, when the caller hands
over a received buffer (`adopt=True`), lets a large, aligned value use it in place. Problems
while encoding raise `Unsupported`; while decoding, `ValueError`.
"""

from __future__ import annotations

import math
import reprlib
from typing import Any

import numpy as np
import torch

from .memory import BUFFER_ALIGNMENT, address, owned_copy
from .wire import Unsupported

__all__ = [
    "ADOPT_MIN_BYTES",
    "MAX_DIMS",
    "NUMPY_DTYPES",
    "TORCH_DTYPES",
    "TORCH_DTYPE_NAMES",
    "array_from_wire",
    "array_to_wire",
    "tensor_from_wire",
    "tensor_to_wire",
]

MAX_DIMS = 64
"""Most dimensions a decoded tensor or array may claim (numpy's own limit)."""

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
    return name, list(plain.shape), memoryview(raw)  # type: ignore[arg-type]


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
    if adopt and view.nbytes >= ADOPT_MIN_BYTES and not view.readonly and address(view) % BUFFER_ALIGNMENT == 0:
        return torch.frombuffer(view, dtype=dtype).reshape(dims)
    data = owned_copy(view)
    return torch.frombuffer(data, dtype=dtype).reshape(dims)


def array_to_wire(array: np.ndarray[Any, Any]) -> tuple[str, list[int], memoryview]:
    """Return the little-endian dtype string, shape and a byte view of ``array``'s values."""
    little = array.dtype.newbyteorder("<")
    key = little.str
    if key not in NUMPY_DTYPES:
        raise Unsupported(
            array,
            f"numpy arrays of dtype {array.dtype} are not supported; send a bool, integer, float or complex array",
        )
    plain = np.asarray(array, dtype=little, order="C")
    return key, list(plain.shape), memoryview(plain.reshape(-1).view(np.uint8))  # type: ignore[arg-type]


def array_from_wire(dtype_key: object, shape: object, offset: object, buffers: memoryview) -> np.ndarray[Any, Any]:
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


def _check_shape(shape: object) -> list[int]:
    if type(shape) is not list or len(shape) > MAX_DIMS:
        raise ValueError(f"bad shape {reprlib.repr(shape)}: expected a list of at most {MAX_DIMS} sizes")
    for size in shape:
        if type(size) is not int or size < 0 or size >= 2**63:
            raise ValueError(f"bad shape {reprlib.repr(shape)}: sizes must be integers in [0, 2**63)")
    return shape


def _buffer_slice(buffers: memoryview, offset: object, nbytes: int) -> memoryview:
    if type(offset) is not int or offset < 0 or offset + nbytes > buffers.nbytes:
        raise ValueError(
            f"value claims {nbytes} bytes at offset {reprlib.repr(offset)}, "
            f"but the buffer section holds {buffers.nbytes} bytes"
        )
    return buffers[offset : offset + nbytes]
