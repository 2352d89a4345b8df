"""The Ray engine: each replica of a served model is a Ray actor, placed anywhere on a Ray cluster.

``--engine ray`` swaps ``pool.WorkerPool`` for :class:`RayEngine`; routes, queue, results and the
wire format do not change. The server keeps the queue and results in its SQLite store and hands
jobs out one at a time, so a restarted server resumes as before (``JobStore.recover``).

Inside each actor, the same sandbox
    A :class:`ReplicaHost` actor runs one ``pool.Replica`` unchanged: the loader process that loads
    the model and applies the lockdown, the per-user job processes it forks, the time and memory
    limits and the after-job checks. Only its queue is replaced: the actor is handed one job at a
    time by the server (:class:`_HandedJobs`) and gives the outcome back instead of writing it to
    SQLite. Reusing the replica rather than writing an actor-shaped copy keeps every rule and
    every escape test identical on both engines; what it costs is one Ray call per job (about a
    millisecond on one machine, see ``benchmarks/remote.py``) and a loader process beside each
    actor's own.

The server's side
    One :class:`RayReplica` thread per replica claims the next job of its model when its actor is
    ready, calls ``run`` on the actor, streams the job's printed lines into its events while it
    runs, and stores the outcome. Replicas ask Ray for ``replica_cpus`` CPUs and
    ``replica_memory_bytes`` of memory, so Ray places each on a machine with room for the model.

Faults
    An actor that dies (killed, out of memory, its machine lost) surfaces as ``RayActorError`` on
    the pending call: the replica starts a new actor, and the job goes back to the front of the
    queue to run once more, or fails with ``WorkerDied`` naming what happened if it had already
    been run again. A job whose actor stops answering is failed the same way once its time limit
    and the grace period have passed, so no job stays ``running`` for good.

Scaling and memory
    A model whose oldest queued job has waited longer than ``scale_up_wait_s`` gets another
    replica, up to ``max_replicas``; replicas added this way stop after ``idle_replica_s``
    without a job. Models unused for ``unload_after_s``, or the least recently used ones when
    the loaded replicas' memory exceeds ``memory_budget_bytes``, are unloaded; their next job
    shows ``loading`` while a replica loads the model again.
"""

from __future__ import annotations

import dataclasses
import logging
import mmap
import multiprocessing
import os
import queue
import socket
import threading
import time
from typing import Any

from ...errors import ModelLoadError, ServerError, WorkerDied, wire_name
from ..codec.memory import fresh_buffer
from ..protocol import TraceErrorInfo, TraceResult, encode_result
from .config import ModelSpec, ServerConfig
from .jobs import Job, JobStore
from .pool import _PRELOAD, Replica, WorkerPool
from .redact import Redactor
from .store import ResultStore

__all__ = ["RayEngine", "RayReplica", "ReplicaHost"]

log = logging.getLogger("nnsight_jupyter.server")

_ANSWER_GRACE_S = 30.0
"""How long past a job's time limit and cancel grace an actor may stay silent before it is replaced."""
_MAX_LOAD_FAILURES = 3
MANAGE_INTERVAL_S = 0.2
"""How often the engine looks at queues and idle replicas to add, stop, unload and load replicas."""


