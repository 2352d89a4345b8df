"""The model worker: one process per replica that loads the model, and the job processes it forks.

User code never runs in the server process, and never in the process that loaded the model. Each
replica of a served model is one *loader* process, started with ``forkserver`` (or ``spawn``): it
loads the model (with file and network access, as any program would), imports every module
traces may use, runs the engine once, moves the weights into read-only memory, takes the
integrity baseline and the fresh global state (``globalstate.py``), and applies
``lockdown.apply``. Then it only forks: on the server's request it starts a *job process*, a
copy of itself that shares the model's memory (the weights read-only, everything else copy on
write) and runs jobs, one at a time, on its main thread, with the sandbox's builtins, importer and
source check (``sandbox.py``).

Why fork per user
    A job process serves one user only. When the next job comes from another user, the server
    hands it to another job process (a fresh fork, or one that has served only that user), so
    nothing one user's code left in memory, in the interpreter or in torch's globals can reach
    another's: out-of-bounds reads through native code see only the reader's own data and the
    loader's (the model and libraries, which every user may read anyway). A job that changed the
    model ends its job process the same way. A fork costs about 30 ms in the loader and a
    warm-up pass in the new process (its first forward pass faults in the memory it touches),
    both before any job is given to it; a full reload would cost the model's loading time.

Inside a job process, per job: put back the process-wide settings (``globalstate.py``), run the
trace, clear gradients and check the model and shared state (``integrity.py``); printed lines
stream back as they happen; the result is encoded here, so oversized or unsendable results fail
with a clear message before they reach the server. Each reply carries the durations of these
steps (``timings``).

Stopping a job: the server sends ``cancel``; the listener thread records the reason and
interrupts the main thread, where a ``SIGINT`` handler raises :class:`StopJob` only while
trace code is running (never while a message is being written, so the pipe stays consistent).
If the job still runs after the grace period, the server kills the job process.

Two threads besides the main one, started in a trusted section (the audit hook forbids new
threads to everything else): the listener reads the job process's socket and the sender writes
it, so the main thread never blocks on it and an interrupt can never land in the middle of a
message. The loader has no threads of its own, so forking it is safe.
"""

from __future__ import annotations

import _thread
import gc
import importlib
import multiprocessing.connection
import os
import queue
import select
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from ...errors import JobStopped, ModelModifiedError, ResultTooLarge, wire_name
from .channel import BrokenChannel, Channel

__all__ = ["StopJob", "load_model", "main"]


class StopJob(BaseException):
    """Raised inside a running trace when the server stops it (cancel or time limit).

    A ``BaseException`` that trace code cannot name, so ``except Exception`` does not catch it.
    """


def load_model(spec: str, *, factory: bool) -> Any:
    """An ``NNsight`` model from a ``module:function`` factory, or a ``LanguageModel`` by name."""
    import torch

    from ...models.base import NNsight

    if factory:
        module_name, _, function_name = spec.partition(":")
        function = getattr(importlib.import_module(module_name), function_name, None)
        if not callable(function):
            raise ValueError(f"{spec!r}: {module_name} has no function {function_name!r}")
        model = function()
        if isinstance(model, torch.nn.Module):
            model = NNsight(model)
        if not isinstance(model, NNsight):
            raise TypeError(
                f"{spec!r} returned {type(model).__name__}; a model factory must return an "
                "NNsight model or a torch.nn.Module"
            )
        return model
    from ...models.language import LanguageModel

    return LanguageModel(spec, dispatch=True)


