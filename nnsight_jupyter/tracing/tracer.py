"""`with model.trace(...)`: capture the block, run it beside one forward pass, hand back saved values.

`Tracer.__enter__` finds the block's source (see `source.py`) and arranges for the body to be
skipped where it is written: a frame-local trace function raises a private exception on the first
instruction after `__enter__` returns, and `__exit__` swallows it. `__exit__` then runs the
compiled body beside the model (`run_block`), and writes the names the body bound back into the
caller's namespace: saved values as they are, unsaved tensors as loud `NotSaved` placeholders.

`run_block` takes a compiled block and a namespace and nothing else from the caller, so the same
function serves a `with` block, a `%%trace` cell, and a trace received by the remote server.

Whatever happens — an exception in the body, in the model, or a KeyboardInterrupt — the module
wrappers come off, parameter gradients touched by a failed run are put back, and names the body
had bound in the caller's namespace are restored. (`Tensor.save` and a pass-through wrapper of
`torch.autograd.backward` are installed at the first trace and stay; outside a trace they do
nothing new; `runtime.py` says why and how to take them off.)
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable, Iterator
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any, Literal

from ..errors import InvokeError, MissingInputError, NNsightError, TraceError
from .backend import LOCAL, Backend, TraceCall
from .backward import backward_block
from .interleave import (
    _MISSING,
    ENDED,
    RESULT,
    Barrier,
    EarlyStop,
    Interleaver,
    Scope,
    StopTrace,
    current_mediator,
)
from .record import record_trace
from .runtime import install_trace_hooks
from .saving import NotSaved, holds_unsaved_tensor, save
from .source import BACKWARD_NAME, SAVE_NAME, USER_CODES, Block, block_for_frame

if TYPE_CHECKING:
    from ..models.base import NNsight
    from .cache import Cache

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
    """Stands in for the thread's trace function until the body is skipped: a C-level tracer
    (coverage, profilers) would not call the frame's own trace function."""
    return None


class Invoker:
    """One prompt (or batch) of a multi-input trace: `with tracer.invoke(input):`."""

    def __init__(self, tracer: Tracer, args: tuple, kwargs: dict) -> None:
        self.tracer = tracer
        self.args = args
        self.kwargs = kwargs

    def __enter__(self) -> Invoker:
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

    def __exit__(self, *exc: Any) -> Literal[False]:
        return False


class _StepSelector:
    """`tracer.iter[...]`: choose the generation steps a loop body runs on."""

    def __init__(self, tracer: Tracer) -> None:
        self.tracer = tracer

    def __getitem__(self, selection: int | slice | list[int]) -> Iterator[int]:
        return self.tracer._steps(selection)


