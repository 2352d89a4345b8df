"""Throughput of the remote wire codec, against baselines measured in the same run.

    python benchmarks/codec.py

For float32 tensors of 1, 16, 64 and 256 MiB it times encode, decode and the round trip
``decode(encode(t))``. Encode and decode are compared with one plain copy of the same bytes
(``bytes(memoryview)``) into memory fresh from the kernel, what a codec that copies naively
pays (the codec asks for huge pages for large messages, so it can beat it); the round trip is compared with ``torch.save`` + ``torch.load`` through ``BytesIO``, the
pickle path NDIF uses. A structure of many small values is compared with bare
``msgpack.packb``/``unpackb`` of the same data as plain lists, which shows what the type checks
and the path-reporting walk cost. Each figure is the best of several runs, so other load on
the machine shows up as little as possible. MB means 10**6 bytes.

Exits with status 1 if the 64 MiB round trip is slower than 1 GB/s.
"""

from __future__ import annotations

import io
import sys
import time
from collections.abc import Callable

import msgpack
import torch

from nnsight_jupyter.remote.protocol import decode, encode

TENSOR_MIB = {1: 25, 16: 9, 64: 7, 256: 3}
"""Tensor size in MiB: how many times each measurement runs (the best run counts)."""

GATE_MIB = 64
GATE_BYTES_PER_S = 1e9


def best_seconds(run: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def torch_save_round_trip(tensor: torch.Tensor) -> torch.Tensor:
    buffer = io.BytesIO()
    torch.save(tensor, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def small_values(count: int) -> dict[str, object]:
    return {
        f"layer{i}": {
            "index": i,
            "scale": i * 0.5,
            "name": f"block {i}",
            "span": (i, i + 8),
            "mask": [True, False] * 4,
            "heads": {1, 3, 5},
        }
        for i in range(count)
    }


def as_plain_lists(value: object) -> object:
    if isinstance(value, dict):
        return {key: as_plain_lists(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [as_plain_lists(item) for item in value]
    return value


def row(payload: str, op: str, codec_rate: float, baseline: str, base_rate: float) -> None:
    print(
        f"{payload:<22} {op:<11} {codec_rate / 1e6:>10,.0f} {baseline:<18}"
        f" {base_rate / 1e6:>10,.0f} {codec_rate / base_rate:>7.2f}x"
    )


def main() -> int:
    print(f"torch {torch.__version__}, msgpack {'.'.join(map(str, msgpack.version))}")
    print(
        f"{'payload':<22} {'op':<11} {'codec MB/s':>10} {'baseline':<18}"
        f" {'MB/s':>10} {'ratio':>8}"
    )
    gate_rate = 0.0
    for mib, repeats in TENSOR_MIB.items():
        tensor = torch.randn(mib * 2**20 // 4)
        raw = memoryview(tensor.numpy()).cast("B")
        data = encode(tensor)
        assert torch.equal(decode(data), tensor)
        copy_s = best_seconds(lambda: bytes(raw), repeats)
        encode_s = best_seconds(lambda: encode(tensor), repeats)
        decode_s = best_seconds(lambda: decode(data), repeats)
        round_trip_s = best_seconds(lambda: decode(encode(tensor)), repeats)
        save_s = best_seconds(lambda: torch_save_round_trip(tensor), repeats)
        size = tensor.nbytes
        payload = f"float32 {mib} MiB"
        row(payload, "encode", size / encode_s, "bytes() copy", size / copy_s)
        row(payload, "decode", size / decode_s, "bytes() copy", size / copy_s)
        row(payload, "round trip", size / round_trip_s, "torch.save+load", size / save_s)
        if mib == GATE_MIB:
            gate_rate = size / round_trip_s
        del tensor, raw, data

    structure = small_values(20_000)
    plain = as_plain_lists(structure)
    data = encode(structure)
    packed = msgpack.packb(plain)
    payload = f"{len(structure) * 6:,} small values"
    encode_s = best_seconds(lambda: encode(structure), 5)
    decode_s = best_seconds(lambda: decode(data), 5)
    pack_s = best_seconds(lambda: msgpack.packb(plain), 5)
    unpack_s = best_seconds(lambda: msgpack.unpackb(packed), 5)
    row(payload, "encode", len(data) / encode_s, "msgpack.packb", len(packed) / pack_s)
    row(payload, "decode", len(data) / decode_s, "msgpack.unpackb", len(packed) / unpack_s)

    verdict = "ok" if gate_rate >= GATE_BYTES_PER_S else "TOO SLOW"
    print(
        f"\n{GATE_MIB} MiB round trip: {gate_rate / 1e9:.2f} GB/s "
        f"(needs {GATE_BYTES_PER_S / 1e9:.0f} GB/s): {verdict}"
    )
    return 0 if gate_rate >= GATE_BYTES_PER_S else 1


if __name__ == "__main__":
    sys.exit(main())
