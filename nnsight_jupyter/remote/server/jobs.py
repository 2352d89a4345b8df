"""The persistent job queue: jobs, their states and their event log, in one SQLite file.

Why SQLite
    A restart must lose nothing: a queued job still runs after the server comes back, and a
    client that reconnects can read the events it missed. SQLite in WAL mode commits each change
    durably against a killed process (``synchronous=NORMAL`` only risks the last transactions on
    power loss), needs no service, and its single writer matches one server per data folder
    (enforced with a lock file; a second server on the same folder is refused).

States (``remote/lifecycle.py``)::

    queued ──> loading ──> running ──> completed | error
       │          │           │
       └──────────┴───────────┴──> cancelled

``loading`` means a replica took the job but cannot start it yet: its model is still loading (a
cold start or a restarted worker), or the fresh job process the job's user gets is still being
prepared. ``attempts`` counts how often a job started running.

Order: round-robin over users
    Within a model's queue, users take turns: the next job is the oldest queued job of the user
    whose last job started longest ago (a user whose jobs never started goes first), so one
    user's 50 queued jobs make another user's single job wait for at most one of them. Each
    user's own jobs run in submission order. The turn each user last had is kept per model in
    the ``turns`` table, so the order survives a restart. A job's position follows from that
    order: with users in turn order and each user's ``n`` queued jobs, the ``k``-th job of a user
    runs after ``min(n, k)`` jobs of each user before it in the rotation, ``min(n, k - 1)`` of each
    user after it, and its user's own ``k - 1``.

Restart policy
    A job that was ``loading`` or ``running`` when the server stopped is put back at the front of
    its queue (its user's turn comes first) and run again, once: a job found interrupted a second
    time is finished as an error saying so, so a job that somehow takes the server down cannot do
    it forever.

Events
    Every change appends an event with the next per-job sequence number (``queued`` with the
    position, ``loading``, ``running``, ``log``, and one final ``completed``, ``error`` or
    ``cancelled``). Position updates are written for the ``position_updates`` queued jobs nearest
    the front each time the queue moves, so a long queue costs a bounded number of writes per
    job; ``GET /jobs/{id}`` always computes the live position.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import sqlite3
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ...errors import ModelUnavailable, ServerRestarted, wire_name
from ..lifecycle import FINAL_STATES, PENDING_STATES

__all__ = ["FINAL", "Event", "Job", "JobStore", "iso"]

FINAL = frozenset(FINAL_STATES)
PENDING = frozenset(PENDING_STATES)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    model TEXT NOT NULL,
    owner TEXT NOT NULL,
    status TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    timeout_s REAL NOT NULL,
    request BLOB,
    request_bytes INTEGER NOT NULL,
    error_type TEXT,
    error_message TEXT,
    result_bytes INTEGER,
    expires REAL,
    expired INTEGER NOT NULL DEFAULT 0,
    last_event INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs (model, status, seq);
CREATE INDEX IF NOT EXISTS jobs_owner_queue ON jobs (model, status, owner, seq);
CREATE INDEX IF NOT EXISTS jobs_expiry ON jobs (expired, expires);
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    type TEXT NOT NULL,
    data TEXT NOT NULL,
    time REAL NOT NULL,
    PRIMARY KEY (job_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS turns (
    model TEXT NOT NULL,
    owner TEXT NOT NULL,
    turn INTEGER NOT NULL,
    PRIMARY KEY (model, owner)
) WITHOUT ROWID;
"""

_COLUMNS = (
    "seq",
    "id",
    "model",
    "owner",
    "status",
    "created",
    "started",
    "finished",
    "attempts",
    "timeout_s",
    "request_bytes",
    "error_type",
    "error_message",
    "result_bytes",
    "expires",
    "expired",
    "last_event",
)
_SELECT = "SELECT " + ", ".join(_COLUMNS) + " FROM jobs"


