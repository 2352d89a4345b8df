"""Finished jobs' results on disk, one file per job, removed when they expire.

A result is the exact ``encode_result`` bytes the worker produced (or the server made for a job
that could not produce one), so serving it is a file copy and the server never decodes what a
worker sent. Files are written to a temporary name and renamed, so a crash never leaves a
truncated result under a job's name. Expiry times live in the job table (``jobs.py``); this
module only stores, opens and deletes.

Reading opens the file first and streams from the open handle, so a result that expires while
it is being downloaded still arrives whole.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import BinaryIO, Iterator

__all__ = ["ResultStore"]

_ID = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
CHUNK = 1 << 20


class ResultStore:
    """``<folder>/<job id>.msgpack`` files."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in self.folder.glob("*.tmp"):
            stale.unlink(missing_ok=True)

    def _path(self, job_id: str) -> Path:
        if not _ID.match(job_id):
            raise ValueError(f"not a job id: {job_id!r}")
        return self.folder / f"{job_id}.msgpack"

    def put(self, job_id: str, data: bytes) -> None:
        target = self._path(job_id)
        temporary = target.with_suffix(".tmp")
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)

    def open(self, job_id: str) -> BinaryIO | None:
        try:
            return open(self._path(job_id), "rb")
        except FileNotFoundError:
            return None

    def read(self, job_id: str) -> bytes | None:
        handle = self.open(job_id)
        if handle is None:
            return None
        with handle:
            return handle.read()

    def delete(self, job_id: str) -> None:
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
