"""Value trees to msgpack bodies and back, for :mod:`nnsight_jupyter.remote.protocol`.

The extension codes and the rules for what may be sent are documented in the ``protocol``
module docstring. msgpack's C packer and unpacker walk the tree; Python runs only for values
msgpack has no type for (the ``default`` hook when packing, ``ext_hook`` when unpacking) and
for a one-line check per array (``list_hook``), which keeps large structures of small values
fast. Containers that msgpack lacks (tuple, set, frozenset, slice) are therefore tagged arrays
rather than nested payloads: the tag is the array's first item, so msgpack keeps walking them
with its own depth limit and no Python recursion.

Encoding raises :class:`~.wire.Unsupported` carrying the offending value's path;
decoding raises ``ValueError`` (or whatever msgpack raises) for malformed input. ``protocol``
turns both into ``ProtocolError``.
"""

from __future__ import annotations

import reprlib
import types
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import numpy as np
import torch

from .arrays import TORCH_DTYPE_NAMES, TORCH_DTYPES, array_from_wire, array_to_wire, tensor_from_wire, tensor_to_wire
from .functions import function_to_wire
from .memory import BUFFER_ALIGNMENT
from .wire import FunctionSource, ModuleRef, Placeholder, Record, Unsupported, unsupported_reason

DEEPEST = 1023
"""How many containers msgpack lets enclose a value inside a message body (it caps nesting
at 1024 levels and the body map takes one). Decoding is one level stricter for empty
containers; both directions refuse anything deeper with an error, never a crash."""

EXT_TENSOR = 1
EXT_NDARRAY = 2
EXT_BIGINT = 3
EXT_TUPLE = 4
EXT_SET = 5
EXT_FROZENSET = 6
EXT_SLICE = 7
EXT_ELLIPSIS = 8
EXT_DTYPE = 9
EXT_SIZE = 10
EXT_DEVICE = 11
EXT_FUNCTION = 12
EXT_MODULE_REF = 13
EXT_RECORD = 14
EXT_PLACEHOLDER = 15

_TAGS: dict[type, msgpack.ExtType] = {
    tuple: msgpack.ExtType(EXT_TUPLE, b""),
    set: msgpack.ExtType(EXT_SET, b""),
    frozenset: msgpack.ExtType(EXT_FROZENSET, b""),
}
_SLICE_TAG = msgpack.ExtType(EXT_SLICE, b"")
_RECORD_TAG = msgpack.ExtType(EXT_RECORD, b"")
_ELLIPSIS = msgpack.ExtType(EXT_ELLIPSIS, b"")

_TIMESTAMP_HEADERS = tuple(
    prefix + bytes([size]) + b"\xff" for prefix in (b"\xc7", b"\xc8\x00", b"\xc9\x00\x00\x00") for size in (4, 8, 12)
) + (b"\xd6\xff", b"\xd7\xff")
"""Every way msgpack can start a timestamp, which it decodes without consulting ext_hook."""


