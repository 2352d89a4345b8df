"""Every setting read from outside the code: environment variables, the config file, and the folders they pick.

Nothing else in the package reads `os.environ` or the config file, so each variable is named,
documented and given its default in one place:

=================================  ==========================================================
``NNSIGHT_JUPYTER_HOST``           the remote server for ``remote=True`` (else a local daemon)
``NNSIGHT_JUPYTER_API_KEY``        the key sent to that server
``NNSIGHT_JUPYTER_CACHE``          the cache folder (converted models, the daemon, server data);
                                   default ``$XDG_CACHE_HOME/nnsight-jupyter``, else
                                   ``~/.cache/nnsight-jupyter``
``NNSIGHT_JUPYTER_SERVER_DIR``     ``nnsight-jupyter serve``'s data folder (default ``server/`` in
                                   the cache)
``NNSIGHT_JUPYTER_API_KEY_FILE``   ``serve``'s file of hashed API keys
``NNSIGHT_JUPYTER_DAEMON_DIR``     the local daemon's folder (default ``daemon/`` in the cache)
``XDG_CONFIG_HOME``                where the config file lives: ``nnsight-jupyter/config.json``
                                   (default ``~/.config``)
``HF_HUB_OFFLINE``,                set to 1/true/yes/on: never contact the Hugging Face Hub
``TRANSFORMERS_OFFLINE``
``HF_ENDPOINT``                    the Hub address, when ``huggingface_hub`` is not installed
``NNSIGHT_JUPYTER_DEBUG``          set to 1/true/yes/on: a trace error shows the engine's frames
                                   too, not only the user's lines (also ``CONFIG.debug = True``,
                                   or nnsight's spelling ``CONFIG.APP.DEBUG = True``)
=================================  ==========================================================

The config file holds ``{"host": ..., "api_key": ...}``. For the remote backend the precedence is,
highest first: values set on :data:`CONFIG` in code (or with ``%nnsight config``), the
environment, the config file. Variables are read when a value is needed, not at import, so
tests and notebooks can change them at any time.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import NNsightError

__all__ = [
    "CONFIG",
    "ENV_API_KEY",
    "ENV_API_KEY_FILE",
    "ENV_CACHE",
    "ENV_DEBUG",
    "ENV_DAEMON_DIR",
    "ENV_HOST",
    "ENV_SERVER_DIR",
    "RemoteConfig",
    "api_key_file",
    "cache_dir",
    "config_file",
    "daemon_dir",
    "debug_tracebacks",
    "hub_endpoint",
    "hub_offline",
    "hub_offline_variable",
    "read_config_file",
    "server_dir",
]

ENV_HOST = "NNSIGHT_JUPYTER_HOST"
ENV_API_KEY = "NNSIGHT_JUPYTER_API_KEY"
ENV_CACHE = "NNSIGHT_JUPYTER_CACHE"
ENV_SERVER_DIR = "NNSIGHT_JUPYTER_SERVER_DIR"
ENV_API_KEY_FILE = "NNSIGHT_JUPYTER_API_KEY_FILE"
ENV_DAEMON_DIR = "NNSIGHT_JUPYTER_DAEMON_DIR"
ENV_DEBUG = "NNSIGHT_JUPYTER_DEBUG"
_HUB_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_TRUE = {"1", "true", "yes", "on"}
SIDEBAR_POLL_S = 5.0
"""Default seconds between an open sidebar's health checks: a stopped server shows within this long."""


def _env(name: str) -> str | None:
    value = os.environ.get(name)
    return value if value else None


