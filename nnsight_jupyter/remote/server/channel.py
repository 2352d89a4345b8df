"""Messages between the server and its workers: msgpack maps over a multiprocessing pipe.

The worker runs untrusted code, so what it sends is untrusted too. ``Connection.send`` and
``recv`` would pickle, and unpickling a worker's message could run code in the server; here
only ``send_bytes``/``recv_bytes`` are used, with msgpack (plain data, no extension types) and a
size cap, and a malformed message is treated as a broken worker.

Server to worker::

    {"op": "run", "job_id": str, "request": bytes, "timeout": float}
    {"op": "cancel", "job_id": str, "reason": "cancelled" | "timeout"}
    {"op": "stop"}

Worker to server::

    {"ev": "loading"}
    {"ev": "ready", "pid": int, "lockdown": {"active": [...], "skipped": [...]}}
    {"ev": "failed", "reason": str}                       (the model could not be loaded)
    {"ev": "log", "job_id": str, "line": str}
    {"ev": "done", "job_id": str, "result": bytes, "error": [type, message, traceback] | None,
     "stopped": str | None, "restart": str | None}

A job's result does not go inside the map: ``send(message, payload=(field, parts))`` writes the
map with the payload's total size, then the parts' bytes straight onto the pipe, and ``recv`` reads
them into one buffer that becomes ``message[field]``. The bytes are copied once on each side (by
the kernel), instead of into and out of a msgpack map and a framed message as well. A large
payload lands in fresh huge-page memory (`fresh_buffer`): a zero-filled ``bytearray`` of 64 MiB
costs as much again as reading into it. The server's end of a job process's pipe passes its own
``receiver`` instead, which puts a large result straight into its file (``store.py``).
"""

from __future__ import annotations

import mmap
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import msgpack

from ..codec.memory import fresh_buffer

__all__ = ["BrokenChannel", "Channel"]


class BrokenChannel(Exception):
    """The other side closed the pipe, or sent something that is not a valid message."""


class Channel:
    """One end of a worker pipe, speaking msgpack maps."""

    def __init__(
        self,
        connection: Any,
        *,
        max_bytes: int,
        receiver: Callable[[int], bytearray | mmap.mmap] = fresh_buffer,
    ) -> None:
        self.connection = connection
        self.max_bytes = max_bytes
        self.receiver = receiver
        self._send_lock = threading.Lock()

    def send(self, message: dict[str, Any], *, payload: tuple[str, Sequence[bytes | memoryview]] | None = None) -> None:
        """Send a map; ``payload=(field, parts)`` sends the parts' bytes to arrive as ``message[field]``."""
        views: list[memoryview] = []
        if payload is not None:
            views = [memoryview(part).cast("B") for part in payload[1]]
            message = {**message, "payload_field": payload[0], "payload": sum(v.nbytes for v in views)}
        data = msgpack.packb(message, use_bin_type=True)
        with self._send_lock:
            try:
                self.connection.send_bytes(data)
                fd = self.connection.fileno()
                for view in views:
                    while view.nbytes:
                        view = view[os.write(fd, view) :]
            except (OSError, ValueError) as exc:
                raise BrokenChannel(f"cannot send to the other side: {exc}") from None

    def recv(self) -> dict[str, Any]:
        try:
            data = self.connection.recv_bytes(self.max_bytes)
        except EOFError:
            raise BrokenChannel("the other side closed the pipe") from None
        except (OSError, ValueError) as exc:
            raise BrokenChannel(f"unreadable message: {exc}") from None
        try:
            message = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
        except Exception as exc:
            raise BrokenChannel(f"malformed message: {type(exc).__name__}") from None
        if type(message) is not dict:
            raise BrokenChannel("malformed message: not a map")
        size = message.pop("payload", None)
        field = message.pop("payload_field", None)
        if size is not None or field is not None:
            if type(size) is not int or not 0 <= size <= self.max_bytes or type(field) is not str:
                raise BrokenChannel("malformed message: bad payload header")
            message[field] = self._read_exactly(size)
        return message

    def _read_exactly(self, size: int) -> bytearray | mmap.mmap:
        try:
            buffer = self.receiver(size)
        except OSError as exc:
            raise BrokenChannel(f"no room for a {size}-byte payload: {exc}") from None
        view = memoryview(buffer)
        fd = self.connection.fileno()
        try:
            while view.nbytes:
                try:
                    got = os.readv(fd, [view])
                except OSError as exc:
                    raise BrokenChannel(f"unreadable payload: {exc}") from None
                if got == 0:
                    raise BrokenChannel("the other side closed the pipe in the middle of a payload")
                view = view[got:]
        except BrokenChannel:
            view.release()
            discard = getattr(buffer, "discard", None)
            if discard is not None:
                discard()
            raise
        view.release()
        return buffer

    def poll(self, timeout: float) -> bool:
        try:
            return self.connection.poll(timeout)
        except (OSError, ValueError, EOFError):
            return True

    def close(self) -> None:
        try:
            self.connection.close()
        except OSError:
            pass
