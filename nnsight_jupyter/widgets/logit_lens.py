"""LogitLensView: what every layer predicts at every position, for one prompt or two side by side.

    lens = logit_lens(model, "The Eiffel Tower is in the city of", target=" Paris")
    show(lens)                       # or LogitLensView(lens)
    show(lens, other_lens)           # two prompts side by side, same layers, same colours

A grid of layers x positions: each cell shows the layer's most likely next token, coloured by its
probability; hovering lists the top-k. With a target token the view switches to its probability
or its rank at every cell. Only the top-k ids and probabilities travel (int32 and float32 bytes,
`[layer, position, k]`), with the text of just those ids: a 30-layer x 16-position x top-5 lens
is 19 KB of numbers plus the text of its distinct ids (68 KB in all when all 2,400 differ),
whatever the vocabulary's size, locally and from a remote run alike.
"""

from __future__ import annotations

import html
from typing import Any

import torch
import traitlets

from .view import View


def _bytes(tensor: torch.Tensor, dtype: torch.dtype) -> memoryview:
    return memoryview(tensor.detach().to(device="cpu", dtype=dtype).contiguous().numpy().tobytes())


def panel(lens: Any, title: str) -> dict[str, Any]:
    """One prompt's part of the view's state."""
    out: dict[str, Any] = {
        "title": title,
        "layers": [int(i) for i in lens.layers],
        "tokens": list(lens.tokens),
        "k": int(lens.top_ids.shape[-1]),
        "top_ids": _bytes(lens.top_ids, torch.int32),
        "top_probs": _bytes(lens.top_probs, torch.float32),
        "target": None,
        "target_probs": None,
        "target_ranks": None,
    }
    if lens.target is not None and lens.target_probs is not None and lens.target_ranks is not None:
        out["target"] = lens.token_text.get(lens.target, str(lens.target))
        out["target_probs"] = _bytes(lens.target_probs, torch.float32)
        out["target_ranks"] = _bytes(lens.target_ranks, torch.int32)
    return out


class LogitLensView(View):
    """The grid of a `LogitLensResult` (`nnsight_jupyter.analysis.logit_lens`), optionally beside a second one."""

    _view = traitlets.Unicode("logit_lens").tag(sync=True)
    panels = traitlets.List(traitlets.Dict()).tag(sync=True)
    vocab = traitlets.Dict().tag(sync=True)
    mode = traitlets.Unicode("top").tag(sync=True)

    def __init__(self, lens: Any, other: Any = None, *, titles: tuple[str, str] | None = None) -> None:
        from ..analysis.logit_lens import LogitLensResult

        lenses = [lens] if other is None else [lens, other]
        for item in lenses:
            if not isinstance(item, LogitLensResult):
                raise TypeError(f"LogitLensView shows what logit_lens(...) returns, not {type(item).__name__}.")
        if other is not None and list(other.layers) != list(lens.layers):
            raise ValueError(
                f"The two lenses read different layers ({lens.layers} and {other.layers}); "
                "run logit_lens with the same layers= for both."
            )
        names = titles or tuple("".join(item.tokens)[-48:] for item in lenses)
        self._lenses = lenses
        vocab: dict[str, str] = {}
        for item in lenses:
            for i in item.top_ids.unique().tolist():
                vocab[str(i)] = item.token_text.get(i, str(i))
        mode = "top" if lens.target is None else "target_prob"
        super().__init__(panels=[panel(x, t) for x, t in zip(lenses, names)], vocab=vocab, mode=mode)

    def _text(self) -> str:
        return "\n\n".join(repr(x) for x in self._lenses)

    def _html(self) -> str:
        parts = []
        for item, p in zip(self._lenses, self.panels):
            title = f"<div style='font-weight:600'>{html.escape(p['title'])}</div>" if len(self._lenses) > 1 else ""
            parts.append(f"<div>{title}{item._repr_html_()}</div>")
        return (
            '<div class="nnsj-static nnsj-static-lens" style="display:flex;gap:20px;flex-wrap:wrap">'
            + "".join(parts)
            + "</div>"
        )


__all__ = ["LogitLensView", "panel"]
