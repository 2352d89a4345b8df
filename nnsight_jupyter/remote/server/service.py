"""The server's long-lived parts (queue, result store, workers) and their start and stop.

The routes reach everything through one :class:`Service` kept on ``app.state.service``. It is
built by the app factory but opened by the app's lifespan, so creating an app touches no files
and starts no processes; opening it takes the data folder's lock, applies the restart policy to
jobs a previous run left behind (``JobStore.recover``), and starts the workers.
"""

from __future__ import annotations

import asyncio
import logging

from starlette.concurrency import run_in_threadpool

from .config import ServerConfig
from .events import Notifier
from .jobs import JobStore
from .pool import WorkerPool
from .redact import Redactor
from .store import ResultStore

__all__ = ["Service"]

log = logging.getLogger("nnsight_jupyter.server")


class Service:
    """Queue, results and workers of one server."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.notifier = Notifier()
        self._jobs: JobStore | None = None
        self._results: ResultStore | None = None
        self._pool: WorkerPool | None = None
        self._sweeper: asyncio.Task | None = None
        self.redactor = Redactor.for_server(config)
        """What ``GET /models`` must not show (``redact.py``)."""

    @property
    def jobs(self) -> JobStore:
        if self._jobs is None:
            raise RuntimeError("the server is not running (its lifespan has not started)")
        return self._jobs

    @property
    def results(self) -> ResultStore:
        if self._results is None:
            raise RuntimeError("the server is not running (its lifespan has not started)")
        return self._results

    @property
    def pool(self) -> WorkerPool:
        if self._pool is None:
            raise RuntimeError("the server is not running (its lifespan has not started)")
        return self._pool

    def open(self) -> None:
        config = self.config
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self._jobs = JobStore(
            config.database, clock=config.clock, position_updates=config.position_updates, on_event=self.notifier.notify
        )
        self._results = ResultStore(config.results_dir)
        for job_id, what in self._jobs.recover(served=[m.name for m in config.models]):
            log.info("job %s after restart: %s", job_id, what)
        if config.engine == "ray":
            from .ray_engine import RayEngine  # imports ray, which only this engine needs

            self._pool = RayEngine(config, self._jobs, self._results)
        else:
            self._pool = WorkerPool(config, self._jobs, self._results)
        self._pool.start()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.stop()
        if self._jobs is not None:
            self._jobs.close()

    def sweep(self) -> int:
        """Delete results past their expiry; returns how many."""
        now = self.config.clock()
        expired = self.jobs.due_for_expiry(now)
        for job_id in expired:
            self.results.delete(job_id)
            self.jobs.mark_expired(job_id)
        return len(expired)

    async def start(self) -> None:
        await run_in_threadpool(self.open)
        self._sweeper = asyncio.create_task(self._sweep_forever())

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            try:
                await self._sweeper
            except (asyncio.CancelledError, Exception):
                pass
        await run_in_threadpool(self.close)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.sweep_interval_s)
            try:
                await run_in_threadpool(self.sweep)
            except Exception:
                log.exception("removing expired results failed; will retry")