def iso(timestamp: float | None) -> str | None:
    """Seconds since the epoch -> ISO 8601 in UTC (``None`` stays ``None``)."""
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class Job:
    """One row of the queue (without the request body, which is read only when the job runs)."""

    seq: int
    id: str
    model: str
    owner: str
    status: str
    created: float
    started: float | None
    finished: float | None
    attempts: int
    timeout_s: float
    request_bytes: int
    error_type: str | None
    error_message: str | None
    result_bytes: int | None
    expires: float | None
    expired: bool
    last_event: int

    @property
    def final(self) -> bool:
        return self.status in FINAL

    def describe(self, *, position: int | None, now: float) -> dict[str, Any]:
        """The JSON answer of ``GET /jobs/{id}``."""
        body: dict[str, Any] = {
            "job_id": self.id,
            "model": self.model,
            "status": self.status,
            "created_at": iso(self.created),
            "started_at": iso(self.started),
            "finished_at": iso(self.finished),
            "timeout_s": self.timeout_s,
            "attempts": self.attempts,
            "last_event": self.last_event,
            "error": None,
            "result": None,
        }
        if self.status == "queued":
            body["position"] = position
        if self.error_type is not None:
            body["error"] = {"type": self.error_type, "message": self.error_message}
        if self.result_bytes is not None:
            expired = self.expired or (self.expires is not None and self.expires <= now)
            body["result"] = {"bytes": self.result_bytes, "expires_at": iso(self.expires), "expired": expired}
        return body


@dataclass(frozen=True)
class Event:
    """One entry of a job's event log."""

    seq: int
    type: str
    data: dict[str, Any]
    time: float

    def as_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "type": self.type, "time": iso(self.time), **self.data}


class DataDirInUse(RuntimeError):
    """Another server process holds the data folder."""


