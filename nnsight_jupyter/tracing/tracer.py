"""`with model.trace(...)`: capture the block, run it beside one forward pass, hand back saved values.

`Tracer.__enter__` finds the block's source (see `source.py`) and arranges for the body to be
skipped where it is written: a frame-local trace function raises a private exception on the first
instruction after `__enter__` returns, and `__exit__` swallows it. `__exit__` then runs the
compiled body beside the model (`run_block`), and writes the names the body bound back into the
caller's namespace: saved values as they are, unsaved tensors as loud `NotSaved` placeholders.

`run_block` takes a compiled block and a namespace and nothing else from the caller, so the same
function serves a `with` block, a `%%trace` cell, and a trace received by the remote server.

Whatever happens — an exception in the body, in the model, or a KeyboardInterrupt — the module
wrappers come off, `Tensor.save` goes away, parameter gradients touched by a failed run are put
back, and names the body had bound in the caller's namespace are restored.
"""

from __future__ import annotations

import ctypes
import sys
import threading
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any, Iterator

import torch

from ..errors import InvokeError, NNsightError, TraceError
from .interleave import (
    ENDED,
    RESULT,
    EarlyStop,
    Interleaver,
    Scope,
    StopTrace,
    _MISSING,
    current_mediator,
)
from .saving import NotSaved, holds_unsaved_tensor, install_tensor_save, save
from .source import SAVE_NAME, USER_CODES, Block, block_for_frame, install_source_recorder

if TYPE_CHECKING:
    from ..models.base import NNsight

install_source_recorder()


_CO_OPTIMIZED = 0x0001


class FrameNamespace(dict):
    """A function's locals as a trace body's namespace; other names come from its module's globals.

    Used as the body's globals, so nested functions and comprehensions see the body's names too;
    missing names fall back to the real globals without copying them.
    """

    fallback: dict

    def __init__(self, values: dict, *, fallback: dict | None = None) -> None:
        super().__init__(values)
        if fallback is not None:
            self.fallback = fallback

    def __missing__(self, name: str) -> Any:
        return self.fallback[name]


class _SkipBody(Exception):
    """Raised on the first instruction of a `with` body to skip its inline execution."""


def _noop_trace(frame: FrameType, event: str, arg: Any) -> None:
    return None


class _BodySkipper:
    """Skip the body of the `with` statement running in `frame`, then put tracing back as it was.

    A debugger, profiler or coverage tool tracing the program is replaced for the moment between
    `__enter__` and the body's first instruction, and restored right after.
    """

    def __init__(self, frame: FrameType) -> None:
        self.frame = frame
        self.previous_global = sys.gettrace()
        self.previous_local = frame.f_trace
        self.previous_opcodes = frame.f_trace_opcodes

    def arm(self) -> None:
        # A C-level tracer (coverage, profilers) would not call the frame's own trace function,
        # so a Python no-op takes its place until the skip has fired.
        sys.settrace(_noop_trace)
        self.frame.f_trace_opcodes = True
        self.frame.f_trace = self._fire

    def _fire(self, frame: FrameType, event: str, arg: Any) -> Any:
        if event in ("opcode", "line"):
            self.disarm()
            raise _SkipBody()
        return self._fire

    def disarm(self) -> None:
        self.frame.f_trace = self.previous_local
        self.frame.f_trace_opcodes = self.previous_opcodes
        if sys.gettrace() is _noop_trace:
            sys.settrace(self.previous_global)


class Invoker:
    """One prompt (or batch) of a multi-input trace: `with tracer.invoke(input):`."""

    def __init__(self, tracer: "Tracer", args: tuple, kwargs: dict) -> None:
        self.tracer = tracer
        self.args = args
        self.kwargs = kwargs

    def __enter__(self) -> "Invoker":
        m = current_mediator()
        frame = sys._getframe(1)
        if m is None or m.interleaver is not self.tracer._interleaver or m.index != 0:
            raise InvokeError(
                "Open `with tracer.invoke(...)` directly in the body of `with model.trace():` "
                "(not inside another invoke or in a helper function)."
            )
        if self.tracer._frozen:
            raise InvokeError(
                "All `with tracer.invoke(...)` blocks must come before code in the trace body that reads "
                "model values: the batch is fixed once the forward pass starts. Move this invoke up."
            )
        block = block_for_frame(frame, "tracer.invoke(...)")
        ns = Scope(frame.f_globals)
        ns.fallback = getattr(frame.f_globals, "fallback", None)
        for sibling in set(m.interleaver.block.invokes.values()):
            if sibling is not block:  # a value left from an earlier run must not stand in for this run's
                for name in sibling.assigned:
                    if name not in block.assigned:
                        dict.pop(ns, name, None)
        if block.as_name:
            ns[block.as_name] = self
        self.tracer._pending_invokes.append((self, block, ns))
        return self

    def __exit__(self, *exc: Any) -> bool:
        return False