def _warm_up(model: Any, name: str) -> None:
    """Run the engine once: before the integrity baseline and the lockdown, and in each new job process.

    In the loader, lazy imports then happen while files can still be read, and what the engine
    sets up once per process (such as ``Tensor.save``) is part of the baseline rather than
    mistaken for a change a job made. In a job process, the memory a trace touches is faulted
    in (and copied from the loader where it is written) before the first job, not during it. A
    trace without input gets that far for any model; a ``LanguageModel`` also runs a real
    forward pass and one generation step.
    """
    import torch

    from ...models.language import LanguageModel
    from ..execute import run_request
    from ..protocol import TraceRequest

    torch.ones(64, 64) @ torch.ones(64, 64)
    run_request(model, TraceRequest(model_id=name, source="pass", options={"kind": "trace"}))
    if not isinstance(model, LanguageModel):
        return
    for options in (
        {"kind": "trace", "inputs": ["Hello"]},
        {"kind": "generate", "inputs": ["Hello"], "kwargs": {"max_new_tokens": 1}},
    ):
        result = run_request(model, TraceRequest(model_id=name, source="pass", options=options))
        if result.error is not None:
            print(
                f"nnsight-jupyter worker {name}: warm-up {options['kind']} failed: "
                f"{result.error.type_name}: {result.error.message}",
                file=sys.stderr,
            )


def _quiet_progress_bars() -> None:
    """No download or loading bars in the server log (and no tqdm lock left to clean up at exit)."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def main(connection: Any, name: str, spec: str, settings: dict[str, Any]) -> None:
    """Entry point of a replica's loader process; it exits when the server says stop or goes away."""
    control = Channel(connection, max_bytes=2**20)
    try:
        control.send({"ev": "loading"})
    except BrokenChannel:
        return
    try:
        import torch

        threads = int(settings.get("threads") or torch.get_num_threads())
        # Thread pools do not survive a fork: a job process forked after the loader ran OpenMP
        # work on two threads hangs in its first parallel region. The loader therefore computes
        # on one thread and only sets the job processes' count (no pool starts until they use it).
        torch.set_num_threads(1)
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        _quiet_progress_bars()
        model = load_model(spec, factory=settings["factory"])
        from . import globalstate, integrity, lockdown, redact, sandbox

        sandbox.preimport()
        sandbox.harden_engine()
        _warm_up(model, name)
        protected = integrity.protect_weights(model)
        baseline = integrity.Baseline(model)
        torch.set_num_threads(threads)
        fresh = globalstate.FreshState()
        global _REDACTOR
        _REDACTOR = redact.Redactor(_model_paths(model, spec))
        gc.collect()
        gc.freeze()
        report = lockdown.LockdownReport(skipped=["all process-level layers (--no-os-sandbox)"])
        if settings["os_sandbox"]:
            report = lockdown.apply(
                memory_bytes=settings["max_job_memory_bytes"] + 512 * 2**20,
                protected=[Path(p) for p in settings["protected"]],
            )
        if protected:
            report.active.append(protected)
        report.active.append("one job process per user, forked from a loader that never runs jobs")
    except BaseException as exc:
        text = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
        try:
            control.send({"ev": "failed", "reason": text})
        except BrokenChannel:
            pass
        return
    loader = _Loader(control, name, settings, model, baseline, fresh)
    control.send({"ev": "ready", "pid": os.getpid(), "lockdown": report.as_json()})
    loader.serve()


_REDACTOR: Any = None
"""The loader's ``redact.Redactor``, made before the sandbox scrubs the environment."""


def _model_paths(model: Any, spec: str) -> list[str]:
    """Where the model came from on this machine, for the redactor."""
    paths = [spec]
    raw = getattr(model, "_model", model)
    for owner in (getattr(raw, "config", None), getattr(raw, "generation_config", None), vars(model).get("_tokenizer")):
        for attribute in ("name_or_path", "_name_or_path"):
            value = getattr(owner, attribute, None)
            if isinstance(value, str):
                paths.append(value)
    return [p for p in paths if os.path.isabs(p)]


def _redact(result: Any, redactor: Any) -> None:
    """Take server paths, host names and environment values out of what a job sends back."""
    from ..protocol import TraceErrorInfo

    result.logs = [redactor.text(line) for line in result.logs]
    if result.error is not None:
        error = result.error
        result.error = TraceErrorInfo(error.type_name, redactor.text(error.message), redactor.text(error.traceback))
    for name, value in list(result.saved.items()):
        if isinstance(value, (str, list, tuple, dict)):
            result.saved[name] = redactor.value(value)


