"""Finished jobs' results: safe before their job is reported finished, recent ones served from memory.

A result is the exact ``encode_result`` bytes the worker produced (or the server made for a job
that could not produce one), so serving it is a copy and the server never decodes what a worker
sent. A job is marked completed only once its result would survive the server being killed at
that instant, and that must not cost the download its speed:

- A large result (``FILE_MIN_BYTES``, 1 MiB, or more) is received from the worker's pipe straight
  into a shared mapping of a preallocated file in the results folder (``receiver``), and ``put``
  renames that file to the job's name. The bytes are in the page cache the moment they arrive, so
  a killed server keeps them, and the mapping is what the download then reads. Measured for
  64 MiB: 41 ms to receive into the file mapping against 37 ms into anonymous memory, where
  writing the received bytes to a file afterwards took another 100 ms, and writing them while
  they were being downloaded halved the download's speed.
- A smaller result goes into the job table, in the same SQLite transaction that marks the job
  finished (``put`` hands it back to the caller for ``JobStore.finish(result=...)``): one more
  column in a write that happens anyway, where a file of its own cost every small remote trace
  about 1.5 ms (each file operation hands the GIL to the server's other threads).

The most recent results stay in memory as well (up to ``memory_bytes`` in all; a large one is its
file's mapping, so this holds page cache rather than copies). Files are only ever complete under a
job's name: a result is received under a temporary ``.part`` name, and those left by a crash are
removed at start. Expiry times live in the job table (``jobs.py``); this module only stores,
opens and deletes.

Reading opens the file first and streams from the open handle, so a result that expires while
it is being downloaded still arrives whole.
"""

from __future__ import annotations

import collections
import contextlib
import mmap
import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from ..codec.memory import fresh_buffer
from ..lifecycle import is_job_id

__all__ = ["FILE_MIN_BYTES", "ResultFile", "ResultStore"]

CHUNK = 8 << 20
FILE_MIN_BYTES = 1 << 20
"""Results this large or larger are received into their file; smaller ones live in the job table."""

Result = bytes | bytearray | mmap.mmap


class ResultFile(mmap.mmap):
    """A result received straight into a shared mapping of its (temporary) file; ``path`` names it."""

    path: Path

    def discard(self) -> None:
        """Drop a result that will never be kept (a broken pipe, a cancelled job)."""
        self.path.unlink(missing_ok=True)
        with contextlib.suppress(BufferError):  # still viewed by a reader: the mapping goes with it
            self.close()


class ResultStore:
    """``<folder>/<job id>.msgpack`` files for large results, the latest results also in memory."""

    def __init__(
        self, folder: str | os.PathLike[str], *, memory_bytes: int = 256 << 20, file_min_bytes: int = FILE_MIN_BYTES
    ) -> None:
        self.folder = Path(folder)
        self.file_min_bytes = file_min_bytes
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in [*self.folder.glob("*.part"), *self.folder.glob("*.tmp")]:
            stale.unlink(missing_ok=True)
        self.memory_bytes = memory_bytes
        self._recent: collections.OrderedDict[str, Result] = collections.OrderedDict()
        self._recent_bytes = 0
        self._lock = threading.Lock()

    def _path(self, job_id: str) -> Path:
        if not is_job_id(job_id):
            raise ValueError(f"not a job id: {job_id!r}")
        return self.folder / f"{job_id}.msgpack"

    def receiver(self, size: int) -> bytearray | mmap.mmap:
        """Writable memory to receive a ``size``-byte result into: for a large one, a shared mapping
        of a new file in the results folder, its blocks allocated up front (a full disk fails here,
        not later as a fault while the pipe is read)."""
        if size < self.file_min_bytes:
            return fresh_buffer(size)
        path = self.folder / f"{uuid.uuid4().hex}.part"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)
            mapping = ResultFile(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        mapping.path = path
        return mapping

    def discard(self, data: object) -> None:
        """Forget a received result that no job will keep."""
        if isinstance(data, ResultFile):
            data.discard()

    def put(self, job_id: str, data: Result) -> bytes | None:
        """Keep a result so that it outlives the server: a large one in its file (renamed from the
        one it was received into, or written now), a small one in the job table, whose bytes this
        returns for the caller to commit with the job's final state (``JobStore.finish(result=)``);
        None when the file holds it."""
        target = self._path(job_id)
        kept: bytes | None = None
        if isinstance(data, ResultFile) and data.path.parent == self.folder:
            os.replace(data.path, target)
            data.path = target
        elif len(data) >= self.file_min_bytes:
            temporary = self.folder / f"{uuid.uuid4().hex}.part"
            with open(temporary, "wb") as handle:
                handle.write(data)
            os.replace(temporary, target)
        else:
            kept = bytes(data)
        with self._lock:
            self._forget(job_id)
            if len(data) <= self.memory_bytes:
                self._recent[job_id] = data
                self._recent_bytes += len(data)
                while self._recent_bytes > self.memory_bytes:
                    self._forget(next(iter(self._recent)))
        return kept

    def _forget(self, job_id: str) -> None:
        old = self._recent.pop(job_id, None)
        if old is not None:
            self._recent_bytes -= len(old)

    def recent(self, job_id: str) -> Result | None:
        """The result's bytes if it is still held in memory."""
        with self._lock:
            return self._recent.get(job_id)

    def open(self, job_id: str) -> BinaryIO | None:
        """The result's file, open for reading; None for a result kept in the job table (or gone)."""
        try:
            return open(self._path(job_id), "rb")
        except FileNotFoundError:
            return None

    def read(self, job_id: str) -> Result | None:
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