class JobStore:
    """Jobs and events in SQLite; every method is thread-safe and short.

    ``on_event(job_id)`` is called (outside the lock) after each change to a job's events, so
    streams waiting on that job can wake up.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        clock: Callable[[], float],
        position_updates: int = 50,
        on_event: Callable[[str], None] | None = None,
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_file = _lock_folder(self.path.parent)
        self.clock = clock
        self.position_updates = position_updates
        self.on_event = on_event
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        if "announced" not in columns:  # a queue written before positions were announced per job
            self._db.execute("ALTER TABLE jobs ADD COLUMN announced INTEGER")
        if "result" not in columns:  # a queue written before small results lived in the job table
            self._db.execute("ALTER TABLE jobs ADD COLUMN result BLOB")
        self._closed = False

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._db.close()
                self._lock_file.close()

    # ----- transactions ----------------------------------------------------------------------
    def _transaction(self, work: Callable[[sqlite3.Connection, list[str]], Any]) -> Any:
        touched: list[str] = []
        with self._lock:
            if self._closed:
                raise RuntimeError("the job store is closed (the server is shutting down)")
            self._db.execute("BEGIN IMMEDIATE")
            try:
                value = work(self._db, touched)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        if self.on_event is not None:
            for job_id in dict.fromkeys(touched):
                self.on_event(job_id)
        return value

    def _append(
        self, db: sqlite3.Connection, touched: list[str], job_id: str, kind: str, data: dict[str, Any], now: float
    ) -> int:
        row = db.execute(
            "UPDATE jobs SET last_event = last_event + 1 WHERE id = ? RETURNING last_event", (job_id,)
        ).fetchone()
        db.execute(
            "INSERT INTO events (job_id, seq, type, data, time) VALUES (?, ?, ?, ?, ?)",
            (job_id, row[0], kind, json.dumps(data), now),
        )
        touched.append(job_id)
        return row[0]

    def _owners(self, db: sqlite3.Connection, model: str) -> list[tuple[str, int, int, int]]:
        """Users with queued jobs of ``model`` in turn order: ``(owner, queued jobs, oldest seq, turn)``."""
        return db.execute(
            "SELECT j.owner, COUNT(*), MIN(j.seq), COALESCE(t.turn, -1) AS turn FROM jobs j "
            "LEFT JOIN turns t ON t.model = j.model AND t.owner = j.owner "
            "WHERE j.model = ? AND j.status = 'queued' GROUP BY j.owner ORDER BY turn, MIN(j.seq)",
            (model,),
        ).fetchall()

    def _position(self, db: sqlite3.Connection, model: str, seq: int, owner: str) -> int:
        """Where the queued job ``seq`` of ``owner`` stands in the round-robin order (1 = next)."""
        owners = self._owners(db, model)
        (k,) = db.execute(
            "SELECT COUNT(*) FROM jobs WHERE model = ? AND status = 'queued' AND owner = ? AND seq <= ?",
            (model, owner, seq),
        ).fetchone()
        position, before = k, True
        for name, count, _, _ in owners:
            if name == owner:
                before = False
                continue
            position += min(count, k if before else k - 1)
        return position

    def _order(self, db: sqlite3.Connection, model: str, limit: int) -> list[tuple[str, int]]:
        """The first ``limit`` queued jobs of ``model`` in the order they will run: ``(id, position)``."""
        owners = [row[0] for row in self._owners(db, model)]
        heads: dict[str, list[str]] = {owner: [] for owner in owners}
        for job_id, owner in db.execute(
            "SELECT id, owner FROM (SELECT id, owner, seq, ROW_NUMBER() OVER (PARTITION BY owner ORDER BY seq) AS rn "
            "FROM jobs WHERE model = ? AND status = 'queued') WHERE rn <= ? ORDER BY seq",
            (model, limit),
        ):
            heads[owner].append(job_id)
        order: list[tuple[str, int]] = []
        for turn in range(limit):
            for owner in owners:
                if turn < len(heads[owner]):
                    order.append((heads[owner][turn], len(order) + 1))
                    if len(order) == limit:
                        return order
        return order

    def _announce_positions(self, db: sqlite3.Connection, touched: list[str], model: str, now: float) -> None:
        """A ``queued`` event for each of the first ``position_updates`` jobs whose position changed."""
        for job_id, position in self._order(db, model, self.position_updates):
            changed = db.execute(
                "UPDATE jobs SET announced = ? WHERE id = ? AND announced IS NOT ?", (position, job_id, position)
            ).rowcount
            if changed:
                self._append(db, touched, job_id, "queued", {"position": position}, now)

    # ----- reading ---------------------------------------------------------------------------
    def get(self, job_id: str) -> Job | None:
        with self._lock:
            row = self._db.execute(_SELECT + " WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def position(self, job: Job) -> int | None:
        if job.status != "queued":
            return None
        with self._lock:
            return self._position(self._db, job.model, job.seq, job.owner)

    def request_body(self, job_id: str) -> bytes | None:
        with self._lock:
            row = self._db.execute("SELECT request FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return bytes(row[0]) if row and row[0] is not None else None

    def events_after(self, job_id: str, after: int, limit: int = 1000) -> list[Event]:
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, type, data, time FROM events WHERE job_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                (job_id, after, limit),
            ).fetchall()
        return [Event(seq, kind, json.loads(data), at) for seq, kind, data, at in rows]

    def counts(self) -> dict[str, dict[str, int]]:
        """``{model: {status: n}}`` for pending jobs."""
        with self._lock:
            rows = self._db.execute(
                "SELECT model, status, COUNT(*) FROM jobs WHERE status IN ('queued', 'loading', 'running') "
                "GROUP BY model, status"
            ).fetchall()
        out: dict[str, dict[str, int]] = {}
        for model, status, n in rows:
            out.setdefault(model, {})[status] = n
        return out

    def has_queued(self, model: str) -> bool:
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM jobs WHERE model = ? AND status = 'queued' LIMIT 1", (model,)
            ).fetchone()
        return row is not None

    def oldest_queued(self, model: str) -> float | None:
        """When ``model``'s longest-waiting queued job was submitted (this store's clock), or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT MIN(created) FROM jobs WHERE model = ? AND status = 'queued'", (model,)
            ).fetchone()
        return None if row is None else row[0]

    # ----- changing ---------------------------------------------------------------------------
    def submit(
        self, *, model: str, owner: str, request: bytes, timeout_s: float, max_queued: int | None = None
    ) -> tuple[Job, int]:
        """Queue a job; returns it with its position (1 = next to run).

        With ``max_queued``, raises :class:`QueueFull` instead when the model already has that many
        queued jobs; the count and the insert are one transaction, so concurrent submissions cannot
        both slip under the limit.
        """
        job_id = secrets.token_urlsafe(12)

        def work(db: sqlite3.Connection, touched: list[str]) -> int:
            if max_queued is not None:
                (queued,) = db.execute(
                    "SELECT COUNT(*) FROM jobs WHERE model = ? AND status = 'queued'", (model,)
                ).fetchone()
                if queued >= max_queued:
                    raise QueueFull(queued)
            now = self.clock()
            cursor = db.execute(
                "INSERT INTO jobs (id, model, owner, status, created, timeout_s, request, request_bytes) "
                "VALUES (?, ?, ?, 'queued', ?, ?, ?, ?)",
                (job_id, model, owner, now, timeout_s, request, len(request)),
            )
            position = self._position(db, model, cursor.lastrowid, owner)
            db.execute("UPDATE jobs SET announced = ? WHERE id = ?", (position, job_id))
            self._append(db, touched, job_id, "queued", {"position": position}, now)
            self._announce_positions(db, touched, model, now)  # a new user's job may move ahead of others
            return position

        position = self._transaction(work)
        job = self.get(job_id)
        if job is None:
            raise RuntimeError(f"job {job_id} vanished right after it was queued")
        return job, position

    def claim(self, model: str, *, ready: bool | Callable[[str], bool], worker: str) -> Job | None:
        """Take the next queued job of ``model`` for a replica (round-robin over users, see the module
        docstring): ``running`` if the replica can start it now (``ready``, or ``ready(owner)``), else
        ``loading``. Returns None when nothing is queued."""

        def work(db: sqlite3.Connection, touched: list[str]) -> str | None:
            owners = self._owners(db, model)
            if not owners:
                return None
            owner, _, seq, _ = owners[0]
            (job_id,) = db.execute("SELECT id FROM jobs WHERE seq = ?", (seq,)).fetchone()
            now = self.clock()
            start = ready(owner) if callable(ready) else ready
            status = "running" if start else "loading"
            db.execute(
                "UPDATE jobs SET status = ?, attempts = attempts + ?, started = ?, announced = NULL WHERE id = ?",
                (status, 1 if start else 0, now if start else None, job_id),
            )
            db.execute(
                "INSERT INTO turns (model, owner, turn) VALUES (?, ?, "
                "(SELECT COALESCE(MAX(turn), 0) + 1 FROM turns WHERE model = ?)) "
                "ON CONFLICT (model, owner) DO UPDATE SET turn = excluded.turn",
                (model, owner, model),
            )
            if start:
                self._append(db, touched, job_id, "running", {"worker": worker}, now)
            else:
                self._append(
                    db,
                    touched,
                    job_id,
                    "loading",
                    {"model": model, "detail": f"waiting for model {model!r} and a fresh worker"},
                    now,
                )
            self._announce_positions(db, touched, model, now)
            return job_id

        job_id = self._transaction(work)
        return self.get(job_id) if job_id else None

    def mark_running(self, job_id: str, *, worker: str) -> bool:
        def work(db: sqlite3.Connection, touched: list[str]) -> bool:
            now = self.clock()
            changed = db.execute(
                "UPDATE jobs SET status = 'running', started = ?, attempts = attempts + 1 "
                "WHERE id = ? AND status = 'loading'",
                (now, job_id),
            ).rowcount
            if changed:
                self._append(db, touched, job_id, "running", {"worker": worker}, now)
            return bool(changed)

        return self._transaction(work)

    def add_events(self, job_id: str, events: Iterable[tuple[str, dict[str, Any]]]) -> None:
        batch = list(events)
        if not batch:
            return

        def work(db: sqlite3.Connection, touched: list[str]) -> None:
            now = self.clock()
            for kind, data in batch:
                self._append(db, touched, job_id, kind, data, now)

        self._transaction(work)

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
        """Move a pending job to a final state, with its final event; False if it already was final.

        ``result`` is a small result's bytes (``store.py``), committed in the same transaction, so
        a job is never final without its result. ``timings`` (where the job's time went, see
        ``pool.py``) ride along in the final event.
        """
        if status not in FINAL:
            raise ValueError(f"{status!r} is not a final state")

        def work(db: sqlite3.Connection, touched: list[str]) -> bool:
            row = db.execute("SELECT model, seq, status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row[2] in FINAL:
                return False
            model, seq, previous = row
            now = self.clock()
            expires = now + ttl_s if result_bytes is not None and ttl_s is not None else None
            db.execute(
                "UPDATE jobs SET status = ?, finished = ?, request = NULL, result_bytes = ?, result = ?, expires = ?, "
                "error_type = ?, error_message = ? WHERE id = ?",
                (
                    status,
                    now,
                    result_bytes,
                    result,
                    expires,
                    error[0] if error else None,
                    error[1] if error else None,
                    job_id,
                ),
            )
            data: dict[str, Any] = {}
            if result_bytes is not None:
                data["result_bytes"] = result_bytes
                data["expires_at"] = iso(expires)
            if error is not None:
                data["error"] = {"type": error[0], "message": error[1], "traceback": error[2]}
            if reason is not None:
                data["reason"] = reason
            if timings:
                data["timings"] = timings
            self._append(db, touched, job_id, status, data, now)
            if previous == "queued":
                self._announce_positions(db, touched, model, now)
            return True

        return self._transaction(work)

    def cancel_if_queued(self, job_id: str, reason: str) -> bool:
        def work(db: sqlite3.Connection, touched: list[str]) -> bool:
            row = db.execute("SELECT model, seq FROM jobs WHERE id = ? AND status = 'queued'", (job_id,)).fetchone()
            if row is None:
                return False
            now = self.clock()
            db.execute("UPDATE jobs SET status = 'cancelled', finished = ?, request = NULL WHERE id = ?", (now, job_id))
            self._append(db, touched, job_id, "cancelled", {"reason": reason}, now)
            self._announce_positions(db, touched, row[0], now)
            return True

        return self._transaction(work)

    def queued_ids(self, model: str) -> list[str]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id FROM jobs WHERE model = ? AND status = 'queued' ORDER BY seq", (model,)
            ).fetchall()
        return [r[0] for r in rows]

    def recover(self, *, served: Iterable[str]) -> list[tuple[str, str]]:
        """After a restart: re-queue interrupted jobs once (or fail them), fail jobs of models no
        longer served. Returns ``(job_id, what happened)`` pairs."""
        served = set(served)

        def work(db: sqlite3.Connection, touched: list[str]) -> list[tuple[str, str]]:
            now = self.clock()
            report: list[tuple[str, str]] = []
            rows = db.execute(
                "SELECT id, model, status, attempts FROM jobs WHERE status IN "
                "('queued', 'loading', 'running') ORDER BY seq"
            ).fetchall()
            for job_id, model, status, attempts in rows:
                if model not in served:
                    message = (
                        f"the server restarted without model {model!r}; it now serves "
                        f"{sorted(served)}. Submit the job again to a served model."
                    )
                    db.execute(
                        "UPDATE jobs SET status = 'error', finished = ?, request = NULL, error_type = ?, "
                        "error_message = ? WHERE id = ?",
                        (now, wire_name(ModelUnavailable), message, job_id),
                    )
                    self._append(
                        db,
                        touched,
                        job_id,
                        "error",
                        {"error": {"type": wire_name(ModelUnavailable), "message": message, "traceback": ""}},
                        now,
                    )
                    report.append((job_id, "failed: model no longer served"))
                elif status == "queued":
                    report.append((job_id, "still queued"))
                elif attempts >= 2:
                    message = (
                        "the server stopped twice while this job was running, so it was not run a third "
                        "time. If the job is very large, lower its memory or time use and submit it again."
                    )
                    db.execute(
                        "UPDATE jobs SET status = 'error', finished = ?, request = NULL, error_type = ?, "
                        "error_message = ? WHERE id = ?",
                        (now, wire_name(ServerRestarted), message, job_id),
                    )
                    self._append(
                        db,
                        touched,
                        job_id,
                        "error",
                        {"error": {"type": wire_name(ServerRestarted), "message": message, "traceback": ""}},
                        now,
                    )
                    report.append((job_id, "failed: interrupted twice"))
                else:
                    db.execute("UPDATE jobs SET status = 'queued', started = NULL WHERE id = ?", (job_id,))
                    seq, owner = db.execute("SELECT seq, owner FROM jobs WHERE id = ?", (job_id,)).fetchone()
                    db.execute(  # its user's turn comes first again, as it had come before the stop
                        "INSERT INTO turns (model, owner, turn) VALUES (?, ?, "
                        "(SELECT MIN(COALESCE(MIN(turn), 0), -1) - 1 FROM turns WHERE model = ?)) "
                        "ON CONFLICT (model, owner) DO UPDATE SET turn = excluded.turn",
                        (model, owner, model),
                    )
                    position = self._position(db, model, seq, owner)
                    self._append(
                        db,
                        touched,
                        job_id,
                        "queued",
                        {
                            "position": position,
                            "requeued": True,
                            "reason": f"the server restarted while the job was {status}; it runs again (once)",
                        },
                        now,
                    )
                    report.append((job_id, "requeued"))
            return report

        return self._transaction(work)

    def requeue(self, job_id: str, reason: str) -> bool:
        """Put a running (or loading) job back at the front of its queue, with a ``queued`` event
        saying why; False if it is no longer pending. Used when the machine running it went away,
        so its user's turn comes first again, as after a restart (``recover``)."""

        def work(db: sqlite3.Connection, touched: list[str]) -> bool:
            row = db.execute(
                "SELECT model, seq, owner FROM jobs WHERE id = ? AND status IN ('loading', 'running')", (job_id,)
            ).fetchone()
            if row is None:
                return False
            model, seq, owner = row
            now = self.clock()
            db.execute("UPDATE jobs SET status = 'queued', started = NULL WHERE id = ?", (job_id,))
            db.execute(
                "INSERT INTO turns (model, owner, turn) VALUES (?, ?, "
                "(SELECT MIN(COALESCE(MIN(turn), 0), -1) - 1 FROM turns WHERE model = ?)) "
                "ON CONFLICT (model, owner) DO UPDATE SET turn = excluded.turn",
                (model, owner, model),
            )
            position = self._position(db, model, seq, owner)
            self._append(db, touched, job_id, "queued", {"position": position, "requeued": True, "reason": reason}, now)
            return True

        return self._transaction(work)

    def due_for_expiry(self, now: float) -> list[str]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id FROM jobs WHERE expired = 0 AND expires IS NOT NULL AND expires <= ?", (now,)
            ).fetchall()
        return [r[0] for r in rows]

    def stored_result(self, job_id: str) -> bytes | None:
        """A small result kept in the job table (``store.py``); None for a large one or none."""
        with self._lock:
            row = self._db.execute("SELECT result FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else row[0]

    def mark_expired(self, job_id: str) -> None:
        """Record that the result is gone; drop the job's log lines, keep its lifecycle events."""

        def work(db: sqlite3.Connection, touched: list[str]) -> None:
            db.execute("UPDATE jobs SET expired = 1, result = NULL WHERE id = ?", (job_id,))
            db.execute("DELETE FROM events WHERE job_id = ? AND type = 'log'", (job_id,))

        self._transaction(work)


class QueueFull(Exception):
    """A model's queue is at its limit; ``queued`` says how many jobs wait."""

    def __init__(self, queued: int) -> None:
        super().__init__(f"{queued} jobs queued")
        self.queued = queued


def _job(row: tuple) -> Job:
    values = dict(zip(_COLUMNS, row))
    values["expired"] = bool(values["expired"])
    return Job(**values)


def _lock_folder(folder: Path):
    handle = open(folder / "server.lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise DataDirInUse(
            f"another nnsight-jupyter server (pid {holder}) is using the data folder {folder}; "
            "stop it, or give this server its own folder with --data-dir"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle
