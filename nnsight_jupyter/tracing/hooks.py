"""Wrap every module's call for the duration of one trace, and always unwrap it.

A module call runs `nn.Module.__call__` -> `self._call_impl` -> `self.forward`. The usual wrapper
takes the place of torch's `_call_impl` in the module instance's `__dict__`: it counts the call,
serves the trace, and calls `forward` itself, which is what torch's `_call_impl` does for a module
without hooks. So a wrapped module call costs no Python frame more than an unwrapped one (on a
tiny model, an extra frame per module call was about a fifth of a trace's fixed cost). When the
module has hooks (registered before or during the trace), torch's global module hooks are set, or
the jit is tracing, the wrapper hands the call to torch's own `_call_impl` and puts a wrapper on
the module's `forward` instead, so hooks run exactly as torch runs them and the trace sees inputs
after the forward pre-hooks and outputs before the forward hooks.

A module whose class overrides `__call__` or `_call_impl`, one with an instance `forward` of its
own (accelerate's dispatch hooks) or a compiled call, gets only the `forward` wrapper, which calls
whatever `forward` was there. `uninstall` puts back exactly what was there before, so after a
trace — finished, failed or interrupted — the model is the object it was.

The wrappers are built once per model (`ModuleWrappers`), so a trace installs them with one
dictionary store per module.

A trace that asks for an operation inside a module's forward (`module.source`, see
`operations.py`) lists that module's rewritten forward in `Interleaver.sourced`, and the wrapper
calls it instead of `forward`; in every other trace that dictionary is None, which costs the
wrapper one test per call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.modules.module as _torch_module

from .interleave import Interleaver

_NOTHING = object()

_TORCH_CALL_IMPL = torch.nn.Module._call_impl
_GLOBAL_HOOKS = tuple(
    getattr(_torch_module, name, None)
    for name in (
        "_global_backward_pre_hooks",
        "_global_backward_hooks",
        "_global_forward_hooks",
        "_global_forward_pre_hooks",
    )
)
_tracing_state = getattr(torch._C, "_get_tracing_state", None)
CALL_WRAPPING = (
    all(isinstance(h, dict) for h in _GLOBAL_HOOKS)
    and _tracing_state is not None
    and torch.nn.Module.__call__ is getattr(torch.nn.Module, "_wrapped_call_impl", None)
)
"""Whether this torch calls modules the way the call wrapper relies on (else: `forward` wrappers only)."""


def _make_wrapper(
    holder: list,
    path: str,
    forward: Callable,
    is_root: bool,
    module: torch.nn.Module | None = None,
    forward_wrapper: Callable | None = None,
) -> Callable:
    """A wrapper that counts the module's call and serves the trace around its `forward`.

    Without `module` it wraps `forward` itself. With `module` it stands in for torch's
    `_call_impl` of that module, and hands calls that need torch's own path (hooks, jit tracing,
    no trace running) to it, after putting `forward_wrapper` (the first kind) on the module.
    """
    guarded = module is not None
    if module is not None:
        module_dict = module.__dict__

        def untraced(*args: Any, **kwargs: Any) -> Any:
            if holder[0] is not None and "forward" not in module_dict:
                module_dict["forward"] = forward_wrapper  # hooks run as torch runs them; values come from inside
            return _TORCH_CALL_IMPL(module, *args, **kwargs)
    else:
        untraced = forward
    backward_pre, backward, forward_hooks, forward_pre = _GLOBAL_HOOKS

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        il = holder[0]
        if (
            il is None
            or guarded
            and (
                module._forward_hooks
                or module._forward_pre_hooks
                or module._backward_hooks
                or module._backward_pre_hooks
                or forward_pre
                or forward_hooks
                or backward_pre
                or backward
                or _tracing_state()
            )
        ):
            return untraced(*args, **kwargs)
        n_in = il.n_in
        call = n_in.get(path, 0)
        n_in[path] = call + 1
        if path in il.wait_in:
            args, kwargs = il.serve(path, "input", call, (args, kwargs))
            run = forward if il.sourced is None else il.sourced.get(path, forward)
            out = il.skipped(run, args, kwargs) if il.skips else run(*args, **kwargs)
        elif il.sourced is None:
            out = forward(*args, **kwargs)
        else:
            out = il.sourced.get(path, forward)(*args, **kwargs)
        il.n_out[path] = call + 1
        if path in il.wait_out:
            out = il.serve(path, "output", call, out)
        if il.observers is not None and path in il.observers:
            il.observe(path, call, args, kwargs, out)
        return out

    if is_root:
        return _root_wrapper(holder, wrapped, untraced)
    wrapped.__wrapped__ = untraced  # type: ignore[attr-defined]
    return wrapped


def _root_wrapper(holder: list, wrapped: Callable, untraced: Callable) -> Callable:
    """The root module's wrapper: a call from outside the model starts a new forward pass."""

    def wrapped_root(*args: Any, **kwargs: Any) -> Any:
        il = holder[0]
        if il is None:
            return untraced(*args, **kwargs)
        if il.root_depth == 0:
            il.new_pass()
        il.root_depth += 1
        try:
            return wrapped(*args, **kwargs)
        finally:
            il.root_depth -= 1

    wrapped_root.__wrapped__ = untraced  # type: ignore[attr-defined]
    return wrapped_root


def _calls_through_call_impl(cls: type[torch.nn.Module]) -> bool:
    return CALL_WRAPPING and cls.__call__ is torch.nn.Module.__call__ and cls._call_impl is _TORCH_CALL_IMPL


class ModuleWrappers:
    """The wrappers of one model, built once; each trace installs them and takes them off.

    A wrapper reads the running trace from a shared holder, so installing is a dictionary store
    per module, and emptying the holder (`paused`) lets a module run untraced in the middle of a
    trace (a module called directly from the trace body). A module whose `forward` was replaced
    since the wrappers were built (an instance `forward` set by accelerate, or a patched class)
    gets a `forward` wrapper around its current `forward`.
    """

    def __init__(self, modules: list[tuple[str, torch.nn.Module]]) -> None:
        self.holder: list[Interleaver | None] = [None]
        self.entries = []
        self.class_forwards: dict[type[torch.nn.Module], Callable] = {}
        self.fast: list[tuple[dict, str, Callable, Callable]] = []
        for path, module in modules:
            func = type(module).forward
            self.class_forwards[type(module)] = func
            forward = func.__get__(module)
            is_root = path == ""
            forward_wrapper = _make_wrapper(self.holder, path, forward, is_root)
            self.entries.append((module.__dict__, forward_wrapper, func, module, path))
            if _calls_through_call_impl(type(module)):
                call_wrapper = _make_wrapper(self.holder, path, forward, is_root, module, forward_wrapper)
                self.fast.append((module.__dict__, "_call_impl", call_wrapper, forward_wrapper))
            else:
                self.fast.append((module.__dict__, "forward", forward_wrapper, forward_wrapper))

    def install(self, il: Interleaver) -> list[tuple[dict, Any]] | None:
        """Wrap every module's call for `il`; returns what `uninstall` needs to undo it.

        The usual case (no class or instance `forward` changed since the wrappers were built, no
        compiled module) is one dictionary store per module and returns None.
        """
        self.holder[0] = il
        if self._classes_unchanged():
            done = 0
            try:
                for d, key, wrapper, _ in self.fast:
                    if "forward" in d or key in d or d.get("_compiled_call_impl") is not None:
                        break  # something of its own is there: the general path wraps it
                    d[key] = wrapper
                    done += 1
            finally:
                if done != len(self.fast):  # interrupted or left for the general path: undo
                    for d, key, _, _ in self.fast[:done]:
                        del d[key]
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
            for d, key, wrapper, forward_wrapper in self.fast:
                if d.get(key) is wrapper:
                    del d[key]
                if key != "forward" and d.get("forward") is forward_wrapper:
                    del d["forward"]  # put there when the module had hooks
        else:
            for d, previous in reversed(installed):
                if previous is _NOTHING:
                    d.pop("forward", None)
                else:
                    d["forward"] = previous
            installed.clear()
        self.holder[0] = None
