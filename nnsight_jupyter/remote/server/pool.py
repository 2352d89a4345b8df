"""The server's side of the workers: one replica thread per worker process, feeding it jobs.

Each served model has ``replicas`` replicas. A replica owns one worker process (``worker.py``)
and a thread that runs a small event loop over an inbox: messages from the worker (read by a
reader thread), "a job was queued" wake-ups, and cancellations. The thread takes the oldest
queued job of its model when its worker is ready (or while it loads, so the job shows
``loading``), sends it, relays printed lines into the job's events, and stores the result.

While a job runs, the replica enforces the limits the worker cannot enforce on itself:

- **time**: at the deadline it asks the worker to stop the job; if the job has not stopped
  ``cancel_grace_s`` later, the worker is killed and replaced;
- **memory**: the worker's resident size is checked a few times a second against its size after
  loading plus ``max_job_memory_bytes``; past it the worker is killed and replaced;
- **crashes**: a worker that dies mid-job fails that job with the exit status and is replaced.

A worker whose model fails to load is not retried (the reason is shown in ``GET /models`` and
given to that model's queued jobs); one that dies while loading is retried twice.

Blocking work (pipes, SQLite, result files) happens on these threads, never on the event loop.
"""

from __future__ import annotations

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
from .process import WorkerProcess
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
]
_MAX_LOAD_CRASHES = 3
_LOG_KEEP_BYTES = 256 * 1024


@dataclass
class _Running:
    job: Job
    deadline: float
    stop: str | None = None
    kill_at: float | None = None
    next_memory_check: float = 0.0
    logs: list[str] = field(default_factory=list)
    log_bytes: int = 0