class _StepSelector:
    """`tracer.iter[...]`: choose the generation steps a loop body runs on."""

    def __init__(self, tracer: "Tracer") -> None:
        self.tracer = tracer

    def __getitem__(self, selection: int | slice | list[int]) -> Iterator[int]:
        return self.tracer._steps(selection)


class Tracer:
    """Context manager returned by `model.trace(...)` and `model.generate(...)`."""

    def __init__(self, model: "NNsight", args: tuple, kwargs: dict, *, generate: bool = False,
                 generate_kwargs: dict | None = None, remote: Any = False, blocking: bool = True,
                 timeout: float | None = None) -> None:
        self.model = model
        self._remote = remote
        self._blocking = blocking
        self._remote_timeout = timeout
        self.job: Any = None
        self._args = args
        self._kwargs = kwargs
        self._has_input = bool(args or kwargs)
        self._generate = generate
        self._generate_kwargs = generate_kwargs or {}
        self._interleaver: Interleaver | None = None
        self._pending_invokes: list[tuple[Invoker, Block, Scope]] = []
        self._frozen = False
        self.invoke_values: list[dict[str, Any]] = []
        self._frame: FrameType | None = None
        self._skipper: _BodySkipper | None = None

    # ----- the with statement -------------------------------------------------------------------
    def __enter__(self) -> "Tracer":
        frame = sys._getframe(1)
        what = "model.generate(...)" if self._generate else "model.trace(...)"
        self._block = block_for_frame(frame, what)
        self._frame = frame
        self._skipper = _BodySkipper(frame)
        self._skipper.arm()
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> bool:
        __tracebackhide__ = True
        skipper, frame = self._skipper, self._frame
        self._skipper = self._frame = None
        if skipper is not None:
            skipper.disarm()
        if exc_type is not _SkipBody:
            return False
        assert frame is not None
        if frame.f_code.co_flags & _CO_OPTIMIZED:
            module_level = False
            ns: dict = FrameNamespace(frame.f_locals)
            ns.fallback = frame.f_globals
        else:
            module_level = frame.f_locals is frame.f_globals
            ns = frame.f_globals if module_level else FrameNamespace(frame.f_locals, fallback=frame.f_globals)
        try:
            if self._remote:
                from ..remote.session import run_remote

                bound = run_remote(self, self._block, ns)
                if module_level:
                    ns.update(bound)
            else:
                bound = run_block(self, self._block, ns, module_level=module_level)
        except BaseException as error:
            del frame
            raise user_traceback(error) from error.__cause__
        if not module_level:
            _write_locals(frame, bound)
        del frame
        return True

    # ----- inside the trace body ----------------------------------------------------------------
    def invoke(self, *args: Any, **kwargs: Any) -> Invoker:
        """Add one input to the batch; the block under it sees only its own rows."""
        if self._has_input:
            raise InvokeError(
                "This trace already has an input. Use `model.trace()` with no input and one "
                "`with tracer.invoke(prompt):` per prompt, or pass everything to model.trace(...)."
            )
        return Invoker(self, args, kwargs)

    def stop(self) -> None:
        """End the forward pass right after the module being served now; later modules do not run."""
        raise StopTrace()

    @property
    def result(self) -> Any:
        """What the model call returned (for `generate`, the generated token ids)."""
        m = self._mediator("result")
        return m.request(RESULT)

    def cache(self, modules: list[Any] | None = None, *, include_inputs: bool = False,
              detach: bool = True) -> "Cache":
        """Record the outputs (and optionally inputs) of all or the given modules during this run."""
        from .cache import Cache

        m = self._mediator("cache()")
        il = m.interleaver
        if il.pass_idx >= 0:
            raise TraceError("Call tracer.cache() before reading any module value, so that it sees every module.")
        paths = [p for p, _ in self.model._paths] if modules is None else [_path_of(x) for x in modules]
        cache = Cache(self.model, include_inputs=include_inputs, detach=detach)
        for path in paths:
            il.observers[path] = cache._recorder(path)
        return cache

    def all(self) -> Iterator[int]:
        """Iterate over every generation step: `for step in tracer.all(): ...`."""
        return self._steps(slice(None))

    @property
    def iter(self) -> _StepSelector:
        """Iterate over chosen steps: `tracer.iter[2]`, `tracer.iter[1:4]`, `tracer.iter[[0, 3]]`."""
        return _StepSelector(self)

    def _steps(self, selection: int | slice | list[int]) -> Iterator[int]:
        m = self._mediator("iter")
        if isinstance(selection, int):
            steps: Any = [selection]
        elif isinstance(selection, slice):
            if (selection.step or 1) <= 0 or (selection.start or 0) < 0 or (selection.stop or 0) < 0:
                raise TraceError("Step selections count forward from 0: use e.g. tracer.iter[1:5].")
            stop = selection.stop if selection.stop is not None else self._max_steps()
            steps = range(selection.start or 0, stop, selection.step or 1)
        else:
            steps = sorted(int(s) for s in selection)
        return self._step_loop(m, steps)

    def _step_loop(self, m: Any, steps: Any) -> Iterator[int]:
        for step in steps:
            if step < m.step or (step == m.step and m.interleaver.pass_idx > step):
                raise TraceError(f"Step {step} has already run; choose steps in increasing order.")
            if m.request(("", "input", step, 0), soft=True) is ENDED:
                return
            m.step = step
            m.cursor = {}
            yield step

    def _max_steps(self) -> int:
        if not self._generate:
            return 1
        return int(self._generate_kwargs.get("max_new_tokens", 10**9))

    def _mediator(self, what: str) -> Any:
        m = current_mediator()
        if m is None or m.interleaver is not self._interleaver:
            raise TraceError(f"tracer.{what} is only available inside the trace's `with` block.")
        return m


