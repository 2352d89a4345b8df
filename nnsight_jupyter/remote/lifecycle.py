"""A remote job's life as client, server and views all see it: the form of its id and its states.

States::

    queued ──> loading ──> running ──> completed | error
       │          │           │
       └──────────┴───────────┴──> cancelled

A job id is 1 to 64 letters, digits, `-` or `_` (the server makes 16 from 12 random bytes); the
same pattern guards the routes and the result files.
"""

from __future__ import annotations

import re

__all__ = ["FINAL_STATES", "JOB_ID", "PENDING_STATES", "is_job_id"]

FINAL_STATES = ("completed", "error", "cancelled")
"""States a job never leaves; each is also the type of the job's last event."""

PENDING_STATES = ("queued", "loading", "running")

JOB_ID = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")


def is_job_id(text: str) -> bool:
    return bool(JOB_ID.match(text))