class _Loader:
    """The loader's loop: fork a job process when asked, and report each one's exit."""

    def __init__(
        self, control: Channel, name: str, settings: dict[str, Any], model: Any, baseline: Any, fresh: Any
    ) -> None:
        self.control = control
        self.name = name
        self.settings = settings
        self.model = model
        self.baseline = baseline
        self.fresh = fresh
        self.children: dict[int, int] = {}  # pidfd -> pid
        from . import lockdown

        with lockdown.trusted():
            self.fd_socket = socket.socket(
                socket.AF_UNIX, socket.SOCK_STREAM, fileno=os.dup(control.connection.fileno())
            )

    def serve(self) -> None:
        control_fd = self.control.connection.fileno()
        poller = select.poll()
        poller.register(control_fd, select.POLLIN)
        while True:
            for fd, _ in poller.poll():
                if fd == control_fd:
                    try:
                        message = self.control.recv()
                    except BrokenChannel:
                        self._stop()
                    op = message.get("op")
                    if op == "fork":
                        pidfd = self._fork()
                        if pidfd is not None:
                            poller.register(pidfd, select.POLLIN)
                    elif op == "stop":
                        self._stop()
                elif fd in self.children:
                    poller.unregister(fd)
                    self._reap(fd)

    def _fork(self) -> int | None:
        from . import lockdown

        with lockdown.trusted():
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            pid = os.fork()
        if pid == 0:
            close = [self.control.connection.fileno(), self.fd_socket.fileno(), ours.fileno(), *self.children]
            try:
                _job_process(theirs, close, os.getppid(), self)
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(70)
        theirs.close()
        with lockdown.trusted():
            try:
                pidfd = os.pidfd_open(pid)
                self.control.send({"ev": "child", "pid": pid})
                socket.send_fds(self.fd_socket, [b"F"], [ours.fileno(), pidfd])
            except (OSError, BrokenChannel):
                os._exit(0)  # the server is gone
            finally:
                ours.close()
        self.children[pidfd] = pid
        return pidfd

    def _reap(self, pidfd: int) -> None:
        pid = self.children.pop(pidfd)
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:
            status = 0
        os.close(pidfd)
        code = os.waitstatus_to_exitcode(status)
        try:
            self.control.send({"ev": "exited", "pid": pid, "code": code})
        except BrokenChannel:
            self._stop()

    def _stop(self) -> None:
        from . import lockdown

        with lockdown.trusted():
            for pid in self.children.values():
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        os._exit(0)


def _job_process(sock: socket.socket, close: list[int], loader_pid: int, loader: _Loader) -> None:
    """A freshly forked job process: set up its own connection and threads, warm up, then serve jobs."""
    from . import integrity, lockdown

    for fd in close:
        try:
            os.close(fd)
        except OSError:
            pass
    with lockdown.trusted():
        lockdown.child_started(loader_pid)
        channel = Channel(
            multiprocessing.connection.Connection(sock.detach()),
            max_bytes=loader.settings["max_request_bytes"] + 2**20,
        )
        worker = _Worker(channel, loader.name, loader.settings)
        worker.model, worker.baseline, worker.fresh = loader.model, loader.baseline, loader.fresh
        signal.signal(signal.SIGINT, worker.on_interrupt)
        worker.start_threads()
    _warm_up(worker.model, loader.name)
    integrity.reset_shared_state(worker.baseline)
    gc.collect()
    worker.post({"ev": "ready", "pid": os.getpid()})
    worker.serve()