class Replica:
    """One worker of one model, and the thread that drives it."""

    def __init__(self, pool: WorkerPool, spec: ModelSpec, index: int) -> None:
        self.pool = pool
        self.spec = spec
        self.label = f"{spec.name}#{index}"
        self.inbox: queue.Queue[tuple] = queue.Queue()
        self.state = "starting"
        self.reason: str | None = None
        self.worker: WorkerProcess | None = None
        self.job: Job | None = None
        self.running: _Running | None = None
        self.lockdown: dict[str, list[str]] | None = None
        self.rss_limit: int | None = None
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
            if self.worker is not None:
                self.worker.send({"op": "stop"})
                self.worker.process.join(timeout=1)
                self.worker.kill()

    def _spawn(self) -> None:
        self.state = "loading"
        self.rss_limit = None
        self.worker = WorkerProcess(self)

    def _replace(self, why: str) -> None:
        log.warning("replacing worker %s (pid %s): %s", self.label, self.worker.pid if self.worker else "-", why)
        if self.worker is not None:
            self.worker.kill()
        self.restarts += 1
        self._spawn()

    # ----- taking jobs -----------------------------------------------------------------------------
    def _maybe_claim(self) -> None:
        if self.job is not None:
            return
        if self.state == "failed":
            if not self.pool.model_alive(self.spec.name):
                self.pool.fail_queued(self.spec.name, self.reason or "the model failed to load")
            return
        if self.state not in ("ready", "loading"):
            return
        ready = self.state == "ready"
        if not ready and any(
            r is not self and r.state == "ready" and r.job is None for r in self.pool.replicas[self.spec.name]
        ):
            return
        if not self.pool.jobs.has_queued(self.spec.name):
            return
        job = self.pool.jobs.claim(self.spec.name, ready=ready, worker=self.label)
        if job is None:
            return
        self.job = job
        if ready:
            self._dispatch()

    def _dispatch(self) -> None:
        job = self.job
        if job is None or self.worker is None:
            return
        body = self.pool.jobs.request_body(job.id)
        if body is None:
            self._finish_error(ServerError, "the job's request was not found in the queue", store=True)
            return
        self.state = "busy"
        self.running = _Running(job=job, deadline=time.monotonic() + job.timeout_s)
        if not self.worker.send({"op": "run", "job_id": job.id, "request": body, "timeout": job.timeout_s}):
            self.inbox.put(("exit", self.worker, "the pipe to the worker is closed"))

    # ----- events --------------------------------------------------------------------------------------
    def _handle(self, item: tuple) -> None:
        kind = item[0]
        if kind == "wake":
            return
        if kind == "cancel":
            self._cancel(item[1], item[2])
            return
        worker = item[1]
        if worker is not self.worker:
            return
        if kind == "exit":
            self._on_exit(item[2])
            return
        message = item[2]
        event = message.get("ev")
        if event == "ready":
            self.state = "ready"
            self.reason = None
            self.load_crashes = 0
            lockdown = message.get("lockdown")
            self.lockdown = lockdown if isinstance(lockdown, dict) else None
            rss = worker.rss()
            if rss > 0:
                self.rss_limit = rss + self.pool.config.max_job_memory_bytes
            if self.job is not None and self.running is None:
                if self.pool.jobs.mark_running(self.job.id, worker=self.label):
                    self._dispatch()
                else:
                    self.job = None
        elif event == "failed":
            self.state = "failed"
            self.reason = f"loading {self.spec.spec!r} failed: {str(message.get('reason'))[:2000]}"
            log.error("model %s: %s", self.spec.name, self.reason)
            if self.job is not None:
                self._finish_error(ModelLoadError, self.reason, store=True)
        elif event == "log":
            running = self.running
            if running is not None and message.get("job_id") == running.job.id:
                line = str(message.get("line", ""))[:65536]
                self.pending_logs.append(("log", {"line": line}))
                if running.log_bytes < _LOG_KEEP_BYTES:
                    running.logs.append(line)
                    running.log_bytes += len(line) + 1
        elif event == "done":
            self._on_done(message)
        elif event == "loading":
            self.state = "loading"

    def _flush_logs(self) -> None:
        if self.pending_logs and self.running is not None:
            self.pool.jobs.add_events(self.running.job.id, self.pending_logs)
        self.pending_logs = []

    def _on_done(self, message: dict[str, Any]) -> None:
        running = self.running
        if running is None or message.get("job_id") != running.job.id:
            return
        self._flush_logs()
        data = message.get("result")
        stopped = message.get("stopped")
        error = message.get("error")
        if running.stop == "cancelled" or stopped == "cancelled":
            self._finish_cancelled()
        elif running.stop == "timeout" or stopped == "timeout":
            self._finish_error(TimeoutError, self._timeout_message(running.job), store=True)
        elif (
            not isinstance(data, (bytes, bytearray, mmap.mmap)) or len(data) > self.pool.config.max_result_bytes + 2**20
        ):
            self._finish_error(ServerError, "the worker sent a malformed result; it was replaced", store=True)
            self._replace("it sent a malformed result")
            return
        else:
            err = None
            if isinstance(error, list) and len(error) == 3 and all(isinstance(e, str) for e in error):
                err = (error[0], error[1], error[2])
            self.pool.results.put(running.job.id, data, later=self.pool.config.result_write_delay_s)
            self.pool.jobs.finish(
                running.job.id,
                "error" if err else "completed",
                result_bytes=len(data),
                ttl_s=self.pool.config.result_ttl_s,
                error=err,
            )
            self.jobs_done += 1
            self.job = None
            self.running = None
        if self.state == "busy":
            self.state = "ready"
        restart = message.get("restart")
        if restart:
            self._replace(f"a job changed the model: {restart}")

    def _on_exit(self, why: str) -> None:
        description = self.worker.describe_exit() if self.worker is not None else why
        if self.running is not None:
            running = self.running
            self._flush_logs()
            if running.stop == "cancelled":
                self._finish_cancelled()
            else:
                hint = "If this repeats, the job may be crashing native code (e.g. an invalid tensor operation)."
                if "SIGSEGV" in description or "SIGBUS" in description:
                    hint = (
                        "The model's weights are read-only on this server, so writing to them (e.g. "
                        "`weight.data.zero_()`) ends the worker this way; change activations instead "
                        "(`module.output = ...`), or the job crashed native code."
                    )
                self._finish_error(
                    WorkerDied,
                    f"the worker process running this job died ({description}); the server replaced it. {hint}",
                    store=True,
                )
            self._replace(f"it died while running a job ({description})")
            return
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
        self._replace(f"it exited ({description})")

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
            if self.worker is not None:
                self.worker.send({"op": "cancel", "job_id": job_id, "reason": "cancelled"})

    def _watch(self) -> None:
        running = self.running
        if running is None:
            return
        now = time.monotonic()
        if running.stop is None and now >= running.deadline:
            running.stop = "timeout"
            running.kill_at = now + self.pool.config.cancel_grace_s
            if self.worker is not None:
                self.worker.send({"op": "cancel", "job_id": running.job.id, "reason": "timeout"})
        if running.kill_at is not None and now >= running.kill_at:
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
            self._replace("a job did not stop when asked")
            return
        if self.rss_limit is not None and self.worker is not None and now >= running.next_memory_check:
            running.next_memory_check = now + 0.2
            rss = self.worker.rss()
            if rss > self.rss_limit:
                limit = describe_bytes(self.pool.config.max_job_memory_bytes)
                self._finish_error(
                    MemoryLimitExceeded,
                    f"the job used {describe_bytes(rss)} in its worker, over the limit of the loaded model plus "
                    f"{limit} per job (server setting --max-job-memory-mb); use smaller tensors or batches. "
                    "Its worker was replaced.",
                    store=True,
                )
                self._replace("a job went over the memory limit")

    # ----- finishing -----------------------------------------------------------------------------------
    def _timeout_message(self, job: Job) -> str:
        limit = self.pool.config.max_job_seconds
        return (
            f"the job ran longer than its time limit of {job.timeout_s:g} s (this server allows at most "
            f"{limit:g} s per job, --max-job-seconds; the request's `timeout` option can lower it)"
        )

    def _finish_error(self, kind: type[BaseException], message: str, *, store: bool) -> None:
        type_name = wire_name(kind)
        job = self.job
        logs = self.running.logs if self.running is not None else []
        self.job = None
        self.running = None
        if self.state == "busy":
            self.state = "ready"
        if job is None:
            return
        size = None
        if store:
            data = encode_result(TraceResult(logs=logs, error=TraceErrorInfo(type_name, message, "")))
            self.pool.results.put(job.id, data)
            size = len(data)
        self.pool.jobs.finish(
            job.id, "error", result_bytes=size, ttl_s=self.pool.config.result_ttl_s, error=(type_name, message, "")
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
        worker = self.worker
        return {
            "replica": self.label,
            "state": self.state,
            "reason": self.reason,
            "pid": worker.pid if worker is not None else None,
            "job": self.job.id if self.job is not None else None,
            "jobs_done": self.jobs_done,
            "restarts": self.restarts,
            "sandbox": self.lockdown,
        }


class WorkerPool:
    """All replicas of all served models."""

    def __init__(self, config: ServerConfig, jobs: JobStore, results: ResultStore) -> None:
        self.config = config
        self.jobs = jobs
        self.results = results
        self.context = multiprocessing.get_context(config.start_method)
        if config.start_method == "forkserver":
            factories = [m.spec.partition(":")[0] for m in config.models if m.is_factory]
            self.context.set_forkserver_preload(_PRELOAD + factories)
        self.stopping = threading.Event()
        self.replicas: dict[str, list[Replica]] = {
            spec.name: [Replica(self, spec, i) for i in range(config.replicas)] for spec in config.models
        }
        self._failed_lock = threading.Lock()

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
                self.results.put(job_id, data)
                self.jobs.finish(
                    job_id,
                    "error",
                    result_bytes=len(data),
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
