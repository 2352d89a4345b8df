"""Where the analyses find a model's parts: decoder layers, attention, MLP, heads, final norm, unembedding.

The analyses look the parts up in the architecture table (`models/architectures.py`) from the
module's own config, so they work the same on a `LanguageModel` and on `NNsight(hf_model)` (the
remote test server's tiny GPT-2 is the latter), on every family the table knows.

Heads. The attention's output projection (`o_proj`, `c_proj`, `out_proj`, `dense`) takes every
query head's output side by side: its input is `[batch, position, n_heads * head_dim]`, head h in
columns `h * head_dim` to `(h + 1) * head_dim`. That holds with grouped-query attention too
(SmolLM2, Gemma): the key/value heads are shared between query heads before this point, and the
projection's input still has one slice per *query* head. So a head is counted with
`config.num_attention_heads`, never with the key/value head count, and its width is taken from
the projection's input at run time, never from `hidden_size / n_heads` (Gemma's heads are wider
than that).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from ..models.architectures import ARCHITECTURES, ArchitectureNames, names_for
from ..tracing.envoy import Envoy

__all__ = ["Layout", "layout_of"]

_HEAD_PROJECTIONS = ("o_proj", "c_proj", "out_proj", "dense", "attention.out_proj")
"""Child paths of an attention module, tried in order, for the projection that merges the heads."""


class Layout:
    """The named parts of one causal LM, as envoys of the traced model."""

    def __init__(self, model: Any) -> None:
        from ..models.base import NNsight

        if not isinstance(model, NNsight):
            raise TypeError(
                f"The analyses take a traced model (LanguageModel(...) or NNsight(hf_model)), not "
                f"{type(model).__name__}."
            )
        module = model._model
        names = names_for(module)
        if names is None:
            model_type = getattr(getattr(module, "config", None), "model_type", None)
            known = ", ".join(sorted(ARCHITECTURES))
            raise ValueError(
                f"The analyses need to know where this model keeps its layers, final norm and unembedding, "
                f"and model_type {model_type!r} is not in the architecture table (known: {known}). Teach it with "
                "nnsight_jupyter.models.architectures.register_architecture(model_type, ArchitectureNames(...))."
            )
        self.model = model
        self.module: torch.nn.Module = module
        self.names: ArchitectureNames = names
        self.config: Any = module.config
        self.layers: Envoy = model.resolve(names.layers)
        self.n_layers = len(self.layers)
        self.final_norm: Envoy = model.resolve(names.final_norm)
        self.lm_head: Envoy = model.resolve(names.lm_head)

    def layer(self, index: int) -> Envoy:
        return self.layers[index]

    def attn(self, index: int) -> Envoy:
        return self._part(index, self.names.attn, "attention")

    def mlp(self, index: int) -> Envoy:
        return self._part(index, self.names.mlp, "MLP")

    def head_projection(self, index: int) -> Envoy:
        """The attention's output projection in layer `index`; its input holds each head's output."""
        attn = self.attn(index)
        for path in _HEAD_PROJECTIONS:
            node: Any = attn
            for part in path.split("."):
                node = node._children.get(part) if isinstance(node, Envoy) else None
            if isinstance(node, Envoy):
                return node
        raise ValueError(
            f"Cannot find the output projection of {type(attn._module).__name__} (looked for "
            f"{', '.join(_HEAD_PROJECTIONS)}), so heads cannot be patched on this model; use site='attn'."
        )

    @property
    def n_heads(self) -> int:
        """Query heads per layer (not key/value heads: see the module docstring)."""
        for name in ("num_attention_heads", "n_head", "num_heads"):
            value = getattr(self.config, name, None)
            if isinstance(value, int) and value > 0:
                return value
        raise ValueError("The model's config does not say how many attention heads it has (num_attention_heads).")

    @property
    def final_logit_softcap(self) -> float | None:
        """Gemma-style soft capping the model applies to its logits after the unembedding, if any."""
        value = getattr(self.config, "final_logit_softcapping", None)
        return float(value) if value else None

    @property
    def device(self) -> torch.device:
        """Where the model's inputs go (its embedding's device); loads a LanguageModel's weights first."""
        dispatch = getattr(self.model, "dispatch", None)
        if callable(dispatch):
            dispatch()
            self.module = self.model._model
        try:
            return self.module.get_input_embeddings().weight.device  # type: ignore[operator]
        except (AttributeError, NotImplementedError):
            return next((p.device for p in self.module.parameters()), torch.device("cpu"))

    def accepts(self, keyword: str) -> bool:
        """Whether the model's forward takes `keyword` (`logits_to_keep`, `use_cache`)."""
        try:
            return keyword in inspect.signature(type(self.module).forward).parameters
        except (TypeError, ValueError):
            return False

    def check_layers(self, layers: Any) -> list[int]:
        """Chosen layer indices (all when None), checked and in forward order."""
        return _indices(layers, self.n_layers, "layers", "layer")

    def check_heads(self, heads: Any) -> list[int]:
        return _indices(heads, self.n_heads, "heads", "head")

    def _part(self, index: int, path: str | None, what: str) -> Envoy:
        if path is None:
            raise ValueError(
                f"model_type {getattr(self.config, 'model_type', None)!r} has no single {what} module per layer "
                "in the architecture table, so this site cannot be patched on it."
            )
        return self.layers[index].resolve(path)


def layout_of(model: Any) -> Layout:
    return Layout(model)


def _indices(values: Any, count: int, argument: str, what: str) -> list[int]:
    if values is None:
        return list(range(count))
    if isinstance(values, (int, torch.Tensor)) and not isinstance(values, bool):
        values = [values]
    try:
        chosen = [int(v) for v in values]
    except (TypeError, ValueError):
        raise TypeError(f"{argument}= takes {what} indices (an int, a list or a range), not {values!r}.") from None
    out = []
    for v in chosen:
        i = v + count if v < 0 else v
        if not 0 <= i < count:
            raise ValueError(f"{argument}= has {what} {v}, but this model has {count} ({what}s 0 to {count - 1}).")
        out.append(i)
    if len(set(out)) != len(out):
        raise ValueError(f"{argument}= names a {what} twice: {chosen}.")
    if not out:
        raise ValueError(f"{argument}= is empty: choose at least one {what}.")
    return sorted(out)