class Encoder:
    """Encodes one message body, collecting tensor and array bytes for the buffer section."""

    def __init__(self) -> None:
        self.buffers: list[memoryview] = []
        self._buffered = 0
        self._tensors: dict[int, tuple[torch.Tensor, msgpack.ExtType]] = {}

    def pack_body(self, fields: list[tuple[str, str, object]]) -> bytes:
        """Pack ``(key, label, value)`` fields as a map; errors name paths below each label."""
        try:
            return msgpack.packb(
                {key: value for key, _, value in fields},
                default=self._default,
                use_bin_type=True,
                strict_types=True,
            )
        except Unsupported as problem:
            culprit = problem.value
            raise _located(fields, lambda item, depth: item is culprit, problem.reason) from None
        except UnicodeEncodeError:
            raise _located(
                fields,
                lambda item, depth: _is_bad_text(item),
                "the text holds lone surrogate characters, which are not valid UTF-8; "
                "clean it first, e.g. text.encode('utf-8', 'replace').decode()",
            ) from None
        except BufferError:
            raise _located(
                fields,
                lambda item, depth: type(item) is memoryview and not item.c_contiguous,
                "a memoryview of non-contiguous memory cannot be sent; send view.tobytes()",
            ) from None
        except ValueError as exc:
            raise _located(
                fields,
                lambda item, depth: depth > DEEPEST,
                f"it sits inside more than {DEEPEST} containers (does it contain itself?)",
                fallback=str(exc),
            ) from None

    def _default(self, value: Any) -> Any:
        """Turn a value msgpack has no type for into a tagged array or an extension type."""
        kind = type(value)
        tag = _TAGS.get(kind)
        if tag is not None:
            return [tag, *value]
        if kind is slice:
            return [_SLICE_TAG, value.start, value.stop, value.step]
        if kind is Record:
            if type(value.fields) is not dict or not all(type(k) is str for k in value.fields):
                raise Unsupported(value, "a Record's fields must be a dict with str keys")
            return [_RECORD_TAG, value.module, value.qualname, value.fields]
        if kind is int:
            return msgpack.ExtType(EXT_BIGINT, _bigint_bytes(value))
        encode = _ENCODERS.get(kind)
        if encode is None:
            raise Unsupported(value, unsupported_reason(value))
        return encode(self, value)

    def _ellipsis(self, value: types.EllipsisType) -> msgpack.ExtType:
        return _ELLIPSIS

    def _dtype(self, value: torch.dtype) -> msgpack.ExtType:
        name = TORCH_DTYPE_NAMES.get(value)
        if name is None:
            raise Unsupported(value, f"dtype {value} is not supported on the wire")
        return msgpack.ExtType(EXT_DTYPE, name.encode())

    def _size(self, value: torch.Size) -> msgpack.ExtType:
        return msgpack.ExtType(EXT_SIZE, msgpack.packb(list(value)))

    def _device(self, value: torch.device) -> msgpack.ExtType:
        return msgpack.ExtType(EXT_DEVICE, str(value).encode())

    def _tensor(self, value: torch.Tensor) -> msgpack.ExtType:
        # One tensor under several names travels once and arrives as one tensor again.
        seen = self._tensors.get(id(value))
        if seen is not None and seen[0] is value:
            return seen[1]
        ext = self._buffer(EXT_TENSOR, *tensor_to_wire(value))
        self._tensors[id(value)] = (value, ext)
        return ext

    def _ndarray(self, value: np.ndarray[Any, Any]) -> msgpack.ExtType:
        return self._buffer(EXT_NDARRAY, *array_to_wire(value))

    def _buffer(self, code: int, dtype: str, shape: list[int], raw: memoryview) -> Any:
        # Each buffer starts on a 64-byte boundary of the buffer section, so a receiver that
        # places the section on such a boundary can let tensors use the received bytes in place.
        padding = -self._buffered % BUFFER_ALIGNMENT
        if padding:
            self.buffers.append(memoryview(bytes(padding)))
            self._buffered += padding
        offset = self._buffered
        self.buffers.append(raw)
        self._buffered += raw.nbytes
        return msgpack.ExtType(code, msgpack.packb([dtype, shape, offset]))

    def _function(self, value: types.FunctionType) -> msgpack.ExtType:
        return self._function_source(function_to_wire(value))

    def _function_source(self, value: FunctionSource) -> msgpack.ExtType:
        return msgpack.ExtType(EXT_FUNCTION, msgpack.packb([value.name, value.source]))

    def _module_ref(self, value: ModuleRef) -> msgpack.ExtType:
        if type(value.path) is not str:
            raise Unsupported(value, "a module reference's path must be a str")
        return msgpack.ExtType(EXT_MODULE_REF, value.path.encode())

    def _placeholder(self, value: Placeholder) -> msgpack.ExtType:
        parts = [value.kind, value.name, value.detail]
        if not all(type(p) is str for p in parts):
            raise Unsupported(value, "a placeholder's kind, name and detail must be str")
        return msgpack.ExtType(EXT_PLACEHOLDER, msgpack.packb(parts))


_ENCODERS: dict[type, Callable[[Encoder, Any], Any]] = {
    types.EllipsisType: Encoder._ellipsis,
    torch.dtype: Encoder._dtype,
    torch.Size: Encoder._size,
    torch.device: Encoder._device,
    torch.Tensor: Encoder._tensor,
    torch.nn.Parameter: Encoder._tensor,
    np.ndarray: Encoder._ndarray,
    types.FunctionType: Encoder._function,
    FunctionSource: Encoder._function_source,
    ModuleRef: Encoder._module_ref,
    Placeholder: Encoder._placeholder,
}


def _bigint_bytes(value: int) -> bytes:
    return value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)


def _is_bad_text(item: object) -> bool:
    if type(item) is not str:
        return False
    try:
        item.encode()
    except UnicodeEncodeError:
        return True
    return False


