"""Finished jobs' results: in memory first, then on disk, one file per job, removed when they expire.

A result is the exact ``encode_result`` bytes the worker produced (or the server made for a job
that could not produce one), so serving it is a copy and the server never decodes what a worker
sent. A client usually downloads a result the moment its job ends, so a new result is served
from memory and, when it is large, written to disk a moment later (``put(..., later=s)``):
writing tens of megabytes to disk while they are being downloaded slowed the download down by
half. Results under ``delay_min_bytes`` (1 MiB) are written by the same background thread at
once, so a server killed a few milliseconds after a small job ended still has its result
(writing them in ``put`` itself, before the job was reported finished, made every small remote
trace about 1.5 ms slower: each file operation hands the GIL to the server's other threads).
The most recent results stay in memory (up to ``memory_bytes`` in all); older ones are read
from disk.
Files are written to a temporary name and renamed, so a crash never leaves a truncated result
under a job's name; ``flush`` writes whatever is still waiting when the server stops. Expiry
times live in the job table (``jobs.py``); this module only stores, opens and deletes.

Reading opens the file first and streams from the open handle, so a result that expires while
it is being downloaded still arrives whole.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import mmap
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from ..lifecycle import is_job_id

__all__ = ["ResultStore"]

CHUNK = 8 << 20
DELAY_MIN_BYTES = 1 << 20
"""Results this large or larger wait ``later`` seconds before they are written (see the module docstring)."""


class ResultStore:
    """``<folder>/<job id>.msgpack`` files, the latest of them also in memory."""

    def __init__(
        self, folder: str | os.PathLike[str], *, memory_bytes: int = 256 << 20, delay_min_bytes: int = DELAY_MIN_BYTES
    ) -> None:
        self.folder = Path(folder)
        self.delay_min_bytes = delay_min_bytes
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in self.folder.glob("*.tmp"):
            stale.unlink(missing_ok=True)
        self.memory_bytes = memory_bytes
        self._recent: collections.OrderedDict[str, bytes | bytearray | mmap.mmap] = collections.OrderedDict()
        self._recent_bytes = 0
        self._unwritten: dict[str, bytes | bytearray | mmap.mmap] = {}
        self._writes: list[tuple[float, int, str, Path]] = []  # a heap: the write due first on top
        self._write_order = itertools.count()
        self._writes_changed = threading.Condition(threading.Lock())
        self._writer_thread: threading.Thread | None = None
        self._writing = 0
        self._lock = threading.Lock()

    def _path(self, job_id: str) -> Path:
        if not is_job_id(job_id):
            raise ValueError(f"not a job id: {job_id!r}")
        return self.folder / f"{job_id}.msgpack"

    def put(self, job_id: str, data: bytes | bytearray | mmap.mmap, *, later: float | None = None) -> None:
        """Keep a result: in memory at once, and on disk now or, with ``later=s``, from a background
        thread: ``s`` seconds from now if the result is at least ``delay_min_bytes`` long, else at
        once (meanwhile it is served from memory)."""
        target = self._path(job_id)
        with self._lock:
            self._forget(job_id)
            self._unwritten[job_id] = data
            if len(data) <= self.memory_bytes:
                self._recent[job_id] = data
                self._recent_bytes += len(data)
                while self._recent_bytes > self.memory_bytes:
                    self._forget(next(iter(self._recent)))
        if later is None:
            self._write(job_id, target)
        else:
            delay = later if len(data) >= self.delay_min_bytes else 0.0
            with self._writes_changed:
                heapq.heappush(self._writes, (time.monotonic() + delay, next(self._write_order), job_id, target))
                self._writes_changed.notify_all()
            self._start_writer()

    def _write(self, job_id: str, target: Path) -> None:
        with self._lock:
            data = self._unwritten.get(job_id)
        if data is None:
            return  # deleted before it was written
        temporary = target.with_suffix(f".{threading.get_ident()}.tmp")  # flush() may race the writer
        with open(temporary, "wb") as handle:
            handle.write(data)
        with self._lock:
            if self._unwritten.pop(job_id, None) is None:  # deleted, or written by the other thread
                temporary.unlink(missing_ok=True)
                return
            os.replace(temporary, target)

    def _start_writer(self) -> None:
        with self._lock:
            if self._writer_thread is not None:
                return
            self._writer_thread = threading.Thread(target=self._write_loop, name="nnsj-results", daemon=True)
        self._writer_thread.start()

    def _write_loop(self) -> None:
        while True:
            with self._writes_changed:
                while not self._writes or self._writes[0][0] > time.monotonic():
                    # until the first write is due, or a new one (maybe due sooner) arrives
                    self._writes_changed.wait(self._writes[0][0] - time.monotonic() if self._writes else None)
                _, _, job_id, target = heapq.heappop(self._writes)
                self._writing += 1
            try:
                self._write(job_id, target)
            except OSError as exc:
                print(f"nnsight-jupyter server: cannot write the result of job {job_id}: {exc}", file=sys.stderr)
            finally:
                with self._writes_changed:
                    self._writing -= 1
                    self._writes_changed.notify_all()

    def settled(self, timeout: float = 10.0) -> bool:
        """Wait until the background writer has handled every write due by now; False on time-out.

        For a clean shutdown check and for tests: a deleted result's write counts as handled once
        the writer has passed it over.
        """
        deadline = time.monotonic() + timeout
        now = time.monotonic()
        with self._writes_changed:
            while self._writing or (self._writes and self._writes[0][0] <= now):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._writes_changed.wait(left)
        return True

    def flush(self) -> None:
        """Write every result still waiting for the disk (at shutdown, and in tests)."""
        with self._lock:
            pending = list(self._unwritten)
        for job_id in pending:
            self._write(job_id, self._path(job_id))

    def _forget(self, job_id: str) -> None:
        old = self._recent.pop(job_id, None)
        if old is not None:
            self._recent_bytes -= len(old)

    def recent(self, job_id: str) -> bytes | bytearray | mmap.mmap | None:
        """The result's bytes if it is still held in memory."""
        with self._lock:
            data = self._recent.get(job_id)
            return data if data is not None else self._unwritten.get(job_id)

    def open(self, job_id: str) -> BinaryIO | None:
        try:
            return open(self._path(job_id), "rb")
        except FileNotFoundError:
            return None

    def read(self, job_id: str) -> bytes | bytearray | mmap.mmap | None:
        data = self.recent(job_id)
        if data is not None:
            return data
        handle = self.open(job_id)
        if handle is None:
            return None
        with handle:
            return handle.read()

    def delete(self, job_id: str) -> None:
        with self._lock:
            self._forget(job_id)
            self._unwritten.pop(job_id, None)
            self._path(job_id).unlink(missing_ok=True)

    def ids(self) -> list[str]:
        return [p.stem for p in self.folder.glob("*.msgpack")]


def iter_file(handle: BinaryIO) -> Iterator[bytes]:
    """Chunks of an open file, closing it at the end (run in a thread by the route)."""
    try:
        while True:
            chunk = handle.read(CHUNK)
            if not chunk:
                return
            yield chunk
    finally:
        handle.close()
