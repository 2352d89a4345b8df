"""One worker process, seen from the server: start it, talk to it, watch it, end it.

The process runs ``worker.main``; a reader thread turns everything it sends (or its exit) into
items on its replica's inbox, so the replica's thread handles worker messages, wake-ups and
cancellations in one place, in order.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import TYPE_CHECKING, Any

from .channel import BrokenChannel, Channel

if TYPE_CHECKING:
    from .pool import Replica

__all__ = ["WorkerProcess"]


class WorkerProcess:
    """One worker process and the thread that reads its pipe into the replica's inbox."""

    def __init__(self, replica: Replica) -> None:
        pool = replica.pool
        context = pool.context
        parent, child = context.Pipe(duplex=True)
        self.replica = replica
        self.process = context.Process(  # type: ignore[attr-defined]
            target=_worker_main,
            args=(child, replica.spec.name, replica.spec.spec, pool.worker_settings(replica.spec)),
            name=f"nnsight-jupyter worker {replica.label}",
            daemon=True,
        )
        self.process.start()
        child.close()
        self.pid = self.process.pid
        self.channel = Channel(parent, max_bytes=pool.config.max_result_bytes + 4 * 2**20)
        self.reader = threading.Thread(target=self._read, name=f"nnsj-read-{replica.label}", daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while True:
            try:
                message = self.channel.recv()
            except BrokenChannel as exc:
                self.replica.inbox.put(("exit", self, str(exc)))
                return
            self.replica.inbox.put(("msg", self, message))

    def send(self, message: dict[str, Any]) -> bool:
        try:
            self.channel.send(message)
            return True
        except BrokenChannel:
            return False

    def rss(self) -> int:
        try:
            with open(f"/proc/{self.pid}/statm") as handle:
                return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return 0

    def kill(self) -> None:
        try:
            self.process.kill()
        except (OSError, ValueError):
            pass
        self.process.join(timeout=5)
        self.channel.close()

    def describe_exit(self) -> str:
        self.process.join(timeout=1)
        code = self.process.exitcode
        if code is None:
            return "it stopped answering"
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exit code {code}"


def _worker_main(connection: Any, name: str, spec: str, settings: dict[str, Any]) -> None:
    from .worker import main

    main(connection, name, spec, settings)