def _path_of(x: Any) -> str:
    from .envoy import Envoy

    if isinstance(x, Envoy):
        return x._path
    if isinstance(x, str):
        return x[6:] if x.startswith("model.") else ("" if x == "model" else x)
    raise TraceError(f"cache(modules=...) takes envoys (model.layers[0]) or path strings, not {type(x).__name__}.")


def run_block(tracer: Tracer, block: Block, ns: dict, *, module_level: bool) -> dict[str, Any]:
    """Run a compiled trace body against one forward pass; return the names it bound, finalised."""
    model = tracer.model
    if model._interleaver is not None:
        raise TraceError("A trace of this model is already running; finish it before starting another.")
    il = Interleaver(model._describe)
    il.root = model
    il.block = block
    tracer._interleaver = il
    tracer._pending_invokes = []
    tracer._frozen = False
    every_assigned: set[str] = set(block.assigned)
    for inner in block.invokes.values():
        every_assigned.update(inner.assigned)
    if block.as_name:
        every_assigned.add(block.as_name)
    restore = {name: ns.get(name, _MISSING) for name in every_assigned | {SAVE_NAME}} if module_level else {}
    ns[SAVE_NAME] = save
    if block.as_name:
        ns[block.as_name] = tracer
    wrappers = model._wrappers
    grads = _GradGuard(model._model)
    il.grad_guard = grads
    installed: list = []
    armed = False
    model._interleaver = il
    install_tensor_save()
    try:
        grads.arm()
        armed = True
        main = il.add(block.code, ns, assigned=block.assigned, rows=None, label="trace body")
        il.start(main)
        tracer._frozen = True
        if tracer._has_input:
            prepared = [model._prepare_input(*tracer._args, **tracer._kwargs)]
        else:
            prepared = [model._prepare_input(*inv.args, **inv.kwargs) if (inv.args or inv.kwargs) else None
                        for inv, _, _ in tracer._pending_invokes]
            if not any(p is not None for p in prepared):
                raise TraceError(
                    "This trace has no input: pass one to model.trace(input), or add "
                    "`with tracer.invoke(input):` blocks inside it."
                )
        args, kwargs, rows = model._batch_inputs(prepared)
        if not tracer._has_input:
            for (inv, inner, scope), row in zip(tracer._pending_invokes, rows):
                il.add(inner.code, scope, assigned=inner.assigned, rows=row, label="invoke")
            for m in il.mediators[1:]:
                il.start(m)
        installed = wrappers.install(il)
        try:
            if tracer._generate:
                result = model._run_generate(args, kwargs, tracer._generate_kwargs)
            else:
                result = model._run_forward(args, kwargs)
        except EarlyStop:
            result = _MISSING
        wrappers.uninstall(installed)
        il.finish(result)
    except BaseException:
        wrappers.uninstall(installed)
        il.kill()
        grads.restore()
        il.release()
        if module_level:
            for name, value in restore.items():
                if value is _MISSING:
                    ns.pop(name, None)
                else:
                    ns[name] = value
        raise
    finally:
        wrappers.uninstall(installed)
        model._interleaver = None
        tracer._interleaver = None
        if armed:
            grads.disarm()
    def finalised(m: Any) -> dict[str, Any]:
        values = {}
        for name in m.assigned:
            value = dict.get(m.ns, name, _MISSING)
            if value is not _MISSING:
                values[name] = NotSaved(name) if holds_unsaved_tensor(value, il.saved) else value
        return values

    per_mediator = [finalised(m) for m in il.mediators]
    il.release()
    tracer.invoke_values = per_mediator[1:]
    bound: dict[str, Any] = {}
    for values in per_mediator:
        bound.update(values)
    if block.as_name:
        bound[block.as_name] = tracer
    if module_level:
        ns.update(bound)
        if restore.get(SAVE_NAME, _MISSING) is _MISSING:
            ns.pop(SAVE_NAME, None)
    return bound


