"""Wire format for the remote backend: one versioned msgpack codec for requests and results.

Why msgpack and not pickle
    Decoding a message must never run code. NDIF ships cloudpickle one way and ``torch.load``
    (with ``weights_only=False``) the other, so each side trusts whatever the other sends. Here
    every value is data: msgpack's own types plus a fixed table of extension types below.
    Functions travel as source text and decode to :class:`FunctionSource`; the receiver
    decides whether and how to compile them.

Message layout
    A message is three sections, back to back::

        header   msgpack array [protocol version, package version, kind, body size]
        body     msgpack map of the message's fields (values use the extension table)
        buffers  raw bytes of every tensor and array, concatenated

    The first two header items are frozen for all protocol versions, so any release can read
    them and name both versions when they differ (:class:`ProtocolVersionError`) before it
    looks at anything else. ``kind`` is ``"value"``, ``"request"`` or ``"result"``.

Why tensor bytes sit outside msgpack
    msgpack copies a ``bin`` payload when packing, again when the packed bytes are returned, and
    again into a new ``bytes`` when unpacking. Keeping tensor bytes out of band means encoding
    copies each tensor once (``b"".join`` over views of the tensors' memory) and decoding copies
    it once, into fresh memory the decoded tensor owns: it is writable and shares nothing with
    the message. The body refers to its bytes by offset into the buffer section. Bytes are
    little-endian, as on every platform torch ships for.

Extension types
    ====  =======================  ===================================================
    code  Python value             encoding
    ====  =======================  ===================================================
    1     ``torch.Tensor``         ext, payload msgpack ``[dtype name, shape, offset]``
    2     ``numpy.ndarray``        ext, payload ``[little-endian dtype.str, shape, offset]``
    3     ``int`` beyond 64 bits   ext, payload little-endian two's complement bytes
    4     ``tuple``                array ``[tag, *items]``; the tag is an empty ext 4
    5     ``set``                  array ``[tag, *items]``; the tag is an empty ext 5
    6     ``frozenset``            array ``[tag, *items]``; the tag is an empty ext 6
    7     ``slice``                array ``[tag, start, stop, step]``; an empty ext 7
    8     ``Ellipsis``             ext, empty payload
    9     ``torch.dtype``          ext, payload the dtype name in UTF-8 (``bfloat16``)
    10    ``torch.Size``           ext, payload msgpack array of ints
    11    ``torch.device``         ext, payload ``str(device)`` in UTF-8 (``cuda:0``)
    12    function, FunctionSource ext, payload msgpack ``[name, source]``; decodes to
                                   :class:`FunctionSource`
    13    ``ModuleRef``            ext, payload the module's dotted path in UTF-8
    14    ``Record``               array ``[tag, module, qualname, fields]``; an empty ext 14
    15    ``Placeholder``          ext, payload msgpack ``[kind, name, detail]``
    ====  =======================  ===================================================

    Containers are tagged arrays rather than ext payloads so that msgpack's C code walks the
    whole tree: Python runs mostly for values msgpack has no type for, which keeps structures
    of many small values fast and leaves no recursion in Python. A tag anywhere but first in
    an array makes the message malformed.

    ``None``, ``bool``, ``int`` (from -2**63 to 2**64 - 1), ``float``, ``str``, ``bytes``,
    ``list`` and ``dict`` (with keys of any supported hashable type) are msgpack's own;
    ``bytearray`` and ``memoryview`` are sent as msgpack bytes too and arrive as ``bytes``.
    Types are matched exactly: a subclass (``OrderedDict``, a namedtuple, ``IntEnum``, a
    tensor subclass) is refused with a hint to convert it, except ``torch.nn.Parameter``,
    which is sent as a plain tensor. Tensors are sent detached, contiguous and on CPU.

Strictness and limits
    Anything else raises :class:`ProtocolError` naming the value's type, where it sits (for
    example ``variables['cfg']['layers'][2]``) and what to send instead. Nesting is capped by
    msgpack's own limit of 1024 levels, in both directions, so a value may sit inside about a
    thousand containers; a structure that contains itself is refused, not followed. Decoding
    refuses messages over ``max_size`` bytes and turns every malformed input into
    :class:`ProtocolError`; no allocation exceeds a small multiple of the message size,
    because msgpack caps each claimed length at the bytes actually present and tensor sizes
    are checked against the buffer section before anything is copied.
"""

