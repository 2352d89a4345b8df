"""The remote wire codec: exact round trips, strict refusals, and hostile input."""

from __future__ import annotations

import collections
import enum
import functools
import gc
import math
import mmap
import pickle
import struct
import threading
import warnings
from typing import Any

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nnsight_jupyter import _version
from nnsight_jupyter.remote import protocol
from nnsight_jupyter.remote.codec import memory
from nnsight_jupyter.remote.codec.arrays import NUMPY_DTYPES, TORCH_DTYPES
from nnsight_jupyter.remote.codec.wire import ModuleRef, Placeholder, Record
from nnsight_jupyter.remote.protocol import (
    PROTOCOL_VERSION,
    FunctionSource,
    ProtocolError,
    ProtocolVersionError,
    TraceErrorInfo,
    TraceRequest,
    TraceResult,
    decode,
    decode_request,
    decode_result,
    encode,
    encode_request,
    encode_result,
)

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def roundtrip(value: object) -> Any:
    return decode(encode(value))


def assert_same(got: object, want: object) -> None:
    """Exact equality: same types all the way down, floats and tensors compared bit for bit."""
    assert type(got) is type(want), (got, want)
    if isinstance(want, float):
        assert struct.pack("<d", got) == struct.pack("<d", want)
    elif isinstance(want, torch.Tensor):
        assert_same_tensor(got, want)
    elif isinstance(want, np.ndarray):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert got.tobytes() == want.tobytes()
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want)
        for got_item, want_item in zip(got, want):
            assert_same(got_item, want_item)
    elif isinstance(want, dict):
        assert len(got) == len(want)
        for (got_key, got_item), (want_key, want_item) in zip(got.items(), want.items()):
            assert_same(got_key, want_key)
            assert_same(got_item, want_item)
    elif isinstance(want, slice):
        for name in ("start", "stop", "step"):
            assert_same(getattr(got, name), getattr(want, name))
    else:
        assert got == want


