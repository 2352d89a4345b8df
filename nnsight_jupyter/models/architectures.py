"""Architecture-agnostic module names: `model.layers`, `.embed`, `.final_norm`, `.lm_head`, `.attn`, `.mlp`.

Every Hugging Face family names its parts differently (GPT-2's blocks are `transformer.h`,
Llama's are `model.layers`), so analysis code written for one model breaks on the next. A small
table, keyed on the config's `model_type`, maps the shared names onto each family's native paths.
`LanguageModel` installs them as envoy aliases when it loads a model and checks every path
then, so a table entry that does not fit the model fails at load time with the missing path
named, not deep inside someone's trace. Native paths keep working beside the aliases.

Add a family with `register_architecture("my_type", ArchitectureNames(...))`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ArchitectureError

if TYPE_CHECKING:
    from ..tracing.envoy import Envoy

__all__ = [
    "ARCHITECTURES",
    "ArchitectureError",
    "ArchitectureNames",
    "apply_aliases",
    "names_for",
    "register_architecture",
]

ROOT_NAMES = ("layers", "embed", "final_norm", "lm_head")
LAYER_NAMES = ("attn", "mlp")


@dataclass(frozen=True)
class ArchitectureNames:
    """Native paths of the shared names for one model family.

    `layers`, `embed`, `final_norm` and `lm_head` are paths from the top-level model; `attn` and
    `mlp` are paths inside one decoder layer. `None` means the family has no single such module
    (OPT computes its MLP with two loose Linear layers), and the alias is then not offered.
    """

    layers: str
    embed: str
    final_norm: str
    lm_head: str
    attn: str | None
    mlp: str | None


_LLAMA_LIKE = ArchitectureNames("model.layers", "model.embed_tokens", "model.norm", "lm_head", "self_attn", "mlp")
_GPT2_LIKE = ArchitectureNames("transformer.h", "transformer.wte", "transformer.ln_f", "lm_head", "attn", "mlp")

ARCHITECTURES: dict[str, ArchitectureNames] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "mixtral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "olmo": _LLAMA_LIKE,
    "olmo2": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "phi": ArchitectureNames(
        "model.layers", "model.embed_tokens", "model.final_layernorm", "lm_head", "self_attn", "mlp"
    ),
    "gpt2": _GPT2_LIKE,
    "gptj": _GPT2_LIKE,
    "gpt_neo": _GPT2_LIKE,
    "gpt_neox": ArchitectureNames(
        "gpt_neox.layers", "gpt_neox.embed_in", "gpt_neox.final_layer_norm", "lm_head", "attention", "mlp"
    ),
    "opt": ArchitectureNames(
        "model.decoder.layers",
        "model.decoder.embed_tokens",
        "model.decoder.final_layer_norm",
        "lm_head",
        "self_attn",
        None,
    ),
}


def register_architecture(model_type: str, names: ArchitectureNames) -> None:
    """Teach `LanguageModel` the shared names of another family (keyed on `config.model_type`)."""
    if not isinstance(names, ArchitectureNames):
        raise TypeError("register_architecture takes an ArchitectureNames(...) describing the native paths.")
    ARCHITECTURES[model_type] = names


def names_for(model: torch.nn.Module) -> ArchitectureNames | None:
    """The table entry for `model`, from its config's `model_type`; None for families not in the table."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        return None
    return ARCHITECTURES.get(model_type)


def apply_aliases(root: Envoy, names: ArchitectureNames, model_type: str) -> None:
    """Install the shared names on `root` and on each of its decoder layers, checking every path."""
    for alias in ROOT_NAMES:
        path = getattr(names, alias)
        _check(root, path, alias, model_type, where="the model")
        if alias != path:
            root.add_alias(alias, path)
    layers = root.resolve(names.layers)
    for index, layer in enumerate(layers):
        for alias in LAYER_NAMES:
            path = getattr(names, alias)
            if path is None:
                continue
            _check(layer, path, alias, model_type, where=f"layer {index} ({names.layers}.{index})")
            if alias != path:
                layer.add_alias(alias, path)


def _check(envoy: Any, path: str, alias: str, model_type: str, *, where: str) -> None:
    node: Any = envoy._module
    for part in path.split("."):
        child = node._modules.get(part) if isinstance(node, torch.nn.Module) else None
        if child is None:
            raise ArchitectureError(
                f"The architecture table maps `{alias}` to `{path}` for model_type {model_type!r}, but {where} "
                f"({type(envoy._module).__name__}) has no module `{path}`. This checkpoint's layout differs from "
                "the table: fix the entry with nnsight_jupyter.models.architectures.register_architecture("
                f"{model_type!r}, ArchitectureNames(...)) before loading, or use the native paths shown by "
                "print(model)."
            )
        node = child