# ----- inside the actor ---------------------------------------------------------------------------------
class _HandedJobs:
    """The queue a ``pool.Replica`` sees inside an actor: the one job the server handed over.

    It offers the ``JobStore`` methods the replica calls and keeps what it reports (printed
    lines, the result, the final state) for the server to collect.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pending: Job | None = None
        self.bodies: dict[str, bytes] = {}
        self.logs: dict[str, list[str]] = {}
        self.results: dict[str, bytes] = {}
        self.outcomes: dict[str, dict[str, Any]] = {}
        self.finished: dict[str, threading.Event] = {}

    def hand(self, job: Job, body: bytes) -> threading.Event:
        with self.lock:
            self.pending = job
            self.bodies[job.id] = body
            self.logs[job.id] = []
            event = self.finished[job.id] = threading.Event()
        return event

    def has_queued(self, model: str) -> bool:
        return self.pending is not None

    def claim(self, model: str, *, ready: Any, worker: str) -> Job | None:
        with self.lock:
            job, self.pending = self.pending, None
        if job is None:
            return None
        start = ready(job.owner) if callable(ready) else ready
        return dataclasses.replace(job, status="running" if start else "loading")

    def mark_running(self, job_id: str, *, worker: str) -> bool:
        return job_id in self.finished and not self.finished[job_id].is_set()

    def request_body(self, job_id: str) -> bytes | None:
        return self.bodies.get(job_id)

    def add_events(self, job_id: str, events: Any) -> None:
        with self.lock:
            lines = self.logs.get(job_id)
            if lines is not None:
                lines.extend(str(data.get("line", "")) for kind, data in events if kind == "log")

    def take_logs(self, job_id: str) -> list[str]:
        with self.lock:
            lines = self.logs.get(job_id) or []
            if job_id in self.logs:
                self.logs[job_id] = []
        return lines

    def finish(
        self,
        job_id: str,
        status: str,
        *,
        result_bytes: int | None = None,
        result: bytes | None = None,
        ttl_s: float | None = None,
        error: tuple[str, str, str] | None = None,
        reason: str | None = None,
        timings: dict[str, float] | None = None,
    ) -> bool:
        with self.lock:
            event = self.finished.get(job_id)
            if event is None or event.is_set():
                return False
            self.outcomes[job_id] = {
                "status": status,
                "error": list(error) if error else None,
                "reason": reason,
                "timings": timings,
            }
            self.bodies.pop(job_id, None)
        event.set()
        return True

    def collect(self, job_id: str) -> dict[str, Any]:
        with self.lock:
            outcome = self.outcomes.pop(job_id)
            outcome["result"] = self.results.pop(job_id, None)
            outcome["logs"] = self.logs.pop(job_id, [])
            self.finished.pop(job_id, None)
        return outcome

    def queued_ids(self, model: str) -> list[str]:
        return []


class _HandedResults:
    """The result store a ``pool.Replica`` sees inside an actor: results go back to the server."""

    def __init__(self, jobs: _HandedJobs) -> None:
        self.jobs = jobs

    def receiver(self, size: int) -> bytearray | mmap.mmap:
        return fresh_buffer(size)

    def discard(self, data: object) -> None:
        """Nothing to remove: a result received here lives only in memory."""

    def put(self, job_id: str, data: Any) -> None:
        with self.jobs.lock:
            self.jobs.results[job_id] = bytes(memoryview(data))


class _HostPool(WorkerPool):
    """The ``WorkerPool`` a replica inside an actor belongs to: one replica, fed by the server."""

    def __init__(self, config: ServerConfig, spec: ModelSpec, index: int, settings: dict[str, Any]) -> None:
        self.config = config
        self.handed = _HandedJobs()
        self.jobs = self.handed  # type: ignore[assignment]
        self.results = _HandedResults(self.handed)  # type: ignore[assignment]
        self.redactor = Redactor.for_server(config)
        self.context = multiprocessing.get_context(config.start_method)
        if config.start_method == "forkserver":
            self.context.set_forkserver_preload(_PRELOAD + ([spec.spec.partition(":")[0]] if spec.is_factory else []))
        self.stopping = threading.Event()
        self.settings = settings
        self.replicas = {spec.name: [Replica(self, spec, index)]}
        self._failed_lock = threading.Lock()

    def worker_settings(self, spec: ModelSpec) -> dict[str, Any]:
        return self.settings

    def fail_queued(self, model: str, reason: str) -> None:
        """Nothing is queued here; the server fails its queued jobs itself."""


class ReplicaHost:
    """The body of a replica's Ray actor: a ``pool.Replica`` (loader, job processes, limits) for one model.

    Ray runs its methods on a few threads (``max_concurrency``), so ``logs``, ``cancel`` and
    ``describe`` answer while ``run`` waits for a job.
    """

    def __init__(self, config: ServerConfig, spec: ModelSpec, index: int, settings: dict[str, Any]) -> None:
        self.pool = _HostPool(config, spec, index, settings)
        self.replica = self.pool.replicas[spec.name][0]
        self.replica.thread.start()

    def describe(self) -> dict[str, Any]:
        info = self.replica.describe()
        info["spare_ready"] = bool(self.replica.spare is not None and self.replica.spare.ready)
        info["actor_pid"] = os.getpid()
        return info

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        """The replica's description once its model is loaded and a job process waits (or loading failed)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.describe()
            if info["state"] == "failed" or (info["state"] in ("ready", "busy") and info["spare_ready"]):
                return info
            time.sleep(0.02)
        return self.describe()

    def run(self, fields: dict[str, Any], body: bytes) -> dict[str, Any]:
        """Run one job as the single-machine server would; returns its outcome and result bytes."""
        job = Job(**fields)
        if self.replica.state == "failed":
            reason = self.replica.reason or "the model failed to load"
            return {
                "status": "error",
                "error": [wire_name(ModelLoadError), reason, ""],
                "reason": None,
                "timings": None,
                "result": None,
                "logs": [],
            }
        finished = self.pool.handed.hand(job, body)
        self.replica.inbox.put(("wake",))
        finished.wait()
        return self.pool.handed.collect(job.id)

    def logs(self, job_id: str) -> list[str]:
        return self.pool.handed.take_logs(job_id)

    def cancel(self, job_id: str, reason: str) -> None:
        self.replica.inbox.put(("cancel", job_id, reason))

    def shutdown(self) -> None:
        """Stop the loader and its job processes (the actor itself is then killed by the server)."""
        self.pool.stop(timeout=5.0)


