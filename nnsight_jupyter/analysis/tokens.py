"""Prompts as token ids, and token ids as the labels an axis shows.

An analysis runs on one prompt (or one pair) of token ids. Text is tokenized with the model's own
tokenizer, exactly as `model.trace(text)` does, without padding; token ids (a list, a 1-D tensor
or a `[1, n]` tensor) are taken as they are, which is how a model without a tokenizer (a plain
`NNsight(hf_model)`) is used. Labels decode one token at a time, so a label shows the token's
own text, leading space included; without a tokenizer a label is the id.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["decode_each", "prompt_ids", "token_id", "tokenizer_of"]


def tokenizer_of(model: Any) -> Any:
    return getattr(model, "tokenizer", None) if hasattr(type(model), "tokenizer") else None


def prompt_ids(model: Any, prompt: Any, what: str = "prompt") -> torch.Tensor:
    """The prompt as a 1-D tensor of token ids."""
    if isinstance(prompt, str):
        tok = tokenizer_of(model)
        if tok is None:
            raise TypeError(
                f"The {what} is text, but this model has no tokenizer: give token ids instead (a list of ints or "
                "a tensor), or use LanguageModel(...), which loads the tokenizer."
            )
        ids = tok(prompt, padding=False, return_attention_mask=False)["input_ids"]
        out = torch.tensor(list(ids), dtype=torch.long)
    elif isinstance(prompt, torch.Tensor):
        if prompt.dtype.is_floating_point or prompt.dtype == torch.bool:
            raise TypeError(f"The {what}'s token ids must be integers, got a {prompt.dtype} tensor.")
        out = prompt.detach().to("cpu", torch.long)
        if out.dim() == 2 and out.shape[0] == 1:
            out = out[0]
        if out.dim() != 1:
            raise ValueError(
                f"The {what} must be one sequence of token ids (shape [n] or [1, n]), got shape {tuple(prompt.shape)}. "
                "These analyses take one prompt at a time."
            )
    elif isinstance(prompt, (list, tuple)) and all(_is_int(x) for x in prompt):
        out = torch.tensor([int(x) for x in prompt], dtype=torch.long)
    else:
        raise TypeError(f"The {what} must be text or a sequence of token ids, not {type(prompt).__name__}.")
    if out.numel() == 0:
        raise ValueError(f"The {what} is empty: give it at least one token.")
    return out


def token_id(model: Any, token: Any, what: str = "token") -> int:
    """One token id from an int or from text that is exactly one token (`" Paris"`)."""
    if _is_int(token):
        return int(token)
    if isinstance(token, str):
        tok = tokenizer_of(model)
        if tok is None:
            raise TypeError(f"The {what} {token!r} is text, but this model has no tokenizer: give its token id.")
        ids = tok(token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            pieces = [tok.decode([i]) for i in ids]
            raise ValueError(
                f"The {what} {token!r} is {len(ids)} tokens ({pieces}), not one. Give one token (note the leading "
                "space most tokenizers put on words, e.g. ' Paris') or its id."
            )
        return int(ids[0])
    raise TypeError(f"The {what} must be a token id (int) or one token of text, not {type(token).__name__}.")


def decode_each(model: Any, ids: Iterable[int]) -> list[str]:
    """Each id's own text (or the id itself, as text, without a tokenizer)."""
    tok = tokenizer_of(model)
    ids = [int(i) for i in ids]
    if tok is None:
        return [str(i) for i in ids]
    return [tok.decode([i]) for i in ids]


def _is_int(x: Any) -> bool:
    if isinstance(x, bool):
        return False
    return isinstance(x, int) or (isinstance(x, torch.Tensor) and x.dim() == 0 and not x.dtype.is_floating_point)
