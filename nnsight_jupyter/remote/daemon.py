"""A local backend daemon, so `remote=True` works with no server configured.

The first remote trace with no host set starts `nnsight-jupyter serve` on 127.0.0.1 (a free port,
a fresh API key known only to this user, its own data folder under the cache) as a detached
process, and records how to reach it in `daemon.json` (mode 0600). Later traces, from this kernel
or another, reuse it while it answers; a daemon that does not serve a model a trace asks for is
restarted with that model added. It runs the same server code as a real deployment, so a notebook
that works against it works against a remote server.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import NNsightError
from ..settings import daemon_dir

START_TIMEOUT_S = 120.0


def _state_file() -> Path:
    return daemon_dir() / "daemon.json"


def _read_state() -> dict[str, Any] | None:
    try:
        return json.loads(_state_file().read_text())
    except (OSError, ValueError):
        return None


def _client(state: dict[str, Any]):
    from .client import RemoteClient

    return RemoteClient(f"http://127.0.0.1:{state['port']}", state["api_key"])


def _alive(state: dict[str, Any]) -> bool:
    from .client import RemoteConnectionError, RemoteServerError

    try:
        _client(state).health()
        return True
    except (RemoteConnectionError, RemoteServerError, KeyError):
        return False


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_daemon() -> bool:
    """Stop the local daemon if one runs; returns whether one was stopped."""
    state = _read_state()
    if not state:
        return False
    try:
        os.killpg(int(state["pid"]), signal.SIGTERM)
    except (OSError, KeyError, ValueError):
        pass
    _state_file().unlink(missing_ok=True)
    return True


def start_daemon(models: list[str]) -> dict[str, Any]:
    """Start a daemon serving `models` and wait until it answers."""
    from .server.auth import create_api_key

    folder = daemon_dir()
    folder.mkdir(parents=True, exist_ok=True)
    keys = folder / "keys.txt"
    keys.unlink(missing_ok=True)
    api_key = create_api_key(keys, "local")
    port = _free_port()
    log = open(folder / "daemon.log", "ab")
    command = [
        sys.executable, "-m", "nnsight_jupyter.remote.serve", "--models", ",".join(models), "--host", "127.0.0.1",
        "--port", str(port), "--api-key-file", str(keys), "--data-dir", str(folder / "data"),
    ]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               start_new_session=True)
    state = {"pid": process.pid, "port": port, "api_key": api_key, "models": models}
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise NNsightError(
                f"The local nnsight-jupyter daemon exited at start (status {process.returncode}); "
                f"see {folder / 'daemon.log'}."
            )
        if _alive(state):
            fd = os.open(_state_file(), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                json.dump(state, handle)
            return state
        time.sleep(0.25)
    os.killpg(process.pid, signal.SIGTERM)
    raise NNsightError(f"The local nnsight-jupyter daemon did not answer within {START_TIMEOUT_S:g} s; "
                       f"see {folder / 'daemon.log'}.")


def local_daemon_client(model_id: str | None = None):
    """A client for the local daemon, starting (or restarting) it so that it serves `model_id`."""
    state = _read_state()
    wanted = [model_id] if model_id else []
    if state and _alive(state):
        if not model_id or model_id in state.get("models", []):
            return _client(state)
        stop_daemon()
        wanted = list(dict.fromkeys([*state.get("models", []), model_id]))
    if not wanted:
        wanted = ["smollm2"]
    return _client(start_daemon(wanted))
