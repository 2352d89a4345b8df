"""The analyses researchers run most, on any causal LM in the architecture table, locally or remotely.

    from nnsight_jupyter.analysis import patching_sweep, logit_lens, attention_patterns, logit_diff, token_prob

- `patching_sweep`: patch the clean run into the corrupted run at every (layer, position, head)
  cell, many cells per forward pass (`patching.py`);
- `logit_lens`: each layer's residual stream through the model's final norm and unembedding,
  top-k per position, in one trace (`logit_lens.py`);
- `attention_patterns`: attention probabilities `[layer, head, query, key]`, also for models that
  run fused attention (`attention.py`).

Each returns a result object with labelled axes (tensors plus the labels of layers, positions,
heads and tokens), a text `repr` and a small static HTML table; `remote=True` runs the analysis
on the server as one job (`remote.py`).
"""

from .attention import AttentionPatterns, attention_patterns
from .logit_lens import LogitLensResult, logit_lens
from .metrics import Metric, logit_diff, token_prob
from .patching import PatchingResult, patching_sweep

__all__ = [
    "AttentionPatterns",
    "LogitLensResult",
    "Metric",
    "PatchingResult",
    "attention_patterns",
    "logit_diff",
    "logit_lens",
    "patching_sweep",
    "token_prob",
]
