"""The server's side of the workers: one replica thread per model process, feeding its job processes.

Each served model has ``replicas`` replicas. A replica owns one loader process (``worker.py``),
which loads the model and forks *job processes* on request, and a thread that runs a small event
loop over an inbox: messages from the loader and the job processes (read by reader threads, see
``process.py``), "a job was queued" wake-ups, and cancellations. The thread takes the next queued
job of its model (``JobStore.claim``: round-robin over users), hands it to a job process of that
job's user, relays printed lines into the job's events, and stores the result.

One user per job process
    A job process runs the jobs of one user only. The replica keeps the job processes of its
    ``user_workers`` most recent users (each still holding only that user's leftovers) and one
    spare, a fresh fork that no job has used, warmed up in advance. A job from a user without a
    job process gets the spare (and a new spare is forked); the least recent user's process is
    ended when there are too many. A job process that a job changed (``restart``), that died, or
    that went over a limit is ended and never runs another job.

While a job runs, the replica enforces the limits the job process cannot enforce on itself:

- **time**: at the deadline it asks the job process to stop the job; if the job has not stopped
  ``cancel_grace_s`` later, the job process is killed;
- **memory**: the job process's resident size is checked a few times a second against its size
  once warmed up plus ``max_job_memory_bytes``; past it the process is killed;
- **crashes**: a job process that dies mid-job fails that job with the exit status (which the
  loader, its parent, reports).

A loader whose model fails to load is not retried (the reason is shown in ``GET /models`` and
given to that model's queued jobs); one that dies while loading is retried twice; one that dies
later is restarted (its job processes die with it).

Blocking work (pipes, SQLite, result files) happens on these threads, never on the event loop.
"""

from __future__ import annotations

import collections
import logging
import mmap
import multiprocessing
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ...errors import MemoryLimitExceeded, ModelLoadError, ServerError, WorkerDied, wire_name
from ..protocol import TraceErrorInfo, TraceResult, encode_result
from .config import ModelSpec, ServerConfig, describe_bytes
from .jobs import Job, JobStore
from .process import JobProcess, LoaderProcess, describe_status
from .redact import Redactor
from .store import ResultStore

__all__ = ["WorkerPool"]

log = logging.getLogger("nnsight_jupyter.server")

_PRELOAD = [
    "torch",
    "numpy",
    "transformers",
    "transformers.modeling_utils",
    "transformers.generation.utils",
    "nnsight_jupyter.models.language",
    "nnsight_jupyter.remote.execute",
    "nnsight_jupyter.remote.server.worker",
    "nnsight_jupyter.remote.server.lockdown",
    "nnsight_jupyter.remote.server.integrity",
    "nnsight_jupyter.remote.server.globalstate",
]
_MAX_LOAD_CRASHES = 3
_LOG_KEEP_BYTES = 256 * 1024
_EXIT_REPORT_WAIT_S = 2.0


@dataclass
class _Running:
    job: Job
    process: JobProcess
    deadline: float
    dispatched: float = 0.0
    dispatched_wall: float = 0.0
    stop: str | None = None
    kill_at: float | None = None
    died: str | None = None
    died_at: float | None = None
    next_memory_check: float = 0.0
    logs: list[str] = field(default_factory=list)
    log_bytes: int = 0