from __future__ import annotations

import reprlib
from dataclasses import dataclass, field
from typing import Any, Final

import msgpack

from .._version import __version__
from ..errors import ProtocolError, ProtocolVersionError
from .codec.body import Decoder, Encoder
from .codec.memory import joined_bytes
from .codec.wire import FunctionSource, ModuleRef, Placeholder, Record, Unsupported

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "FunctionSource",
    "ModuleRef",
    "PROTOCOL_VERSION",
    "Placeholder",
    "ProtocolError",
    "ProtocolVersionError",
    "Record",
    "TraceErrorInfo",
    "TraceRequest",
    "TraceResult",
    "decode",
    "decode_request",
    "decode_result",
    "encode",
    "encode_request",
    "encode_result",
]

PROTOCOL_VERSION: Final = 2
"""Wire protocol version; bumped on any change to the layout or the extension table."""

DEFAULT_MAX_MESSAGE_BYTES: Final = 8 * 2**30
"""Largest message :func:`decode` and friends accept unless given another ``max_size``."""

_HEADER_MAX_BYTES = 4096


@dataclass
class TraceRequest:
    """One trace to run remotely, as the client sends it.

    Attributes:
        model_id: the model the server should run, e.g. ``"openai-community/gpt2"``.
        source: the trace body's Python source text.
        options: how to run it, e.g. ``{"kind": "generate", "inputs": [...],
            "max_new_tokens": 5}``; keys are ``str``, values any supported value.
        variables: the values of the names ``source`` reads, by name; nothing else.
    """

    model_id: str
    source: str
    options: dict[str, Any] = field(default_factory=dict)
    variables: dict[str, Any] = field(default_factory=dict)


@dataclass
class TraceErrorInfo:
    """An exception the trace raised on the server, carried as text (it is not re-raised here).

    Attributes:
        type_name: the exception's class name, e.g. ``"IndexError"``.
        message: ``str(exception)``.
        traceback: the traceback text, trimmed to the user's own code.
    """

    type_name: str
    message: str
    traceback: str


@dataclass
class TraceResult:
    """What the server sends back for one trace.

    Attributes:
        saved: the values the trace saved, by name.
        logs: the lines the trace printed, in order.
        error: set when the trace raised; ``saved`` then holds what was saved before that.
        trace: what the notebook views need of a finished trace, or None: ``input_ids`` (the
            batched call's token ids, or None), ``marks`` (module path -> ``"read"`` or
            ``"saved"``) and ``rows`` (saved name -> ``[start, size, total]``, the batch rows of
            the invoke that saved it). A few hundred bytes; it lets a tensor saved remotely show
            its tokens and the module tree mark what the trace touched, as after a local run.
    """

    saved: dict[str, Any] = field(default_factory=dict)
    logs: list[str] = field(default_factory=list)
    error: TraceErrorInfo | None = None
    trace: dict[str, Any] | None = None


def encode(value: object) -> bytes:
    """Encode one value as a ``"value"`` message; see the module docstring for what is allowed.

    >>> decode(encode({"scale": 0.5, "layers": (0, 3)}))
    {'scale': 0.5, 'layers': (0, 3)}
    """
    return _encode_message("value", [("value", "value", value)])


def decode(data: bytes, *, max_size: int = DEFAULT_MAX_MESSAGE_BYTES) -> Any:
    """Decode a message written by :func:`encode`; raises :class:`ProtocolError` if malformed."""
    body = _decode_message(data, "value", max_size)
    _expect_fields(body, ("value",), "value")
    return body["value"]


def encode_request(request: TraceRequest) -> bytes:
    """Encode a :class:`TraceRequest` for the server."""
    if type(request) is not TraceRequest:
        raise ProtocolError(f"expected a TraceRequest, got {type(request).__name__}")
    _expect_text(request.model_id, "request.model_id")
    _expect_text(request.source, "request.source")
    _expect_names(request.options, "options")
    _expect_names(request.variables, "variables")
    return _encode_message(
        "request",
        [
            ("model_id", "model_id", request.model_id),
            ("source", "source", request.source),
            ("options", "options", request.options),
            ("variables", "variables", request.variables),
        ],
    )


