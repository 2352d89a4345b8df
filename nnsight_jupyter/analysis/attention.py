"""Attention patterns: the probabilities every head puts on every earlier position, `[layer, head, query, key]`.

    att = attention_patterns(model, "When Mary and John went to the store, John gave a drink to")
    att.patterns[3, 5]             # layer 3 (of those read), head 5: [query, key]
    att.previous_token_scores()     # [layer, head]: how much each head looks one token back

Models run with PyTorch's fused attention (SDPA) by default, which never forms the probability
matrix, so there is nothing to read. Recomputing it from the queries and keys would mean
re-implementing each family's attention (rotary variants, query/key norms, scaling, sliding
windows, soft-capping) and keeping that in step with transformers. Instead this call switches
the model to transformers' own eager attention for one trace, reads the weights each attention
module returns, and switches back, also on error or Ctrl-C: the numbers are the model's own
eager-mode attention weights by construction, and the model is left in the mode it was in.
The cost is the eager kernel's speed and memory for that one pass (`heads x n x n` per layer).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from ..tracing.source import compile_source
from ..tracing.tracer import run_block
from .layout import layout_of
from .tables import grid_table, sequential
from .tokens import decode_each, prompt_ids

__all__ = ["AttentionPatterns", "attention_patterns", "eager_attention"]

_READ = compile_source(
    "for reader in readers:\n    reader.take(reader.attn.output)\n",
    "<attention patterns>",
)

_MISSING = object()


@dataclass
class AttentionPatterns:
    """Attention probabilities `[layer, head, query, key]` for the layers in `layers`, one prompt."""

    layers: list[int]
    prompt_ids: list[int]
    patterns: torch.Tensor
    token_text: dict[int, str] = field(default_factory=dict)

    dims = ("layer", "head", "query", "key")

    @property
    def tokens(self) -> list[str]:
        return [self.token_text.get(i, str(i)) for i in self.prompt_ids]

    def labels(self, dim: str) -> list[str]:
        if dim in ("query", "key"):
            return [f"{p} {t!r}" for p, t in enumerate(self.tokens)]
        if dim == "layer":
            return [str(layer) for layer in self.layers]
        if dim == "head":
            return [str(h) for h in range(self.patterns.shape[1])]
        raise ValueError(f"No axis {dim!r}; the axes are {self.dims}.")

    def head(self, layer: int, head: int) -> torch.Tensor:
        """One head's `[query, key]` pattern, by model layer number."""
        if layer not in self.layers:
            raise ValueError(f"Layer {layer} was not read; these patterns have layers {self.layers}.")
        return self.patterns[self.layers.index(layer), head]

    def previous_token_scores(self) -> torch.Tensor:
        """`[layer, head]`: mean attention from each position to the one before it (positions 1 on)."""
        n = self.patterns.shape[-1]
        if n < 2:
            return torch.zeros(self.patterns.shape[:2])
        q = torch.arange(1, n)
        return self.patterns[..., q, q - 1].mean(-1)

    def first_token_scores(self) -> torch.Tensor:
        """`[layer, head]`: mean attention from each position to position 0 (an 'attention sink')."""
        return self.patterns[..., 0].mean(-1)

    def __repr__(self) -> str:
        layers, heads, n, _ = self.patterns.shape
        prev = self.previous_token_scores()
        flat = int(prev.reshape(-1).argmax()) if prev.numel() else 0
        best = f"layer {self.layers[flat // heads]} head {flat % heads} ({float(prev.reshape(-1)[flat]):.2f})"
        return (
            f"AttentionPatterns: {layers} layers x {heads} heads x {n} x {n} positions\n"
            f"  strongest previous-token head: {best}"
        )

    def _repr_html_(self) -> str:
        rows, cols = self.labels("layer"), self.labels("head")
        out = ""
        tables = (
            ("previous-token score (mean attention to the token before)", self.previous_token_scores()),
            ("first-token score (mean attention to position 0)", self.first_token_scores()),
        )
        for title, scores in tables:
            cells = [[(f"{v:.2f}", sequential(v, 0.0, 1.0)) for v in row] for row in scores.tolist()]
            out += grid_table(rows, cols, cells, corner="layer \\ head", title=title)
        shape = tuple(self.patterns.shape)
        return out + f"<div style='font-size:11px;opacity:.75'>patterns: {shape} [layer, head, query, key]</div>"

    def to_wire(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "prompt_ids": list(self.prompt_ids), "patterns": self.patterns}

    @classmethod
    def from_wire(cls, data: dict[str, Any], model: Any) -> AttentionPatterns:
        result = cls(**data)
        result.token_text = dict(zip(result.prompt_ids, decode_each(model, result.prompt_ids)))
        return result


