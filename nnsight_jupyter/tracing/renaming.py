"""`rename=` and `envoys=`: nnsight's two ways to adapt the envoy tree to one's own names and needs.

`rename={"transformer.h": "layers", "mlp": "ffn"}` adds aliases, never moving or hiding a name:
- a dotted path (`"transformer.h"`, globs such as `"*.h"` allowed) is reachable from the root
  under the alias (`model.layers`) and from the matched module's parent;
- a single name (`"mlp"`) or a module class makes every matching module reachable from its
  parent under the alias (`model.transformer.h[0].ffn`).
An alias that would displace an existing child or attribute is refused with a ValueError.

`envoys={torch.nn.MultiheadAttention: MyEnvoy, "transformer.h.0": OtherEnvoy}` chooses the Envoy
subclass for modules of a class or at a path, so properties defined on it (`.heads`) work on
those modules; a bare subclass applies to every module. Aliases are kept on the root
(`_renames`) and put back whenever the tree is re-read.
"""

from __future__ import annotations

import fnmatch
from typing import Any

import torch

from .envoy import Envoy
from .paths import normalise_path

__all__ = ["add_aliases", "apply_renames", "check_envoys", "envoy_class_for"]


def apply_renames(root: Envoy, rename: dict[Any, str]) -> list[tuple[str, str, str]]:
    """Add the aliases `rename` describes to the envoy tree under `root` (see the module docstring).

    Returns them as `(path of the envoy holding it, alias, path relative to that envoy)`, which is
    also kept on the root (`_rename_aliases`) so a remote run can add the same aliases.
    """
    added: list[tuple[str, str, str]] = []
    for key, alias in rename.items():
        if not isinstance(alias, str) or not alias.isidentifier():
            raise ValueError(f"rename={{{key!r}: {alias!r}}}: an alias is a plain name such as 'layers'.")
        matches = _matching_paths(root, key)
        if not matches:
            raise ValueError(
                f"rename: {key!r} matches no module of this model. Keys are module paths ('transformer.h', "
                "globs like '*.h'), module names ('mlp') or module classes; print(model) shows the tree."
            )
        for path in matches:
            parent_path, _, name = path.rpartition(".")
            targets = [parent_path]
            if isinstance(key, str) and "." in normalise_path(key) and parent_path:
                targets.insert(0, "")
            for target in dict.fromkeys(targets):
                holder = root.resolve(target) if target else root
                relative = path[len(target) + 1 :] if target else path
                _add_alias(holder, alias, relative)
                added.append((target, alias, relative))
    object.__setattr__(root, "_rename_aliases", added)
    return added


def add_aliases(root: Envoy, aliases: list[tuple[str, str, str]]) -> Any:
    """Add aliases `apply_renames` listed (a remote run's copy of the client's); returns the undo."""
    done: list[tuple[Envoy, str]] = []
    try:
        for target, alias, relative in aliases:
            holder = root.resolve(target) if target else root
            if not isinstance(holder, Envoy):
                raise ValueError(f"rename: {target!r} is not a module of the served model.")
            if holder._aliases.get(alias) == relative:
                continue
            _add_alias(holder, alias, relative)
            done.append((holder, alias))
    except BaseException:
        _remove(done)
        raise
    return lambda: _remove(done)


def _remove(done: list[tuple[Envoy, str]]) -> None:
    for holder, alias in done:
        holder._aliases.pop(alias, None)


def _matching_paths(root: Envoy, key: Any) -> list[str]:
    paths = [p for p, _ in root._paths if p]
    if isinstance(key, type):
        return [p for p, m in root._paths if p and isinstance(m, key)]
    pattern = normalise_path(str(key))
    if "." not in pattern and not any(c in pattern for c in "*?["):
        return [p for p in paths if p.rpartition(".")[2] == pattern]
    return [p for p in paths if fnmatch.fnmatchcase(p, pattern)]


def _add_alias(holder: Envoy, alias: str, relative: str) -> None:
    existing = holder._aliases.get(alias)
    if existing == relative:
        return
    if existing is not None or alias in holder._children or hasattr(type(holder), alias):
        raise ValueError(
            f"rename: the alias {alias!r} would hide an existing name of {holder._path or 'the model'}; "
            "choose another alias."
        )
    try:
        getattr(holder._module, alias)
    except AttributeError:
        holder.add_alias(alias, relative)
        return
    raise ValueError(
        f"rename: the alias {alias!r} would hide the attribute {alias!r} of {type(holder._module).__name__}; "
        "choose another alias."
    )


def envoy_class_for(envoys: Any, module: torch.nn.Module, path: str) -> type[Envoy]:
    """The Envoy subclass `envoys=` chooses for the module at `path` (Envoy when it names none)."""
    if isinstance(envoys, type):
        return envoys
    chosen = envoys.get(path)
    if chosen is None:
        for cls in type(module).__mro__:
            chosen = envoys.get(cls)
            if chosen is not None:
                break
    return chosen or Envoy


def check_envoys(envoys: Any) -> Any:
    """`envoys=` as given, refused with a clear message unless it maps classes or paths to Envoy subclasses."""
    if envoys is None:
        return None
    if isinstance(envoys, type) and issubclass(envoys, Envoy):
        return envoys
    if isinstance(envoys, dict):
        fixed = {}
        for key, cls in envoys.items():
            if not (isinstance(cls, type) and issubclass(cls, Envoy)):
                raise TypeError(f"envoys={{{key!r}: {cls!r}}}: each value is a subclass of nnsight_jupyter's Envoy.")
            fixed[normalise_path(key) if isinstance(key, str) else key] = cls
        return fixed
    raise TypeError("envoys= takes an Envoy subclass, or a dict of module classes or paths to Envoy subclasses.")
