"""A replica's processes, seen from the server: the loader and the job processes it forks.

The loader (``worker.main``) is started with ``multiprocessing``; it loads the model and then forks
job processes on request (see ``worker.py`` for why). Each fork arrives as a ``child`` message on
the loader's pipe followed by two file descriptors passed over the same Unix socket: the server's
end of a socket pair connected to the new job process, and a pidfd for it, through which the
server can kill it without racing a reused process id. The loader reports each job process's exit
status (``exited``), since only it, the parent, can read it.

A reader thread per process turns everything it sends (or its end) into items on the replica's
inbox, so the replica's thread handles worker messages, wake-ups and cancellations in one place,
in order.
"""

from __future__ import annotations

import contextlib
import multiprocessing.connection
import os
import signal
import socket
import threading
from typing import TYPE_CHECKING, Any

from .channel import BrokenChannel, Channel

if TYPE_CHECKING:
    from .pool import Replica

__all__ = ["JobProcess", "LoaderProcess", "describe_status"]


def describe_status(code: int | None) -> str:
    """``-11`` -> ``"killed by SIGSEGV"``; ``3`` -> ``"exit code 3"``; None -> it stopped answering."""
    if code is None:
        return "it stopped answering"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class LoaderProcess:
    """A replica's loader process and the thread that reads its pipe into the replica's inbox."""

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
        self.channel = Channel(parent, max_bytes=2**20)
        self.fd_socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, fileno=os.dup(parent.fileno()))
        self.reader = threading.Thread(target=self._read, name=f"nnsj-read-{replica.label}", daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while True:
            try:
                message = self.channel.recv()
                if message.get("ev") == "child":
                    child = self._receive_child(message)
                    self.replica.inbox.put(("child", self, child))
                    continue
            except BrokenChannel as exc:
                self.replica.inbox.put(("loader-exit", self, str(exc)))
                return
            self.replica.inbox.put(("loader", self, message))

    def _receive_child(self, message: dict[str, Any]) -> JobProcess:
        try:
            _, fds, _, _ = socket.recv_fds(self.fd_socket, 1, 2)
        except OSError as exc:
            raise BrokenChannel(f"the loader did not pass its job process: {exc}") from None
        pid = message.get("pid")
        if len(fds) != 2 or type(pid) is not int:
            for fd in fds:
                os.close(fd)
            raise BrokenChannel("the loader passed a malformed job process")
        return JobProcess(self.replica, pid, fds[0], fds[1])

    def send(self, message: dict[str, Any]) -> bool:
        try:
            self.channel.send(message)
            return True
        except BrokenChannel:
            return False

    def kill(self) -> None:
        try:
            self.process.kill()
        except (OSError, ValueError):
            pass
        self.process.join(timeout=5)
        self.channel.close()
        self.fd_socket.close()

    def describe_exit(self) -> str:
        self.process.join(timeout=1)
        return describe_status(self.process.exitcode)


class JobProcess:
    """One job process, forked by a loader, and the thread that reads its socket into the replica's inbox.

    ``owner`` is the one user whose jobs it runs (None while it is a spare no job has used).
    """

    def __init__(self, replica: Replica, pid: int, fd: int, pidfd: int) -> None:
        self.replica = replica
        self.pid = pid
        self.pidfd = pidfd
        self.owner: str | None = None
        self.ready = False
        self.gone = False
        self.rss_limit: int | None = None
        self.jobs_done = 0
        self.channel = Channel(
            multiprocessing.connection.Connection(fd),
            max_bytes=replica.pool.config.max_result_bytes + 4 * 2**20,
            receiver=replica.pool.results.receiver,
        )
        self.reader = threading.Thread(target=self._read, name=f"nnsj-read-{replica.label}-{pid}", daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while True:
            try:
                message = self.channel.recv()
            except BrokenChannel as exc:
                self.replica.inbox.put(("exit", self, str(exc)))
                self.channel.close()
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
        """Kill it (its socket then reaches end of file and its reader thread ends)."""
        if self.pidfd < 0:
            return
        with contextlib.suppress(OSError):
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        os.close(self.pidfd)
        self.pidfd = -1


def _worker_main(connection: Any, name: str, spec: str, settings: dict[str, Any]) -> None:
    from .worker import main

    main(connection, name, spec, settings)
