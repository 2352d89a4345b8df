"""Wrap every module's `forward` for the duration of one trace, and always unwrap it.

The wrapper goes into the module instance's `__dict__`, where `nn.Module.__call__` finds it
before the class's `forward`. That keeps torch's fast call path (no hook dictionaries are touched),
lets user-registered torch hooks run as usual around it, and composes with libraries that set an
instance `forward` of their own (accelerate's dispatch hooks): the wrapper calls whatever
`forward` was there. `uninstall` puts back exactly what was there before, so after a trace —
finished, failed or interrupted — the model is the object it was.

Per call, a wrapper costs two dictionary updates and two membership tests when nobody waits on
the module. The wrappers are built once per model (`ModuleWrappers`), so a trace installs them
with one dictionary store per module.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

from .interleave import Interleaver

_NOTHING = object()


def _make_wrapper(holder: list, path: str, forward: Callable, is_root: bool) -> Callable:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        il = holder[0]
        if il is None:
            return forward(*args, **kwargs)
        n_in = il.n_in
        call = n_in.get(path, 0)
        n_in[path] = call + 1
        if path in il.wait_in:
            args, kwargs = il.serve(path, "input", call, (args, kwargs))
        out = forward(*args, **kwargs)
        il.n_out[path] = call + 1
        if path in il.wait_out:
            out = il.serve(path, "output", call, out)
        if il.observers is not None and path in il.observers:
            il.observe(path, call, args, kwargs, out)
        return out

    if not is_root:
        wrapped.__wrapped__ = forward  # type: ignore[attr-defined]
        return wrapped

    def wrapped_root(*args: Any, **kwargs: Any) -> Any:
        il = holder[0]
        if il is None:
            return forward(*args, **kwargs)
        if il.root_depth == 0:
            il.new_pass()
        il.root_depth += 1
        try:
            return wrapped(*args, **kwargs)
        finally:
            il.root_depth -= 1

    wrapped_root.__wrapped__ = forward  # type: ignore[attr-defined]
    return wrapped_root


class ModuleWrappers:
    """The forward wrappers of one model, built once; each trace installs them and takes them off.

    A wrapper reads the running trace from a shared holder, so installing is a dictionary store
    per module, and emptying the holder (`paused`) lets a module run untraced in the middle of a
    trace (a module called directly from the trace body). A module whose `forward` was replaced
    since the wrappers were built (an instance `forward` set by accelerate, or a patched class)
    gets a wrapper around its current `forward`.
    """

    def __init__(self, modules: list[tuple[str, torch.nn.Module]]) -> None:
        self.holder: list[Interleaver | None] = [None]
        self.entries = []
        self.class_forwards: dict[type, Callable] = {}
        for path, module in modules:
            func = type(module).forward
            self.class_forwards[type(module)] = func
            wrapper = _make_wrapper(self.holder, path, func.__get__(module), path == "")
            self.entries.append((module.__dict__, wrapper, func, module, path))
        self.fast = [(d, wrapper) for d, wrapper, *_ in self.entries]

    def install(self, il: Interleaver) -> list[tuple[dict, Any]] | None:
        """Wrap every module's forward for `il`; returns what `uninstall` needs to undo it.

        The usual case (no class or instance `forward` changed since the wrappers were built)
        is one dictionary store per module and returns None.
        """
        self.holder[0] = il
        if self._classes_unchanged():
            done = 0
            try:
                for d, wrapper in self.fast:
                    if "forward" in d:  # an instance forward appeared: the general path wraps it
                        break
                    d["forward"] = wrapper
                    done += 1
            finally:
                if done != len(self.fast):  # interrupted or left for the general path: undo
                    for d, _ in self.fast[:done]:
                        del d["forward"]
            if done == len(self.fast):
                return None
        installed: list[tuple[dict, Any]] = []
        try:
            for d, wrapper, func, module, path in self.entries:
                previous = d.get("forward", _NOTHING)
                if previous is _NOTHING and type(module).forward is func:
                    d["forward"] = wrapper
                else:
                    d["forward"] = _make_wrapper(self.holder, path, module.forward, path == "")
                installed.append((d, previous))
        except BaseException:
            self.uninstall(installed)
            raise
        return installed

    def _classes_unchanged(self) -> bool:
        for cls, func in self.class_forwards.items():
            if cls.forward is not func:
                return False
        return True

    @contextmanager
    def paused(self) -> Iterator[None]:
        il = self.holder[0]
        self.holder[0] = None
        try:
            yield
        finally:
            self.holder[0] = il

    def uninstall(self, installed: list[tuple[dict, Any]] | None) -> None:
        if installed is None:
            for d, wrapper in self.fast:
                if d.get("forward") is wrapper:
                    del d["forward"]
        else:
            for d, previous in reversed(installed):
                if previous is _NOTHING:
                    d.pop("forward", None)
                else:
                    d["forward"] = previous
            installed.clear()
        self.holder[0] = None