class Tracer:
    """Context manager returned by `model.trace(...)` and `model.generate(...)`."""

    # Set while the trace runs or after it; class defaults keep building a tracer cheap.
    job: Any = None
    invoke_values: list[dict[str, Any]] | tuple = ()
    _interleaver: Interleaver | None = None
    _pending_invokes: list[tuple[Invoker, Block, Scope]] = []  # replaced by each run before use
    _frozen = False
    _frame: FrameType | None = None
    _untraced: tuple[Any, Any, bool] | None = None  # tracing to put back once the body is skipped
    _bound: dict[str, Any] | None = None  # the names the finished body bound

    def __init__(
        self,
        model: NNsight,
        args: tuple,
        kwargs: dict,
        *,
        generate: bool = False,
        generate_kwargs: dict | None = None,
        backend: Backend | None = None,
        options: dict[str, Any] | None = None,
    ) -> None:
        self.model = model
        self.backend: Backend = backend if backend is not None else LOCAL
        self.options: dict[str, Any] = options or {}
        self._args = args
        self._kwargs = kwargs
        self._has_input = bool(args or kwargs)
        self._generate = generate
        self._generate_kwargs = generate_kwargs or {}

    def trace_call(self, block: Block, namespace: dict, *, module_level: bool = False) -> TraceCall:
        """What this tracer's backend receives to run `block` reading `namespace`."""
        return TraceCall(
            self,
            self.model,
            block,
            namespace,
            module_level=module_level,
            args=self._args,
            kwargs=self._kwargs,
            generate=self._generate,
            generate_kwargs=self._generate_kwargs,
            options=self.options,
        )

    def run(self, block: Block, namespace: dict, *, module_level: bool = False) -> dict[str, Any]:
        """Run `block` through this tracer's backend; returns the names it bound (with `as` name: the tracer)."""
        bound = self.backend.execute(self.trace_call(block, namespace, module_level=module_level))
        if block.as_name:
            bound[block.as_name] = self
        self._bound = bound
        return bound

    def _call_model(self, model: NNsight, args: tuple, kwargs: dict) -> Any:
        """The model call the trace runs beside (a scan runs it on fake tensors)."""
        if self._generate:
            return model._run_generate(args, kwargs, self._generate_kwargs)
        return model._run_forward(args, kwargs)

    # ----- the with statement -------------------------------------------------------------------
    def __enter__(self) -> Tracer:
        return self._enter(sys._getframe(1))

    def _enter(self, frame: FrameType) -> Tracer:
        self._block = block_for_frame(frame, "model.generate(...)" if self._generate else "model.trace(...)")
        self._frame = frame
        # Skip the body where it is written: the frame's trace function raises on its first
        # instruction. A debugger, profiler or coverage tool tracing the program is set aside for
        # that moment and put back at once.
        self._untraced = (sys.gettrace(), frame.f_trace, frame.f_trace_opcodes)
        sys.settrace(_noop_trace)
        frame.f_trace_opcodes = True
        frame.f_trace = self._skip_body
        return self

    def _skip_body(self, frame: FrameType, event: str, arg: Any) -> Any:
        if event in ("opcode", "line"):
            self._put_tracing_back(frame)
            raise _SkipBody()
        return self._skip_body

    def _put_tracing_back(self, frame: FrameType) -> None:
        previous, frame.f_trace, frame.f_trace_opcodes = self._untraced
        self._untraced = None
        if sys.gettrace() is _noop_trace:
            sys.settrace(previous)

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> bool:
        __tracebackhide__ = True
        frame = self._frame
        self._frame = None
        if self._untraced is not None and frame is not None:
            self._put_tracing_back(frame)
        if exc_type is not _SkipBody:
            return False
        assert frame is not None
        f_locals = None
        if frame.f_code.co_flags & _CO_OPTIMIZED:
            module_level = False
            f_locals = frame.f_locals
            ns: Any = FrameNamespace(f_locals)
            ns.fallback = frame.f_globals
        else:
            module_level = frame.f_locals is frame.f_globals
            ns = frame.f_globals if module_level else FrameNamespace(frame.f_locals, fallback=frame.f_globals)
        try:
            bound = self.run(self._block, ns, module_level=module_level)
            if module_level:
                ns.update(bound)
        except BaseException as error:
            del frame
            __tracebackhide__ = not debug_tracebacks()
            raise user_traceback(error) from error.__cause__
        if not module_level and bound:
            _write_locals(frame, bound, self._block, f_locals)
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

    def barrier(self, n: int) -> Barrier:
        """A meeting point for `n` invokes: each calls `barrier()`, and none goes on until all have."""
        self._mediator("barrier()")
        return Barrier(n)

    def stop(self) -> None:
        """End the forward pass right after the module being served now; later modules do not run."""
        raise StopTrace()

    @property
    def saved(self) -> dict[str, Any]:
        """After the trace: the values it saved, by the names the body bound them to."""
        if self._bound is None:
            raise TraceError("tracer.saved is filled when the trace has run; read it after the `with` block.")
        return {
            name: value
            for name, value in self._bound.items()
            if value is not self and not isinstance(value, NotSaved) and name not in (SAVE_NAME, BACKWARD_NAME)
        }

    @property
    def result(self) -> Any:
        """What the model call returned (for `generate`, the generated token ids)."""
        m = self._mediator("result")
        return m.request(RESULT)

    def cache(
        self,
        modules: list[Any] | None = None,
        *,
        device: Any = None,
        dtype: Any = None,
        detach: bool = True,
        include_output: bool = True,
        include_inputs: bool = False,
    ) -> Cache:
        """Record the outputs (and optionally inputs) of all or the given modules during this run.

        Options as nnsight names them: `device` / `dtype` move and cast what is kept (default: as
        computed), `detach`, `include_output`, `include_inputs`. Declared inside an invoke, the
        cache holds that invoke's rows.
        """
        from .cache import Cache

        m = self._mediator("cache()")
        il = m.interleaver
        if il.pass_idx >= 0:
            raise TraceError("Call tracer.cache() before reading any module value, so that it sees every module.")
        paths = [p for p, _ in self.model._paths] if modules is None else [_path_of(self.model, x) for x in modules]
        cache = Cache(
            self.model,
            include_inputs=include_inputs,
            include_output=include_output,
            detach=detach,
            device=device,
            dtype=dtype,
            rows=m.rows,
            per_step=self._generate,
        )
        observers = dict(il.observers or {})
        for path in paths:
            observers[path] = (*observers.get(path, ()), cache._recorder(path))
        il.observers = observers
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
        if not self._generate:
            return self._call_loop(m, steps)
        return self._pass_loop(m, steps)

    def _call_loop(self, m: Any, steps: Any) -> Iterator[int]:
        """`tracer.iter[i]` in a trace (one forward pass): the body reads each module's call i, as
        nnsight counts a module's calls; a module that runs once per pass has only call 0."""
        last = -1
        try:
            for step in steps:
                if step <= last:
                    raise TraceError(f"Step {step} has already run; choose steps in increasing order.")
                last = step
                m.call_base = step
                m.cursor = {}
                yield step
        finally:
            m.call_base = 0
            m.cursor = {}

    def _pass_loop(self, m: Any, steps: Any) -> Iterator[int]:
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


