"""One call that records the outputs (and optionally inputs) of many modules during a run.

Values are recorded by the same module wrappers that serve trace bodies, after any edits the
trace made, and detached by default. They can be looked up by path (`cache["transformer.h.0"]`,
the `model.` prefix is optional) or by walking the tree (`cache.transformer.h[0].output`).
A module called several times (a shared block, or one call per generated token) keeps every
call in `.calls`; `.output` is the first.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ModulePathError
from .envoy import first_argument
from .nested import map_structure
from .paths import normalise_path

if TYPE_CHECKING:
    from ..models.base import NNsight


def _detach(value: Any) -> Any:
    return value.detach() if isinstance(value, torch.Tensor) else value


def _detached(value: Any) -> Any:
    return map_structure(value, _detach)


@dataclass
class CachedCall:
    """What one call of a module received and returned."""

    output: Any
    inputs: tuple[tuple, dict] | None
    step: int
    call: int

    @property
    def input(self) -> Any:
        return first_argument(*self.inputs) if self.inputs else None


@dataclass
class CacheEntry:
    """Every recorded call of one module; `.output` / `.input` are those of the first call."""

    path: str
    calls: list[CachedCall] = field(default_factory=list)

    @property
    def output(self) -> Any:
        return self.calls[0].output

    @property
    def inputs(self) -> Any:
        return self.calls[0].inputs

    @property
    def input(self) -> Any:
        return self.calls[0].input


class Cache(Mapping[str, CacheEntry]):
    """Recorded module values of one run, keyed by module path."""

    def __init__(self, model: NNsight, *, include_inputs: bool, detach: bool) -> None:
        self._model = model
        self._include_inputs = include_inputs
        self._detach = detach
        self._entries: dict[str, CacheEntry] = {}

    def _recorder(self, path: str):
        def record(step: int, call: int, args: tuple, kwargs: dict, output: Any) -> None:
            fix = _detached if self._detach else (lambda v: v)
            inputs = (fix(tuple(args)), fix(dict(kwargs))) if self._include_inputs else None
            entry = self._entries.get(path)
            if entry is None:
                entry = self._entries[path] = CacheEntry(path)
            entry.calls.append(CachedCall(fix(output), inputs, step, call))

        return record

    def __getitem__(self, key: str) -> CacheEntry:
        path = key if key in self._entries else normalise_path(key)
        if path in self._entries:
            return self._entries[path]
        raise KeyError(
            f"No values recorded for {key!r}: the module was not selected or did not run. "
            f"Recorded: {len(self._entries)} modules, e.g. {list(self._entries)[:3]}."
        )

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return _CacheView(self, name)

    def __repr__(self) -> str:
        return f"Cache({len(self._entries)} modules)"


class _CacheView:
    """Tree-style access into a cache: `cache.transformer.h[0].output`."""

    def __init__(self, cache: Cache, path: str) -> None:
        self._cache = cache
        self._path = path

    def __getattr__(self, name: str) -> Any:
        if name in ("output", "input", "inputs", "calls"):
            entry = self._cache._entries.get(self._path)
            if entry is None:
                raise ModulePathError(f"No values recorded for model.{self._path}.")
            return getattr(entry, name)
        if name.startswith("_"):
            raise AttributeError(name)
        return _CacheView(self._cache, f"{self._path}.{name}")

    def __getitem__(self, index: int | str) -> _CacheView:
        return _CacheView(self._cache, f"{self._path}.{index}")
