"""Metrics of a patched run: a function from the final position's logits to one number per run.

A patching sweep runs many patched copies of the corrupted prompt side by side, so a metric
gets the last position's logits of all of them at once, `[runs, vocab]`, and returns one value
per run, `[runs]`:

    metric = lambda logits: logits[:, paris] - logits[:, rome]

A metric that returns a single number for the whole batch is called once per run instead
(slower, same result). The two metrics almost every patching experiment uses are provided, and
unlike a function they travel to a server as data:

    logit_diff(" Paris", " Rome")    # logit of the right answer minus the wrong one's
    token_prob(" Paris")             # probability of one token
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .tokens import decode_each, token_id

__all__ = ["Metric", "logit_diff", "token_prob"]


@dataclass(frozen=True)
class Metric:
    """A named metric over `[runs, vocab]` logits; tokens given as text are resolved by `bind`."""

    kind: str
    tokens: tuple[Any, ...]

    def bind(self, model: Any) -> Metric:
        """The same metric with every token as an id, read with the model's tokenizer."""
        return Metric(self.kind, tuple(token_id(model, t, "metric token") for t in self.tokens))

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if any(not isinstance(t, int) for t in self.tokens):
            raise TypeError(f"{self} still has tokens as text; call .bind(model) first (the analyses do).")
        logits = logits.float()
        if self.kind == "logit_diff":
            return logits[:, self.tokens[0]] - logits[:, self.tokens[1]]
        if self.kind == "token_prob":
            return logits.softmax(-1)[:, self.tokens[0]]
        raise ValueError(f"Unknown metric kind {self.kind!r}.")

    def describe(self, model: Any = None) -> str:
        shown = [repr(t) if isinstance(t, str) else _token_text(model, t) for t in self.tokens]
        if self.kind == "logit_diff":
            return f"logit({shown[0]}) - logit({shown[1]})"
        return f"P({shown[0]})"

    def to_wire(self) -> dict[str, Any]:
        return {"kind": self.kind, "tokens": list(self.tokens)}

    @classmethod
    def from_wire(cls, data: Any) -> Metric:
        if not isinstance(data, dict) or data.get("kind") not in ("logit_diff", "token_prob"):
            raise ValueError(f"Not a metric description: {data!r}.")
        tokens = tuple(int(t) for t in data.get("tokens") or ())
        if len(tokens) != (2 if data["kind"] == "logit_diff" else 1):
            raise ValueError(f"A {data['kind']} metric takes {2 if data['kind'] == 'logit_diff' else 1} tokens.")
        return cls(data["kind"], tokens)

    def __repr__(self) -> str:
        return f"{self.kind}({', '.join(repr(t) for t in self.tokens)})"


def logit_diff(correct: int | str, incorrect: int | str) -> Metric:
    """The final position's logit of `correct` minus that of `incorrect` (ids, or one token of text each)."""
    return Metric("logit_diff", (correct, incorrect))


def token_prob(token: int | str) -> Metric:
    """The probability of `token` (an id, or one token of text) at the final position."""
    return Metric("token_prob", (token,))


def evaluate(metric: Callable[[torch.Tensor], Any], logits: torch.Tensor) -> torch.Tensor:
    """`metric` on `[runs, vocab]` logits as a float tensor `[runs]`; per run if it gives one number."""
    runs = logits.shape[0]
    with torch.no_grad():
        value = _as_tensor(metric(logits))
        if value.numel() == runs and (value.dim() == 1 or runs == 1):
            return value.reshape(runs).float()
        if value.numel() == 1:
            return torch.stack([_single(metric, logits[i : i + 1]) for i in range(runs)])
    raise ValueError(
        f"The metric returned shape {tuple(value.shape)} for {runs} runs' logits (shape {tuple(logits.shape)}). "
        "Return one number per run, e.g. `lambda logits: logits[:, a] - logits[:, b]`, or one number for a "
        "single run."
    )


def describe(metric: Any, model: Any = None) -> str:
    if isinstance(metric, Metric):
        return metric.describe(model)
    return getattr(metric, "__name__", None) or type(metric).__name__


def _single(metric: Callable[[torch.Tensor], Any], logits: torch.Tensor) -> torch.Tensor:
    value = _as_tensor(metric(logits))
    if value.numel() != 1:
        raise ValueError(f"The metric returned shape {tuple(value.shape)} for one run; return one number.")
    return value.reshape(()).float()


def _as_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach()
    try:
        return torch.as_tensor(value, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"The metric must return a tensor or a number, not {type(value).__name__}.") from None


def _token_text(model: Any, token: int) -> str:
    return repr(decode_each(model, [token])[0]) if model is not None else str(token)
