"""Server settings: which models to serve, where state lives, and every limit a job runs under.

All limits live in one frozen :class:`ServerConfig`, so the routes, the queue and the workers read
the same numbers, and every refusal can name the setting that caused it and the command-line flag
that changes it (:data:`FLAGS`). Sizes are bytes and times are seconds here; the command line
takes MiB where that reads better (``--max-request-mb``).

Model specs
    ``smollm2``                  a registry alias, Hub id or local folder, loaded with ``LanguageModel``
    ``pkg.module:function``      a factory returning an ``NNsight`` model (or a ``torch.nn.Module``,
                                 which is wrapped); used by tests to serve a tiny random model
    ``name=spec``                either of the above, served under ``name``
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["FLAGS", "ModelSpec", "ServerConfig", "parse_model_specs"]

MiB = 2**20

FLAGS: dict[str, str] = {
    "max_request_bytes": "--max-request-mb",
    "max_result_bytes": "--max-result-mb",
    "max_job_seconds": "--max-job-seconds",
    "user_workers": "--user-workers",
    "max_job_memory_bytes": "--max-job-memory-mb",
    "max_log_bytes": "--max-log-kb",
    "max_queued_jobs": "--max-queued-jobs",
    "result_ttl_s": "--result-ttl",
    "cancel_grace_s": "--cancel-grace",
    "replica_cpus": "--replica-cpus",
    "replica_memory_bytes": "--replica-memory-mb",
    "max_replicas": "--max-replicas",
    "scale_up_wait_s": "--scale-up-wait",
    "idle_replica_s": "--idle-replica-seconds",
    "memory_budget_bytes": "--memory-budget-mb",
    "unload_after_s": "--unload-after",
}
"""The command-line flag behind each limit, quoted in the messages that enforce it."""

_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_NAME = re.compile(r"^[\w.\-/]{1,200}$")


@dataclass(frozen=True)
class ModelSpec:
    """One served model: the name requests use (``TraceRequest.model_id``) and how to load it."""

    name: str
    spec: str

    @property
    def is_factory(self) -> bool:
        """``module:function`` specs call a factory; others go to ``LanguageModel``."""
        return bool(_FACTORY.match(self.spec)) and not Path(self.spec).exists()


def parse_model_specs(text: str | list[str]) -> tuple[ModelSpec, ...]:
    """``"smollm2,tiny=tests.helpers:tiny_gpt2"`` -> model specs; raises ``ValueError`` naming the bad one.

    >>> parse_model_specs("smollm2")
    (ModelSpec(name='smollm2', spec='smollm2'),)
    """
    items = text if isinstance(text, list) else [text]
    specs: list[ModelSpec] = []
    for item in items:
        for part in item.split(","):
            part = part.strip()
            if not part:
                continue
            name, sep, spec = part.partition("=")
            if not sep:
                name, spec = part, part
            name, spec = name.strip(), spec.strip()
            if not name or not spec or not _NAME.match(name):
                raise ValueError(
                    f"invalid model spec {part!r}: write a registry name, Hub id, folder or "
                    "module:function factory, optionally as name=spec (e.g. tiny=mypkg.models:tiny)"
                )
            specs.append(ModelSpec(name, spec))
    names = [s.name for s in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"model names must be unique, but {duplicates} appear twice; rename with name=spec")
    if not specs:
        raise ValueError("no models given: pass --models smollm2 (or any Hub id, folder or module:function)")
    return tuple(specs)


@dataclass(frozen=True)
class ServerConfig:
    """Everything the server needs to run; built by ``serve`` from flags, or directly in tests.

    Attributes:
        models: what to serve.
        data_dir: holds ``jobs.sqlite3`` (the queue) and ``results/``; one server per folder.
        api_key_file: hashed API keys (see ``auth.py``); required unless ``auth`` is False.
        auth: False serves without keys (only with ``--insecure-no-auth``).
        replicas: loader processes per model, each running one job at a time in the job
            processes it forks (``worker.py``).
        user_workers: job processes a replica keeps for its most recent users, each serving
            one user only (a spare fork that no job has used is kept as well).
        result_ttl_s: how long a finished job's result stays downloadable.
        max_request_bytes, max_result_bytes: message size limits.
        max_job_seconds: wall-clock limit per job; a request's ``timeout`` option may lower it.
        max_job_memory_bytes: memory a job may add to its worker's size after loading the model.
        max_log_bytes: printed output kept per job; the rest is dropped with a note.
        max_queued_jobs: queued jobs per model before new ones are refused (429).
        cancel_grace_s: how long a stopped job may take to unwind before its worker is killed.
        worker_threads: torch threads per worker (None: torch's default).
        start_method: ``forkserver`` (fast restarts) or ``spawn``.
        os_sandbox: apply the process-level layers (namespaces, Landlock, privileges, rlimits).
        job_checks: put back torch's global settings before each job and check the model
            after it (``globalstate.py``, ``integrity.py``). Only ``benchmarks/remote.py`` turns
            them off, to measure what they cost; a server that runs without them lets one job
            change what the next job of the same user computes.
        position_updates: queued jobs nearest the front that get an event when they move up.
        sweep_interval_s: how often expired results are removed.
        engine: where jobs run: ``local`` (loader processes on this machine, ``pool.py``) or
            ``ray`` (one Ray actor per replica, anywhere on a Ray cluster, ``ray_engine.py``).
        ray_address: the Ray cluster to join (``ray``); None starts a Ray instance on this machine.
        model_replicas: ``(name, n)`` pairs overriding ``replicas`` for single models.
        replica_cpus, replica_memory_bytes: the Ray resources each replica asks for, which decide
            the machine it is placed on; the memory should cover the loaded model plus
            ``max_job_memory_bytes``.
        max_replicas: the most replicas of one model the Ray engine runs when it adds replicas for
            a long queue.
        scale_up_wait_s: a model whose oldest queued job has waited this long gets another replica
            (Ray engine, up to ``max_replicas``); replicas added this way stop after
            ``idle_replica_s`` without a job.
        memory_budget_bytes: the total ``replica_memory_bytes`` the Ray engine keeps loaded; past
            it, the models unused longest are unloaded (None: no budget). A job for an unloaded
            model shows ``loading`` until a replica has loaded it again.
        unload_after_s: a model without jobs for this long is unloaded (Ray engine; None: never).
        clock: the time source (tests move it forward to expire results).
    """

    models: tuple[ModelSpec, ...]
    data_dir: Path
    api_key_file: Path | None = None
    auth: bool = True
    replicas: int = 1
    user_workers: int = 2
    result_ttl_s: float = 3600.0
    max_request_bytes: int = 64 * MiB
    max_result_bytes: int = 256 * MiB
    max_job_seconds: float = 600.0
    max_job_memory_bytes: int = 4096 * MiB
    max_log_bytes: int = 1 * MiB
    max_queued_jobs: int = 10_000
    cancel_grace_s: float = 2.0
    worker_threads: int | None = None
    start_method: str = "forkserver"
    os_sandbox: bool = True
    job_checks: bool = True
    position_updates: int = 50
    sweep_interval_s: float = 30.0
    engine: str = "local"
    ray_address: str | None = None
    model_replicas: tuple[tuple[str, int], ...] = ()
    replica_cpus: float = 1.0
    replica_memory_bytes: int = 6144 * MiB
    max_replicas: int = 4
    scale_up_wait_s: float = 5.0
    idle_replica_s: float = 60.0
    memory_budget_bytes: int | None = None
    unload_after_s: float | None = None
    clock: Callable[[], float] = field(default=time.time, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        if self.api_key_file is not None:
            object.__setattr__(self, "api_key_file", Path(self.api_key_file))
        if not self.models:
            raise ValueError("ServerConfig needs at least one model (--models)")
        if self.auth and self.api_key_file is None:
            raise ValueError(
                "no API key file: create one with `nnsight-jupyter serve --add-key NAME --api-key-file "
                "keys.txt` and pass --api-key-file keys.txt (or set NNSIGHT_JUPYTER_API_KEY_FILE); "
                "--insecure-no-auth serves without keys"
            )
        positive = {
            "replicas": self.replicas,
            "user_workers": self.user_workers,
            "result_ttl_s": self.result_ttl_s,
            "max_request_bytes": self.max_request_bytes,
            "max_result_bytes": self.max_result_bytes,
            "max_job_seconds": self.max_job_seconds,
            "max_job_memory_bytes": self.max_job_memory_bytes,
            "max_log_bytes": self.max_log_bytes,
            "max_queued_jobs": self.max_queued_jobs,
            "sweep_interval_s": self.sweep_interval_s,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value!r} ({FLAGS.get(name, name)})")
        if self.cancel_grace_s < 0:
            raise ValueError(f"cancel_grace_s must be >= 0, got {self.cancel_grace_s!r} (--cancel-grace)")
        if self.worker_threads is not None and self.worker_threads < 1:
            raise ValueError(f"worker_threads must be >= 1, got {self.worker_threads!r} (--threads)")
        if self.start_method not in ("forkserver", "spawn"):
            raise ValueError(f"start_method must be 'forkserver' or 'spawn', not {self.start_method!r}")
        self._check_engine()

    def _check_engine(self) -> None:
        if self.engine not in ("local", "ray"):
            raise ValueError(f"engine must be 'local' or 'ray', not {self.engine!r} (--engine)")
        if self.ray_address is not None and self.engine != "ray":
            raise ValueError("--ray-address needs --engine ray")
        object.__setattr__(self, "model_replicas", tuple((str(n), int(c)) for n, c in self.model_replicas))
        served = {m.name for m in self.models}
        for name, count in self.model_replicas:
            if name not in served:
                raise ValueError(
                    f"--replicas {name}={count} names a model this server does not serve; served: {sorted(served)}"
                )
            if count < 1:
                raise ValueError(f"--replicas {name}={count}: a served model needs at least 1 replica")
        for name, value in (
            ("replica_cpus", self.replica_cpus),
            ("replica_memory_bytes", self.replica_memory_bytes),
            ("max_replicas", self.max_replicas),
            ("idle_replica_s", self.idle_replica_s),
        ):
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value!r} ({FLAGS.get(name, name)})")
        if self.scale_up_wait_s < 0:
            raise ValueError(f"scale_up_wait_s must be >= 0, got {self.scale_up_wait_s!r} (--scale-up-wait)")
        if self.engine == "ray" and self.replica_memory_bytes < self.max_job_memory_bytes:
            raise ValueError(
                f"each Ray replica reserves {describe_bytes(self.replica_memory_bytes)} (--replica-memory-mb) but a "
                f"job may use {describe_bytes(self.max_job_memory_bytes)} (--max-job-memory-mb): reserve the "
                "model's size plus the job limit, or lower the job limit"
            )
        if self.memory_budget_bytes is not None and self.memory_budget_bytes < self.replica_memory_bytes:
            raise ValueError(
                f"the memory budget ({describe_bytes(self.memory_budget_bytes)}, --memory-budget-mb) is smaller than "
                f"one replica ({describe_bytes(self.replica_memory_bytes)}, --replica-memory-mb): raise the budget"
            )

    def replicas_for(self, model: str) -> int:
        """How many replicas ``model`` starts with: its ``--replicas NAME=N``, else ``--replicas``."""
        return dict(self.model_replicas).get(model, self.replicas)

    @property
    def database(self) -> Path:
        return self.data_dir / "jobs.sqlite3"

    @property
    def results_dir(self) -> Path:
        return self.data_dir / "results"

    def model(self, name: str) -> ModelSpec | None:
        return next((m for m in self.models if m.name == name), None)


def describe_bytes(n: int) -> str:
    """``67108864`` -> ``"64 MiB"``; used in limit messages."""
    if n >= MiB and n % MiB == 0:
        return f"{n // MiB} MiB"
    if n >= MiB:
        return f"{n / MiB:.1f} MiB"
    if n >= 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n} bytes"