class Replica:
    """One loader of one model, its job processes, and the thread that drives them."""

    def __init__(self, pool: WorkerPool, spec: ModelSpec, index: int) -> None:
        self.pool = pool
        self.spec = spec
        self.label = f"{spec.name}#{index}"
        self.inbox: queue.Queue[tuple] = queue.Queue()
        self.state = "starting"
        self.reason: str | None = None
        self.loader: LoaderProcess | None = None
        self.users: collections.OrderedDict[str, JobProcess] = collections.OrderedDict()
        self.spare: JobProcess | None = None
        self.forking = False
        self.job: Job | None = None
        self.running: _Running | None = None
        self.exit_codes: dict[int, int | None] = {}
        self.lockdown: dict[str, list[str]] | None = None
        self.load_crashes = 0
        self.restarts = 0
        self.jobs_done = 0
        self.pending_logs: list[tuple[str, dict[str, Any]]] = []
        self.thread = threading.Thread(target=self._main, name=f"nnsj-replica-{self.label}", daemon=True)

    # ----- the thread ----------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            self._spawn()
            while not self.pool.stopping.is_set():
                self._maybe_claim()
                try:
                    items = [self.inbox.get(timeout=0.1 if self.running else 1.0)]
                except queue.Empty:
                    items = []
                while items and len(items) < 512:
                    try:
                        items.append(self.inbox.get_nowait())
                    except queue.Empty:
                        break
                for item in items:
                    self._handle(item)
                self._flush_logs()
                if self.running is not None:
                    self._watch()
        except Exception:
            log.exception("replica %s failed; its model stops taking jobs", self.label)
            self.state, self.reason = "failed", "internal error in the server's replica thread (see the server log)"
        finally:
            for process in self._processes():
                process.kill()
            if self.loader is not None:
                self.loader.send({"op": "stop"})
                self.loader.process.join(timeout=1)
                self.loader.kill()

    def _processes(self) -> list[JobProcess]:
        processes = list(self.users.values())
        if self.spare is not None:
            processes.append(self.spare)
        if self.running is not None and self.running.process not in processes:
            processes.append(self.running.process)
        return processes

    def _spawn(self) -> None:
        self.state = "loading"
        self.forking = False
        self.loader = LoaderProcess(self)

    def _restart_loader(self, why: str) -> None:
        log.warning(
            "restarting the loader of %s (pid %s): %s", self.label, self.loader.pid if self.loader else "-", why
        )
        for process in self._processes():
            process.kill()
        self.users.clear()
        self.spare = None
        if self.loader is not None:
            self.loader.kill()
        self._spawn()

    def _retire(self, process: JobProcess, why: str) -> None:
        """End a job process for good: it never runs another job."""
        log.info("ending job process %s of %s: %s", process.pid, self.label, why)
        if process is self.spare:
            self.spare = None
        for owner, candidate in list(self.users.items()):
            if candidate is process:
                del self.users[owner]
        process.kill()
        self._ensure_spare()

    def _ensure_spare(self) -> None:
        if self.spare is None and not self.forking and self.state in ("ready", "busy") and self.loader is not None:
            if self.loader.send({"op": "fork"}):
                self.forking = True

    # ----- taking jobs -----------------------------------------------------------------------------
    def _available(self, owner: str) -> bool:
        """Whether a job of ``owner`` could start now."""
        if self.state not in ("ready", "busy"):
            return False
        process = self.users.get(owner)
        if process is not None:
            return process.ready
        return self.spare is not None and self.spare.ready

    def _process_for(self, owner: str) -> JobProcess | None:
        """The job process that runs ``owner``'s job: theirs, or the spare, which becomes theirs."""
        process = self.users.get(owner)
        if process is not None:
            self.users.move_to_end(owner)
            return process if process.ready else None
        spare = self.spare
        if spare is None or not spare.ready:
            return None
        self.spare = None
        spare.owner = owner
        self.users[owner] = spare
        while len(self.users) > self.pool.config.user_workers:
            _, oldest = self.users.popitem(last=False)
            oldest.kill()
        self._ensure_spare()
        return spare

    def _maybe_claim(self) -> None:
        if self.job is not None:
            return
        if self.state == "failed":
            if not self.pool.model_alive(self.spec.name):
                self.pool.fail_queued(self.spec.name, self.reason or "the model failed to load")
            return
        if self.state not in ("ready", "loading"):
            return
        if self.state == "loading" and any(
            r is not self and r.state == "ready" and r.job is None for r in self.pool.replicas[self.spec.name]
        ):
            return
        if not self.pool.jobs.has_queued(self.spec.name):
            return
        job = self.pool.jobs.claim(self.spec.name, ready=self._available, worker=self.label)
        if job is None:
            return
        self.job = job
        if job.status == "running":
            self._dispatch()

    def _dispatch(self) -> None:
        job = self.job
        if job is None or self.running is not None:
            return
        process = self._process_for(job.owner)
        if process is None:
            return
        body = self.pool.jobs.request_body(job.id)
        if body is None:
            self._finish_error(ServerError, "the job's request was not found in the queue", store=True)
            return
        self.state = "busy"
        self.running = _Running(job=job, process=process, deadline=time.monotonic() + job.timeout_s)
        self.running.dispatched_wall = time.time()
        self.running.dispatched = time.monotonic()
        if not process.send({"op": "run", "job_id": job.id, "request": body, "timeout": job.timeout_s}):
            self.inbox.put(("exit", process, "the socket to the job process is closed"))

    def _start_waiting_job(self) -> None:
        """A job process became available: start the claimed job that waits for one, if any."""
        job = self.job
        if job is None or self.running is not None or not self._available(job.owner):
            return
        if job.status == "loading":
            if not self.pool.jobs.mark_running(job.id, worker=self.label):
                self.job = None
                return
        self._dispatch()

    # ----- events --------------------------------------------------------------------------------------
    def _handle(self, item: tuple) -> None:
        kind = item[0]
        if kind == "wake":
            return
        if kind == "cancel":
            self._cancel(item[1], item[2])
            return
        if kind in ("loader", "loader-exit", "child"):
            if item[1] is not self.loader:
                if kind == "child":
                    item[2].kill()
                return
            if kind == "loader":
                self._on_loader_message(item[2])
            elif kind == "loader-exit":
                self._on_loader_exit(item[2])
            else:
                self.forking = False
                if item[2].gone:  # it died before it was announced
                    self._ensure_spare()
                    return
                self.spare = item[2]
                if self.spare.ready:
                    self._start_waiting_job()
            return
        process: JobProcess = item[1]
        if kind == "exit":
            self._on_process_exit(process, item[2])
            return
        message = item[2]
        event = message.get("ev")
        if event == "ready":
            # Its reader thread starts before the loader's reader announces it ("child"), so
            # this may arrive first: the flag is kept on the process either way.
            process.ready = True
            rss = process.rss()
            if rss > 0:
                process.rss_limit = rss + self.pool.config.max_job_memory_bytes
            if process is self.spare:
                self._start_waiting_job()
            return
        running = self.running
        if running is None or running.process is not process:
            return
        if event == "log":
            if message.get("job_id") == running.job.id:
                line = str(message.get("line", ""))[:65536]
                self.pending_logs.append(("log", {"line": line}))
                if running.log_bytes < _LOG_KEEP_BYTES:
                    running.logs.append(line)
                    running.log_bytes += len(line) + 1
        elif event == "done":
            self._on_done(message)

    def _on_loader_message(self, message: dict[str, Any]) -> None:
        event = message.get("ev")
        if event == "ready":
            self.state = "ready"
            self.reason = None
            self.load_crashes = 0
            lockdown = message.get("lockdown")
            self.lockdown = lockdown if isinstance(lockdown, dict) else None
            self._ensure_spare()
        elif event == "failed":
            self.state = "failed"
            self.reason = f"loading {self.spec.spec!r} failed: {str(message.get('reason'))[:2000]}"
            log.error("model %s: %s", self.spec.name, self.reason)
            if self.job is not None:
                self._finish_error(ModelLoadError, self.reason, store=True)
        elif event == "exited":
            pid, code = message.get("pid"), message.get("code")
            if type(pid) is int and (code is None or type(code) is int):
                self._on_exit_code(pid, code)
        elif event == "loading":
            self.state = "loading"

    def _flush_logs(self) -> None:
        if self.pending_logs and self.running is not None:
            self.pool.jobs.add_events(self.running.job.id, self.pending_logs)
        self.pending_logs = []

    def _on_done(self, message: dict[str, Any]) -> None:
        running = self.running
        data = message.get("result")
        if running is None or message.get("job_id") != running.job.id:
            self.pool.results.discard(data)
            return
        arrived = time.monotonic()
        self._flush_logs()
        process = running.process
        stopped = message.get("stopped")
        error = message.get("error")
        cancelled = running.stop == "cancelled" or stopped == "cancelled"
        timed_out = running.stop == "timeout" or stopped == "timeout"
        malformed = (
            not isinstance(data, (bytes, bytearray, mmap.mmap)) or len(data) > self.pool.config.max_result_bytes + 2**20
        )
        if cancelled or timed_out or malformed:
            self.pool.results.discard(data)
        if cancelled:
            self._finish_cancelled()
        elif timed_out:
            self._finish_error(TimeoutError, self._timeout_message(running.job), store=True)
        elif malformed:
            self._finish_error(ServerError, "the worker sent a malformed result; it was replaced", store=True)
            self._retire(process, "it sent a malformed result")
            return
        else:
            err = None
            if isinstance(error, list) and len(error) == 3 and all(isinstance(e, str) for e in error):
                err = (error[0], error[1], error[2])
            try:
                kept = self.pool.results.put(running.job.id, data)
            except OSError as exc:
                self.pool.results.discard(data)
                self._finish_error(ServerError, f"the server could not store the job's result: {exc}", store=False)
            else:
                self.pool.jobs.finish(
                    running.job.id,
                    "error" if err else "completed",
                    result_bytes=len(data),
                    result=kept,
                    ttl_s=self.pool.config.result_ttl_s,
                    error=err,
                    timings=_timings(running, message.get("timings"), arrived),
                )
                self.jobs_done += 1
                process.jobs_done += 1
                self.job = None
                self.running = None
        if self.state == "busy":
            self.state = "ready"
        restart = message.get("restart")
        if restart:
            self.restarts += 1
            self._retire(process, f"a job changed the model: {restart}")

    def _on_process_exit(self, process: JobProcess, why: str) -> None:
        process.gone, process.ready = True, False
        running = self.running
        if running is not None and running.process is process:
            code = self.exit_codes.pop(process.pid, "unknown")
            running.died = why
            running.died_at = time.monotonic()
            self._retire(process, f"it died while running a job ({why})")
            if code != "unknown":
                self._finish_died(describe_status(code))  # type: ignore[arg-type]
            return
        if process is self.spare or process in self.users.values():
            self._retire(process, f"it exited ({why})")

    def _on_exit_code(self, pid: int, code: int | None) -> None:
        running = self.running
        if running is not None and running.process.pid == pid and running.died is not None:
            self._finish_died(describe_status(code))
            return
        if running is not None and running.process.pid == pid:
            self.exit_codes[pid] = code  # the end of its socket is still on its way
        if len(self.exit_codes) > 64:
            self.exit_codes.pop(next(iter(self.exit_codes)))

    def _finish_died(self, description: str) -> None:
        running = self.running
        if running is None:
            return
        self._flush_logs()
        if running.stop == "cancelled":
            self._finish_cancelled()
            return
        hint = "If this repeats, the job may be crashing native code (e.g. an invalid tensor operation)."
        if "SIGSEGV" in description or "SIGBUS" in description:
            hint = (
                "The model's weights are read-only on this server, so writing to them (e.g. "
                "`weight.data.zero_()`) ends the worker this way; change activations instead "
                "(`module.output = ...`), or the job crashed native code."
            )
        self.restarts += 1
        self._finish_error(
            WorkerDied,
            f"the worker process running this job died ({description}); the server replaced it. {hint}",
            store=True,
        )

    def _on_loader_exit(self, why: str) -> None:
        description = self.loader.describe_exit() if self.loader is not None else why
        if self.running is not None:
            self._finish_died(f"its model process ended: {description}")
        if self.state == "failed":
            return
        if self.state in ("loading", "starting"):
            self.load_crashes += 1
            if self.load_crashes >= _MAX_LOAD_CRASHES:
                self.state = "failed"
                self.reason = (
                    f"the worker died {self.load_crashes} times while loading {self.spec.spec!r} "
                    f"({description}); check the server log"
                )
                if self.job is not None:
                    self._finish_error(ModelLoadError, self.reason, store=True)
                return
        self._restart_loader(f"it exited ({description})")

    def _cancel(self, job_id: str, reason: str) -> None:
        if self.job is None or self.job.id != job_id:
            return
        running = self.running
        if running is None:
            self._finish_cancelled(reason)
            return
        if running.stop is None:
            running.stop = "cancelled"
            running.kill_at = time.monotonic() + self.pool.config.cancel_grace_s
            running.process.send({"op": "cancel", "job_id": job_id, "reason": "cancelled"})

    def _watch(self) -> None:
        running = self.running
        if running is None:
            return
        now = time.monotonic()
        if running.died_at is not None:
            if now - running.died_at > _EXIT_REPORT_WAIT_S:
                self._finish_died(f"it exited: {running.died}")
            return
        if running.stop is None and now >= running.deadline:
            running.stop = "timeout"
            running.kill_at = now + self.pool.config.cancel_grace_s
            running.process.send({"op": "cancel", "job_id": running.job.id, "reason": "timeout"})
        if running.kill_at is not None and now >= running.kill_at:
            process = running.process
            if running.stop == "cancelled":
                self._finish_cancelled()
            else:
                self._finish_error(
                    TimeoutError,
                    self._timeout_message(running.job)
                    + (
                        f" It did not stop within {self.pool.config.cancel_grace_s:g} s of being asked, so its worker "
                        "was replaced."
                    ),
                    store=True,
                )
            self.restarts += 1
            self._retire(process, "a job did not stop when asked")
            return
        process = running.process
        if process.rss_limit is not None and now >= running.next_memory_check:
            running.next_memory_check = now + 0.2
            rss = process.rss()
            if rss > process.rss_limit:
                limit = describe_bytes(self.pool.config.max_job_memory_bytes)
                self._finish_error(
                    MemoryLimitExceeded,
                    f"the job used {describe_bytes(rss)} in its worker, over the limit of the loaded model plus "
                    f"{limit} per job (server setting --max-job-memory-mb); use smaller tensors or batches. "
                    "Its worker was replaced.",
                    store=True,
                )
                self.restarts += 1
                self._retire(process, "a job went over the memory limit")

    # ----- finishing -----------------------------------------------------------------------------------
    def _timeout_message(self, job: Job) -> str:
        limit = self.pool.config.max_job_seconds
        return (
            f"the job ran longer than its time limit of {job.timeout_s:g} s (this server allows at most "
            f"{limit:g} s per job, --max-job-seconds; the request's `timeout` option can lower it)"
        )

    def _finish_error(self, kind: type[BaseException], message: str, *, store: bool) -> None:
        type_name = wire_name(kind)
        message = self.pool.redactor.text(message)
        job = self.job
        logs = self.running.logs if self.running is not None else []
        self.job = None
        self.running = None
        if self.state == "busy":
            self.state = "ready"
        if job is None:
            return
        size = kept = None
        if store:
            data = encode_result(TraceResult(logs=logs, error=TraceErrorInfo(type_name, message, "")))
            kept = self.pool.results.put(job.id, data)
            size = len(data)
        self.pool.jobs.finish(
            job.id,
            "error",
            result_bytes=size,
            result=kept,
            ttl_s=self.pool.config.result_ttl_s,
            error=(type_name, message, ""),
        )

    def _finish_cancelled(self, reason: str = "cancelled by the client") -> None:
        job = self.job
        self.job = None
        self.running = None
        if self.state == "busy":
            self.state = "ready"
        if job is not None:
            self.pool.jobs.finish(job.id, "cancelled", reason=reason)

    def describe(self) -> dict[str, Any]:
        loader = self.loader
        return {
            "replica": self.label,
            "state": self.state,
            "reason": self.reason,
            "pid": loader.pid if loader is not None else None,
            "job": self.job.id if self.job is not None else None,
            "jobs_done": self.jobs_done,
            "restarts": self.restarts,
            "job_processes": len(self.users) + (self.spare is not None),
            "sandbox": self.lockdown,
        }


