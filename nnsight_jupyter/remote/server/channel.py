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
"""

from __future__ import annotations

import threading
from typing import Any

import msgpack

__all__ = ["BrokenChannel", "Channel"]


class BrokenChannel(Exception):
    """The other side closed the pipe, or sent something that is not a valid message."""


class Channel:
    """One end of a worker pipe, speaking msgpack maps."""

    def __init__(self, connection: Any, *, max_bytes: int) -> None:
        self.connection = connection
        self.max_bytes = max_bytes
        self._send_lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        data = msgpack.packb(message, use_bin_type=True)
        with self._send_lock:
            try:
                self.connection.send_bytes(data)
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
        return message

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
