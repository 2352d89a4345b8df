"""Job event streams: server-sent events, and waking the streams that wait on a job.

Format (``GET /jobs/{id}/events``, or the answer to ``POST /jobs`` sent with ``Accept:
text/event-stream``; ``Content-Type: text/event-stream``)::

    id: 3
    event: running
    data: {"seq": 3, "type": "running", "time": "2026-11-27T12:00:01.250+00:00", "worker": "tiny#0"}

One event per job change, in sequence order; ``data`` is JSON and repeats ``seq`` and ``type``.
The stream ends after the final event (``completed``, ``error`` or ``cancelled``). A final
``completed`` or ``error`` event whose result is at most ``INLINE_RESULT_BYTES`` long and still
held in memory also carries it, as the base64 of the ``GET /jobs/{id}/result`` bytes in
``result``: a client following a small trace then needs no second request for it (about 2 ms
over loopback). The field is absent otherwise; the result endpoint always works. While
nothing happens a comment line (``: keep-alive``) is sent every few seconds, so proxies keep
the connection open and a client notices a dead one. To resume after a dropped connection,
pass the last ``seq`` seen as ``?after=SEQ`` (or the standard ``Last-Event-ID`` header).

Server-sent events were chosen over newline-delimited JSON because browsers' ``EventSource``
and most HTTP libraries parse them, and resuming by id is part of the format.

Events are stored in SQLite by the job store; :class:`Notifier` only wakes waiting streams
(from any thread: worker threads finish jobs, the event loop serves streams) so they re-read.
"""

from __future__ import annotations

import asyncio
import base64
import json
import mmap
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from .jobs import Event

__all__ = ["INLINE_RESULT_BYTES", "KEEPALIVE", "Notifier", "format_event"]

KEEPALIVE = b": keep-alive\n\n"


INLINE_RESULT_BYTES = 64 << 10
"""Results up to this size ride along in the final event (see the module docstring)."""


def format_event(event: Event, result: bytes | bytearray | mmap.mmap | None = None) -> bytes:
    """One server-sent event; ``data`` is compact single-line JSON, with ``result`` inlined if given."""
    fields = event.as_json()
    if result is not None:
        fields["result"] = base64.b64encode(result).decode("ascii")
    data = json.dumps(fields, separators=(",", ":"))
    return f"id: {event.seq}\nevent: {event.type}\ndata: {data}\n\n".encode()


class Notifier:
    """Wake the asyncio streams waiting on a job when the job store records a change."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}

    def notify(self, job_id: str) -> None:
        with self._lock:
            waiters = list(self._waiters.get(job_id, ()))
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:
                pass

    @contextmanager
    def subscribe(self, job_id: str) -> Iterator[asyncio.Event]:
        """An ``asyncio.Event`` set whenever the job changes; call from the event loop."""
        entry = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            self._waiters.setdefault(job_id, set()).add(entry)
        try:
            yield entry[1]
        finally:
            with self._lock:
                waiters = self._waiters.get(job_id)
                if waiters is not None:
                    waiters.discard(entry)
                    if not waiters:
                        del self._waiters[job_id]