def _path_of(model: Any, x: Any) -> str:
    from .envoy import Envoy
    from .paths import normalise_path

    if isinstance(x, Envoy):
        return x._path
    if isinstance(x, str):
        target = model.resolve(normalise_path(x))
        if not isinstance(target, Envoy):
            raise TraceError(f"cache(modules=...): {x!r} names an attribute, not a module.")
        return target._path
    raise TraceError(f"cache(modules=...) takes envoys (model.layers[0]) or path strings, not {type(x).__name__}.")


def run_block(tracer: Tracer, block: Block, ns: dict, *, module_level: bool) -> dict[str, Any]:
    """Run a compiled trace body against one forward pass; return the names it bound, finalised.

    With `module_level`, `ns` is the caller's module globals: what the body bound there is put
    back if the run fails; on success the caller binds the returned names.
    """
    model = tracer.model
    if model._interleaver is not None:
        raise TraceError("A trace of this model is already running; finish it before starting another.")
    il = Interleaver(model, block)
    tracer._interleaver = il
    tracer._pending_invokes = []
    tracer._frozen = False
    restore = _bindings_before(block, ns) if module_level else None
    ns[SAVE_NAME] = save
    ns[BACKWARD_NAME] = backward_block
    if block.as_name:
        ns[block.as_name] = tracer
    model._interleaver = il
    install_trace_hooks()
    try:
        il.start(il.add(block.code, ns, assigned=block.assigned, rows=None, label="trace body"))
        if model._edits:
            from .edits import start_edits

            start_edits(il, model, save)
        tracer._frozen = True
        args, kwargs = _model_call(tracer, model, il)
        wrappers = model._wrappers
        installed = wrappers.install(il)
        try:
            result = tracer._call_model(model, args, kwargs)
        except EarlyStop:
            result = _MISSING
        finally:
            wrappers.uninstall(installed)
        il.finish(result)
    except BaseException:
        il.kill()
        restore_grads(il)
        il.release()
        if restore is not None:
            for name, value in restore.items():
                if value is _MISSING:
                    ns.pop(name, None)
                else:
                    ns[name] = value
        raise
    finally:
        model._interleaver = None
        tracer._interleaver = None
    saved = il.saved
    kept = saved
    sessions = model._sessions
    if sessions:  # inside a session, names are handed on as they are; the session's end filters them
        sessions[-1].saved_ids.update(saved)
        kept = _EVERYTHING
    mediators = il.mediators if not model._edits else [m for m in il.mediators if m.label != "edit"]
    per_mediator = [_finalised(m, kept) for m in mediators]
    record_trace(model, kwargs, saved, il.reads, mediators, per_mediator)
    il.release()
    if len(per_mediator) == 1:
        bound = per_mediator[0]
        tracer.invoke_values = []
    else:
        tracer.invoke_values = per_mediator[1:]
        bound = {}
        for values in per_mediator:
            bound.update(values)
    if block.as_name:
        bound[block.as_name] = tracer
    if restore is not None:
        for name in (SAVE_NAME, BACKWARD_NAME):
            if restore[name] is _MISSING:
                ns.pop(name, None)
    return bound


class _Everything(dict):
    """Stands for "every value is saved" (inside a session)."""

    def __contains__(self, key: object) -> bool:
        return True


