"""The analyses researchers run most, on any causal LM in the architecture table.

    from nnsight_jupyter.analysis import patching_sweep, logit_diff, token_prob

- `patching_sweep`: patch the clean run into the corrupted run at every (layer, position, head)
  cell, many cells per forward pass (`patching.py`).

Each returns a result object with labelled axes (tensors plus the labels of layers, positions,
heads and tokens), a text `repr` and a small static HTML table.
"""

from .metrics import Metric, logit_diff, token_prob
from .patching import PatchingResult, patching_sweep

__all__ = [
    "Metric",
    "PatchingResult",
    "logit_diff",
    "patching_sweep",
    "token_prob",
]
