"""A local backend daemon, so `remote=True` works with no server configured.

The first remote trace with no host set starts `nnsight-jupyter serve` on 127.0.0.1 (a free port,
a fresh API key known only to this user, its own data folder under the cache) as a detached
process, and records how to reach it in `daemon.json` (mode 0600). Later traces, from this kernel
or another, reuse it while it answers; a daemon that does not serve a model a trace asks for is
restarted with that model added. It runs the same server code as a real deployment, so a notebook
that works against it works against a remote server.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import NNsightError, RemoteConnectionError, RemoteServerError
from ..settings import daemon_dir

START_TIMEOUT_S = 120.0


def _state_file() -> Path:
    return daemon_dir() / "daemon.json"


def _read_state() -> dict[str, Any] | None:
    try:
        return json.loads(_state_file().read_text())
    except (OSError, ValueError):
        return None


def recorded_host() -> str | None:
    """Where the local daemon was last started, from `daemon.json` (it may have stopped since)."""
    state = _read_state()
    return f"http://127.0.0.1:{state['port']}" if state and "port" in state else None


def _write_state(state: dict[str, Any]) -> None:
    fd = os.open(_state_file(), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(state, handle)


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """Hold the daemon folder's start lock (an exclusive ``flock``) while a daemon is found or started."""
    folder = daemon_dir()
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "daemon.lock", "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _client(state: dict[str, Any]):
    from .client import RemoteClient

    return RemoteClient(f"http://127.0.0.1:{state['port']}", state["api_key"])


def _alive(state: dict[str, Any]) -> bool:
    try:
        _client(state).health()
        return True
    except (RemoteConnectionError, RemoteServerError, KeyError):
        return False


def _busy(state: dict[str, Any]) -> bool:
    """Whether any job is queued or running on the daemon (when it cannot tell, assume so)."""
    try:
        models = _client(state).models()
    except (RemoteConnectionError, RemoteServerError, KeyError):
        return True
    return any(entry.get("queued") or entry.get("running") for entry in models)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _daemons(state: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not state:
        return []
    return [state, *state.get("others", [])]


def _kill(state: dict[str, Any]) -> None:
    try:
        os.killpg(int(state["pid"]), signal.SIGTERM)
    except (OSError, KeyError, ValueError):
        pass


def stop_daemon() -> bool:
    """Stop the local daemon (and any started beside it); returns whether one was running."""
    with _locked():
        state = _read_state()
        if not state:
            return False
        for daemon in _daemons(state):
            _kill(daemon)
        _state_file().unlink(missing_ok=True)
        return True


def start_daemon(models: list[str], *, name: str = "") -> dict[str, Any]:
    """Start a daemon serving `models` and wait until it answers; the caller holds the start lock."""
    from .server.auth import create_api_key

    folder = daemon_dir()
    folder.mkdir(parents=True, exist_ok=True)
    suffix = f"-{name}" if name else ""
    keys = folder / f"keys{suffix}.txt"
    keys.unlink(missing_ok=True)
    api_key = create_api_key(keys, "local")
    port = _free_port()
    log = open(folder / f"daemon{suffix}.log", "ab")
    command = [
        sys.executable,
        "-m",
        "nnsight_jupyter.remote.serve",
        "--models",
        ",".join(models),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--api-key-file",
        str(keys),
        "--data-dir",
        str(folder / f"data{suffix}"),
    ]
    process = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
    )
    log.close()
    state = {"pid": process.pid, "port": port, "api_key": api_key, "models": models}
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise NNsightError(
                f"The local nnsight-jupyter daemon exited at start (status {process.returncode}); "
                f"see {folder / f'daemon{suffix}.log'}."
            )
        if _alive(state):
            return state
        time.sleep(0.25)
    os.killpg(process.pid, signal.SIGTERM)
    raise NNsightError(
        f"The local nnsight-jupyter daemon did not answer within {START_TIMEOUT_S:g} s; "
        f"see {folder / f'daemon{suffix}.log'}."
    )


def local_daemon_client(model_id: str | None = None):
    """A client for a local daemon that serves `model_id`, starting one if none does (see the module docstring)."""
    with _locked():
        state = _read_state()
        if state and not _alive(state):
            for daemon in _daemons(state):
                _kill(daemon)
            state = None
        if state is None:
            state = start_daemon([model_id or "smollm2"])
            _write_state(state)
            return _client(state)
        for daemon in _daemons(state):
            if not model_id or model_id in daemon.get("models", []):
                if daemon is state or _alive(daemon):
                    return _client(daemon)
        if not _busy(state) and not state.get("others"):
            _kill(state)
            state = start_daemon(list(dict.fromkeys([*state.get("models", []), model_id])))
            _write_state(state)
            return _client(state)
        others = [d for d in state.get("others", []) if _alive(d)]
        extra = start_daemon([str(model_id)], name=str(len(others) + 1))
        state["others"] = [*others, extra]
        _write_state(state)
        return _client(extra)
