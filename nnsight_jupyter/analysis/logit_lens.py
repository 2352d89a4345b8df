"""Logit lens: what each layer's residual stream would predict if the model stopped there.

    lens = logit_lens(model, "The Eiffel Tower is in the city of", target=" Paris")
    lens.top_tokens(layer=20, position=-1)     # [(" Paris", 0.41), (" Rome", 0.07), ...]
    lens.target_probs                           # [layer, position]

One trace: at every chosen layer the body reads the layer's output and applies the model's own
final norm and unembedding to it (found through the architecture table, so GPT-2's `ln_f` /
`lm_head`, Llama's and Gemma's `model.norm` / `lm_head`), and Gemma-style logit soft-capping
when the config has it, so the last layer's row is the model's own prediction. Those calls run
beside the forward pass without being traced (see `Envoy.__call__`), so they are not counted as
the model's own calls of those modules.

Only the top-k tokens and probabilities (and the target's probability and rank) are kept per
layer and position, never the full `[vocab]` distributions: that is what a view shows, and all
a remote run sends back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch

from ..tracing.source import compile_source
from ..tracing.tracer import run_block
from .layout import Layout, layout_of
from .tables import grid_table, sequential, token_text
from .tokens import decode_each, prompt_ids, token_id

__all__ = ["LogitLensResult", "logit_lens"]

_LENS = compile_source(
    "for reader in readers:\n    reader.take(reader.layer.output)\n",
    "<logit lens>",
)


@dataclass
class LogitLensResult:
    """Top-k next tokens read off every chosen layer's residual stream, per position.

    `top_ids` and `top_probs` are `[layer, position, k]` (layers as in `layers`, most likely
    first); `target_probs` and `target_ranks` are `[layer, position]` when a target was given
    (rank 1 = the most likely token).
    """

    layers: list[int]
    prompt_ids: list[int]
    top_ids: torch.Tensor
    top_probs: torch.Tensor
    target: int | None = None
    target_probs: torch.Tensor | None = None
    target_ranks: torch.Tensor | None = None
    token_text: dict[int, str] = field(default_factory=dict)

    dims = ("layer", "position")

    @property
    def tokens(self) -> list[str]:
        return [self.token_text.get(i, str(i)) for i in self.prompt_ids]

    def labels(self, dim: str) -> list[str]:
        if dim == "position":
            return [f"{p} {t!r}" for p, t in enumerate(self.tokens)]
        if dim == "layer":
            return [str(layer) for layer in self.layers]
        raise ValueError(f"No axis {dim!r}; the axes are {self.dims}.")

    def top_tokens(self, layer: int, position: int) -> list[tuple[str, float]]:
        """The top-k tokens and probabilities at one layer (a model layer number) and position."""
        row = self._layer_row(layer)
        ids = self.top_ids[row, position].tolist()
        return [(self.token_text.get(i, str(i)), p) for i, p in zip(ids, self.top_probs[row, position].tolist())]

    def _layer_row(self, layer: int) -> int:
        if layer < 0:
            layer = self.layers[layer]
        try:
            return self.layers.index(layer)
        except ValueError:
            raise ValueError(f"Layer {layer} was not read; this lens has layers {self.layers}.") from None

    def __repr__(self) -> str:
        last = [
            f"{self.layers[i]}: {self.token_text.get(int(self.top_ids[i, -1, 0]), '?')!r} "
            f"{float(self.top_probs[i, -1, 0]):.2f}"
            for i in range(len(self.layers))
        ]
        lines = [
            f"LogitLensResult: {len(self.layers)} layers x {len(self.prompt_ids)} positions, "
            f"top {self.top_ids.shape[-1]}",
            "  last position, top token by layer: " + ("..., " if len(last) > 6 else "") + ", ".join(last[-6:]),
        ]
        if self.target is not None and self.target_ranks is not None:
            text = self.token_text.get(self.target, str(self.target))
            first = (self.target_ranks[:, -1] == 1).nonzero()
            where = f"layer {self.layers[int(first[0])]}" if first.numel() else "no layer"
            lines.append(
                f"  target {text!r}: probability at the last layer {float(self.target_probs[-1, -1]):.3g}; "
                f"first top-ranked at the last position in {where}"
            )
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        """Tables of the top token and of the target's probability, for pages without the live view.

        Tokens are drawn as the view draws them (`token_text`: a space or newline token is ␣ or ↵);
        each position's title and each cell's hover give the exact tokens, JSON-quoted as the view's are.
        """
        rows = self.labels("layer")
        cols = [f"{p} {token_text(t)}" for p, t in enumerate(self.tokens)]
        col_titles = [f"{p} {json.dumps(t, ensure_ascii=False)}" for p, t in enumerate(self.tokens)]
        text = [[self.token_text.get(int(i), str(int(i))) for i in row] for row in self.top_ids[..., 0].tolist()]
        probs = self.top_probs[..., 0].tolist()
        hover = [
            [
                "\n".join(
                    f"{json.dumps(self.token_text.get(int(i), str(int(i))), ensure_ascii=False)} {p:.3f}"
                    for i, p in zip(self.top_ids[r, c].tolist(), self.top_probs[r, c].tolist())
                )
                for c in range(len(cols))
            ]
            for r in range(len(rows))
        ]
        cells = [
            [(token_text(t), sequential(p, 0.0, 1.0)) for t, p in zip(trow, prow)] for trow, prow in zip(text, probs)
        ]
        out = grid_table(
            rows,
            cols,
            cells,
            corner="layer \\ position",
            titles=hover,
            col_titles=col_titles,
            title="logit lens: top token per layer and position (colour: its probability)",
        )
        if self.target is not None and self.target_probs is not None:
            name = self.token_text.get(self.target, str(self.target))
            tp = self.target_probs.tolist()
            cells = [[(f"{p:.3f}", sequential(p, 0.0, 1.0)) for p in row] for row in tp]
            out += grid_table(
                rows, cols, cells, corner="layer \\ position", col_titles=col_titles, title=f"probability of {name!r}"
            )
        return out

    def to_wire(self) -> dict[str, Any]:
        return {
            "layers": list(self.layers),
            "prompt_ids": list(self.prompt_ids),
            "top_ids": self.top_ids,
            "top_probs": self.top_probs,
            "target": self.target,
            "target_probs": self.target_probs,
            "target_ranks": self.target_ranks,
        }

    @classmethod
    def from_wire(cls, data: dict[str, Any], model: Any) -> LogitLensResult:
        result = cls(**data)
        result.token_text = _token_text(model, result)
        return result


class _Reader:
    """Applies the final norm and unembedding to one layer's output and keeps the top-k."""

    def __init__(self, layer: Any, layout: Layout, top_k: int, target: int | None) -> None:
        self.layer, self.layout, self.top_k, self.target = layer, layout, top_k, target
        self.top: Any = None
        self.target_stats: tuple[torch.Tensor, torch.Tensor] | None = None

    def take(self, value: Any) -> None:
        hidden = value[0] if isinstance(value, tuple) else value
        logits = self.layout.lm_head(self.layout.final_norm(hidden))[0].float()
        cap = self.layout.final_logit_softcap
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        probs = logits.softmax(-1)
        top = probs.topk(min(self.top_k, probs.shape[-1]), dim=-1)
        self.top = (top.indices.cpu(), top.values.cpu())
        if self.target is not None:
            p = probs[:, self.target]
            self.target_stats = (p.cpu(), ((probs > p.unsqueeze(-1)).sum(-1) + 1).cpu())


