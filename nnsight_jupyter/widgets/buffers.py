"""Tensor values for the views: summaries computed in the kernel, slices as binary buffers.

Everything a view shows of a tensor comes from here:

- `summarise`: min, max, mean, std and the NaN / inf counts of the whole tensor. For floating
  tensors it takes three passes that torch runs at memory speed (`aminmax`, `sum`,
  `vector_norm`: about 0.2 s for 1 GB of float32 on 2 cores; 16-bit floats are converted chunk
  by chunk into one reused buffer, about 0.15 s per GiB), with no temporary the size of the tensor. A one-pass
  `std_mean` took 3 s and `isfinite` 4.5 s on the same tensor, so those run only when they are
  needed: when `aminmax` found NaN or inf, or when the mean is so large against the spread that
  the one-pass variance would cancel (then a second pass over chunks is exact).
- `histogram`: 64 bins over the finite range, exact up to `EXACT_HISTOGRAM` values, else over a
  fixed-seed random sample of `SAMPLE` values (a full `histc` of 1 GB took 3.6 s).
- `tile`: one rectangle of a 2-D slice as C-contiguous float32 (int32 for integer tensors that
  fit) bytes. Only that rectangle is copied; the tensor never is.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

BINS = 64
EXACT_HISTOGRAM = 1 << 22
SAMPLE = 1 << 20
CHUNK = 1 << 22


@dataclass(frozen=True)
class Summary:
    count: int
    min: float
    max: float
    mean: float
    std: float
    nan: int
    posinf: int
    neginf: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def as_real(tensor: torch.Tensor) -> torch.Tensor:
    """The values a view shows: detached, and bool as uint8."""
    t = tensor.detach()
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    return t


def _flat_chunks(t: torch.Tensor):
    """The tensor's values in chunks of at most CHUNK, as 1-D tensors (views when contiguous)."""
    if t.is_contiguous():
        yield from t.view(-1).split(CHUNK)
        return
    if t.dim() == 0:
        yield t.reshape(1)
        return
    rows = max(1, CHUNK // max(1, t[0].numel()))
    for start in range(0, t.shape[0], rows):
        yield t[start : start + rows].reshape(-1)


def summarise(tensor: torch.Tensor) -> Summary:
    """Statistics of every value; min/max/mean/std over the finite ones (NaN when there are none)."""
    t = as_real(tensor)
    n = t.numel()
    if n == 0:
        return Summary(0, math.nan, math.nan, math.nan, math.nan, 0, 0, 0)
    if t.is_floating_point():
        lo, hi = (float(v) for v in torch.aminmax(t))
        if math.isfinite(lo) and math.isfinite(hi):
            total, squares = _sums(t)
            mean = total / n
            var = (squares - n * mean * mean) / max(n - 1, 1)
            if var >= 1e-3 * mean * mean:
                return Summary(n, lo, hi, mean, math.sqrt(max(var, 0.0)), 0, 0, 0)
    return _summarise_exact(t)


def _sums(t: torch.Tensor) -> tuple[float, float]:
    """Sum and sum of squares of a floating tensor with no NaN or inf.

    float32/float64 in two whole-tensor passes (`sum`, `vector_norm`: 0.06 s each per GiB). 16-bit
    floats convert chunk by chunk into one reused float32 buffer, and both sums come from it. A
    fresh `chunk.float()` per chunk is a 16 MB allocation that glibc maps and unmaps each time, so
    every chunk paid its page faults again: 1 GiB of bfloat16 took 0.25-3.1 s that way (1.6 s
    for `sum(dtype=float32)` plus `vector_norm`) and 0.12-0.14 s with the reused buffer.
    """
    if t.dtype in (torch.float32, torch.float64):
        norm = float(torch.linalg.vector_norm(t))
        return float(t.sum()), norm * norm
    total = squares = 0.0
    buffer = torch.empty(0)
    for chunk in _flat_chunks(t):
        n = chunk.numel()
        if n > buffer.numel():
            buffer = torch.empty(max(n, min(CHUNK, t.numel())))
        f = buffer[:n]
        f.copy_(chunk.reshape(-1))
        total += float(f.sum())
        squares += float(torch.dot(f, f))
    return total, squares


def _summarise_exact(t: torch.Tensor) -> Summary:
    """Chunked float64 statistics over the finite values (two passes: mean, then squared deviations)."""
    n = t.numel()
    count = 0
    total = 0.0
    lo, hi = math.inf, -math.inf
    nan = posinf = neginf = 0
    floating = t.is_floating_point()
    for chunk in _flat_chunks(t):
        c = chunk.double()
        if floating:
            finite = torch.isfinite(c)
            nan += int(torch.isnan(c).sum())
            posinf += int((c == math.inf).sum())
            neginf += int((c == -math.inf).sum())
            c = c[finite]
        if c.numel():
            a, b = torch.aminmax(c)
            lo, hi = min(lo, float(a)), max(hi, float(b))
            total += float(c.sum())
            count += c.numel()
    if count == 0:
        return Summary(n, math.nan, math.nan, math.nan, math.nan, nan, posinf, neginf)
    mean = total / count
    squares = 0.0
    for chunk in _flat_chunks(t):
        c = chunk.double()
        if floating:
            c = c[torch.isfinite(c)]
        squares += float(((c - mean) ** 2).sum())
    std = math.sqrt(squares / (count - 1)) if count > 1 else 0.0
    return Summary(n, lo, hi, mean, std, nan, posinf, neginf)


@dataclass(frozen=True)
class Histogram:
    lo: float
    hi: float
    counts: np.ndarray  # float64 [BINS]
    sampled: int | None  # how many values the counts come from, when sampled

    def header(self, total: int) -> dict[str, Any]:
        return {"lo": self.lo, "hi": self.hi, "sampled": self.sampled, "total": total}


def sample(tensor: torch.Tensor, size: int = SAMPLE) -> torch.Tensor:
    """`size` values picked at random (fixed seed) from anywhere in the tensor, without copying it."""
    t = as_real(tensor)
    generator = torch.Generator().manual_seed(0)
    flat_index = torch.randint(t.numel(), (size,), generator=generator)
    if t.is_contiguous():
        return t.view(-1)[flat_index.to(t.device)]
    coords = torch.unravel_index(flat_index, tuple(t.shape))
    return t[tuple(c.to(t.device) for c in coords)]


def histogram(tensor: torch.Tensor, summary: Summary, picked: torch.Tensor | None = None) -> Histogram | None:
    """BINS counts over [min, max]; from `picked` (a `sample`) when the tensor has more than EXACT_HISTOGRAM values."""
    if summary.count == 0 or not math.isfinite(summary.min):
        return None
    lo, hi = summary.min, summary.max
    t = as_real(tensor)
    sampled = None
    if t.numel() > EXACT_HISTOGRAM:
        t = sample(t) if picked is None else picked
        sampled = t.numel()
    if lo == hi:
        single = np.zeros(BINS)
        single[BINS // 2] = float(torch.isfinite(t.double()).sum()) if t.is_floating_point() else t.numel()
        return Histogram(lo - 0.5, hi + 0.5, single, sampled)
    counts = torch.zeros(BINS, dtype=torch.float64)
    for chunk in _flat_chunks(t):
        counts += torch.histc(chunk.float() if chunk.dtype != torch.float64 else chunk, BINS, lo, hi).double().cpu()
    return Histogram(lo, hi, counts.numpy(), sampled)


def percentile_range(
    tensor: torch.Tensor, low: float = 0.01, high: float = 0.99, picked: torch.Tensor | None = None
) -> list[float] | None:
    """The `low` and `high` quantiles of the finite values (of a fixed-seed sample for large tensors).

    Gives a colour range that one huge outlier (the "massive activations" of many LLMs) cannot wash
    out; `kthvalue` on at most SAMPLE values, about 20 ms.
    """
    t = as_real(tensor)
    if t.numel() == 0:
        return None
    if t.numel() > SAMPLE:
        values = sample(t) if picked is None else picked
    else:
        values = t.reshape(-1)
    values = values.to(device="cpu", dtype=torch.float64)
    values = values[torch.isfinite(values)]
    n = values.numel()
    if n == 0:
        return None
    lo = values.kthvalue(max(1, min(n, int(math.floor(low * (n - 1))) + 1))).values
    hi = values.kthvalue(max(1, min(n, int(math.ceil(high * (n - 1))) + 1))).values
    return [float(lo), float(hi)]


def display_dtype(tensor: torch.Tensor, summary: Summary) -> str:
    """What a tensor's values travel as: float32, or int32 for integers that fit (exact either way)."""
    if tensor.is_floating_point():
        return "float64" if tensor.dtype == torch.float64 and not _fits_float32(summary) else "float32"
    if summary.count and -(2**31) <= summary.min and summary.max < 2**31:
        return "int32"
    return "float64"


def _fits_float32(summary: Summary) -> bool:
    """float64 values are sent as float32 (hover shows 7 digits either way) unless they overflow it."""
    big = 3.4e38
    return not (summary.count and (abs(summary.min) > big or abs(summary.max) > big))


_TORCH = {"float32": torch.float32, "float64": torch.float64, "int32": torch.int32}


def plane(tensor: torch.Tensor, index: list[int], rows_axis: int, cols_axis: int) -> torch.Tensor:
    """The 2-D slice with `rows_axis` down and `cols_axis` across, other dims fixed at `index` (a view).

    `rows_axis` -1 means a single row (1-D tensors).
    """
    t = as_real(tensor)
    if t.dim() == 0:
        return t.reshape(1, 1)
    select = tuple(slice(None) if d in (rows_axis, cols_axis) else int(index[d]) for d in range(t.dim()))
    p = t[select]
    if rows_axis < 0:
        return p.reshape(1, -1)
    if rows_axis > cols_axis:
        p = p.transpose(0, 1)
    return p


def check_index(shape: tuple[int, ...], index: list[int], rows_axis: int, cols_axis: int) -> None:
    if len(index) != len(shape):
        raise ValueError(f"index {index} has {len(index)} entries; the tensor has {len(shape)} dims")
    if cols_axis < 0 or cols_axis >= max(len(shape), 1) or rows_axis >= len(shape) or rows_axis == cols_axis:
        raise ValueError(f"rows_axis {rows_axis} and cols_axis {cols_axis} must be two different dims")
    for d, (i, n) in enumerate(zip(index, shape)):
        if d not in (rows_axis, cols_axis) and not 0 <= i < n:
            raise ValueError(f"index {i} is out of range for dim {d} of size {n}")


def tile(
    tensor: torch.Tensor,
    index: list[int],
    rows_axis: int,
    cols_axis: int,
    tile_row: int,
    tile_col: int,
    tile_shape: tuple[int, int],
    dtype: str,
) -> tuple[int, int, np.ndarray]:
    """Rows x cols and the values of one tile of a slice, as a C-contiguous numpy array."""
    p = plane(tensor, index, rows_axis, cols_axis)
    tr, tc = tile_shape
    r0, c0 = tile_row * tr, tile_col * tc
    if r0 >= p.shape[0] or c0 >= p.shape[1] or r0 < 0 or c0 < 0:
        raise ValueError(f"tile ({tile_row}, {tile_col}) is outside the {p.shape[0]} x {p.shape[1]} slice")
    part = p[r0 : r0 + tr, c0 : c0 + tc]
    values = part.to(device="cpu", dtype=_TORCH[dtype]).contiguous().numpy()
    return part.shape[0], part.shape[1], values


def finite_range(values: torch.Tensor) -> list[float] | None:
    """[min, max] of the finite values of a (2-D slice) tensor, None when it has none."""
    if values.numel() == 0:
        return None
    lo, hi = (float(v) for v in torch.aminmax(values))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        finite = values[torch.isfinite(values)] if values.is_floating_point() else values
        if finite.numel() == 0:
            return None
        lo, hi = (float(v) for v in torch.aminmax(finite))
    return [lo, hi]


def preview(values: torch.Tensor, rows: int, cols: int) -> np.ndarray:
    """`values` (2-D) shrunk to at most rows x cols by picking evenly spaced rows and columns."""
    p = values
    if p.shape[0] > rows:
        p = p[torch.linspace(0, p.shape[0] - 1, rows).round().long()]
    if p.shape[1] > cols:
        p = p[:, torch.linspace(0, p.shape[1] - 1, cols).round().long()]
    return p.to(device="cpu", dtype=torch.float32).contiguous().numpy()