_EVERYTHING = _Everything()


def _bindings_before(block: Block, ns: dict) -> dict[str, Any]:
    """What a module-level namespace holds under every name the trace may bind, to put back on failure."""
    names = set(block.assigned)
    for inner in block.invokes.values():
        names.update(inner.assigned)
    if block.as_name:
        names.add(block.as_name)
    names.add(SAVE_NAME)
    names.add(BACKWARD_NAME)
    return {name: ns.get(name, _MISSING) for name in names}


def _model_call(tracer: Tracer, model: NNsight, il: Interleaver) -> tuple[tuple, dict]:
    """The one batched model call of this trace; starts the invoke bodies on their rows."""
    if tracer._has_input:
        prepared = [model._prepare_input(*tracer._args, **tracer._kwargs)]
    else:
        prepared = [
            model._prepare_input(*inv.args, **inv.kwargs) if (inv.args or inv.kwargs) else None
            for inv, _, _ in tracer._pending_invokes
        ]
        if not any(p is not None for p in prepared):
            raise MissingInputError(
                "This trace has no input: pass one to model.trace(input), or add "
                "`with tracer.invoke(input):` blocks inside it."
            )
    args, kwargs, rows = model._batch_inputs(prepared)
    if not tracer._has_input:
        for (_, inner, scope), row in zip(tracer._pending_invokes, rows):
            il.add(inner.code, scope, assigned=inner.assigned, rows=row, label="invoke")
        for m in il.mediators[1:]:
            if m.label != "invoke":
                continue
            il.start(m)
    return args, kwargs


def _finalised(m: Any, saved: dict[int, Any]) -> dict[str, Any]:
    """The names a body bound: saved values as they are, unsaved tensors as `NotSaved` placeholders."""
    values = {}
    ns = m.ns
    for name in m.assigned:
        value = dict.get(ns, name, _MISSING)
        if value is not _MISSING:
            values[name] = NotSaved(name) if holds_unsaved_tensor(value, saved) else value
    return values


def restore_grads(il: Interleaver) -> None:
    if il.grad_snapshot is not None:
        for p, g in il.grad_snapshot:
            p.grad = g
        il.grad_snapshot = None


_locals_to_fast: Any = None


def _write_locals(frame: FrameType, values: dict[str, Any], block: Block, f_locals: dict | None) -> None:
    """Bind `values` in the frame that ran the `with` statement: its fast locals where it has such a
    name (through its `f_locals` dict, then `PyFrame_LocalsToFast`), its globals otherwise.

    `f_locals` is the dict `frame.f_locals` gave before the run; the frame has not run since, so it
    is still current.
    """
    global _locals_to_fast
    fast = block.frame_names
    if fast is None:
        code = frame.f_code
        fast = block.frame_names = frozenset(code.co_varnames + code.co_cellvars + code.co_freevars)
    if f_locals is None:
        f_locals = frame.f_locals
    to_fast = False
    for name, value in values.items():
        if name in fast or name in f_locals:
            f_locals[name] = value
            to_fast = True
        else:
            frame.f_globals[name] = value
    if not to_fast:
        return
    if _locals_to_fast is None:
        _locals_to_fast = getattr(ctypes.pythonapi, "PyFrame_LocalsToFast", False)
        if _locals_to_fast:
            _locals_to_fast.argtypes = [ctypes.py_object, ctypes.c_int]
            _locals_to_fast.restype = None
    if _locals_to_fast:
        _locals_to_fast(frame, 0)


def _no_debug() -> bool:
    return False


_debug_switch: list[Callable[[], bool]] = [_no_debug]


def set_debug_switch(switch: Callable[[], bool]) -> None:
    """Where `debug_tracebacks` asks; the package sets `settings.debug_tracebacks` (the engine reads no settings)."""
    _debug_switch[0] = switch


def debug_tracebacks() -> bool:
    """Whether trace errors keep the engine's frames (`CONFIG.debug`, ``NNSIGHT_JUPYTER_DEBUG``)."""
    return _debug_switch[0]()


def user_traceback(error: BaseException) -> BaseException:
    """Start the traceback at the user's trace body; for the engine's own errors, end it there too.

    The error is returned unchanged when no frame of a trace body is in its traceback, or when
    `CONFIG.debug` (``NNSIGHT_JUPYTER_DEBUG``) asks for the engine's frames.
    """
    if debug_tracebacks():
        return error
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
