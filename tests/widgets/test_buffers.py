"""Statistics, histograms and tiles of tensors, against numpy in float64."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nnsight_jupyter.widgets import buffers


def reference(t: torch.Tensor) -> dict:
    v = t.detach().to(torch.float64).numpy().ravel()
    finite = v[np.isfinite(v)]
    return {"min": finite.min(), "max": finite.max(), "mean": finite.mean(), "std": finite.std(ddof=1),
            "nan": int(np.isnan(v).sum()), "posinf": int((v == np.inf).sum()), "neginf": int((v == -np.inf).sum())}


def with_specials() -> torch.Tensor:
    t = torch.randn(50, 40)
    t[3, 4] = float("nan")
    t[7, 1] = float("inf")
    t[9, 9] = float("-inf")
    return t


CASES = {
    "float32": lambda: torch.randn(300, 70),
    "bfloat16": lambda: torch.randn(64, 33).to(torch.bfloat16),
    "float64 transposed": lambda: torch.randn(40, 90, dtype=torch.float64).t(),
    "int64 token ids": lambda: torch.randint(0, 50257, (4, 19)),
    "bool": lambda: torch.rand(20, 20) > 0.3,
    "large mean, small spread": lambda: 1e4 + 1e-2 * torch.randn(1000, dtype=torch.float64),
    "NaN and inf": with_specials,
    "expanded (strided, not contiguous)": lambda: torch.randn(1, 30, 20).expand(5, -1, -1),
}


@pytest.mark.parametrize("make", CASES.values(), ids=CASES.keys())
def test_summary_matches_numpy(make):
    torch.manual_seed(0)
    t = make()
    s = buffers.summarise(t)
    ref = reference(t)
    assert s.count == t.numel()
    assert (s.nan, s.posinf, s.neginf) == (ref["nan"], ref["posinf"], ref["neginf"])
    assert s.min == ref["min"] and s.max == ref["max"]
    assert s.mean == pytest.approx(ref["mean"], rel=1e-5, abs=1e-6)
    assert s.std == pytest.approx(ref["std"], rel=1e-4)


@pytest.mark.parametrize("contiguous", [True, False])
def test_16_bit_summaries_over_many_chunks_match_numpy(monkeypatch, contiguous):
    # Small chunks, so the reused conversion buffer serves many chunks, of two sizes when the
    # tensor is strided (rows of 70, then a last short block).
    monkeypatch.setattr(buffers, "CHUNK", 1000)
    torch.manual_seed(1)
    t = (3 + torch.randn(130, 70)).to(torch.bfloat16)
    if not contiguous:
        t = t.t().contiguous().t()
    s, ref = buffers.summarise(t), reference(t)
    assert s.min == ref["min"] and s.max == ref["max"]
    assert s.mean == pytest.approx(ref["mean"], rel=1e-5)
    assert s.std == pytest.approx(ref["std"], rel=1e-4)


def test_summary_of_nothing_and_of_only_nan():
    empty = buffers.summarise(torch.zeros(0, 3))
    assert empty.count == 0 and math.isnan(empty.mean)
    nans = buffers.summarise(torch.full((4,), float("nan")))
    assert nans.nan == 4 and math.isnan(nans.min)


def test_exact_histogram_counts_every_finite_value():
    t = with_specials()
    s = buffers.summarise(t)
    h = buffers.histogram(t, s)
    finite = t[torch.isfinite(t)].double().numpy()
    expected, _ = np.histogram(finite, bins=buffers.BINS, range=(s.min, s.max))
    assert h.sampled is None and (h.lo, h.hi) == (s.min, s.max)
    assert np.abs(h.counts - expected).max() <= 1  # a value on a bin edge may land either side
    assert h.counts.sum() == finite.size


def test_large_tensors_get_a_sampled_histogram():
    t = torch.randn(buffers.EXACT_HISTOGRAM + 1)
    s = buffers.summarise(t)
    h = buffers.histogram(t, s)
    assert h.sampled == buffers.SAMPLE and h.counts.sum() == buffers.SAMPLE
    # the sample follows the distribution: about 68% within one std of the mean
    centres = np.linspace(h.lo, h.hi, buffers.BINS + 1)
    centres = (centres[:-1] + centres[1:]) / 2
    within = h.counts[np.abs(centres - s.mean) < s.std].sum() / h.counts.sum()
    assert 0.62 < within < 0.74


@pytest.mark.parametrize("rows_axis,cols_axis", [(1, 3), (3, 1), (0, 2)])
def test_a_tile_is_the_slice_with_the_chosen_axes(rows_axis, cols_axis):
    t = torch.randn(3, 70, 4, 600)
    index = [2, 0, 3, 0]
    plane = t[tuple(slice(None) if d in (rows_axis, cols_axis) else index[d] for d in range(4))]
    if rows_axis > cols_axis:
        plane = plane.t()
    tile_row, tile_col = int(plane.shape[0] > 64), int(plane.shape[1] > 512)
    rows, cols, values = buffers.tile(t, index, rows_axis, cols_axis, tile_row, tile_col, (64, 512), "float32")
    expected = plane[64 * tile_row:64 * (tile_row + 1), 512 * tile_col:512 * (tile_col + 1)]
    assert (rows, cols) == tuple(expected.shape)
    assert np.array_equal(values, expected.numpy()) and values.flags["C_CONTIGUOUS"]


def test_one_dimensional_and_integer_tiles():
    ids = torch.randint(0, 50257, (100,))
    s = buffers.summarise(ids)
    assert buffers.display_dtype(ids, s) == "int32"
    rows, cols, values = buffers.tile(ids, [0], -1, 0, 0, 0, (64, 512), "int32")
    assert (rows, cols) == (1, 100) and values.dtype == np.int32 and (values[0] == ids.numpy()).all()
    assert buffers.display_dtype(torch.randn(3).bfloat16(), buffers.summarise(torch.randn(3))) == "float32"


def test_bad_indices_are_refused():
    with pytest.raises(ValueError, match="out of range for dim 0"):
        buffers.check_index((2, 3, 4), [5, 0, 0], 1, 2)
    with pytest.raises(ValueError, match="two different dims"):
        buffers.check_index((2, 3, 4), [0, 0, 0], 2, 2)
    with pytest.raises(ValueError, match="outside"):
        buffers.tile(torch.zeros(3, 4), [0, 0], 0, 1, 1, 0, (64, 512), "float32")


def test_finite_range_skips_nan_and_inf():
    assert buffers.finite_range(with_specials()) == pytest.approx(
        [reference(with_specials())["min"], reference(with_specials())["max"]], abs=10)
    t = torch.tensor([[1.0, float("nan")], [float("inf"), -2.0]])
    assert buffers.finite_range(t) == [-2.0, 1.0]
    assert buffers.finite_range(torch.full((2, 2), float("nan"))) is None


def test_percentile_range_is_the_quantiles_of_the_finite_values():
    torch.manual_seed(0)
    t = torch.randn(1000, dtype=torch.float64)
    t[0] = 1e6  # one massive outlier
    t[1] = float("nan")
    lo, hi = buffers.percentile_range(t)
    ordered = np.sort(t[torch.isfinite(t)].numpy())
    for value, q in [(lo, 0.01), (hi, 0.99)]:
        k = q * (len(ordered) - 1)  # between two order statistics, as numpy's quantile puts it
        assert ordered[int(np.floor(k))] <= value <= ordered[int(np.ceil(k))]
    assert hi < 5
