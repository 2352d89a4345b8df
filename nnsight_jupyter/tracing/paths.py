"""Module paths, as the engine stores them and as people write and read them.

The engine keys every module by its dotted path from the root (`transformer.h.0.attn`, '' for the
root itself), as `named_modules()` gives it. People write `model.transformer.h[0].attn`; both
spellings, and any mix, are accepted wherever a path is given as a string (`cache[...]`,
`scan(...)[...]`, `tracer.cache(modules=[...])`), and messages show the written form.
"""

from __future__ import annotations

__all__ = ["display_path", "normalise_path"]


def normalise_path(key: str) -> str:
    """`model.transformer.h[0]` and `transformer.h.0` -> `transformer.h.0`; `model` -> ''."""
    if key == "model":
        return ""
    if key.startswith("model."):
        key = key[6:]
    return key.replace("[", ".").replace("]", "")


def display_path(path: str, root: str = "model") -> str:
    """`transformer.h.0.attn` -> `model.transformer.h[0].attn`."""
    if not path:
        return root
    out = root
    for part in path.split("."):
        out += f"[{part}]" if part.isdigit() else f".{part}"
    return out