def _timings(running: _Running, worker: Any, arrived: float) -> dict[str, float]:
    """Where a job's time went, in seconds, from the queue to the result arriving back in the server."""
    timings = {"queue": max(0.0, running.dispatched_wall - running.job.created)}
    if isinstance(worker, dict) and all(isinstance(v, (int, float)) for v in worker.values()):
        received, sent = worker.get("received"), worker.get("sent")
        if received is not None and sent is not None:
            timings["to_worker"] = received - running.dispatched
            timings["from_worker"] = arrived - sent
        for name in ("wait", "reset", "run", "check", "encode"):
            if name in worker:
                timings[name] = float(worker[name])
    return {name: round(value, 6) for name, value in timings.items()}


class WorkerPool:
    """All replicas of all served models."""

    def __init__(self, config: ServerConfig, jobs: JobStore, results: ResultStore) -> None:
        self.config = config
        self.jobs = jobs
        self.results = results
        self.redactor = Redactor.for_server(config)
        self.context = multiprocessing.get_context(config.start_method)
        if config.start_method == "forkserver":
            factories = [m.spec.partition(":")[0] for m in config.models if m.is_factory]
            self.context.set_forkserver_preload(_PRELOAD + factories)
        self.stopping = threading.Event()
        self.replicas: dict[str, list[Replica]] = {
            spec.name: [self._new_replica(spec, i) for i in range(config.replicas_for(spec.name))]
            for spec in config.models
        }
        self._failed_lock = threading.Lock()

    def _new_replica(self, spec: ModelSpec, index: int) -> Replica:
        """One replica of a served model, not started yet (an engine that runs replicas elsewhere makes its own)."""
        return Replica(self, spec, index)

    def worker_settings(self, spec: ModelSpec) -> dict[str, Any]:
        config = self.config
        protected = [str(config.data_dir.resolve())]
        if config.api_key_file is not None:
            protected.append(str(config.api_key_file.resolve()))
        return {
            "factory": spec.is_factory,
            "threads": config.worker_threads,
            "os_sandbox": config.os_sandbox,
            "protected": protected,
            "max_request_bytes": config.max_request_bytes,
            "max_result_bytes": config.max_result_bytes,
            "max_job_memory_bytes": config.max_job_memory_bytes,
            "max_log_bytes": config.max_log_bytes,
            "job_checks": config.job_checks,
        }

    def start(self) -> None:
        for replicas in self.replicas.values():
            for replica in replicas:
                replica.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self.stopping.set()
        for replicas in self.replicas.values():
            for replica in replicas:
                replica.inbox.put(("wake",))
        deadline = time.monotonic() + timeout
        for replicas in self.replicas.values():
            for replica in replicas:
                replica.thread.join(timeout=max(0.1, deadline - time.monotonic()))

    def wake(self, model: str) -> None:
        for replica in self.replicas.get(model, ()):
            replica.inbox.put(("wake",))

    def cancel(self, model: str, job_id: str, reason: str = "cancelled by the client") -> None:
        for replica in self.replicas.get(model, ()):
            replica.inbox.put(("cancel", job_id, reason))

    def model_alive(self, model: str) -> bool:
        return any(r.state != "failed" for r in self.replicas.get(model, ()))

    def fail_queued(self, model: str, reason: str) -> None:
        with self._failed_lock:
            for job_id in self.jobs.queued_ids(model):
                data = encode_result(TraceResult(error=TraceErrorInfo(wire_name(ModelLoadError), reason, "")))
                kept = self.results.put(job_id, data)
                self.jobs.finish(
                    job_id,
                    "error",
                    result_bytes=len(data),
                    result=kept,
                    ttl_s=self.config.result_ttl_s,
                    error=(wire_name(ModelLoadError), reason, ""),
                )

    def model_state(self, model: str) -> tuple[str, str | None]:
        """``(state, reason)``: ready if any replica can run jobs, loading if one is on its way, else failed."""
        replicas = self.replicas.get(model, [])
        states = {r.state for r in replicas}
        if states & {"ready", "busy"}:
            return "ready", None
        if states & {"loading", "starting"}:
            return "loading", None
        reasons = [r.reason for r in replicas if r.reason]
        return "failed", reasons[0] if reasons else "no replica is running"

    def describe(self) -> list[dict[str, Any]]:
        counts = self.jobs.counts()
        out = []
        for spec in self.config.models:
            state, reason = self.model_state(spec.name)
            pending = counts.get(spec.name, {})
            out.append(
                {
                    "name": spec.name,
                    "spec": spec.spec,
                    "state": state,
                    "reason": reason,
                    "queued": pending.get("queued", 0),
                    "running": pending.get("running", 0) + pending.get("loading", 0),
                    "replicas": [r.describe() for r in self.replicas[spec.name]],
                }
            )
        return out
