"""Run trace bodies in step with one forward pass.

Each participant of a trace (the trace body, and each `tracer.invoke(...)` body) runs in its own
greenlet, a `Mediator`. When its code reads a module value (`layer.output`), the mediator *parks*:
it hands a request to the model side and waits. The model side is the forward pass itself, running
in the caller's greenlet; every module's `forward` is wrapped for the duration of the trace (see
`hooks.py`), and at each module call the wrapper serves the mediators parked on that call, in
invoke order. Between reads the user's code runs natively on real tensors, so `print`, `if`,
loops and any torch operation just work.

A location is `(module path, "input" | "output", forward pass, call index)`: the pass counts calls
of the root module (one per generated token), the call index counts calls of a module within a
pass (shared or looped modules run several times). A request for a location the model has
already passed fails at once, in the mediator, so the traceback points at the user's line; a
request the model never reaches fails when the run ends.

Invokes share names: when a mediator parks, the names its body assigned are copied into the
other mediators' namespaces, and a mediator that reads a name another invoke will assign waits for
it, so `model.layers[3].output[:] = h` in invoke B can use `h` read by invoke A in the same pass.
"""

from __future__ import annotations

import builtins
import threading
from types import FunctionType
from typing import Any

from greenlet import getcurrent, greenlet

from ..errors import ModuleNotReachedError, OutOfOrderError
from .batching import Rows, narrow, splice
from .paths import display_path

RESULT = ("result",)
STREAMED = "streamed"
"""Keys `(STREAMED, k)`: the `k`-th value a generation streamed (`streaming.py`)."""


class _Sentinel:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


DONE = _Sentinel("DONE")
ENDED = _Sentinel("ENDED")
_MISSING = _Sentinel("MISSING")


class StopTrace(BaseException):
    """Raised inside a mediator by `tracer.stop()`; ends that mediator quietly."""


class EarlyStop(BaseException):
    """Raised from a module wrapper to unwind the forward pass after `tracer.stop()`."""


class Request:
    """What a parked mediator wants: op is "get", "set" or "name"."""

    __slots__ = ("op", "key", "value", "soft")

    def __init__(self, op: str, key: Any, value: Any = None, soft: bool = False) -> None:
        self.op = op
        self.key = key
        self.value = value
        self.soft = soft


MEDIATOR_ATTR = "_nnsight_jupyter_mediator"
"""The greenlet attribute that links a running trace body to its mediator (named to avoid other tools')."""