class _Worker:
    def __init__(self, channel: Channel, name: str, settings: dict[str, Any]) -> None:
        self.channel = channel
        self.name = name
        self.settings = settings
        self.model: Any = None
        self.baseline: Any = None
        self.fresh: Any = None
        self.inbox: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.outbox: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.lock = threading.Lock()
        self.current: str | None = None
        self.stop_reason: str | None = None
        self.in_trace = False
        self.started = False

    # ----- threads -------------------------------------------------------------------------
    def start_threads(self) -> None:
        threading.Thread(target=self._listen, name="nnsj-listener", daemon=True).start()
        threading.Thread(target=self._send, name="nnsj-sender", daemon=True).start()
        self.started = True

    def post(self, message: dict[str, Any]) -> None:
        if self.started:
            self.outbox.put(message)
        else:
            self.channel.send(message)

    def _send(self) -> None:
        while True:
            message = self.outbox.get()
            try:
                if message is None:
                    return
                parts = message.pop("result_parts", None)
                timings = message.get("timings")
                if timings is not None:
                    timings["sent"] = time.monotonic()
                self.channel.send(message, payload=None if parts is None else ("result", parts))
            except BrokenChannel:
                os._exit(0)
            finally:
                self.outbox.task_done()

    def _listen(self) -> None:
        while True:
            try:
                message = self.channel.recv()
            except BrokenChannel:
                os._exit(0)
            op = message.get("op")
            if op == "run":
                message["received"] = time.monotonic()
                self.inbox.put(message)
            elif op == "cancel":
                with self.lock:
                    if self.current is not None and self.current == message.get("job_id") and not self.stop_reason:
                        self.stop_reason = str(message.get("reason") or "cancelled")
                        _thread.interrupt_main()
            elif op == "stop":
                self.inbox.put(None)

    def on_interrupt(self, signum: int, frame: Any) -> None:
        if self.in_trace and self.stop_reason:
            raise StopJob(self.stop_reason)

    # ----- jobs ----------------------------------------------------------------------------
    def serve(self) -> None:
        while True:
            try:
                message = self.inbox.get()
            except StopJob:
                continue
            if message is None:
                self.outbox.put(None)
                self.outbox.join()
                os._exit(0)
            reply = self._run(message)
            restart = reply.get("restart")
            self.post(reply)
            del reply
            gc.collect()  # the job's garbage, while the result goes out
            if restart:
                self.outbox.join()
                os._exit(0)

    def _run(self, message: dict[str, Any]) -> dict[str, Any]:
        from ..protocol import TraceErrorInfo, TraceResult
        from . import integrity

        job_id = str(message.get("job_id"))
        started = time.monotonic()
        sink = _LogSink(self, job_id, self.settings["max_log_bytes"])
        with self.lock:
            self.current, self.stop_reason = job_id, None
        checks = self.settings.get("job_checks", True)
        if checks:
            self.fresh.restore()
        reset = time.monotonic()
        result: Any = None
        try:
            result = self._execute(message, sink)
        except StopJob:
            result = None
        self.in_trace = False
        ran = time.monotonic()
        with self.lock:
            self.current = None
            stopped = self.stop_reason
        if result is None:
            result = TraceResult(error=TraceErrorInfo(wire_name(JobStopped), stopped or "stopped", ""))
        elif result.error is not None and _is_out_of_memory(result.error):
            detail = f" ({result.error.message})" if result.error.message else ""
            result.error = TraceErrorInfo(
                wire_name(MemoryError), _memory_message(self.settings) + detail, result.error.traceback
            )
        problems: list[str] = []
        if checks:
            try:
                integrity.reset_shared_state(self.baseline)
                problems = self.baseline.check()
                problems += [f"{name} was changed" for name in self.fresh.unrestorable_changes()]
            except Exception as exc:
                problems = [f"the model could not be checked after the job ({type(exc).__name__}: {exc})"]
        checked = time.monotonic()
        restart = None
        if problems:
            restart = "; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
            result = TraceResult(
                error=TraceErrorInfo(
                    wire_name(ModelModifiedError),
                    f"the trace changed the served model or state shared with later jobs: {restart}. A shared server "
                    "does not keep such changes; change activations inside the trace instead (e.g. "
                    "`model.layer.output = ...`). The server replaced this worker, so no other job saw the change.",
                    "",
                )
            )
        result.logs = sink.lines()
        if _REDACTOR is not None:
            _redact(result, _REDACTOR)
        parts, error = self._encode(result)
        del result
        encoded = time.monotonic()
        received = float(message.get("received") or started)
        return {
            "ev": "done",
            "job_id": job_id,
            "result_parts": parts,
            "stopped": stopped,
            "restart": restart,
            "error": None if error is None else [error.type_name, error.message, error.traceback],
            "timings": {
                "received": received,
                "wait": started - received,
                "reset": reset - started,
                "run": ran - reset,
                "check": checked - ran,
                "encode": encoded - checked,
            },
        }

    def _execute(self, message: dict[str, Any], sink: _LogSink) -> Any:
        from ..execute import run_request
        from ..protocol import ProtocolError, TraceErrorInfo, TraceResult, decode_request
        from . import lockdown, sandbox

        try:
            request = decode_request(message["request"], max_size=self.settings["max_request_bytes"])
        except (ProtocolError, KeyError, TypeError) as exc:
            return TraceResult(error=TraceErrorInfo(wire_name(ProtocolError), str(exc), ""))
        lockdown.set_user_files({str(request.options.get("filename") or "<remote trace>")})
        if self.settings["os_sandbox"]:
            timeout = float(message.get("timeout") or 60.0)
            lockdown.set_cpu_budget(timeout * max(1, os.cpu_count() or 1) + 10)
        self.in_trace = True
        try:
            return run_request(
                self.model,
                request,
                builtins=sandbox.make_builtins(),
                validate=sandbox.validate,
                on_log=sink.add,
                importer=sandbox.restricted_import,
            )
        finally:
            self.in_trace = False

    def _encode(self, result: Any) -> tuple[list[bytes | memoryview], Any]:
        """The result's encoded parts and its error (a replacement error if it cannot be sent)."""
        from ..protocol import ProtocolError, TraceErrorInfo, TraceResult, encode_result, encode_result_parts
        from .config import describe_bytes

        limit = self.settings["max_result_bytes"]
        try:
            parts = encode_result_parts(result)
        except ProtocolError as exc:
            result = TraceResult(
                logs=result.logs,
                error=TraceErrorInfo(
                    wire_name(ProtocolError), f"the trace's saved values cannot be sent back: {exc}", ""
                ),
            )
            parts = [encode_result(result)]
        except MemoryError:
            result = TraceResult(
                logs=result.logs,
                error=TraceErrorInfo(
                    wire_name(MemoryError),
                    "the result did not fit in the job's memory while being encoded; save fewer or smaller values",
                    "",
                ),
            )
            parts = [encode_result(result)]
        size = sum(memoryview(part).nbytes for part in parts)
        if size > limit:
            result = TraceResult(
                logs=result.logs,
                error=TraceErrorInfo(
                    wire_name(ResultTooLarge),
                    f"the result is {describe_bytes(size)}, over this server's limit of {describe_bytes(limit)}; "
                    "save fewer or smaller values (slice tensors before .save()), or ask the operator to raise "
                    "--max-result-mb",
                    "",
                ),
            )
            parts = [encode_result(result)]
        return parts, result.error