# ----- the server's side -----------------------------------------------------------------------------------
class RayReplica:
    """One replica as the server sees it: a Ray actor and the thread that feeds it jobs."""

    def __init__(self, engine: RayEngine, spec: ModelSpec, index: int, *, extra: bool = False) -> None:
        self.engine = engine
        self.spec = spec
        self.index = index
        self.label = f"{spec.name}#{index}"
        self.extra = extra
        self.inbox: queue.Queue[tuple] = queue.Queue()
        self.state = "starting"
        self.reason: str | None = None
        self.actor: Any = None
        self.ready_ref: Any = None
        self.info: dict[str, Any] = {}
        self.job: Job | None = None
        self.jobs_done = 0
        self.restarts = 0
        self.load_failures = 0
        self.last_used = time.monotonic()
        self.unloaded = False
        self.retired = threading.Event()
        self.thread = threading.Thread(target=self._main, name=f"nnsj-ray-{self.label}", daemon=True)

    # ----- the thread ---------------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            while not self.engine.stopping.is_set() and not self.retired.is_set():
                if self.actor is None and not self.unloaded and self.state != "failed":
                    self._start_actor()
                if self.ready_ref is not None:
                    self._check_loaded()
                self._maybe_claim()
                if self.job is not None and self.state == "ready":
                    self._run()
                    continue
                try:
                    item = self.inbox.get(timeout=0.05 if self.ready_ref is not None else 0.5)
                except queue.Empty:
                    continue
                if item[0] == "cancel":
                    self._cancel_waiting(item[1], item[2])
                elif item[0] in ("unload", "retire") and self.job is None and self.state != "busy":
                    self._stop_actor()
                    if item[0] == "retire":
                        self.retired.set()
                    else:
                        self.unloaded, self.state, self.info = True, "unloaded", {}
                        log.info("replica %s: model unloaded (%s)", self.label, item[1])
                elif item[0] == "load" and self.unloaded:
                    self.unloaded = False
        except Exception:
            log.exception("replica %s failed; its model stops taking jobs", self.label)
            self.state, self.reason = "failed", "internal error in the server's replica thread (see the server log)"
        finally:
            self._stop_actor()
            if self.retired.is_set():
                self.engine.forget(self)

    def _start_actor(self) -> None:
        import ray

        engine = self.engine
        options = {
            "num_cpus": engine.config.replica_cpus,
            "memory": engine.config.replica_memory_bytes,
            "max_concurrency": 8,
            "max_restarts": 0,
            "max_task_retries": 0,
        }
        self.state, self.reason, self.info = "loading", None, {}
        self.actor = (
            ray.remote(ReplicaHost)
            .options(**options)
            .remote(engine.host_config, self.spec, self.index, engine.worker_settings(self.spec))
        )
        self.ready_ref = self.actor.wait_ready.remote(30.0)
        log.info("replica %s: started a Ray actor", self.label)

    def _stop_actor(self, *, graceful: bool = True) -> None:
        """End the actor: asked to stop its loader and job processes first unless it no longer answers
        (they die with it either way: they are its children, set to die with their parent)."""
        actor, self.actor, self.ready_ref = self.actor, None, None
        if actor is None:
            return
        import ray

        if graceful:
            try:
                ray.get(actor.shutdown.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - the actor may already be gone; it is killed either way
                pass
        try:
            ray.kill(actor)
        except Exception:  # noqa: BLE001
            pass

    def _check_loaded(self) -> None:
        import ray

        done, _ = ray.wait([self.ready_ref], timeout=0)
        if not done:
            return
        try:
            info = ray.get(self.ready_ref)
        except ray.exceptions.RayError as exc:
            self.ready_ref = None
            self._actor_lost(f"its Ray actor ended while loading the model ({_first_line(exc)})", loading=True)
            return
        self.info = info
        if info["state"] == "failed":
            self.ready_ref = None
            self.state, self.reason = "failed", info.get("reason") or "the model failed to load"
            log.error("model %s: %s", self.spec.name, self.reason)
            self._stop_actor()
            if self.job is not None:
                self._finish_error(ModelLoadError, self.reason)
            if not self.engine.model_alive(self.spec.name):
                self.engine.fail_queued(self.spec.name, self.reason)
            return
        if info["state"] in ("ready", "busy") and info.get("spare_ready"):
            self.ready_ref = None
            self.state, self.load_failures = "ready", 0
            self.last_used = time.monotonic()
            if self.job is not None and self.job.status == "loading":
                if self.engine.jobs.mark_running(self.job.id, worker=self.label):
                    self.job = self.engine.jobs.get(self.job.id)
                else:
                    self.job = None
            return
        self.ready_ref = self.actor.wait_ready.remote(30.0)

    def _maybe_claim(self) -> None:
        if self.job is not None or self.state not in ("ready", "loading") or self.retired.is_set():
            return
        engine = self.engine
        if self.state == "loading" and any(
            r is not self and r.state == "ready" and r.job is None for r in engine.replicas[self.spec.name]
        ):
            return
        if not engine.jobs.has_queued(self.spec.name):
            return
        self.job = engine.jobs.claim(self.spec.name, ready=self.state == "ready", worker=self.label)
        if self.job is not None:
            self.last_used = time.monotonic()

    def _cancel_waiting(self, job_id: str, reason: str) -> None:
        """A cancel for the job this replica holds while its model loads."""
        if self.job is not None and self.job.id == job_id:
            job, self.job = self.job, None
            self.engine.jobs.finish(job.id, "cancelled", reason=reason)

    def _run(self) -> None:
        import ray

        engine, job = self.engine, self.job
        assert job is not None
        body = engine.jobs.request_body(job.id)
        if body is None:
            self._finish_error(ServerError, "the job's request was not found in the queue")
            return
        self.state = "busy"
        ref = self.actor.run.remote(dataclasses.asdict(job), body)
        del body
        limit = time.monotonic() + job.timeout_s + engine.config.cancel_grace_s + _ANSWER_GRACE_S
        log_ref = None
        while True:
            done, _ = ray.wait([ref], timeout=0.1)
            if done:
                break
            while True:
                try:
                    item = self.inbox.get_nowait()
                except queue.Empty:
                    break
                if item[0] == "cancel" and item[1] == job.id:
                    self.actor.cancel.remote(job.id, item[2])
            if log_ref is not None and ray.wait([log_ref], timeout=0)[0]:
                self._add_logs(job, log_ref)
                log_ref = None
            if log_ref is None:
                log_ref = self.actor.logs.remote(job.id)
            if engine.stopping.is_set():
                # The job stays "running" in the store; a restarted server runs it again (``JobStore.recover``).
                self.job = None
                self._stop_actor()
                return
            if time.monotonic() > limit:
                self._stop_actor(graceful=False)
                self._actor_lost("it stopped answering", loading=False)
                return
        if log_ref is not None:
            self._add_logs(job, log_ref)
        try:
            outcome = ray.get(ref)
        except ray.exceptions.RayError as exc:
            self.actor, self.ready_ref = None, None
            self._actor_lost(f"its Ray actor ended ({_first_line(exc)})", loading=False)
            return
        self._store(job, outcome)

    def _add_logs(self, job: Job, ref: Any) -> None:
        import ray

        try:
            lines = ray.get(ref)
        except ray.exceptions.RayError:
            return
        if lines:
            self.engine.jobs.add_events(job.id, [("log", {"line": line}) for line in lines])

    def _store(self, job: Job, outcome: dict[str, Any]) -> None:
        engine = self.engine
        if outcome.get("logs"):
            engine.jobs.add_events(job.id, [("log", {"line": line}) for line in outcome["logs"]])
        data = outcome.get("result")
        error = tuple(outcome["error"]) if outcome.get("error") else None
        if outcome["status"] == "cancelled":
            engine.jobs.finish(job.id, "cancelled", reason=outcome.get("reason") or "cancelled by the client")
        else:
            kept = None if data is None else engine.results.put(job.id, data)
            engine.jobs.finish(
                job.id,
                outcome["status"],
                result_bytes=None if data is None else len(data),
                result=kept,
                ttl_s=engine.config.result_ttl_s,
                error=error,
                timings=outcome.get("timings"),
            )
        self.jobs_done += 1
        self.job = None
        self.state = "ready"
        self.last_used = time.monotonic()

    def _actor_lost(self, why: str, *, loading: bool) -> None:
        """The actor is gone: start another; the job it held runs again once, or fails saying why."""
        log.warning("replica %s: %s; starting a new actor", self.label, why)
        self.actor, self.ready_ref = None, None
        self.restarts += 1
        self.state = "starting"
        if loading:
            self.load_failures += 1
            if self.load_failures >= _MAX_LOAD_FAILURES:
                self.state = "failed"
                self.reason = f"the replica's Ray actor ended {self.load_failures} times while loading ({why})"
                if self.job is not None:
                    self._finish_error(ModelLoadError, self.reason)
                if not self.engine.model_alive(self.spec.name):
                    self.engine.fail_queued(self.spec.name, self.reason)
                return
        job, self.job = self.job, None
        if job is None or job.status != "running":
            if job is not None:
                self.engine.jobs.requeue(job.id, f"the replica loading its model ended ({why})")
            return
        current = self.engine.jobs.get(job.id)
        if current is not None and current.attempts < 2 and not self.engine.stopping.is_set():
            self.engine.jobs.requeue(job.id, f"the replica running the job ended ({why}); it runs again (once)")
            self.engine.wake(self.spec.name)
            return
        self.job = job
        self._finish_error(
            WorkerDied,
            f"the replica running this job ended ({why}) and the job had already been run again once; the server "
            "replaced the replica. If this repeats, the job may be exhausting its machine's memory.",
        )

    def _finish_error(self, kind: type[BaseException], message: str) -> None:
        engine, job = self.engine, self.job
        self.job = None
        if self.state == "busy":
            self.state = "ready"
        if job is None:
            return
        type_name = wire_name(kind)
        message = engine.redactor.text(message)
        data = encode_result(TraceResult(error=TraceErrorInfo(type_name, message, "")))
        kept = engine.results.put(job.id, data)
        engine.jobs.finish(
            job.id,
            "error",
            result_bytes=len(data),
            result=kept,
            ttl_s=engine.config.result_ttl_s,
            error=(type_name, message, ""),
        )

    def describe(self) -> dict[str, Any]:
        info = self.info
        return {
            "replica": self.label,
            "state": "unloaded" if self.unloaded else self.state,
            "reason": self.reason,
            "pid": info.get("pid"),
            "actor_pid": info.get("actor_pid"),
            "job": self.job.id if self.job is not None else None,
            "jobs_done": self.jobs_done,
            "restarts": self.restarts,
            "job_processes": info.get("job_processes", 0),
            "sandbox": info.get("sandbox"),
            "engine": "ray",
            "extra": self.extra,
        }


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


def connect(address: str | None) -> None:
    """Join the Ray cluster at ``address`` (None: start a Ray instance of the server's own on this machine).

    Raises ``ValueError`` saying what to do when there is no cluster there, so ``serve`` reports
    it as a bad flag instead of a traceback from the server's startup. The actors' own output is
    not copied into the server's log (``log_to_driver``): jobs' printed lines reach their users
    through the job's events, and Ray keeps each actor's log in its session folder.
    """
    import ray

    _check_reachable(address)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # "local": a Ray instance of this server's own, even where `ray start` already runs one on this
    # machine (``ray.init()`` with no address would join that one).
    options: dict[str, Any] = {"address": address or "local", "log_to_driver": False}
    if address is None or not address.startswith("ray://"):
        options.update(include_dashboard=False, configure_logging=False)
    try:
        ray.init(**options)
    except ConnectionError as exc:
        raise ValueError(
            f"no Ray cluster answers at --ray-address {address}: start one there (ray start --head) or leave "
            f"--ray-address out to start Ray on this machine ({_first_line(exc)})"
        ) from None


def _check_reachable(address: str | None, timeout: float = 5.0) -> None:
    """Refuse a ``host:port`` (or ``ray://host:port``) address nothing listens on, in seconds:
    Ray itself keeps retrying a missing cluster for about two minutes before it gives up."""
    if address is None or address == "auto" or ":" not in address:
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"no Ray cluster answers at --ray-address {address} ({exc}): start one there (ray start --head) or "
            "leave --ray-address out to start Ray on this machine"
        ) from None