class _Raised:
    """A worker's message that the body it ran raised `error`."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class _Abort(BaseException):
    """Thrown into a parked body to end it after the trace failed."""


class _Worker(greenlet):
    """A greenlet that runs trace bodies one after another.

    Creating and finishing a greenlet for every trace leaves Python's frame stacks to be
    rebuilt, which made the next forward pass measurably slower; a worker is kept per thread
    and reused instead.
    """

    _nnsight_jupyter_mediator: Mediator | None = None


_idle = threading.local()


def _acquire_worker() -> _Worker:
    pool = getattr(_idle, "workers", None)
    if pool:
        worker = pool.pop()
        if not worker.dead:
            return worker
    return _Worker(_worker_main)


def _release_worker(worker: _Worker) -> None:
    worker._nnsight_jupyter_mediator = None
    if worker.dead:
        return
    pool = getattr(_idle, "workers", None)
    if pool is None:
        pool = _idle.workers = []
    if len(pool) < 8:
        pool.append(worker)


def _worker_main(m: Mediator) -> None:
    while True:
        box: list[Any] = []
        try:
            m.execute()
            box.append(DONE)
        except _Abort:
            box.append(DONE)
        except BaseException as error:  # handed to the model side, which raises it there
            box.append(_Raised(error))
        main = m.interleaver.main
        m = None
        m = main.switch(box.pop())


def current_mediator() -> Mediator | None:
    return getattr(getcurrent(), MEDIATOR_ATTR, None)


def current_trace() -> Interleaver | None:
    m = getattr(getcurrent(), MEDIATOR_ATTR, None)
    return m.interleaver if m is not None else None


class Scope(dict):
    """An invoke's namespace: waits for names that another invoke of the same pass will assign.

    It starts as a copy of the trace body's namespace; names that namespace falls back on (a
    function's module globals) are looked up in `fallback`.
    """

    mediator: Mediator
    fallback: Any = None

    def __missing__(self, name: str) -> Any:
        fallback = self.fallback
        if fallback is not None:
            try:
                return fallback[name]
            except KeyError:
                pass
        if name in builtins.__dict__:
            raise KeyError(name)
        value = self.mediator.interleaver.await_name(self.mediator, name)
        if value is _MISSING:
            raise KeyError(name)
        return value


_EMPTY: dict = {}
"""A shared empty dict for mediator fields that are replaced, never mutated, when they change."""


class Barrier:
    """`tracer.barrier(n)`: a meeting point for `n` trace bodies (invokes) of one trace.

    Each body that calls it parks; when the n-th arrives, the others resume in invoke order, then
    the n-th goes on. Use it when one invoke must not go past a point before another has read a
    value there (copying an activation between prompts at the same module).
    """

    def __init__(self, n: int) -> None:
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"tracer.barrier(n) takes the number of invokes that meet there (n >= 1), not {n!r}.")
        self.n = n
        self.arrived = 0
        self.waiting: list[Mediator] = []
        self.key = ("barrier", self)

    def __call__(self) -> None:
        m = current_mediator()
        if m is None:
            raise ValueError("A barrier is called inside the trace that made it: `barrier()` in each invoke.")
        m.interleaver.main.switch(Request("barrier", self.key, self))


class Mediator:
    """One participant of a trace: a compiled body running in its own greenlet."""

    __slots__ = (
        "interleaver",
        "code",
        "ns",
        "assigned",
        "rows",
        "label",
        "index",
        "pending",
        "done",
        "started",
        "step",
        "cursor",
        "call_base",
        "last",
        "greenlet",
        "initial",
    )

    def __init__(
        self,
        interleaver: Interleaver,
        code: Any,
        ns: dict,
        *,
        assigned: tuple[str, ...],
        rows: Rows | None,
        label: str,
        index: int,
    ) -> None:
        self.interleaver = interleaver
        self.code = code
        self.ns = ns
        self.assigned = assigned
        self.rows = rows
        self.label = label
        self.index = index
        self.pending: Request | None = None
        self.done = False
        self.started = False
        self.step = 0
        self.cursor: dict[str, int] = _EMPTY  # `.next()` replaces it
        self.call_base = 0  # `tracer.iter[i]` in a single-pass trace: each module's call i
        self.last: Any = None
        self.greenlet: _Worker | None = None
        if isinstance(ns, Scope):
            self.initial = {name: dict.get(ns, name, _MISSING) for name in assigned}
            ns.mediator = self
        else:
            self.initial = _EMPTY

    def execute(self) -> None:
        # Called as a function rather than exec'd: the same namespace semantics (the body's code is
        # module-level code, so its locals are `ns`), one C stack frame less for every switch.
        try:
            FunctionType(self.code, self.ns)()
        except StopTrace:
            self.interleaver.stop_requested = True

    def request(self, key: Any, *, soft: bool = False) -> Any:
        return self.interleaver.main.switch(Request("get", key, None, soft))

    def swap(self, key: Any, value: Any) -> None:
        self.interleaver.main.switch(Request("set", key, value))

    def location(self, path: str, kind: str) -> tuple:
        return (path, kind, self.step, self.call_base + self.cursor.get(path, 0))


class Interleaver:
    """The model side of one trace: serves parked mediators as the forward pass reaches them.

    Mediators parked on a module wait in `wait_in` / `wait_out` under the module's path, so a
    module wrapper's check for waiters is one lookup of a string whose hash is cached.
    """

    __slots__ = (
        "root",
        "block",
        "describe_path",
        "mediators",
        "wait_in",
        "wait_out",
        "wait_other",
        "name_waiters",
        "n_in",
        "n_out",
        "saved",
        "main",
        "observers",
        "stop_requested",
        "stopped_at",
        "here",
        "here_value",
        "result",
        "grad_snapshot",
        "root_depth",
        "pass_idx",
        "reads",
        "skips",
        "sourced",
        "callees",
        "source_late",
        "streamed",
    )

    def __init__(self, root: Any, block: Any = None) -> None:
        self.root = root
        self.block = block
        self.describe_path = display_path
        self.mediators: list[Mediator] = []
        self.wait_in: dict[str, list[Mediator]] = {}
        self.wait_out: dict[str, list[Mediator]] = {}
        self.wait_other: dict[Any, list[Mediator]] = {}
        self.name_waiters: dict[str, list[Mediator]] = {}
        self.n_in: dict[str, int] = {}
        self.n_out: dict[str, int] = {}
        self.saved: dict[int, Any] = {}
        self.main = getcurrent()
        self.observers: dict[str, tuple[Any, ...]] | None = None  # per path: the caches recording it
        self.stop_requested = False
        self.stopped_at: str | None = None
        self.here: Any = None
        self.here_value: Any = None
        self.result: Any = _MISSING
        self.grad_snapshot: list | None = None
        self.root_depth = 0
        self.pass_idx = -1
        self.reads: list[tuple[str, Any]] = []  # (path, value handed out), for the trace record
        self.skips: list[tuple[Rows | None, Any]] = []  # `.skip(value)` requests served at the current input
        # `module.source` (operations.py): module path -> its rewritten forward; operation path -> what
        # swaps its callee for the rewritten callee; module path -> the pass in which it had run before.
        self.sourced: dict[str, Any] | None = None
        self.callees: dict[str, Any] | None = None
        self.source_late: dict[str, int] = {}
        self.streamed: list[Any] = []  # what a generation streamed so far: the prompt, then each step's tokens

    def _queues(self, key: Any) -> tuple[dict, Any]:
        """The waiting dict and slot for a request key."""
        if len(key) == 4:
            return (self.wait_out if key[1] == "output" else self.wait_in), key[0]
        return self.wait_other, key

    def add(
        self,
        code: Any,
        ns: dict,
        *,
        assigned: tuple[str, ...],
        rows: Rows | None,
        label: str,
        index: int | None = None,
    ) -> Mediator:
        """A new participant; `index` orders who is served first at a module (default: after all others)."""
        m = Mediator(
            self,
            code,
            ns,
            assigned=assigned,
            rows=rows,
            label=label,
            index=len(self.mediators) if index is None else index,
        )
        self.mediators.append(m)
        return m

    def start(self, m: Mediator) -> None:
        """Run a mediator until it first parks (or finishes)."""
        m.started = True
        worker = _acquire_worker()
        worker._nnsight_jupyter_mediator = m
        m.greenlet = worker
        self._handle(m, worker.switch(m))

    def new_pass(self) -> None:
        self.pass_idx += 1
        self.n_in = {}
        self.n_out = {}

    def serve(self, path: str, kind: str, call: int, value: Any) -> Any:
        """Called by a module wrapper: hand `value` to every mediator parked on this location."""
        parked = (self.wait_out if kind == "output" else self.wait_in).pop(path, None)
        if not parked:
            return value
        outer_here, outer_value = self.here, self.here_value
        self.here = (path, kind, self.pass_idx, call)
        self.here_value = value
        try:
            for m in parked:
                req = m.pending
                if req is not None and req.key == self.here:
                    m.pending = None
                    self._deliver(m, req)
                elif req is not None:
                    self._park(m)
            value = self.here_value
        finally:
            self.here, self.here_value = outer_here, outer_value
        if self.stop_requested:
            self.stopped_at = path
            raise EarlyStop()
        return value

    def stream(self, value: Any) -> None:
        """Called by the generation's streamer: keep its `k`-th value and hand it to bodies waiting for it."""
        key = (STREAMED, len(self.streamed))
        self.streamed.append(value)
        for m in self.wait_other.pop(key, ()):
            if m.pending is not None and m.pending.key == key:
                m.pending = None
                self._handle(m, self._streamed_to(m, key))

    def _streamed_to(self, m: Mediator, key: Any) -> Any:
        """Hand a body the streamed value it asked for (its invoke's rows); returns its next message."""
        value = self.streamed[key[1]]
        m.last = key
        return m.greenlet.switch(value if m.rows is None else narrow(value, m.rows))

    def skipped(self, forward: Any, args: tuple, kwargs: dict) -> Any:
        """A module's output when trace bodies asked to skip it: their values instead of its forward.

        When every skip covers the whole batch the forward does not run; when invokes skip only
        their own rows, the forward runs for the others and the skipping invokes' rows are replaced.
        """
        skips, self.skips = self.skips, []
        for rows, value in skips:
            if rows is None or (rows.start == 0 and rows.size == rows.total):
                return value
        out = forward(*args, **kwargs)
        for rows, value in skips:
            out = splice(out, rows, value)
        return out

    def _deliver(self, m: Mediator, req: Request) -> None:
        self._handle(m, self._serve_here(m, req))

    def _serve_here(self, m: Mediator, req: Request) -> Any:
        """Answer a request for the location being served now; returns the mediator's next message."""
        m.last = self.here
        if req.op == "get":
            value = self.here_value if m.rows is None else narrow(self.here_value, m.rows)
            self.reads.append((self.here[0], value))
            return m.greenlet.switch(value)
        if req.op == "skip":
            self.skips.append((m.rows, req.value))
            return m.greenlet.switch(None)
        self.here_value = splice(self.here_value, m.rows, req.value)
        return m.greenlet.switch(None)

    def _handle(self, m: Mediator, msg: Any) -> None:
        while True:
            if msg is DONE:
                m.done = True
                _release_worker(m.greenlet)
                self._publish(m)
                return
            if type(msg) is _Raised:
                m.done = True
                _release_worker(m.greenlet)
                raise msg.error
            if msg.op == "name":
                value = self._published(m, msg.key)
                if value is _MISSING and self._provider_pending(m, msg.key):
                    self.name_waiters.setdefault(msg.key, []).append(m)
                    m.pending = msg
                    self._publish(m)
                    return
                msg = m.greenlet.switch(value)
                continue
            if msg.op == "barrier":
                msg = self._arrive(m, msg)
                if msg is None:
                    return
                continue
            if msg.key == self.here and self.here is not None:
                msg = self._serve_here(m, msg)
                continue
            if msg.key[0] == STREAMED and msg.key[1] < len(self.streamed):
                # Streamed before the body asked (a step runs once its forward pass starts, after the
                # tokens of the step before it were streamed): served from what was kept.
                msg = self._streamed_to(m, msg.key)
                continue
            problem = self._passed(m, msg.key, msg.op)
            if problem is not None:
                msg = m.greenlet.throw(problem)
                continue
            m.pending = msg
            self._park(m)
            self._publish(m)
            return

    def _arrive(self, m: Mediator, msg: Request) -> Any:
        """`barrier()`: park until `n` bodies have called it, then resume them in order; returns m's next message."""
        barrier = msg.value
        barrier.waiting.append(m)
        barrier.arrived += 1
        if len(barrier.waiting) < barrier.n:
            m.pending = msg
            self._publish(m)
            return None
        waiting, barrier.waiting, barrier.arrived = barrier.waiting, [], 0
        for other in waiting:
            if other is not m:
                other.pending = None
                self._handle(other, other.greenlet.switch(None))
        return m.greenlet.switch(None)

    def _park(self, m: Mediator) -> None:
        waiting, slot = self._queues(m.pending.key)
        queue = waiting.setdefault(slot, [])
        queue.append(m)
        if len(queue) > 1 and queue[-2].index > m.index:
            queue.sort(key=lambda x: x.index)

    def _passed(self, m: Mediator, key: Any, op: str = "get") -> Exception | None:
        if len(key) != 4:
            return None
        path, kind, step, call = key
        if step > self.pass_idx:
            return None
        if step == self.pass_idx:
            count = (self.n_out if kind == "output" else self.n_in).get(path, 0)
            if count <= call:
                return None
            if kind == "input" and self.here == (path, "fn", step, call):
                return None  # an operation's callee is served just before its inputs
        where = self.describe_path(path)
        now = self._describe_location(m.last) if m.last else "a later module"
        if op == "skip":
            return OutOfOrderError(
                f"{where}.skip() came after {where} had already run (the model was at {now}). Skip a module "
                "before reading any value the model computes after it starts: move .skip() above that line."
            )
        if kind == "fn":
            return OutOfOrderError(
                f"{where}.source was asked for after that call had started (the model was at {now}). The function "
                "an operation calls is known just before its inputs are: ask for .source first, then read the "
                "operation's .input, .inputs or .output, or read it in a separate trace."
            )
        return OutOfOrderError(
            f"{where}.{kind} was requested after the forward pass had already computed it "
            f"(the model was at {now}). One trace is one pass through the model, so read values in the "
            f"order the model computes them: move this line above the one that reads {now}, "
            "or read it in a separate trace."
        )

    def _describe_location(self, key: Any) -> str:
        if key == RESULT:
            return "the end of the run"
        if key[0] == STREAMED:
            return f"model.generator.streamer.output at step {key[1]}"
        path, kind, step, call = key
        text = f"{self.describe_path(path)}.{'source' if kind == 'fn' else kind}"
        if call:
            text += f" (call {call})"
        if step:
            text += f" at step {step}"
        return text

    def _publish(self, m: Mediator) -> None:
        if len(self.mediators) < 2 or not m.assigned:
            return
        published = []
        for name in m.assigned:
            value = m.ns.get(name, _MISSING) if isinstance(m.ns, dict) else _MISSING
            if value is _MISSING or value is m.initial.get(name, _MISSING):
                continue  # not bound by this body yet: a value it started with is not news
            for other in self.mediators:
                if other is not m and name not in other.assigned:
                    other.ns[name] = value
            published.append((name, value))
        for name, value in published:  # every name is in place before any waiting invoke resumes
            waiters = self.name_waiters.pop(name, None)
            for waiter in waiters or ():
                waiter.pending = None
                self._handle(waiter, waiter.greenlet.switch(value))

    def _published(self, m: Mediator, name: str) -> Any:
        return dict.get(m.ns, name, _MISSING)

    def _provider_pending(self, m: Mediator, name: str) -> bool:
        return any(other is not m and not other.done and name in other.assigned for other in self.mediators)

    def await_name(self, m: Mediator, name: str) -> Any:
        if not self._provider_pending(m, name):
            return _MISSING
        return self.main.switch(Request("name", name))

    def observe(self, path: str, call: int, args: tuple, kwargs: dict, output: Any) -> None:
        for record in self.observers[path]:
            record(self.pass_idx, call, args, kwargs, output)

    def finish(self, result: Any) -> None:
        """After the model has run: serve `tracer.result`, end step loops, and report what never came."""
        for m in self.mediators:
            if not m.done:
                break
        else:
            return
        self.result = result
        self.here = RESULT
        self.here_value = result
        progress = True
        while progress:
            progress = False
            for m in self.mediators:
                req = m.pending
                if m.done or req is None or req.op == "name":
                    continue
                if req.key == RESULT and result is not _MISSING:
                    self._unpark(m)
                    self._deliver(m, req)
                    progress = True
                elif req.soft:
                    self._unpark(m)
                    m.last = RESULT
                    self._handle(m, m.greenlet.switch(ENDED))
                    progress = True
        self.here = None
        for m in self.mediators:
            req = m.pending
            if m.done or req is None:
                continue
            self._unpark(m)
            if req.op == "name":
                self._handle(m, m.greenlet.switch(_MISSING))
            else:
                self._handle(m, m.greenlet.throw(self._not_reached(req.key)))
        for m in self.mediators:
            if not m.done and m.pending is not None:
                self._unpark(m)
                self._handle(m, m.greenlet.throw(self._not_reached(m.pending.key)))

    def _unpark(self, m: Mediator) -> None:
        req = m.pending
        m.pending = None
        if req is None:
            return
        if req.op == "name":
            queue = self.name_waiters.get(req.key, [])
        elif req.op == "barrier":
            queue = req.value.waiting
        else:
            waiting, slot = self._queues(req.key)
            queue = waiting.get(slot, [])
        if m in queue:
            queue.remove(m)

    def _not_reached(self, key: Any) -> ModuleNotReachedError:
        if key[0] == "barrier":
            barrier = key[1]
            return ModuleNotReachedError(
                f"tracer.barrier({barrier.n}) was called by {barrier.arrived} of the {barrier.n} trace bodies "
                "it waits for before the run ended. Call the barrier once in each of the invokes it was made for, "
                "or make it with the number of invokes that call it."
            )
        if key == RESULT:
            return ModuleNotReachedError(
                "tracer.result has no value: the run was ended by tracer.stop() before the model returned."
            )
        if key[0] == STREAMED:
            return ModuleNotReachedError(
                f"model.generator.streamer.output has no value for step {key[1]}: the generation streamed "
                f"{len(self.streamed)} value(s) (the prompt, then one per generated token). Ask for fewer steps "
                "or generate more tokens."
            )
        path, kind, step, call = key
        where = self.describe_path(path)
        if self.stopped_at is not None:
            return ModuleNotReachedError(
                f"{where}.{kind} was never computed: tracer.stop() ended the forward pass at "
                f"{self.describe_path(self.stopped_at)}. Read it before calling stop(), or stop later."
            )
        if step > self.pass_idx:
            return ModuleNotReachedError(
                f"{where}.{kind} was requested for step {step}, but the run ended after "
                f"{self.pass_idx + 1} forward pass(es). Ask for fewer steps or generate more tokens."
            )
        if ".source." in f".{path}":
            owner = path[: path.rindex(".source.")] if ".source." in path else ""
            ran = self.n_in.get(path, 0) if step == self.pass_idx else 0
            if ran:
                return ModuleNotReachedError(
                    f"{where} ran {ran} time(s) in this forward pass, but call {call} was requested. "
                    f"Calls are counted from 0; use .call(i) or .next() with i < {ran}."
                )
            return ModuleNotReachedError(
                f"{where}.{kind} was never computed: the forward pass did not make that call"
                + (f" (at step {step})" if step else "")
                + f". {self.describe_path(owner)} may not have run, or that line of its source was not reached "
                "for this input (a branch not taken); print(... .source) shows where each operation is."
            )
        ran = self.n_in.get(path, 0) if step == self.pass_idx else None
        if ran:
            return ModuleNotReachedError(
                f"{where} ran {ran} time(s) in this forward pass, but call {call} was requested. "
                f"Calls are counted from 0; choose i < {ran} in .call(i), .next() or, in model.trace(...), "
                "tracer.iter[i] (which counts each module's calls there, and generation steps in model.generate)."
            )
        seen = list(self.n_in)
        shown = ", ".join(self.describe_path(p) for p in seen[:6])
        if len(seen) > 6:
            shown += f", ... ({len(seen)} modules in all)"
        return ModuleNotReachedError(
            f"{where}.{kind} was never computed: the forward pass did not call {where}. "
            f"Modules that ran: {shown or 'none'}. Check that this module is used by the model's forward "
            "for this input (print(model) shows the tree; model.scan(input) shows what runs)."
        )

    def release(self) -> None:
        """Drop the references that tie greenlets, namespaces and this object together."""
        for m in self.mediators:
            m.greenlet = None
            m.ns = None
            m.interleaver = None
        self.mediators = []
        self.wait_in = {}
        self.wait_out = {}
        self.wait_other = {}
        self.name_waiters = {}
        self.here_value = None
        self.result = _MISSING
        self.grad_snapshot = None
        self.reads = []
        self.skips = []

    def kill(self) -> None:
        """End every unfinished mediator (after an error), running its `finally` blocks."""
        for m in self.mediators:
            if m.started and not m.done and m.greenlet is not None and not m.greenlet.dead:
                try:
                    msg = m.greenlet.throw(_Abort)
                    if msg is DONE:
                        _release_worker(m.greenlet)
                except BaseException:
                    pass
            m.done = True
