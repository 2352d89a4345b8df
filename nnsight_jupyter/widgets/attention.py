"""AttentionView: every head of one layer as a thumbnail, one head large, with the prompt's tokens.

    patterns = attention_patterns(model, "When Mary and John went to the store, John gave")
    show(patterns)                   # or AttentionView(patterns, layer=5)

Each head's thumbnail carries its previous-token score (mean attention from a position to the
one before it) and first-token score (mean attention to position 0, the "attention sink"), so
induction-style and sink heads stand out before any is opened. Hovering a thumbnail shows that
head large, clicking locks it; in the large pattern, hovering a query token colours the keys it
attends to, clicking locks that query. Cells the causal mask hides (a key after its query) are
drawn hatched and read "masked", never as a probability of 0.

Every message is bounded, whatever the prompt's length. A whole layer as float32 is
`heads x n x n x 4` bytes: 12.6 MB for 12 heads and 512 tokens, over the websocket's 10 MB
message limit, and most of it never on screen. So the first message holds:

- the layer's thumbnails, one byte a pixel (`round(p * 254)`, 255 for masked), each head shrunk
  to at most `THUMB` x `THUMB` pixels by block maximum (torch's `adaptive_max_pool2d`: a sharp
  previous-token diagonal stays visible where a block mean would fade it), the side shrinking
  further when many heads would pass `THUMB_BYTES`;
- the top-left `TILE` x `TILE` tile of the shown head as float32 (64 KB), or of every head of the
  layer when those fit in `PRELOAD_BYTES` (a short prompt then needs no request at all);
- the scores of every head of every layer as float32 bytes;
- the first `TOKENS_FIRST` tokens of the prompt (`n_tokens` says how many there are).

For 12 heads and 512 tokens that is 110 KB. The rest of the large pattern travels as exact float32
tiles when it scrolls into view (`{kind: "tiles", layer, head, tiles}`, at most `MAX_TILES` a
request), the hovered query's row when its tiles are not there (`{kind: "row", ...}`, 4 bytes a
key), another layer's thumbnails when it is picked (`{kind: "layer", index}`), and the rest of
the tokens `TOKEN_CHUNK` at a time (`{kind: "tokens", start}`), which the view asks for as soon
as it is drawn. Measured on 8,192 GPT-2 tokens of this project's README (prose and code), with
9 heads as SmolLM2 has: the tokens as one JSON list were 60 KB of a 163 KB first message, and
grew with the prompt; now the first message is 107 KB, its tokens 4 KB, and each chunk 16 KB at
most.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
import traitlets

from . import static
from .buffers import tile as tile_of
from .view import Buffers, View

THUMB = 64
THUMB_BYTES = 96 * 1024
TILE = 128
PRELOAD_BYTES = 96 * 1024
MAX_TILES = 16
MASKED = 255
TOKENS_FIRST = 512
TOKEN_CHUNK = 2048


def _float_bytes(tensor: torch.Tensor) -> memoryview:
    return np.ascontiguousarray(tensor.detach().to("cpu", torch.float32).numpy()).data.cast("B")


def causal_mask(n: int) -> torch.Tensor:
    """`[query, key]`: True where the key comes after the query, which a causal LM never attends to."""
    return torch.ones(n, n, dtype=torch.bool).triu(1)


def thumb_size(heads: int, n: int) -> int:
    """The thumbnails' side: at most THUMB and n, and small enough that a layer's fit in THUMB_BYTES."""
    return max(1, min(THUMB, n, int((THUMB_BYTES / max(heads, 1)) ** 0.5)))


def thumbnails(layer: torch.Tensor, size: int) -> torch.Tensor:
    """`[head, size, size]` uint8: each block's largest probability in 0..254, MASKED where all its cells are masked."""
    values = torch.nn.functional.adaptive_max_pool2d(layer.detach().float().cpu(), size)
    open_ = torch.nn.functional.adaptive_max_pool2d((~causal_mask(layer.shape[-1])).float()[None], size)[0]
    out = (values.clamp(0, 1) * 254).round().to(torch.uint8)
    out[:, open_ == 0] = MASKED
    return out