def decode_request(data: bytes, *, max_size: int = DEFAULT_MAX_MESSAGE_BYTES) -> TraceRequest:
    """Decode a message written by :func:`encode_request`."""
    body = _decode_message(data, "request", max_size)
    _expect_fields(body, ("model_id", "source", "options", "variables"), "request")
    _expect_text(body["model_id"], "request.model_id")
    _expect_text(body["source"], "request.source")
    _expect_names(body["options"], "options")
    _expect_names(body["variables"], "variables")
    return TraceRequest(**body)


def encode_result(result: TraceResult) -> bytes:
    """Encode a :class:`TraceResult` for the client."""
    return joined_bytes(encode_result_parts(result))


def encode_result_parts(result: TraceResult) -> list[bytes | memoryview]:
    """:func:`encode_result` as pieces to be written one after another.

    Tensor bytes stay views of the tensors' own memory, so a large result reaches a pipe or a
    file without being copied into one message first.
    """
    if type(result) is not TraceResult:
        raise ProtocolError(f"expected a TraceResult, got {type(result).__name__}")
    _expect_names(result.saved, "saved")
    _expect_lines(result.logs)
    error = result.error
    if error is not None:
        if type(error) is not TraceErrorInfo:
            raise ProtocolError(f"result.error must be a TraceErrorInfo or None, got {error!r}")
        for name in ("type_name", "message", "traceback"):
            _expect_text(getattr(error, name), f"result.error.{name}")
        error_fields: dict[str, str] | None = {
            "type_name": error.type_name,
            "message": error.message,
            "traceback": error.traceback,
        }
    if result.trace is not None and type(result.trace) is not dict:
        raise ProtocolError(f"result.trace must be a dict or None, got {type(result.trace).__name__}")
    return _encode_parts(
        "result",
        [
            ("saved", "saved", result.saved),
            ("logs", "logs", result.logs),
            ("error", "error", error_fields if error is not None else None),
            ("trace", "trace", result.trace),
        ],
    )


def decode_result(
    data: bytes | bytearray | memoryview, *, max_size: int = DEFAULT_MAX_MESSAGE_BYTES, adopt: bool = False
) -> TraceResult:
    """Decode a message written by :func:`encode_result`.

    ``adopt=True`` hands ``data`` over to the result: large tensors then use its memory in place
    instead of a copy (pass memory that nothing else will write to, such as a fresh download).
    """
    body = _decode_message(data, "result", max_size, adopt=adopt)
    _expect_fields(body, ("saved", "logs", "error", "trace"), "result")
    _expect_names(body["saved"], "saved")
    _expect_lines(body["logs"])
    error = body["error"]
    if error is not None:
        if type(error) is not dict:
            raise ProtocolError(f"malformed result message: error is {reprlib.repr(error)}")
        _expect_fields(error, ("type_name", "message", "traceback"), "result error")
        for name, text in error.items():
            _expect_text(text, f"result.error.{name}")
        error = TraceErrorInfo(**error)
    trace = body["trace"]
    if trace is not None and type(trace) is not dict:
        raise ProtocolError(f"malformed result message: trace is {reprlib.repr(trace)}")
    return TraceResult(saved=body["saved"], logs=body["logs"], error=error, trace=trace)


def _encode_message(kind: str, fields: list[tuple[str, str, object]]) -> bytes:
    """Pack ``(key, label for error paths, value)`` fields into one message of ``kind``."""
    return joined_bytes(_encode_parts(kind, fields))


def _encode_parts(kind: str, fields: list[tuple[str, str, object]]) -> list[bytes | memoryview]:
    encoder = Encoder()
    try:
        body = encoder.pack_body(fields)
    except Unsupported as problem:
        raise ProtocolError(f"cannot send {problem.path}: {problem.reason}") from None
    header = msgpack.packb([PROTOCOL_VERSION, __version__, kind, len(body)])
    return [header + body, *encoder.buffers]


