"""Where the remote backend is and how to authenticate: the one place settings are read.

Precedence, highest first: values set on `CONFIG` in code (or with `%nnsight config`), the
environment (`NNSIGHT_JUPYTER_HOST`, `NNSIGHT_JUPYTER_API_KEY`), then the config file
(`$XDG_CONFIG_HOME/nnsight-jupyter/config.json`, default `~/.config/...`), which holds
`{"host": ..., "api_key": ...}`. With no host anywhere, remote traces use a local backend daemon
that is started on demand (see `remote.daemon`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import NNsightError

ENV_HOST = "NNSIGHT_JUPYTER_HOST"
ENV_API_KEY = "NNSIGHT_JUPYTER_API_KEY"


def config_file() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "nnsight-jupyter" / "config.json"


@dataclass
class RemoteConfig:
    """Settings for `remote=True`; attributes left as None fall back to the environment and the file."""

    host: str | None = None
    api_key: str | None = None
    timeout: float | None = None
    poll_interval: float = 0.5
    _file_cache: dict[str, Any] | None = field(default=None, repr=False)

    def _file(self) -> dict[str, Any]:
        path = config_file()
        if not path.exists():
            return {}
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise NNsightError(f"Cannot read {path}: {exc}. Fix or delete the file.") from exc
        if not isinstance(data, dict):
            raise NNsightError(f"{path} must hold a JSON object like {{\"host\": ..., \"api_key\": ...}}.")
        return data

    def resolved_host(self) -> str | None:
        return self.host or os.environ.get(ENV_HOST) or self._file().get("host")

    def resolved_api_key(self) -> str | None:
        return self.api_key or os.environ.get(ENV_API_KEY) or self._file().get("api_key")

    def set(self, key: str, value: str) -> None:
        """Set one setting by name (`host`, `api_key`, `timeout`), as `%nnsight config` does."""
        aliases = {"remote_host": "host", "url": "host", "key": "api_key", "remote_api_key": "api_key"}
        key = aliases.get(key, key)
        if key not in ("host", "api_key", "timeout", "poll_interval"):
            raise NNsightError(f"Unknown setting {key!r}; choose host, api_key, timeout or poll_interval.")
        setattr(self, key, float(value) if key in ("timeout", "poll_interval") else value)


CONFIG = RemoteConfig()