class AttentionView(View):
    """The heads of an `AttentionPatterns` (`nnsight_jupyter.analysis.attention_patterns`), one layer at a time."""

    _view = traitlets.Unicode("attention").tag(sync=True)
    layers = traitlets.List(traitlets.Int()).tag(sync=True)
    tokens = traitlets.List(traitlets.Unicode()).tag(sync=True)
    n_tokens = traitlets.Int(0).tag(sync=True)
    n_heads = traitlets.Int(0).tag(sync=True)
    mask = traitlets.Unicode("causal").tag(sync=True)
    prev_scores = traitlets.Any(None, allow_none=True).tag(sync=True)
    first_scores = traitlets.Any(None, allow_none=True).tag(sync=True)
    layer = traitlets.Int(0).tag(sync=True)
    head = traitlets.Int(0).tag(sync=True)
    thumb_size = traitlets.Int(0).tag(sync=True)
    thumbs = traitlets.Any(None, allow_none=True).tag(sync=True)
    tile = traitlets.Int(TILE).tag(sync=True)
    preload_heads = traitlets.List(traitlets.Int()).tag(sync=True)
    preload = traitlets.Any(None, allow_none=True).tag(sync=True)

    def __init__(self, patterns: Any, *, layer: int | None = None, head: int = 0) -> None:
        from ..analysis.attention import AttentionPatterns

        if not isinstance(patterns, AttentionPatterns):
            raise TypeError(f"AttentionView shows what attention_patterns(...) returns, not {type(patterns).__name__}.")
        self._patterns = patterns
        index = self._layer_index(patterns.layers[0] if layer is None else layer)
        _, n_heads, n, _ = patterns.patterns.shape
        if not 0 <= head < n_heads:
            raise ValueError(f"head={head}: the model has {n_heads} heads per layer (0 to {n_heads - 1}).")
        side = min(TILE, n)
        heads = list(range(n_heads)) if n_heads * side * side * 4 <= PRELOAD_BYTES else [head]
        size = thumb_size(n_heads, n)
        super().__init__(
            layers=list(patterns.layers),
            tokens=list(patterns.tokens[:TOKENS_FIRST]),
            n_tokens=n,
            n_heads=n_heads,
            prev_scores=_float_bytes(patterns.previous_token_scores()),
            first_scores=_float_bytes(patterns.first_token_scores()),
            layer=index,
            head=head,
            thumb_size=size,
            thumbs=thumbnails(patterns.patterns[index], size).numpy().data.cast("B"),
            tile=TILE,
            preload_heads=heads,
            preload=_float_bytes(patterns.patterns[index, heads, :side, :side]),
        )

    def _layer_index(self, layer: int) -> int:
        layers = list(self._patterns.layers)
        if layer not in layers:
            raise ValueError(f"layer={layer} was not read; these patterns have layers {layers}.")
        return layers.index(layer)

    def _head(self, content: dict[str, Any]) -> torch.Tensor:
        layers, heads = self._patterns.patterns.shape[:2]
        index, head = int(content["layer"]), int(content["head"])
        if not 0 <= index < layers:
            raise ValueError(f"layer index {index} is outside 0..{layers - 1}")
        if not 0 <= head < heads:
            raise ValueError(f"head {head} is outside 0..{heads - 1}")
        return self._patterns.patterns[index, head]

    def _handle(self, content: dict[str, Any], buffers: Buffers) -> tuple[dict[str, Any], Buffers]:
        kind = content.get("kind")
        if kind == "layer":
            index = int(content["index"])
            if not 0 <= index < len(self._patterns.layers):
                raise ValueError(f"layer index {index} is outside 0..{len(self._patterns.layers) - 1}")
            thumbs = thumbnails(self._patterns.patterns[index], self.thumb_size)
            return {"index": index}, [thumbs.numpy().data.cast("B")]
        if kind == "tiles":
            pattern = self._head(content)
            wanted = [(int(r), int(c)) for r, c in content["tiles"]]
            if len(wanted) > MAX_TILES:
                raise ValueError(f"{len(wanted)} tiles asked for at once; a request takes at most {MAX_TILES}")
            out = [tile_of(pattern, [0, 0], 0, 1, r, c, (TILE, TILE), "float32")[2] for r, c in wanted]
            return {"tiles": [list(t) for t in wanted]}, [v.data.cast("B") for v in out]
        if kind == "row":
            pattern = self._head(content)
            query = int(content["query"])
            if not 0 <= query < pattern.shape[0]:
                raise ValueError(f"query {query} is outside 0..{pattern.shape[0] - 1}")
            return {"query": query}, [_float_bytes(pattern[query])]
        if kind == "tokens":
            start, n = int(content["start"]), len(self._patterns.prompt_ids)
            if not 0 <= start < n:
                raise ValueError(f"token {start} is outside 0..{n - 1}")
            return {"start": start, "tokens": self._patterns.tokens[start : start + TOKEN_CHUNK]}, []
        raise ValueError(f"an attention view answers 'layer', 'tiles', 'row' and 'tokens' requests, not {kind!r}")

    def _text(self) -> str:
        return repr(self._patterns)

    def _html(self) -> str:
        return static_html(self._patterns, self.layer, self.head)