def logit_lens(
    model: Any,
    prompt: Any,
    *,
    top_k: int = 5,
    target: int | str | None = None,
    layers: Any = None,
    remote: Any = False,
    timeout: float | None = None,
) -> LogitLensResult:
    """Each chosen layer's output through the model's final norm and unembedding, in one trace.

    Args:
        model: a `LanguageModel` or `NNsight(hf_model)` of a family in the architecture table.
        prompt: text or token ids.
        top_k: tokens kept per layer and position.
        target: a token (id or one token of text) whose probability and rank to record everywhere.
        layers: the layers to read (all by default).
        remote: run on the server (`True`, `"local"` or a backend); only the top-k comes back.
        timeout: seconds the remote job may take.
    """
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive int, not {top_k!r}.")
    if remote:
        from .remote import run_logit_lens

        return run_logit_lens(model, prompt, top_k=top_k, target=target, layers=layers, remote=remote, timeout=timeout)
    layout = layout_of(model)
    ids = prompt_ids(model, prompt)
    chosen = layout.check_layers(layers)
    target_id = token_id(model, target, "target") if target is not None else None
    readers = [_Reader(layout.layer(i), layout, top_k, target_id) for i in chosen]
    kwargs = {"use_cache": False} if layout.accepts("use_cache") else {}
    with torch.no_grad():
        run_block(
            model.trace(ids.unsqueeze(0).to(layout.device), **kwargs), _LENS, {"readers": readers}, module_level=False
        )
    result = LogitLensResult(
        layers=chosen,
        prompt_ids=ids.tolist(),
        top_ids=torch.stack([r.top[0] for r in readers]),
        top_probs=torch.stack([r.top[1] for r in readers]),
        target=target_id,
        target_probs=torch.stack([r.target_stats[0] for r in readers]) if target_id is not None else None,
        target_ranks=torch.stack([r.target_stats[1] for r in readers]) if target_id is not None else None,
    )
    result.token_text = _token_text(model, result)
    return result


def _token_text(model: Any, result: LogitLensResult) -> dict[int, str]:
    ids = sorted(
        set(result.prompt_ids)
        | set(result.top_ids.reshape(-1).tolist())
        | ({result.target} if result.target is not None else set())
    )
    return dict(zip(ids, decode_each(model, ids)))