def _located(
    fields: list[tuple[str, str, object]],
    is_culprit: Callable[[object, int], bool],
    reason: str,
    fallback: str | None = None,
) -> Unsupported:
    """An :class:`Unsupported` at the first value in ``fields`` matching ``is_culprit``.

    If nothing matches, the reason is ``fallback`` (msgpack's own message) when given.
    """
    for _, label, value in fields:
        path = _find_path(value, is_culprit, label)
        if path is not None:
            return Unsupported(None, reason, path)
    return Unsupported(None, fallback or reason, fields[0][1] if len(fields) == 1 else "a value")


def _find_path(root: object, is_culprit: Callable[[object, int], bool], label: str) -> str | None:
    """Return where in ``root`` the first value matching ``is_culprit`` sits, as Python syntax.

    ``is_culprit`` gets each value and how many containers hold it. The search is iterative and
    stops descending below ``DEEPEST``, so it survives the values that broke encoding.
    """
    if is_culprit(root, 0):
        return label
    segments: list[str] = []
    stack: list[Iterator[tuple[object, str]]] = [_children(root)]
    while stack:
        for child, segment in stack[-1]:
            if is_culprit(child, len(stack)):
                return _format_path(label, [*segments, segment])
            if len(stack) <= DEEPEST:
                segments.append(segment)
                stack.append(_children(child))
                break
        else:
            stack.pop()
            if segments:
                segments.pop()
    return None


def _children(value: Any) -> Iterator[tuple[object, str]]:
    kind = type(value)
    if kind is list or kind is tuple:
        for index, item in enumerate(value):
            yield item, f"[{index}]"
    elif kind is dict:
        for key, item in value.items():
            yield key, "[<key>]"
            yield item, f"[{reprlib.repr(key)}]"
    elif kind is set or kind is frozenset:
        for item in value:
            yield item, "[<element>]"
    elif kind is slice:
        for name in ("start", "stop", "step"):
            yield getattr(value, name), f".{name}"


def _format_path(label: str, segments: list[str]) -> str:
    if len(segments) > 12:
        skipped = len(segments) - 10
        segments = [*segments[:6], f"...({skipped} more levels)...", *segments[-4:]]
    return label + "".join(segments)


class _Tag:
    """Decoded container tag: turns the rest of its array into the container it names."""

    def __init__(self, build: Callable[[list[Any]], Any]) -> None:
        self.build = build


def _build_record(items: list[Any]) -> Record:
    if len(items) != 3 or type(items[0]) is not str or type(items[1]) is not str or type(items[2]) is not dict:
        raise ValueError("a record is not [module, qualname, fields]")
    if not all(type(k) is str for k in items[2]):
        raise ValueError("a record's field names are not all str")
    return Record(items[0], items[1], items[2])


def _build_slice(items: list[Any]) -> slice:
    if len(items) != 3:
        raise ValueError(f"a slice has {len(items)} parts, not 3")
    return slice(*items)


_TAGS_BY_CODE = {
    EXT_TUPLE: _Tag(tuple),
    EXT_SET: _Tag(set),
    EXT_FROZENSET: _Tag(frozenset),
    EXT_SLICE: _Tag(_build_slice),
    EXT_RECORD: _Tag(_build_record),
}