class RayEngine(WorkerPool):
    """All replicas of all served models, as Ray actors; takes the ``WorkerPool``'s place in the service."""

    replicas: dict[str, list[RayReplica]]  # type: ignore[assignment]

    def __init__(self, config: ServerConfig, jobs: JobStore, results: ResultStore) -> None:
        self.host_config = dataclasses.replace(config, clock=time.time)
        """What the actors get: the limits, without the server's clock (tests pass one that cannot travel)."""
        super().__init__(config, jobs, results)
        budget, loaded = config.memory_budget_bytes, 0
        for replicas in self.replicas.values():
            for replica in replicas:
                loaded += config.replica_memory_bytes
                if budget is not None and loaded > budget:  # loads on its first job, within the budget
                    replica.unloaded, replica.state = True, "unloaded"
        self._started_ray = False
        self._manager: threading.Thread | None = None

    def _new_replica(self, spec: ModelSpec, index: int) -> RayReplica:  # type: ignore[override]
        return RayReplica(self, spec, index)

    def start(self) -> None:
        import ray

        if not ray.is_initialized():
            connect(self.config.ray_address)
            self._started_ray = True
        for replicas in self.replicas.values():
            for replica in replicas:
                replica.thread.start()
        self._manager = threading.Thread(target=self._manage, name="nnsj-ray-manager", daemon=True)
        self._manager.start()

    def stop(self, timeout: float = 15.0) -> None:
        self.stopping.set()
        self.wake_all()
        deadline = time.monotonic() + timeout
        for replicas in list(self.replicas.values()):
            for replica in list(replicas):
                replica.thread.join(timeout=max(0.1, deadline - time.monotonic()))
        if self._started_ray:
            import ray

            ray.shutdown()

    # ----- replicas added and removed, models unloaded and loaded ---------------------------------------
    def _manage(self) -> None:
        """Every ``MANAGE_INTERVAL_S``: add a replica to a model whose queue waits too long, stop
        added replicas left idle, unload models left unused or past the memory budget, and load
        an unloaded model that has a job."""
        while not self.stopping.wait(MANAGE_INTERVAL_S):
            try:
                self._manage_once(time.monotonic())
            except Exception:  # noqa: BLE001 - the next round tries again; jobs keep running meanwhile
                log.exception("the Ray engine's replica manager failed a round")

    def _manage_once(self, now: float) -> None:
        config = self.config
        for spec in config.models:
            replicas = list(self.replicas.get(spec.name, ()))
            live = [r for r in replicas if not r.retired.is_set()]
            oldest = self.jobs.oldest_queued(spec.name)
            waited = None if oldest is None else self.jobs.clock() - oldest
            if not live:
                continue
            if all(r.unloaded for r in live):
                if oldest is not None and self._make_room(spec.name, now):
                    live[0].inbox.put(("load",))
                continue
            if (
                waited is not None
                and waited >= config.scale_up_wait_s
                and len(live) < config.max_replicas
                and all(r.job is not None or r.state in ("starting", "loading") for r in live)
                and not any(r.extra and r.state in ("starting", "loading") for r in live)
                and self._fits(self.replica_memory())
            ):
                self._add_replica(spec)
                continue
            for replica in live:
                if replica.extra and replica.job is None and replica.state == "ready":
                    if now - replica.last_used >= config.idle_replica_s:
                        replica.inbox.put(("retire", "idle"))
            if (
                config.unload_after_s is not None
                and oldest is None
                and all(r.job is None and r.state in ("ready", "failed") for r in live)
                and any(r.state == "ready" for r in live)
                and now - max(r.last_used for r in live) >= config.unload_after_s
            ):
                for replica in live:
                    replica.inbox.put(("unload", f"no job for {config.unload_after_s:g} s, --unload-after"))

    def replica_memory(self) -> int:
        return self.config.replica_memory_bytes

    def loaded_memory(self) -> int:
        """The Ray memory of every replica that holds (or is loading) its model."""
        return sum(
            self.replica_memory()
            for replicas in self.replicas.values()
            for r in replicas
            if not r.unloaded and not r.retired.is_set() and r.state != "failed"
        )

    def _fits(self, extra: int) -> bool:
        budget = self.config.memory_budget_bytes
        return budget is None or self.loaded_memory() + extra <= budget

    def _make_room(self, model: str, now: float) -> bool:
        """Whether ``model`` may load now; past the memory budget, unload the idle model used least recently."""
        if self._fits(self.replica_memory()):
            return True
        idle = [
            (max(r.last_used for r in replicas), name)
            for name, replicas in self.replicas.items()
            if name != model
            and any(not r.unloaded for r in replicas)
            and all(r.job is None and r.state in ("ready", "failed", "unloaded") for r in replicas)
            and not self.jobs.has_queued(name)
        ]
        if idle:
            _, name = min(idle)
            for replica in self.replicas[name]:
                replica.inbox.put(("unload", f"the memory budget (--memory-budget-mb) made room for {model!r}"))
        return False

    def _add_replica(self, spec: ModelSpec) -> None:
        replicas = self.replicas[spec.name]
        index = max((r.index for r in replicas), default=-1) + 1
        replica = RayReplica(self, spec, index, extra=True)
        replicas.append(replica)
        log.info("model %s: its queue waited past --scale-up-wait; adding replica %s", spec.name, replica.label)
        replica.thread.start()

    def forget(self, replica: RayReplica) -> None:
        """Drop a retired replica from its model's list."""
        replicas = self.replicas.get(replica.spec.name, [])
        if replica in replicas:
            replicas.remove(replica)

    def model_state(self, model: str) -> tuple[str, str | None]:
        replicas = [r for r in self.replicas.get(model, []) if not r.retired.is_set()]
        if replicas and all(r.unloaded for r in replicas):
            return "unloaded", "the model was unloaded; its next job loads it again"
        return super().model_state(model)

    def wake_all(self) -> None:
        for replicas in self.replicas.values():
            for replica in list(replicas):
                replica.inbox.put(("wake",))

    def wake(self, model: str) -> None:
        for replica in list(self.replicas.get(model, ())):
            replica.inbox.put(("wake",))

    def cancel(self, model: str, job_id: str, reason: str = "cancelled by the client") -> None:
        for replica in list(self.replicas.get(model, ())):
            replica.inbox.put(("cancel", job_id, reason))
