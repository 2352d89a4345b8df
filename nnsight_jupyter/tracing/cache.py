"""One call that records the outputs (and optionally inputs) of many modules during a run.

Values are recorded by the same module wrappers that serve trace bodies, after any edits the
trace made, and detached by default (`detach=`), optionally moved and cast (`device=`, `dtype=`).
They can be looked up by path (`cache["model.transformer.h.0"]`, the `model.` prefix is
optional) or by walking the tree from the root, as nnsight spells it (`cache.model.transformer.h[0]`,
shared names such as `cache.model.layers[0]` included; `cache.transformer.h[0]` works too).
A module called several times in one pass (a shared block) keeps every call in `.calls` and
`.output` is the first; in a generation, `.output` (and `.input`, `.inputs`) is a list with one
entry per step. A cache declared inside `tracer.invoke(...)` holds that invoke's rows only.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ModulePathError
from .batching import narrow
from .envoy import Envoy, first_argument
from .nested import map_structure
from .paths import display_path, normalise_path


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
    """Every recorded call of one module; `.output` / `.input` are those of the first call, or one per step."""

    path: str
    calls: list[CachedCall] = field(default_factory=list)
    per_step: bool = False

    def _pick(self, what: str) -> Any:
        if self.per_step:
            return [getattr(c, what) for c in self.calls if c.call == 0]
        return getattr(self.calls[0], what)

    @property
    def output(self) -> Any:
        return self._pick("output")

    @property
    def inputs(self) -> Any:
        return self._pick("inputs")

    @property
    def input(self) -> Any:
        return self._pick("input")


class Cache(Mapping[str, CacheEntry]):
    """Recorded module values of one run, keyed by module path."""

    def __init__(
        self,
        model: Envoy | None,
        *,
        include_inputs: bool,
        detach: bool,
        include_output: bool = True,
        device: Any = None,
        dtype: Any = None,
        rows: Any = None,
        per_step: bool = False,
    ) -> None:
        self._model = model
        self._include_inputs = include_inputs
        self._include_output = include_output
        self._detach = detach
        self._device = device
        self._dtype = dtype
        self._rows = rows
        self._per_step = per_step
        self._entries: dict[str, CacheEntry] = {}

    def _fix(self, value: Any) -> Any:
        if self._rows is not None:
            value = narrow(value, self._rows)
        detach, device, dtype = self._detach, self._device, self._dtype
        if not detach and device is None and dtype is None:
            return value

        def leaf(v: Any) -> Any:
            if not isinstance(v, torch.Tensor):
                return v
            if detach:
                v = v.detach()
            if device is not None or (dtype is not None and v.is_floating_point()):
                v = v.to(device=device, dtype=dtype if v.is_floating_point() else None)
            return v

        return map_structure(value, leaf)

    def _recorder(self, path: str):
        def record(step: int, call: int, args: tuple, kwargs: dict, output: Any) -> None:
            fix = self._fix
            inputs = (fix(tuple(args)), fix(dict(kwargs))) if self._include_inputs else None
            entry = self._entries.get(path)
            if entry is None:
                entry = self._entries[path] = CacheEntry(path, per_step=self._per_step)
            entry.calls.append(CachedCall(fix(output) if self._include_output else None, inputs, step, call))

        return record

    def _path(self, written: str) -> str | None:
        """The recorded path a written one names: a leading `model` is the root, as in nnsight."""
        if written in self._entries:
            return written
        candidates = [normalise_path(written)]
        if written.startswith("model.") or written == "model":
            candidates.append(written.replace("[", ".").replace("]", ""))
        for candidate in candidates:
            if candidate in self._entries:
                return candidate
            if self._model is not None:
                try:
                    envoy = self._model.resolve(candidate)
                except (AttributeError, IndexError, KeyError):
                    continue
                path = getattr(envoy, "_path", None)
                if isinstance(path, str) and path in self._entries:
                    return path
        return None

    def __getitem__(self, key: str) -> CacheEntry:
        path = self._path(key)
        if path is not None:
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
            path = self._cache._path(self._path)
            if path is None:
                raise ModulePathError(f"No values recorded for {display_path(normalise_path(self._path))}.")
            return getattr(self._cache._entries[path], name)
        if name.startswith("_"):
            raise AttributeError(name)
        return _CacheView(self._cache, f"{self._path}.{name}")

    def __getitem__(self, index: int | str) -> _CacheView:
        return _CacheView(self._cache, f"{self._path}.{index}")
