"""Comparing float32 values that were computed with different shapes.

A row computed inside a batch of three and the same row computed alone agree to rounding, not bit
for bit: matrix kernels choose their blocking, vector width and summation order by CPU features,
batch size, thread count and memory alignment. So a test claims bit equality only against a
reference that ran the same shapes on the same layout; where the shapes must differ (a batch
against single runs), it uses :func:`assert_rounding_close`.

The bound. A sum of n float32 products, rounded to nearest, differs from the exact sum by at most
lambda * sqrt(n) * u times the sum of the terms' magnitudes, with probability at least
1 - 2 exp(-lambda^2 / 2), when rounding errors behave as independent and mean-zero (Higham and
Mary, "A New Approach to Probabilistic Rounding Error Analysis", SIAM J. Sci. Comput. 41, 2019;
u = 2^-24 is float32's unit roundoff). Two summation orders of one computation each lie within
that of the exact value, so within twice it of each other. A value at the end of a chain of
`depth` reductions of up to `width` terms is treated as one reduction of depth * width terms:
normalised residual networks (LayerNorm / RMSNorm in every block) keep relative errors from
compounding faster than that. The sum of magnitudes of a dot product is of the order of the
output vector's root mean square, so each element's difference is measured against its own
magnitude plus the RMS of its vector (the last dimension). lambda = 8 puts the chance of a false
failure per reduction below 1e-13.
"""

from __future__ import annotations

import math

import torch

UNIT_ROUNDOFF = 2.0**-24
LAMBDA = 8.0


def rounding_bound(depth: int, width: int) -> float:
    """Largest relative difference two summation orders may produce through `depth` reductions of `width` terms."""
    return 2 * LAMBDA * math.sqrt(depth * width) * UNIT_ROUNDOFF


def relative_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / (|e| + rms(e along the last dimension)), in float64."""
    a, e = actual.detach().double(), expected.detach().double()
    scale = e.abs() + e.pow(2).mean(dim=-1, keepdim=True).sqrt()
    return float(((a - e).abs() / scale.clamp_min(torch.finfo(torch.float32).tiny)).max())


def assert_rounding_close(actual: torch.Tensor, expected: torch.Tensor, *, depth: int, width: int) -> None:
    """`actual` equals `expected` up to float32 rounding through `depth` reductions of up to `width` terms."""
    assert actual.shape == expected.shape, f"shapes differ: {tuple(actual.shape)} vs {tuple(expected.shape)}"
    bound = rounding_bound(depth, width)
    diff = relative_difference(actual, expected)
    assert diff <= bound, (
        f"relative difference {diff:.3g} exceeds the float32 rounding bound {bound:.3g} "
        f"for {depth} chained reductions of up to {width} terms"
    )


def transformer_depth_width(config) -> tuple[int, int]:
    """(depth, width) of a decoder-only transformer, from its Hugging Face config.

    Each block reduces nine times in sequence (two norms, the q/k/v projections, q.k, softmax,
    attention times v, the output projection, the MLP's first and second matrices); the final norm
    and the unembedding add two. The longest reduction is the MLP's down projection.
    """
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    inner = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    return 9 * layers + 2, max(hidden, inner)
