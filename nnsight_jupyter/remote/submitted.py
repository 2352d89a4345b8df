"""The remote jobs this process submitted, newest last, for the JupyterLab sidebar.

A kernel forgets nothing else about its jobs: a blocking run keeps its handle only while it waits,
and `blocking=False` leaves it on `tracer.job`. The sidebar lists this kernel's jobs with their
status and offers to cancel them, so `RemoteClient.submit` adds every handle here. The list keeps
the latest `LIMIT` handles (a handle is a client reference and an id: a few hundred bytes).
"""

from __future__ import annotations

import threading
from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .client import JobHandle

LIMIT = 50

_jobs: deque[JobHandle] = deque(maxlen=LIMIT)
_lock = threading.Lock()


def record(handle: JobHandle) -> None:
    with _lock:
        _jobs.append(handle)


def jobs() -> list[JobHandle]:
    """This process's latest jobs, oldest first."""
    with _lock:
        return list(_jobs)


def find(job_id: str) -> JobHandle | None:
    with _lock:
        for handle in _jobs:
            if handle.job_id == job_id:
                return handle
    return None


def clear() -> None:
    with _lock:
        _jobs.clear()