class _GradGuard:
    """Put parameter gradients back if a failed run had called backward.

    While any trace runs, `torch.autograd.backward` (which `Tensor.backward` calls) is wrapped
    once; a backward started from a trace body first snapshots that trace's parameter gradients.
    """

    _lock = threading.Lock()
    _users = 0
    _original: Any = None

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.snapshot: list[tuple[torch.nn.Parameter, torch.Tensor | None]] | None = None

    def take_snapshot(self) -> None:
        if self.snapshot is None:
            self.snapshot = [(p, None if p.grad is None else p.grad.detach().clone()) for p in self.module.parameters()]

    def arm(self) -> None:
        cls = _GradGuard
        with cls._lock:
            cls._users += 1
            if cls._users == 1:
                cls._original = torch.autograd.backward
                torch.autograd.backward = _guarded_backward

    def disarm(self) -> None:
        cls = _GradGuard
        with cls._lock:
            cls._users -= 1
            if cls._users == 0 and torch.autograd.backward is _guarded_backward:
                torch.autograd.backward = cls._original
                cls._original = None

    def restore(self) -> None:
        if self.snapshot is not None:
            for p, g in self.snapshot:
                p.grad = g
            self.snapshot = None


def _guarded_backward(*args: Any, **kwargs: Any) -> Any:
    from .interleave import current_trace

    trace = current_trace()
    guard = getattr(trace, "grad_guard", None)
    if guard is not None:
        guard.take_snapshot()
    return _GradGuard._original(*args, **kwargs)


_locals_to_fast: Any = None


def _write_locals(frame: FrameType, values: dict[str, Any]) -> None:
    global _locals_to_fast
    code = frame.f_code
    f_locals = frame.f_locals
    for name, value in values.items():
        if name in code.co_varnames or name in code.co_cellvars or name in code.co_freevars or name in f_locals:
            f_locals[name] = value
        else:
            frame.f_globals[name] = value
    if _locals_to_fast is None:
        _locals_to_fast = getattr(ctypes.pythonapi, "PyFrame_LocalsToFast", False)
        if _locals_to_fast:
            _locals_to_fast.argtypes = [ctypes.py_object, ctypes.c_int]
            _locals_to_fast.restype = None
    if _locals_to_fast:
        _locals_to_fast(frame, 0)


def user_traceback(error: BaseException) -> BaseException:
    """Start the traceback at the user's trace body; for the engine's own errors, end it there too.

    The error is returned unchanged when no frame of a trace body is in its traceback.
    """
    first_user = last_user = None
    node = error.__traceback__
    while node is not None:
        if node.tb_frame.f_code in USER_CODES:
            first_user = first_user or node
            last_user = node
        node = node.tb_next
    if first_user is None:
        return error
    if isinstance(error, NNsightError) and last_user is not None:
        last_user.tb_next = None
    return error.with_traceback(first_user)

