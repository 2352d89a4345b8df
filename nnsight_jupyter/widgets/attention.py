"""AttentionView: every head of one layer as a thumbnail, one head large, with the prompt's tokens.

    patterns = attention_patterns(model, "When Mary and John went to the store, John gave")
    show(patterns)                   # or AttentionView(patterns, layer=5)

Each head's thumbnail carries its previous-token score (mean attention from a position to the
one before it) and first-token score (mean attention to position 0, the "attention sink"), so
induction-style and sink heads stand out before any is opened. Hovering a thumbnail shows that
head large, clicking locks it; in the large pattern, hovering a query token colours the keys it
attends to, clicking locks that query.

Only the layer on screen travels: its `[head, query, key]` probabilities as float32 bytes in the
first message, another layer when the view asks for it (`{kind: "layer", index}`). The scores of
every head of every layer come with the first message (two floats a head).
"""

from __future__ import annotations

from typing import Any

import torch
import traitlets

from .view import Buffers, View


def _layer_bytes(patterns: Any, index: int) -> memoryview:
    return memoryview(patterns.patterns[index].detach().to("cpu", torch.float32, copy=True).numpy()).cast("B")


class AttentionView(View):
    """The heads of an `AttentionPatterns` (`nnsight_jupyter.analysis.attention_patterns`), one layer at a time."""

    _view = traitlets.Unicode("attention").tag(sync=True)
    layers = traitlets.List(traitlets.Int()).tag(sync=True)
    tokens = traitlets.List(traitlets.Unicode()).tag(sync=True)
    n_heads = traitlets.Int(0).tag(sync=True)
    prev_scores = traitlets.List(traitlets.List(traitlets.Float())).tag(sync=True)
    first_scores = traitlets.List(traitlets.List(traitlets.Float())).tag(sync=True)
    layer = traitlets.Int(0).tag(sync=True)
    head = traitlets.Int(0).tag(sync=True)
    pattern = traitlets.Any(None, allow_none=True).tag(sync=True)

    def __init__(self, patterns: Any, *, layer: int | None = None, head: int = 0) -> None:
        from ..analysis.attention import AttentionPatterns

        if not isinstance(patterns, AttentionPatterns):
            raise TypeError(f"AttentionView shows what attention_patterns(...) returns, not {type(patterns).__name__}.")
        self._patterns = patterns
        index = self._layer_index(patterns.layers[0] if layer is None else layer)
        n_heads = int(patterns.patterns.shape[1])
        if not 0 <= head < n_heads:
            raise ValueError(f"head={head}: the model has {n_heads} heads per layer (0 to {n_heads - 1}).")
        super().__init__(
            layers=list(patterns.layers),
            tokens=list(patterns.tokens),
            n_heads=n_heads,
            prev_scores=patterns.previous_token_scores().tolist(),
            first_scores=patterns.first_token_scores().tolist(),
            layer=index,
            head=head,
            pattern=_layer_bytes(patterns, index),
        )

    def _layer_index(self, layer: int) -> int:
        layers = list(self._patterns.layers)
        if layer not in layers:
            raise ValueError(f"layer={layer} was not read; these patterns have layers {layers}.")
        return layers.index(layer)

    def _handle(self, content: dict[str, Any], buffers: Buffers) -> tuple[dict[str, Any], Buffers]:
        if content.get("kind") != "layer":
            raise ValueError(f"an attention view answers 'layer' requests, not {content.get('kind')!r}")
        index = int(content["index"])
        if not 0 <= index < len(self._patterns.layers):
            raise ValueError(f"layer index {index} is outside 0..{len(self._patterns.layers) - 1}")
        return {"index": index}, [_layer_bytes(self._patterns, index)]

    def _text(self) -> str:
        return repr(self._patterns)

    def _html(self) -> str:
        return f'<div class="nnsj-static nnsj-static-attention">{self._patterns._repr_html_()}</div>'


__all__ = ["AttentionView"]
