"""Run the same trace on a server: `model.trace(..., remote=True)`, and what a notebook needs around it.

    from nnsight_jupyter.remote import CONFIG, job
    CONFIG.host, CONFIG.api_key = "http://127.0.0.1:8000", "..."
    with model.trace("Hello", remote=True, timeout=60):
        h = model.layers[5].output.save()
    values = job("...").values()          # a job submitted earlier with blocking=False, by id

`CONFIG` holds the server's address and key (see `nnsight_jupyter.settings` for the environment
variables and the config file); with no host anywhere, the first remote trace starts a local
daemon (`stop_daemon()` ends it). `RemoteClient` talks to one server and can be passed as
`remote=client`; `LocalSimulation` runs the whole remote path in process (`remote="local"`).

The names are loaded on first use, so importing this package (and the codec under it) does not
import the HTTP client.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "CONFIG",
    "JobHandle",
    "LocalSimulation",
    "RemoteBackend",
    "RemoteClient",
    "RemoteConfig",
    "job",
    "stop_daemon",
]

_WHERE = {
    "CONFIG": "..settings",
    "RemoteConfig": "..settings",
    "JobHandle": ".client",
    "RemoteClient": ".client",
    "job": ".client",
    "LocalSimulation": ".backends",
    "RemoteBackend": ".backends",
    "stop_daemon": ".daemon",
}


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(where, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