# Pixels a side of the static fallback's pattern: a pixel a cell up to 128 tokens, block maxima
# beyond (as in the thumbnails), so the saved picture stays small whatever the prompt's length.
STATIC_SIDE = 128
BLANK = (245, 245, 245)


def static_html(patterns: Any, index: int, head: int) -> str:
    """What a notebook without its kernel shows: the shown head's pattern as a PNG, its tokens, every head's scores.

    The pattern is drawn in the live view's colours (masked cells in its light-theme blank); with at
    most `STATIC_SIDE` tokens each cell is a pixel and each query's row is labelled with its token
    (drawn with `glyphs`, the exact token in the title), beyond that the picture holds block maxima.
    """
    from ..analysis.tables import token_text as glyphs

    esc = static.esc
    pattern = patterns.patterns[index, head].detach().float().cpu()
    n = pattern.shape[-1]
    if n <= STATIC_SIDE:
        shown = pattern.clone()
        shown[causal_mask(n)] = float("nan")
    else:
        shown = torch.nn.functional.adaptive_max_pool2d(pattern[None], STATIC_SIDE)[0]
        open_ = torch.nn.functional.adaptive_max_pool2d((~causal_mask(n)).float()[None], STATIC_SIDE)[0]
        shown[open_ == 0] = float("nan")
    scale = static.Scale(0.0, 1.0)
    image = static.data_uri(static.heatmap_png(shown.numpy(), scale, nan_colour=BLANK))
    side = shown.shape[0]
    cell = max(2, min(14, 480 // side))
    labels = ""
    if n <= STATIC_SIDE:
        rows = "".join(
            f"<div data-pos='{q}' title='{esc(f'{q} {json.dumps(t, ensure_ascii=False)}')}' style='height: {cell}px; "
            f"line-height: {cell}px; white-space: pre;'>{esc(f'{q} {glyphs(t)}'[:16])}</div>"
            for q, t in enumerate(patterns.tokens)
        )
        labels = f"<div style='{static.MONO} font-size: {min(11, cell)}px; text-align: right; padding-right: 4px;'>"
        labels += rows + "</div>"
    layer = patterns.layers[index]
    prev = float(patterns.previous_token_scores()[index, head])
    first = float(patterns.first_token_scores()[index, head])
    reduced = "" if n <= STATIC_SIDE else f", each pixel the largest of a {n / side:.3g} × {n / side:.3g} block"
    return (
        f'<div class="nnsj-static nnsj-static-attention" style="{static.STYLE}">'
        f"<div style='font-weight: 600;'>attention: layer {layer}, head {head} "
        f"(previous-token {prev:.2f}, first-token {first:.2f})</div>"
        f"<div style='display: flex; align-items: flex-start; margin: 4px 0;'>{labels}"
        f"<img data-role='pattern' data-layer='{layer}' data-head='{head}' "
        f"alt='attention of layer {layer}, head {head}' "
        f"src='{image}' width='{side * cell}' height='{side * cell}' style='image-rendering: pixelated; "
        f"width: {side * cell}px; height: {side * cell}px; max-width: none;'></div>"
        f"<div style='{static.MUTED} font-size: 12px;'>query ↓ × key →, {n} × {n} tokens{reduced}; "
        "masked cells (a key after its query) blank</div>"
        f"{static.colourbar_html(scale)}{patterns._repr_html_()}</div>"
    )


__all__ = ["TOKEN_CHUNK", "TOKENS_FIRST", "AttentionView", "causal_mask", "static_html", "thumbnails"]