def _is_out_of_memory(error: Any) -> bool:
    if error.type_name == "MemoryError":
        return True
    message = error.message.lower()
    return error.type_name in ("RuntimeError", "OutOfMemoryError") and (
        "can't allocate memory" in message or "out of memory" in message
    )


def _memory_message(settings: dict[str, Any]) -> str:
    from .config import describe_bytes

    return (
        f"the job ran out of memory: each job may use about {describe_bytes(settings['max_job_memory_bytes'])} "
        "beyond the loaded model (server setting --max-job-memory-mb); use smaller tensors or batches"
    )


class _LogSink:
    """The lines a job prints: streamed to the server as they come, capped in total size."""

    def __init__(self, worker: _Worker, job_id: str, limit: int) -> None:
        self.worker = worker
        self.job_id = job_id
        self.limit = limit
        self.used = 0
        self.kept: list[str] = []
        self.dropped = 0

    def add(self, line: str) -> None:
        if self.dropped:
            self.dropped += 1
            return
        size = len(line.encode("utf-8", "replace")) + 1
        if self.used + size > self.limit:
            self.dropped = 1
            note = (
                f"[nnsight-jupyter: output truncated; a job may print {self.limit} bytes (server setting --max-log-kb)]"
            )
            self.kept.append(note)
            self.worker.post({"ev": "log", "job_id": self.job_id, "line": note})
            return
        self.used += size
        self.kept.append(line)
        self.worker.post({"ev": "log", "job_id": self.job_id, "line": line})

    def lines(self) -> list[str]:
        if self.dropped:
            return [*self.kept[:-1], self.kept[-1].replace("truncated", f"truncated, {self.dropped} lines dropped")]
        return list(self.kept)