class _Reader:
    def __init__(self, attn: Any) -> None:
        self.attn = attn
        self.weights: torch.Tensor | None = None

    def take(self, value: Any) -> None:
        weights = value[1] if isinstance(value, tuple) and len(value) > 1 else None
        if not isinstance(weights, torch.Tensor):
            raise ValueError(
                f"{type(self.attn._module).__name__} returned no attention weights even in eager mode, so its "
                "patterns cannot be read this way."
            )
        self.weights = weights[0].detach().float().cpu()


@contextmanager
def eager_attention(module: torch.nn.Module) -> Iterator[None]:
    """Run a transformers model with eager attention inside the block; put its own mode back after."""
    configs: dict[int, Any] = {}
    pending = [m.config for m in module.modules() if hasattr(m, "config") and hasattr(m.config, "_attn_implementation")]
    while pending:
        config = pending.pop()
        if id(config) in configs:
            continue
        configs[id(config)] = config
        for key in getattr(config, "sub_configs", None) or ():
            sub = getattr(config, key, None)
            if sub is not None and hasattr(sub, "_attn_implementation"):
                pending.append(sub)
    if not configs:
        raise ValueError(
            f"{type(module).__name__} has no transformers config with an attention implementation, so "
            "its attention weights cannot be read this way."
        )
    before = [(config, config.__dict__.get("_attn_implementation_internal", _MISSING)) for config in configs.values()]
    try:
        for config, _ in before:
            config.__dict__["_attn_implementation_internal"] = "eager"
        yield
    finally:
        for config, value in before:
            if value is _MISSING:
                config.__dict__.pop("_attn_implementation_internal", None)
            else:
                config.__dict__["_attn_implementation_internal"] = value


def attention_patterns(
    model: Any, prompt: Any, *, layers: Any = None, remote: Any = False, timeout: float | None = None
) -> AttentionPatterns:
    """Attention probabilities `[layer, head, query, key]` of one prompt, even for a model running SDPA.

    Args:
        model: a `LanguageModel` or `NNsight(hf_model)` of a family in the architecture table.
        prompt: text or token ids.
        layers: the layers to read (all by default).
        remote: run on the server (`True`, `"local"` or a backend).
        timeout: seconds the remote job may take.
    """
    if remote:
        from .remote import run_attention_patterns

        return run_attention_patterns(model, prompt, layers=layers, remote=remote, timeout=timeout)
    layout = layout_of(model)
    ids = prompt_ids(model, prompt)
    chosen = layout.check_layers(layers)
    readers = [_Reader(layout.attn(i)) for i in chosen]
    kwargs = {"use_cache": False} if layout.accepts("use_cache") else {}
    tracer = model.trace(ids.unsqueeze(0).to(layout.device), **kwargs)  # after loading the weights (and config)
    with torch.no_grad(), eager_attention(model._model):
        run_block(tracer, _READ, {"readers": readers}, module_level=False)
    result = AttentionPatterns(
        layers=chosen, prompt_ids=ids.tolist(), patterns=torch.stack([r.weights for r in readers])
    )
    result.token_text = dict(zip(result.prompt_ids, decode_each(model, result.prompt_ids)))
    return result