def buffer_section_offset(prefix: bytes | bytearray | memoryview) -> int | None:
    """Where a message's buffer section starts, from its first bytes (None if they are too few to tell).

    A receiver uses it to place the section on a `BUFFER_ALIGNMENT` boundary before the rest arrives.
    """
    try:
        header, header_end = _unpack_header(prefix)
    except msgpack.OutOfData:
        return None
    except Exception:
        return 0
    if type(header) is not list or len(header) != 4 or type(header[3]) is not int or header[3] < 0:
        return 0
    return header_end + header[3]


def _decode_message(
    data: bytes | bytearray | memoryview, kind: str, max_size: int, *, adopt: bool = False
) -> dict[Any, Any]:
    """Check the header of ``data`` and return its decoded body map."""
    try:
        view = memoryview(data).cast("B")
    except TypeError:
        raise ProtocolError(f"expected the message as bytes, got {type(data).__name__}") from None
    if view.nbytes > max_size:
        raise ProtocolError(
            f"the message is {view.nbytes} bytes, over the {max_size}-byte limit; pass a larger "
            "max_size if you expect results this big and trust their sender"
        )
    body_start, body_end = _read_header(view, kind)
    try:
        body = Decoder(view[body_end:], adopt=adopt).unpack_body(bytes(view[body_start:body_end]))
    except MemoryError:
        raise
    except Exception as exc:
        detail = str(exc) or type(exc).__name__
        raise ProtocolError(f"malformed {kind} message: {detail}") from exc
    if type(body) is not dict:
        raise ProtocolError(f"malformed {kind} message: the body is not a map")
    return body


def _unpack_header(data: bytes | bytearray | memoryview) -> tuple[Any, int]:
    """The message's header array and where it ends (msgpack's errors propagate)."""
    unpacker = msgpack.Unpacker(max_buffer_size=_HEADER_MAX_BYTES)
    unpacker.feed(data[:_HEADER_MAX_BYTES])
    header = unpacker.unpack()
    return header, unpacker.tell()


def _read_header(view: memoryview, kind: str) -> tuple[int, int]:
    """Validate the header against this side's version and ``kind``; return the body's span."""
    try:
        header, body_start = _unpack_header(view)
    except Exception as exc:
        raise ProtocolError(
            f"not an nnsight-jupyter message: its header cannot be read ({exc or 'truncated'})"
        ) from exc
    if type(header) is not list or len(header) < 2 or type(header[0]) is not int or type(header[1]) is not str:
        raise ProtocolError(
            "not an nnsight-jupyter message: it does not start with [protocol version, package version]"
        )
    if header[0] != PROTOCOL_VERSION:
        raise ProtocolVersionError(header[0], header[1], PROTOCOL_VERSION, __version__)
    if len(header) != 4 or type(header[2]) is not str or type(header[3]) is not int:
        raise ProtocolError(f"malformed message header {reprlib.repr(header)}")
    if header[2] != kind:
        raise ProtocolError(f"expected a {kind} message, got a {reprlib.repr(header[2])} message")
    body_end = body_start + header[3]
    if header[3] < 0 or body_end > view.nbytes:
        raise ProtocolError(
            f"truncated message: the header announces a {header[3]}-byte body, "
            f"but only {view.nbytes - body_start} bytes follow it"
        )
    return body_start, body_end


def _expect_fields(body: dict[Any, Any], names: tuple[str, ...], kind: str) -> None:
    if set(body) != set(names):
        raise ProtocolError(
            f"malformed {kind} message: fields {sorted(map(repr, body))}, expected {sorted(map(repr, names))}"
        )


def _expect_text(value: object, label: str) -> None:
    if type(value) is not str:
        raise ProtocolError(f"{label} must be a str, got {type(value).__name__}")


def _expect_names(value: object, label: str) -> None:
    if type(value) is not dict:
        raise ProtocolError(f"{label} must be a dict, got {type(value).__name__}")
    for key in value:
        if type(key) is not str:
            raise ProtocolError(f"{label} must have str keys (names), but has the key {reprlib.repr(key)}")


def _expect_lines(value: object) -> None:
    if type(value) is not list or not all(type(line) is str for line in value):
        raise ProtocolError(f"result.logs must be a list of str, got {reprlib.repr(value)}")