class Decoder:
    """Decodes one message body, resolving extension types against the buffer section."""

    def __init__(self, buffers: memoryview, *, adopt: bool = False) -> None:
        self._buffers = buffers
        self._adopt = adopt
        self._open_tags = 0
        self._tensors: dict[bytes, torch.Tensor] = {}

    def unpack_body(self, data: bytes) -> Any:
        """Unpack ``data``, refusing tags out of place and msgpack timestamps."""
        try:
            body = msgpack.unpackb(data, ext_hook=self._ext_hook, list_hook=self._list_hook, strict_map_key=False)
        except msgpack.exceptions.StackError:
            raise ValueError("containers nest deeper than msgpack's limit of 1024") from None
        if self._open_tags:
            raise ValueError("a container tag is not the first item of an array")
        if any(header in data for header in _TIMESTAMP_HEADERS) and _holds_timestamp(body):
            raise ValueError("it holds a msgpack timestamp, which this protocol never sends")
        return body

    def _list_hook(self, items: list[Any]) -> Any:
        if items and type(items[0]) is _Tag:
            self._open_tags -= 1
            return items[0].build(items[1:])
        return items

    def _ext_hook(self, code: int, data: bytes) -> Any:
        tag = _TAGS_BY_CODE.get(code)
        if tag is not None:
            if data:
                raise ValueError(f"container tag {code} carries a payload")
            self._open_tags += 1
            return tag
        decode = _DECODERS.get(code)
        if decode is None:
            raise ValueError(f"unknown extension type code {code}")
        return decode(self, data)

    def _ellipsis(self, data: bytes) -> types.EllipsisType:
        if data:
            raise ValueError("an Ellipsis payload is not empty")
        return ...

    def _dtype(self, data: bytes) -> torch.dtype:
        dtype = TORCH_DTYPES.get(data.decode())
        if dtype is None:
            raise ValueError(f"unknown dtype {reprlib.repr(data)}")
        return dtype

    def _size(self, data: bytes) -> torch.Size:
        sizes = _plain(data, "torch.Size")
        if not all(type(size) is int for size in sizes):
            raise ValueError(f"a torch.Size holds non-integers: {reprlib.repr(sizes)}")
        return torch.Size(sizes)

    def _device(self, data: bytes) -> torch.device:
        if len(data) > 64:
            raise ValueError(f"device name {reprlib.repr(data)} is too long")
        return torch.device(data.decode())

    def _bigint(self, data: bytes) -> int:
        return int.from_bytes(data, "little", signed=True)

    def _tensor(self, data: bytes) -> torch.Tensor:
        tensor = self._tensors.get(data)
        if tensor is None:
            dtype, shape, offset = _buffer_ref(data, "tensor")
            tensor = self._tensors[data] = tensor_from_wire(dtype, shape, offset, self._buffers, adopt=self._adopt)
        return tensor

    def _ndarray(self, data: bytes) -> np.ndarray[Any, Any]:
        dtype, shape, offset = _buffer_ref(data, "array")
        return array_from_wire(dtype, shape, offset, self._buffers)

    def _function(self, data: bytes) -> FunctionSource:
        parts = _plain(data, "function")
        if len(parts) != 2 or not all(type(part) is str for part in parts):
            raise ValueError("a function payload is not [name, source]")
        return FunctionSource(*parts)

    def _module_ref(self, data: bytes) -> ModuleRef:
        if len(data) > 4096:
            raise ValueError("a module path longer than 4096 bytes")
        return ModuleRef(data.decode())

    def _placeholder(self, data: bytes) -> Placeholder:
        parts = _plain(data, "placeholder")
        if len(parts) != 3 or not all(type(p) is str for p in parts):
            raise ValueError("a placeholder payload is not [kind, name, detail]")
        if parts[0] not in ("not_saved", "omitted"):
            raise ValueError(f"unknown placeholder kind {reprlib.repr(parts[0])}")
        return Placeholder(*parts)


_DECODERS: dict[int, Callable[[Decoder, bytes], Any]] = {
    EXT_TENSOR: Decoder._tensor,
    EXT_NDARRAY: Decoder._ndarray,
    EXT_BIGINT: Decoder._bigint,
    EXT_ELLIPSIS: Decoder._ellipsis,
    EXT_DTYPE: Decoder._dtype,
    EXT_SIZE: Decoder._size,
    EXT_DEVICE: Decoder._device,
    EXT_FUNCTION: Decoder._function,
    EXT_MODULE_REF: Decoder._module_ref,
    EXT_PLACEHOLDER: Decoder._placeholder,
}


def _plain(data: bytes, what: str) -> list[Any]:
    """Unpack an extension payload that holds no extension types of its own."""
    items = msgpack.unpackb(data)
    if type(items) is not list:
        raise ValueError(f"a {what} payload is not an array")
    return items


def _buffer_ref(data: bytes, what: str) -> list[Any]:
    parts = _plain(data, what)
    if len(parts) != 3:
        raise ValueError(f"a {what} payload is not [dtype, shape, offset]")
    return parts


def _holds_timestamp(value: object) -> bool:
    stack = [value]
    while stack:
        item: Any = stack.pop()
        kind = type(item)
        if kind is msgpack.Timestamp:
            return True
        if kind in (list, tuple, set, frozenset):
            stack.extend(item)
        elif kind is dict:
            stack.extend(item)
            stack.extend(item.values())
        elif kind is slice:
            stack.extend((item.start, item.stop, item.step))
        elif kind is Record:
            stack.extend(item.fields.values())
    return False