# ----- folders -----------------------------------------------------------------------------------
def cache_dir() -> Path:
    """Root folder for everything cached: ``$NNSIGHT_JUPYTER_CACHE``, else the XDG cache location.

    The XDG location means the 538 MB model conversion is shared by every checkout and virtual
    environment of the same user; the variable lets CI and tests use a throwaway folder.
    """
    explicit = _env(ENV_CACHE)
    if explicit:
        return Path(explicit).expanduser()
    xdg = _env("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "nnsight-jupyter"
    return Path.home() / ".cache" / "nnsight-jupyter"


def server_dir() -> Path:
    """``serve``'s default data folder: ``$NNSIGHT_JUPYTER_SERVER_DIR``, else ``server/`` in the cache."""
    explicit = _env(ENV_SERVER_DIR)
    return Path(explicit).expanduser() if explicit else cache_dir() / "server"


def daemon_dir() -> Path:
    """The local daemon's folder: ``$NNSIGHT_JUPYTER_DAEMON_DIR``, else ``daemon/`` in the cache."""
    explicit = _env(ENV_DAEMON_DIR)
    return Path(explicit).expanduser() if explicit else cache_dir() / "daemon"


def api_key_file() -> Path | None:
    """``serve``'s default key file, from ``$NNSIGHT_JUPYTER_API_KEY_FILE`` (None when unset)."""
    explicit = _env(ENV_API_KEY_FILE)
    return Path(explicit).expanduser() if explicit else None


def config_file() -> Path:
    """``$XDG_CONFIG_HOME/nnsight-jupyter/config.json`` (default ``~/.config/...``)."""
    base = _env("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "nnsight-jupyter" / "config.json"


def read_config_file() -> dict[str, Any]:
    """The config file's settings ({} when there is none); a broken file is an error naming it."""
    path = config_file()
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise NNsightError(f"Cannot read {path}: {exc}. Fix or delete the file.") from exc
    if not isinstance(data, dict):
        raise NNsightError(f'{path} must hold a JSON object like {{"host": ..., "api_key": ...}}.')
    return data


# ----- the Hugging Face Hub -----------------------------------------------------------------------
def hub_offline_variable() -> str | None:
    """The variable that switches the Hub off (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``), if one is set."""
    for name in _HUB_OFFLINE_VARIABLES:
        if os.environ.get(name, "").strip().lower() in _TRUE:
            return name
    return None


def hub_endpoint() -> str:
    """The Hub address that ``huggingface_hub`` would contact (its setting, else ``HF_ENDPOINT`` or the default)."""
    try:
        from huggingface_hub import constants

        return str(constants.ENDPOINT)
    except ImportError:
        return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Forbid Hugging Face Hub traffic during the conversion, and only then.

    ``huggingface_hub`` reads ``HF_HUB_OFFLINE`` once, at import time, so it is imported first
    (with the caller's environment) and its constant is switched along with the variable;
    otherwise a first import inside this block would leave the whole process offline.
    """
    try:
        import huggingface_hub.constants as hub_constants
    except ImportError:
        hub_constants = None
    saved_env = os.environ.get("HF_HUB_OFFLINE")
    saved_const = getattr(hub_constants, "HF_HUB_OFFLINE", None)
    os.environ["HF_HUB_OFFLINE"] = "1"
    if hub_constants is not None:
        hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if saved_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved_env
        if hub_constants is not None:
            hub_constants.HF_HUB_OFFLINE = saved_const


# ----- the remote backend ------------------------------------------------------------------------
_ALIASES = {"remote_host": "host", "url": "host", "key": "api_key", "remote_api_key": "api_key"}


@dataclass
class RemoteConfig:
    """Settings for `remote=True`; attributes left as None fall back to the environment and the file.

    ``timeout`` is the default time limit, in seconds, of a remote trace that passes none.
    ``sidebar_poll`` is how often, in seconds, a kernel whose JupyterLab sidebar is open asks its
    servers' `/health` and its unfinished jobs' status (default :data:`SIDEBAR_POLL_S`).
    """

    host: str | None = None
    api_key: str | None = None
    timeout: float | None = None
    sidebar_poll: float | None = None
    debug: bool | None = None
    """Trace errors show the engine's frames as well as the user's lines (None: the environment decides)."""

    @property
    def APP(self) -> _AppSettings:  # noqa: N802 - nnsight's spelling, CONFIG.APP.DEBUG
        return _AppSettings(self)

    def resolved_host(self) -> str | None:
        return self.host or _env(ENV_HOST) or read_config_file().get("host")

    def resolved_api_key(self) -> str | None:
        return self.api_key or _env(ENV_API_KEY) or read_config_file().get("api_key")

    def resolved_sidebar_poll(self) -> float:
        """Seconds between an open sidebar's checks of the servers; a value that is not a positive number is
        an error saying so (the sidebar's thread would otherwise spin or never wake)."""
        value = SIDEBAR_POLL_S if self.sidebar_poll is None else self.sidebar_poll
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            seconds = float("nan")
        if not seconds > 0 or seconds == float("inf"):
            raise NNsightError(
                f"CONFIG.sidebar_poll is {value!r}: set it to a positive number of seconds, "
                "e.g. %nnsight config sidebar_poll=5."
            )
        return seconds

    def set(self, key: str, value: str) -> None:
        """Set one setting by name (`host`, `api_key`, `timeout`, `sidebar_poll`, `debug`), as `%nnsight config`
        does."""
        key = _ALIASES.get(key, key)
        if key not in ("host", "api_key", "timeout", "sidebar_poll", "debug"):
            raise NNsightError(f"Unknown setting {key!r}; choose host, api_key, timeout, sidebar_poll or debug.")
        if key == "debug":
            self.debug = value.strip().lower() in _TRUE
            return
        if key == "sidebar_poll":
            # A bad value raises, naming the fix; the text goes in as given so the message quotes it.
            self.sidebar_poll = RemoteConfig(sidebar_poll=value).resolved_sidebar_poll()  # type: ignore[arg-type]
            return
        setattr(self, key, float(value) if key == "timeout" else value)


class _AppSettings:
    """`CONFIG.APP.DEBUG`: nnsight's name for `CONFIG.debug`."""

    _config: RemoteConfig

    def __init__(self, config: RemoteConfig) -> None:
        object.__setattr__(self, "_config", config)

    @property
    def DEBUG(self) -> bool:  # noqa: N802
        return debug_tracebacks()

    @DEBUG.setter
    def DEBUG(self, value: bool) -> None:  # noqa: N802
        self._config.debug = bool(value)


def debug_tracebacks() -> bool:
    """Whether trace errors keep the engine's frames (`CONFIG.debug`, else ``NNSIGHT_JUPYTER_DEBUG``)."""
    if CONFIG.debug is not None:
        return CONFIG.debug
    return (_env(ENV_DEBUG) or "").strip().lower() in _TRUE


CONFIG = RemoteConfig()
"""The settings `remote=True` uses in this process."""