def assert_same_tensor(got: torch.Tensor, want: torch.Tensor) -> None:
    assert type(got) is torch.Tensor
    assert got.dtype == want.dtype and got.shape == want.shape
    assert not got.requires_grad
    got_bytes = got.contiguous().reshape(-1).view(torch.uint8)
    want_bytes = want.detach().resolve_conj().contiguous().reshape(-1).view(torch.uint8)
    assert torch.equal(got_bytes, want_bytes)


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Any bit pattern at all (NaN payloads included), except bool, which must be 0 or 1."""
    generator = torch.Generator().manual_seed(seed)
    count = math.prod(shape)
    if dtype is torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    raw = torch.randint(0, 256, (count * dtype.itemsize,), dtype=torch.uint8, generator=generator)
    return raw.view(dtype).reshape(shape)


def message(body: object, buffers: bytes = b"") -> bytes:
    """Build a message by hand, following the layout in the protocol module docstring."""
    return raw_message(msgpack.packb(body), buffers)


def raw_message(body: bytes, buffers: bytes = b"") -> bytes:
    header = [PROTOCOL_VERSION, _version.__version__, "value", len(body)]
    return msgpack.packb(header) + body + buffers


def tensor_ext(dtype: str, shape: object, offset: object = 0) -> msgpack.ExtType:
    return msgpack.ExtType(1, msgpack.packb([dtype, shape, offset]))


# -- round trips ------------------------------------------------------------------------------

SCALARS = [
    None,
    True,
    False,
    0,
    -1,
    2**63 - 1,
    -(2**63),
    2**64 - 1,
    2**64,
    -(2**63) - 1,
    10**40,
    -(10**40),
    0.0,
    -0.0,
    1.5,
    float("inf"),
    float("-inf"),
    float("nan"),
    struct.unpack("<d", b"\x01\x00\x00\x00\x00\x00\xf8\x7f")[0],
    "",
    "héllo ✓ 🙂",
    b"",
    b"\x00\xff",
    ...,
    slice(None),
    slice(1, 10, 2),
    slice(None, -1),
    torch.Size([]),
    torch.Size([2, 3]),
    torch.device("cpu"),
    torch.device("cuda", 1),
    FunctionSource("f", "def f():\n    return 1\n"),
]


@pytest.mark.parametrize("value", SCALARS, ids=repr)
def test_scalars_round_trip(value: object) -> None:
    assert_same(roundtrip(value), value)


CONTAINERS = [
    [],
    [1, [2, [3]]],
    (),
    (1,),
    ((), [()]),
    {},
    {"a": 1, "b": [1.5, None]},
    {1: "int", (1, 2): "tuple", None: 0, 2.5: 1, b"k": 2, frozenset({1}): 3, True: 4},
    set(),
    {1, "a", (2, 3)},
    frozenset(),
    frozenset({1, frozenset({2})}),
    [slice(0, 3), ..., (slice(None), 1)],
]


@pytest.mark.parametrize("value", CONTAINERS, ids=repr)
def test_containers_round_trip(value: object) -> None:
    assert_same(roundtrip(value), value)


def test_bytes_like_values_arrive_as_bytes() -> None:
    assert_same(roundtrip([bytearray(b"ab"), memoryview(b"cd")]), [b"ab", b"cd"])


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@pytest.mark.parametrize("dtype", list(TORCH_DTYPES.values()), ids=str)
def test_every_dtype_round_trips(dtype: torch.dtype) -> None:
    assert roundtrip(dtype) is dtype
    for shape in [(), (0,), (0, 3), (5,), (2, 3, 4)]:
        tensor = random_tensor(dtype, shape)
        assert_same(roundtrip(tensor), tensor)


def test_nan_payloads_keep_their_bits() -> None:
    patterns = [0x7FC00001, 0xFFC12345, 0x7F800001, 0x7FFFFFFF]
    tensor = torch.tensor(patterns, dtype=torch.int64).to(torch.int32).view(torch.float32)
    got = roundtrip(tensor)
    assert got.view(torch.int32).tolist() == tensor.view(torch.int32).tolist()


def test_common_tensors_are_equal() -> None:
    for tensor in [torch.randn(3, 4), torch.arange(10), torch.tensor(True), torch.tensor(2.5)]:
        got = roundtrip(tensor)
        assert torch.equal(got, tensor) and got.shape == tensor.shape


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.arange(24.0).reshape(4, 6)[:, ::2],
        lambda: torch.arange(24.0).reshape(4, 6).T,
        lambda: torch.arange(24.0)[5:11],
        lambda: torch.arange(3).expand(4, 3),
        lambda: torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last),
        lambda: torch.randn(4, dtype=torch.complex64).conj(),
        lambda: torch.randn(3, 4, dtype=torch.bfloat16)[1:, 1::2],
    ],
    ids=["strided", "transposed", "offset", "expanded", "channels_last", "conj", "bf16 slice"],
)
def test_views_round_trip_as_their_values(make: Any) -> None:
    tensor = make()
    got = roundtrip(tensor)
    assert torch.equal(got, tensor) and got.is_contiguous()


def test_tensors_that_require_grad_arrive_detached() -> None:
    weight = torch.nn.Parameter(torch.randn(3))
    activation = torch.randn(3, requires_grad=True) * 2
    got = roundtrip([weight, activation])
    for decoded, original in zip(got, [weight, activation]):
        assert type(decoded) is torch.Tensor and not decoded.requires_grad
        assert torch.equal(decoded, original.detach())


def test_one_tensor_under_several_names_travels_once_and_stays_one_tensor() -> None:
    shared = torch.randn(1000)
    twin = shared.clone()
    once = encode([shared, twin])
    data = encode({"a": shared, "b": [shared, (shared,)], "c": twin})
    assert len(data) - len(once) < 100  # the bytes of `shared` are in the message once
    got = decode(data)
    assert got["a"] is got["b"][0] is got["b"][1][0] and got["c"] is not got["a"]
    assert torch.equal(got["a"], shared) and torch.equal(got["c"], twin)
    got["a"].add_(1)  # as with the original objects: one tensor changes under every name
    assert torch.equal(got["b"][1][0], shared + 1) and torch.equal(got["c"], twin)


@pytest.mark.parametrize("numel", [7, 3 * 2**20], ids=["small", "past the huge-page cut"])
def test_decoded_tensors_are_writable_and_independent(numel: int) -> None:
    tensor = torch.randn(numel)
    original = tensor.clone()
    data = bytearray(encode(tensor))
    tensor.zero_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = decode(data)
        again = decode(data)
    assert torch.equal(got, original)
    got.add_(1)
    assert torch.equal(again, original) and torch.equal(decode(data), original)
    data[:] = bytes(len(data))
    del data
    gc.collect()
    assert torch.equal(again, original)
    assert torch.equal(got, original + 1)


@pytest.mark.parametrize("key", list(NUMPY_DTYPES))
def test_numpy_arrays_round_trip(key: str) -> None:
    dtype = NUMPY_DTYPES[key]
    rng = np.random.default_rng(0)
    for shape in [(), (0,), (3, 4)]:
        raw = rng.integers(0, 256, size=math.prod(shape) * dtype.itemsize, dtype=np.uint8)
        array = (raw > 127 if dtype == np.bool_ else raw.view(dtype)).reshape(shape)
        got = roundtrip(array)
        assert_same(got, array)
        assert got.flags.writeable


def test_numpy_views_and_byte_order() -> None:
    big_endian = np.arange(6, dtype=">f4").reshape(2, 3)
    got = roundtrip(big_endian)
    assert got.dtype == np.dtype("<f4") and np.array_equal(got, big_endian)
    strided = np.arange(20).reshape(4, 5)[::2, 1::2]
    assert np.array_equal(roundtrip(strided), strided)


# -- functions -----------------------------------------------------------------------------------


def scale_by(x: Any, k: int = 2) -> Any:
    return x * k


double = lambda x: x*2  # noqa: E731
pair = (lambda a: a + 1, lambda b: b * 2)
curried = lambda a: lambda b: a + b  # noqa: E731
spread = (lambda q:
          q + 1)


def test_def_travels_as_dedented_source() -> None:
    def inner(x: int) -> int:
        return x + 1

    assert roundtrip(scale_by) == FunctionSource(
        "scale_by", "def scale_by(x: Any, k: int = 2) -> Any:\n    return x * k\n"
    )
    assert roundtrip(inner).source.startswith("def inner(x: int) -> int:\n    return x + 1")


def test_decorators_travel_with_the_function() -> None:
    @functools.lru_cache
    def cached(x: int) -> int:
        return x

    source = roundtrip(cached.__wrapped__).source
    assert source.startswith("@functools.lru_cache\ndef cached(")


def test_lambdas_travel_as_the_expression_alone() -> None:
    assert roundtrip(double) == FunctionSource("<lambda>", "lambda x: x*2")
    assert [item.source for item in roundtrip(pair)] == ["lambda a: a + 1", "lambda b: b * 2"]
    assert roundtrip(curried).source == "lambda a: lambda b: a + b"
    assert roundtrip(curried(1)).source == "lambda b: a + b"
    compile(roundtrip(spread).source, "<test>", "eval")


def test_decoding_a_function_never_runs_it() -> None:
    got = roundtrip({"f": scale_by})["f"]
    assert type(got) is FunctionSource and not callable(got)


def test_function_without_source_is_refused_with_advice() -> None:
    namespace: dict[str, Any] = {}
    exec("def made_up(x):\n    return x\n", namespace)
    for function in [namespace["made_up"], eval("lambda: 0")]:
        with pytest.raises(ProtocolError, match=r"value\['f'\].*source code.*notebook cell"):
            encode({"f": function})


# -- refusals --------------------------------------------------------------------------------


class Plain:
    def method(self) -> None:
        pass


class Color(enum.IntEnum):
    RED = 1


Point = collections.namedtuple("Point", "x y")


class Tagged(torch.Tensor):
    pass


def quantized() -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.quantize_per_tensor(torch.randn(2), 0.1, 0, torch.quint8)


REFUSED = {
    "object": (Plain(), "Plain", "send a tensor"),
    "module": (torch.nn.Linear(2, 2), "Linear", "refer to them by path"),
    "python module": (math, "module", "import it inside the trace"),
    "class": (Plain, "type", "classes cannot be sent"),
    "generator": ((i for i in range(3)), "generator", "list(value)"),
    "ordered dict": (collections.OrderedDict(a=1), "OrderedDict", "dict(value)"),
    "namedtuple": (Point(1, 2), "Point", "tuple(value)"),
    "int enum": (Color.RED, "Color", "int(value)"),
    "numpy scalar": (np.float32(1.0), "float32", ".item()"),
    "complex": (1 + 2j, "complex", "send a tensor"),
    "builtin": (len, "builtin_function_or_method", "call this one inside the trace"),
    "method": (Plain().method, "method", "call this one inside the trace"),
    "slot wrapper": (Plain().__init__, "method-wrapper", "call this one inside the trace"),
    "partial": (functools.partial(scale_by, k=3), "partial", "call this one inside the trace"),
    "tensor subclass": (torch.randn(2).as_subclass(Tagged), "Tagged", "as_subclass"),
    "meta tensor": (torch.empty(2, device="meta"), "meta tensor", ".shape"),
    "sparse tensor": (torch.eye(2).to_sparse(), "sparse", "to_dense()"),
    "quantized tensor": (quantized(), "quantized", "dequantize()"),
    "quantized dtype": (torch.qint8, "qint8", "not supported"),
    "object array": (np.array([object()]), "dtype object", "float or complex array"),
    "structured array": (np.zeros(2, dtype=[("a", "<i4")]), "dtype [(", "float or complex array"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_unsupported_values_name_type_path_and_remedy(name: str) -> None:
    value, type_hint, remedy = REFUSED[name]
    with pytest.raises(ProtocolError) as caught:
        encode({"cfg": {"layers": [1, 2, value]}})
    text = str(caught.value)
    assert text.startswith("cannot send value['cfg']['layers'][2]: ")
    assert type_hint in text and remedy in text


def test_open_files_are_refused(tmp_path: Any) -> None:
    with open(tmp_path / "notes.txt", "w") as handle:
        with pytest.raises(ProtocolError, match=r"value\[0\].*read its contents"):
            encode([handle])


def test_request_errors_point_into_variables() -> None:
    variables = {"cfg": {"layers": [0, 1, Plain()]}}
    request = TraceRequest("gpt2", "out = x", {"kind": "trace"}, variables)
    with pytest.raises(ProtocolError, match=r"^cannot send variables\['cfg'\]\['layers'\]\[2\]: "):
        encode_request(request)


@pytest.mark.parametrize(
    "value, path",
    [
        ({(1, Plain()): 0}, r"value\[<key>\]\[1\]"),
        ({frozenset({Plain()})}, r"value\[<element>\]\[<element>\]"),
        (slice(0, Plain()), r"value\.stop"),
        (["ok", "bad \ud800"], r"value\[1\]: .*surrogate"),
        ({"v": memoryview(b"abcd")[::2]}, r"value\['v'\]: .*tobytes"),
    ],
)
def test_paths_through_keys_sets_slices_and_text(value: object, path: str) -> None:
    with pytest.raises(ProtocolError, match=f"^cannot send {path}"):
        encode(value)


def nested(depth: int, leaf: object = 0) -> Any:
    value = leaf
    for level in range(depth):
        value = [value] if level % 2 else (value,)
    return value


def test_nesting_is_limited_and_cycles_are_caught() -> None:
    got = roundtrip(nested(1000))
    for level in reversed(range(1000)):
        assert type(got) is (list if level % 2 else tuple) and len(got) == 1
        got = got[0]
    assert got == 0
    deep = r"value\['deep'\](\[0\]){5}\.\.\.\(1014 more levels\)\.\.\.(\[0\]){4}"
    with pytest.raises(ProtocolError, match=f"^cannot send {deep}: .*1023 containers"):
        encode({"deep": nested(2000)})
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(ProtocolError, match=r"^cannot send value\['loop'\].*contain itself"):
        encode({"loop": loop})


def test_message_fields_are_checked() -> None:
    with pytest.raises(ProtocolError, match="model_id must be a str"):
        encode_request(TraceRequest(None, "x"))  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="variables must have str keys"):
        encode_request(TraceRequest("m", "x", variables={1: 2}))  # type: ignore[dict-item]
    with pytest.raises(ProtocolError, match="logs must be a list of str"):
        encode_result(TraceResult(logs=["ok", 3]))  # type: ignore[list-item]


# -- requests and results ------------------------------------------------------------------


def test_request_round_trip() -> None:
    request = TraceRequest(
        model_id="openai-community/gpt2",
        source="hidden = model.transformer.h[0].output.save()\n",
        options={"kind": "generate", "inputs": ["Hello", "World"], "max_new_tokens": 3},
        variables={"steer": torch.randn(768), "layers": (0, 5), "fn": double},
    )
    got = decode_request(encode_request(request))
    assert got.model_id == request.model_id and got.source == request.source
    assert_same(got.options, request.options)
    assert_same(got.variables["steer"], request.variables["steer"])
    assert got.variables["layers"] == (0, 5)
    assert got.variables["fn"] == FunctionSource("<lambda>", "lambda x: x*2")


def test_result_round_trip_with_and_without_error() -> None:
    ok = TraceResult(saved={"logits": torch.randn(2, 5)}, logs=["step 1", "step 2"])
    got = decode_result(encode_result(ok))
    assert got.logs == ok.logs and got.error is None
    assert_same(got.saved["logits"], ok.saved["logits"])
    failed = TraceResult(error=TraceErrorInfo("IndexError", "out of range", "Traceback ...\n"))
    assert decode_result(encode_result(failed)) == failed


def test_a_result_carries_the_traces_summary_for_the_views() -> None:
    ids = torch.tensor([[464, 3139, 286]])
    summary = {"input_ids": ids, "marks": {"transformer.h.0": "saved"}, "rows": {"h": [0, 1, 2]}}
    got = decode_result(encode_result(TraceResult(saved={"h": torch.ones(1)}, trace=summary)))
    assert torch.equal(got.trace["input_ids"], ids)
    assert got.trace["marks"] == summary["marks"] and got.trace["rows"] == summary["rows"]
    with pytest.raises(ProtocolError, match="result.trace must be a dict or None"):
        encode_result(TraceResult(trace=["not", "a", "dict"]))


def test_kinds_are_not_interchangeable() -> None:
    with pytest.raises(ProtocolError, match="expected a request message, got a 'value' message"):
        decode_request(encode(1))
    with pytest.raises(ProtocolError, match="expected a value message, got a 'result' message"):
        decode(encode_result(TraceResult()))


def test_no_pickle_in_either_direction(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("pickle was used")

    for name in ("dump", "dumps", "load", "loads", "Pickler", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch.Tensor, "__reduce_ex__", refuse)
    value = {"t": torch.randn(3), "a": np.ones(2), "f": scale_by, "s": {1, 2}, "d": torch.int8}
    assert_same(roundtrip(value)["t"], value["t"])


# -- versions and the header ---------------------------------------------------------------


def test_header_layout_is_pinned() -> None:
    data = encode([1, 2])
    unpacker = msgpack.Unpacker()
    unpacker.feed(data)
    version, package, kind, body_size = unpacker.unpack()
    assert (version, package, kind) == (PROTOCOL_VERSION, _version.__version__, "value")
    assert unpacker.tell() + body_size == len(data)
    assert decode(message({"value": [1, 2]})) == [1, 2]


@pytest.mark.parametrize("remote", [PROTOCOL_VERSION + 1, PROTOCOL_VERSION - 1])
def test_version_mismatch_names_both_sides(remote: int) -> None:
    future = msgpack.packb([remote, "9.9.9", {"layout": "changed"}]) + b"\xc1garbage"
    with pytest.raises(ProtocolVersionError) as caught:
        decode_result(future)
    text = str(caught.value)
    assert f"protocol {remote}" in text and f"protocol {PROTOCOL_VERSION}" in text
    assert "9.9.9" in text and _version.__version__ in text
    assert "upgrade" in text and "pip install -U nnsight-jupyter" in text
    assert ("this side is older" in text) == (remote > PROTOCOL_VERSION)
    assert caught.value.remote_protocol == remote and caught.value.remote_package == "9.9.9"
    assert isinstance(caught.value, ProtocolError) and isinstance(caught.value, ValueError)


# -- malformed input -----------------------------------------------------------------------

MALFORMED = {
    "not bytes": ("a string", "expected the message as bytes"),
    "empty": (b"", "header cannot be read"),
    "not a header": (msgpack.packb({"a": 1}), "does not start with"),
    "short header": (msgpack.packb([PROTOCOL_VERSION, "0", "value"]), "malformed message header"),
    "body overrun": (
        msgpack.packb([PROTOCOL_VERSION, "0", "value", 10**12]),
        "truncated message",
    ),
    "negative body": (msgpack.packb([PROTOCOL_VERSION, "0", "value", -1]), "truncated message"),
    "body not a map": (message([1]), "not a map"),
    "missing field": (message({"other": 1}), "fields"),
    "unknown ext": (message({"value": msgpack.ExtType(99, b"")}), "unknown extension type code 99"),
    "timestamp": (message({"value": msgpack.Timestamp(1, 0)}), "timestamp"),
    "wrong dtype": (message({"value": tensor_ext("float33", [1])}, b"\0" * 4), "float33"),
    "bytes mismatch": (message({"value": tensor_ext("float32", [3])}, b"\0" * 8), "12 bytes"),
    "negative shape": (message({"value": tensor_ext("float32", [-1])}), "bad shape"),
    "huge shape": (message({"value": tensor_ext("float32", [2**40, 2**20])}), "bytes at offset"),
    "float shape": (message({"value": tensor_ext("float32", [1.0])}), "bad shape"),
    "bad offset": (message({"value": tensor_ext("int8", [2], -1)}, b"\0" * 4), "offset -1"),
    "numpy object dtype": (
        message({"value": msgpack.ExtType(2, msgpack.packb(["|O", [1], 0]))}, b"\0" * 8),
        "unknown numpy dtype",
    ),
    "bad dtype ext": (message({"value": msgpack.ExtType(9, b"Tensor")}), "unknown dtype"),
    "bad device": (message({"value": msgpack.ExtType(11, b"warp:drive")}), "malformed"),
    "bad slice": (message({"value": [msgpack.ExtType(7, b""), 1]}), "not 3"),
    "unhashable element": (message({"value": [msgpack.ExtType(5, b""), [1]]}), "unhashable"),
    "tag with payload": (message({"value": [msgpack.ExtType(4, b"x")]}), "carries a payload"),
    "stray tag": (message({"value": [1, msgpack.ExtType(4, b"")]}), "not the first item"),
    "lone tag": (message({"value": msgpack.ExtType(6, b"")}), "not the first item"),
    "huge array claim": (
        msgpack.packb([PROTOCOL_VERSION, "0", "value", 5]) + b"\xdd\xff\xff\xff\xff",
        "malformed",
    ),
    "invalid utf-8": (raw_message(b"\x81\xa5value\xa1\xff"), "utf-8"),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_messages_raise_protocol_error(name: str) -> None:
    data, expected = MALFORMED[name]
    with pytest.raises(ProtocolError, match=f"(?i){expected}"):
        decode(data)  # type: ignore[arg-type]


def test_deep_nesting_from_a_hostile_sender_is_refused() -> None:
    with pytest.raises(ProtocolError, match="malformed"):
        decode(raw_message(b"\x81\xa5value" + b"\x91" * 5000 + b"\xc0"))


def test_size_limit() -> None:
    data = encode(torch.zeros(1000))
    assert decode(data, max_size=len(data)).shape == (1000,)
    with pytest.raises(ProtocolError, match="over the 100-byte limit"):
        decode(data, max_size=100)


def test_every_truncation_is_refused() -> None:
    data = encode({"t": torch.arange(4), "x": (1, "two", {3}), "f": double})
    for end in range(len(data)):
        with pytest.raises(ProtocolError):
            decode(data[:end])


DECODED_TYPES = {
    type(None), bool, int, float, str, bytes, list, tuple, dict, set, frozenset, slice,
    type(...), torch.dtype, torch.Size, torch.device, torch.Tensor, np.ndarray, FunctionSource,
    ModuleRef, Record, Placeholder,
}


def decodes_or_refuses(data: bytes) -> None:
    """Decoding either fails with ProtocolError or yields only types the protocol defines."""
    try:
        value = decode(data)
    except ProtocolError:
        return
    stack = [value]
    while stack:
        item = stack.pop()
        assert type(item) in DECODED_TYPES, item
        if isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend([*item, *item.values()])
        elif isinstance(item, slice):
            stack.extend([item.start, item.stop, item.step])
        elif isinstance(item, ModuleRef):
            assert type(item.path) is str
        elif isinstance(item, Placeholder):
            assert all(type(part) is str for part in (item.kind, item.name, item.detail))
        elif isinstance(item, Record):
            assert type(item.module) is str and type(item.qualname) is str and type(item.fields) is dict
            stack.extend([*item.fields, *item.fields.values()])


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(data: bytes) -> None:
    decodes_or_refuses(data)


@FUZZ
@given(body=st.binary(max_size=200), buffers=st.binary(max_size=64))
def test_fuzz_random_bodies_behind_a_valid_header(body: bytes, buffers: bytes) -> None:
    decodes_or_refuses(raw_message(body, buffers))


ext_payloads = st.binary(max_size=12) | st.lists(
    st.integers(-2, 40) | st.text(max_size=10) | st.lists(st.integers(-1, 8), max_size=3),
    max_size=4,
).map(msgpack.packb)
wire_trees = st.recursive(
    st.none()
    | st.integers(-(2**63), 2**64 - 1)
    | st.text(max_size=6)
    | st.builds(msgpack.ExtType, st.integers(0, 14), ext_payloads)
    | st.builds(msgpack.Timestamp, st.integers(0, 2**40), st.integers(0, 999_999_999))
    | st.builds(msgpack.ExtType, st.sampled_from([4, 5, 6, 7]), st.just(b"")),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=4) | st.integers(-5, 5), inner, max_size=3),
    max_leaves=12,
)


@FUZZ
@given(tree=wire_trees, buffers=st.binary(max_size=64))
def test_fuzz_hostile_msgpack_trees(tree: object, buffers: bytes) -> None:
    decodes_or_refuses(message({"value": tree}, buffers))


SAMPLE = encode(
    {
        "t": torch.arange(6, dtype=torch.float16).reshape(2, 3),
        "a": np.arange(3),
        "nest": [(1, 2**70), {"k": {1, 2}}, frozenset({"x"}), slice(1, None), ...],
        "meta": [torch.bfloat16, torch.Size([2]), torch.device("cpu"), double],
    }
)


@FUZZ
@given(st.data())
def test_fuzz_mutated_valid_messages(data: st.DataObject) -> None:
    mutated = bytearray(SAMPLE)
    for _ in range(data.draw(st.integers(1, 4))):
        where = data.draw(st.integers(0, len(mutated) - 1))
        action = data.draw(st.sampled_from(["flip", "delete", "insert", "cut"]))
        if action == "flip":
            mutated[where] = data.draw(st.integers(0, 255))
        elif action == "delete":
            del mutated[where]
        elif action == "insert":
            mutated[where:where] = data.draw(st.binary(min_size=1, max_size=4))
        else:
            del mutated[where:]
        if not mutated:
            break
    decodes_or_refuses(bytes(mutated))


# -- property-based round trip ----------------------------------------------------------------

tensors = st.builds(
    random_tensor,
    st.sampled_from([torch.float32, torch.bfloat16, torch.int64, torch.bool, torch.complex64]),
    st.lists(st.integers(0, 3), max_size=3).map(tuple),
    st.integers(0, 2**16),
)
arrays = st.builds(
    lambda dtype, shape: np.arange(math.prod(shape), dtype=dtype).reshape(shape),
    st.sampled_from(["<i4", "<f8", "|u1"]),
    st.lists(st.integers(0, 3), max_size=3).map(tuple),
)
hashables = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.binary(max_size=8)
    | st.sampled_from([torch.float16, torch.int8, torch.device("cpu"), ...]),
    lambda inner: st.tuples(inner, inner) | st.frozensets(inner, max_size=3),
    max_leaves=6,
)
leaves = (
    hashables
    | st.floats()
    | tensors
    | arrays
    | st.builds(slice, st.none() | st.integers(), st.none() | st.integers())
    | st.lists(st.integers(0, 5), max_size=3).map(torch.Size)
)
values = st.recursive(
    leaves,
    lambda inner: st.lists(inner, max_size=4)
    | st.lists(inner, max_size=4).map(tuple)
    | st.dictionaries(hashables, inner, max_size=4)
    | st.sets(hashables, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values)
def test_nested_values_round_trip_exactly(value: object) -> None:
    assert_same(roundtrip(value), value)


def test_module_exports() -> None:
    assert sorted(protocol.__all__) == protocol.__all__
    assert all(hasattr(protocol, name) for name in protocol.__all__)


# ----- copying large buffers --------------------------------------------------------------------------
@pytest.mark.parametrize("size", [16 * 2**20, 16 * 2**20 + 4097, 40 * 2**20 - 3])
def test_a_large_copy_split_across_threads_is_exact(size):
    source = memoryview(torch.randint(0, 256, (size,), dtype=torch.uint8).numpy())
    target = memoryview(bytearray(size))
    memory.copy_into(target, source)
    assert target == source


def test_a_large_copy_uses_helper_threads_where_it_may(monkeypatch):
    seen = []
    real = memory.np.copyto

    def spy(dst, src):
        seen.append(threading.current_thread().name)
        real(dst, src)

    monkeypatch.setattr(memory, "_usable_cpus", lambda: 4)
    monkeypatch.setattr(memory.np, "copyto", spy)
    size = 32 * 2**20
    source = memoryview(bytes(range(256)) * (size // 256))
    target = memoryview(bytearray(size))
    memory.copy_into(target, source)
    assert target == source
    assert len(seen) == 4 and sum(name.startswith("nnsj-copy") for name in seen) == 3


def test_where_threads_are_refused_a_large_copy_is_done_in_one(monkeypatch):
    class RefusingPool:
        def submit(self, *args, **kwargs):
            raise PermissionError("starting threads is not allowed here")

    monkeypatch.setattr(memory, "_usable_cpus", lambda: 4)
    monkeypatch.setattr(memory, "_copy_threads", RefusingPool())
    size = 24 * 2**20 + 5
    source = memoryview(torch.randint(0, 256, (size,), dtype=torch.uint8).numpy())
    target = memoryview(bytearray(size))
    memory.copy_into(target, source)
    assert target == source
    monkeypatch.setattr(memory, "_copy_threads", None)

    def refuse(*args, **kwargs):
        raise PermissionError("no threads")

    monkeypatch.setattr("concurrent.futures.ThreadPoolExecutor.submit", refuse)
    assert memory._copy_pool() is None and memory._copy_threads is False


# ----- joining a message's parts ------------------------------------------------------------------------
def _parts(size: int) -> list:
    """A header, a float tensor's bytes (a non-byte memoryview) and a tail, ``size`` bytes in all."""
    values = torch.randn((size - 16) // 4)
    tail = bytes(range(256)) * 16
    return [b"header", memoryview(values.numpy()), tail[: size - 6 - values.nbytes]]


@pytest.mark.parametrize("size", [4 * 2**20 - 1, 4 * 2**20, 4 * 2**20 + 1, 2 * 2**20 * 5 + 12345, 40 * 2**20 - 3])
def test_joined_messages_are_plain_bytes_equal_to_a_join(size):
    parts = _parts(size)
    expected = b"".join(parts)
    joined = memory.joined_bytes(parts)
    assert type(joined) is bytes and len(joined) == size
    assert joined == expected and hash(joined) == hash(expected)


def test_a_large_message_is_built_in_place_in_huge_pages(monkeypatch):
    new_bytes, madvise = memory._native_bytes()
    made, advised = [], []

    def spy_new(pointer, size):
        made.append(size)
        return new_bytes(pointer, size)

    def spy_madvise(address, length, advice):
        advised.append((address, length, advice))
        return madvise(address, length, advice)

    monkeypatch.setattr(memory, "_native_bytes_calls", (spy_new, spy_madvise))
    parts = _parts(12 * 2**20 + 7)
    joined = memory.joined_bytes(parts)
    assert joined == b"".join(parts)
    assert made == [len(joined)]
    start = int(np.frombuffer(joined, dtype=np.uint8).ctypes.data)
    [(address, length, advice)] = advised
    assert advice == mmap.MADV_HUGEPAGE and address % (2 * 2**20) == 0 and length % (2 * 2**20) == 0
    assert start <= address and address + length <= start + len(joined) and length >= 8 * 2**20
    small = _parts(2**20)
    assert memory.joined_bytes(small) == b"".join(small)
    assert made == [len(joined)], "messages under 4 MiB are joined as usual"


def test_where_native_calls_are_refused_messages_are_joined_as_usual(monkeypatch):
    def refuse(*args):
        raise PermissionError("calling native code through ctypes is not allowed on this server")

    monkeypatch.setattr(memory, "_native_bytes_calls", (refuse, refuse))
    parts = _parts(6 * 2**20)
    assert memory.joined_bytes(parts) == b"".join(parts)
    assert memory._native_bytes_calls is False
    assert memory.joined_bytes(parts) == b"".join(parts)

    class NoPythonApi:
        def __getattr__(self, name):
            raise PermissionError("ctypes.dlsym refused")

    monkeypatch.setattr(memory, "_native_bytes_calls", None)
    monkeypatch.setattr(memory.ctypes, "pythonapi", NoPythonApi())
    assert memory._native_bytes() is None and memory._native_bytes_calls is False
    assert memory.joined_bytes(parts) == b"".join(parts)


def test_large_requests_and_results_round_trip_through_joined_bytes():
    big = torch.randn(2_000_000)
    request = protocol.TraceRequest(model_id="m", source="x = 1", options={}, variables={"patch": big})
    data = protocol.encode_request(request)
    assert type(data) is bytes and len(data) > 4 * 2**20
    assert torch.equal(protocol.decode_request(data).variables["patch"], big)
    result = protocol.TraceResult(saved={"h": big, "ids": [1, 2]}, logs=["ok"])
    data = protocol.encode_result(result)
    assert data == b"".join(bytes(memoryview(part)) for part in protocol.encode_result_parts(result))
    back = protocol.decode_result(data)
    assert torch.equal(back.saved["h"], big) and back.saved["ids"] == [1, 2] and back.logs == ["ok"]
