"""The one walker for nested values: tensors inside tuples, lists and dicts, at any depth.

Module inputs and outputs, cached values, scan descriptions, saved names and values crossing
the wire are all trees of containers with tensors (and other values) at the leaves. Every part of
the package walks them with the two functions here, under one rule for what a container is:

- by default (the engine's view), any `tuple`, `list`, `dict`, `set` or `frozenset`, subclasses
  included. A rebuilt
  container keeps its type: a named tuple by position, a `dict` subclass (a Hugging Face
  `ModelOutput`, a `BatchEncoding`) from keywords, or filled after construction when its
  constructor takes none; `plain=True` rebuilds them as plain `tuple`, `list` and `dict`;
- with `exact=True` (the wire's view), only the exact types `tuple`, `list`, `dict`, `set` and
  `frozenset`: a subclass is a leaf, for the caller to translate or refuse.

Anything else is a leaf, including objects that hold tensors (a key-value cache object), which
are handed to the caller whole. `torch.utils._pytree` was not used: transformers registers its
cache classes there, so a pytree walk would descend into (and rebuild) a model's key-value
cache, which the engine hands over untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["TRUNCATED", "leaves", "map_structure", "rebuild"]


class _Truncated:
    def __repr__(self) -> str:
        return "TRUNCATED"


TRUNCATED: Any = _Truncated()
"""What `leaves` yields in place of a container deeper than its `max_depth`."""

_EXACT = (tuple, list, dict, set, frozenset)


def _is_container(value: Any, exact: bool) -> bool:
    if exact:
        return type(value) in _EXACT
    return isinstance(value, (tuple, list, dict, set, frozenset))


def map_structure(value: Any, leaf: Callable[[Any], Any], *, exact: bool = False, plain: bool = False) -> Any:
    """`value` with every leaf replaced by `leaf(it)`, containers rebuilt (see the module docstring)."""
    if not _is_container(value, exact):
        return leaf(value)
    if isinstance(value, dict):
        items = {k: map_structure(v, leaf, exact=exact, plain=plain) for k, v in value.items()}
        return items if plain else rebuild(value, items)
    mapped = [map_structure(v, leaf, exact=exact, plain=plain) for v in value]
    if plain:
        return (
            tuple(mapped)
            if isinstance(value, tuple)
            else type(value)(mapped)
            if isinstance(value, (set, frozenset)) and type(value) in _EXACT
            else mapped
        )
    return rebuild(value, mapped)


def rebuild(original: Any, items: Any) -> Any:
    """A container of `original`'s type holding `items` (a list for sequences, a dict for mappings)."""
    kind = type(original)
    if isinstance(original, dict):
        if kind is dict:
            return items
        try:
            return kind(**items)
        except TypeError:
            rebuilt = kind()
            rebuilt.update(items)
            return rebuilt
    if kind is list:
        return items
    if kind is tuple:
        return tuple(items)
    if hasattr(original, "_fields"):
        return kind(*items)
    return kind(items)


def leaves(
    value: Any, *, exact: bool = False, max_depth: int | None = None, skip: Callable[[Any], bool] | None = None
) -> Iterator[Any]:
    """Every leaf of `value`, depth first. With `max_depth`, only leaves at most that many containers
    deep are reached, and a container deeper than that is yielded as `TRUNCATED`; values for which
    `skip(value)` is true are neither entered nor yielded."""
    if skip is not None and skip(value):
        return
    if not _is_container(value, exact):
        yield value
        return
    if max_depth is not None and max_depth <= 0:
        yield TRUNCATED
        return
    children = value.values() if isinstance(value, dict) else value
    deeper = None if max_depth is None else max_depth - 1
    for child in children:
        yield from leaves(child, exact=exact, max_depth=deeper, skip=skip)
