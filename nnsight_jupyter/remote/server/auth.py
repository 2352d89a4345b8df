"""API keys: a file of hashed keys, and a pure ASGI middleware that checks every request.

File format (``--api-key-file``, or ``$NNSIGHT_JUPYTER_API_KEY_FILE``)::

    # comments and blank lines are ignored
    alice sha256:5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8
    ci-bot sha256:...

One key per line: a name (who the key belongs to; jobs are visible only to the key name that
submitted them) and the SHA-256 of the key. The plain key is never stored: ``create_api_key``
(``nnsight-jupyter serve --add-key NAME``) generates one, appends its hash and returns it once.

Why SHA-256 and no salt: salts and slow hashes (scrypt) protect *guessable* secrets such as
passwords from precomputed tables and brute force. These keys are 256 random bits made by
``secrets``, so neither attack applies, and a fast hash keeps each request's check at
microseconds instead of the tens of milliseconds scrypt would add to every poll.

The file is re-read when it changes (checked at most once a second), so adding or removing a
key needs no restart.

Clients send ``Authorization: Bearer <key>`` (or ``X-API-Key: <key>``). A missing key is 401,
an unknown one 403; ``/health`` needs none.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import threading
import time
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from .responses import error_response

__all__ = ["ApiKeyMiddleware", "ApiKeys", "create_api_key", "hash_key", "OWNER_SCOPE_KEY"]

OWNER_SCOPE_KEY = "nnsight_jupyter.owner"
"""Where the middleware leaves the key's name in the ASGI scope for the routes."""

KEY_PREFIX = "nnsj_"
_LINE = re.compile(r"^(?P<name>[\w.@\-]{1,100})\s+sha256:(?P<digest>[0-9a-f]{64})\s*$")
_RELOAD_EVERY_S = 1.0


def hash_key(key: str) -> str:
    """The ``sha256:<hex>`` form stored in the key file."""
    return "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()


def create_api_key(path: str | os.PathLike[str], name: str) -> str:
    """Append a new key for ``name`` to the key file (created with mode 0600) and return it.

    The returned key is the only copy: give it to its user, who passes it as ``Authorization:
    Bearer <key>``.

        key = create_api_key("keys.txt", "alice")
    """
    if not re.fullmatch(r"[\w.@\-]{1,100}", name):
        raise ValueError(f"key names are 1-100 letters, digits or . @ - _; got {name!r}")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as handle:
        if handle.tell() == 0:
            handle.write("# nnsight-jupyter API keys: <name> sha256:<hex digest of the key>\n")
        handle.write(f"{name} {hash_key(key)}\n")
    return key


class ApiKeys:
    """The key file, parsed; re-read when its modification time changes."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._by_digest: dict[str, str] = {}
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        self._load(force=True)

    def _load(self, force: bool = False) -> None:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            if force:
                raise ValueError(
                    f"API key file {str(self.path)!r} does not exist; create it with "
                    f"`nnsight-jupyter serve --add-key NAME --api-key-file {self.path}`"
                ) from None
            self._by_digest = {}
            self._stamp = None
            return
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp == self._stamp and not force:
            return
        keys: dict[str, str] = {}
        for number, raw in enumerate(self.path.read_text(encoding="utf-8").splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            match = _LINE.match(line)
            if match is None:
                raise ValueError(
                    f"{self.path}, line {number}: expected '<name> sha256:<64 hex digits>', got "
                    f"{line[:60]!r}; create keys with `nnsight-jupyter serve --add-key NAME`"
                )
            keys["sha256:" + match["digest"]] = match["name"]
        self._by_digest = keys
        self._stamp = stamp

    def owner(self, key: str) -> str | None:
        """The name the key belongs to, or None if it is not in the file."""
        now = time.monotonic()
        if now - self._checked > _RELOAD_EVERY_S:
            with self._lock:
                self._checked = now
                try:
                    self._load()
                except (OSError, ValueError):
                    pass
        return self._by_digest.get(hash_key(key))

    def __len__(self) -> int:
        return len(self._by_digest)


class ApiKeyMiddleware:
    """Refuse HTTP requests without a known key (except public paths); record the key's owner.

    With ``keys=None`` (``--insecure-no-auth``) every request is let through as ``anonymous``.
    """

    def __init__(self, app: ASGIApp, *, keys: ApiKeys | None, public_paths: tuple[str, ...] = ("/health",)) -> None:
        self.app = app
        self.keys = keys
        self.public_paths = frozenset(public_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in self.public_paths:
            await self.app(scope, receive, send)
            return
        if self.keys is None:
            scope[OWNER_SCOPE_KEY] = "anonymous"
            await self.app(scope, receive, send)
            return
        key, problem = _key_from_headers(scope.get("headers") or [])
        if key is None:
            response = error_response(
                401,
                "missing API key",
                f"{problem} Send your key as 'Authorization: Bearer <key>' (or 'X-API-Key: <key>'); "
                "the server's operator creates keys with `nnsight-jupyter serve --add-key NAME`.",
                headers={"WWW-Authenticate": "Bearer"},
            )
            await response(scope, receive, send)
            return
        owner = self.keys.owner(key)
        if owner is None:
            response = error_response(
                403,
                "invalid API key",
                "this server does not know the key that was sent; check for a typo or ask the "
                "server's operator for a new key (keys can be revoked by removing their line).",
            )
            await response(scope, receive, send)
            return
        scope[OWNER_SCOPE_KEY] = owner
        await self.app(scope, receive, send)


def _key_from_headers(headers: list[tuple[bytes, bytes]]) -> tuple[str | None, str]:
    authorization = api_key = None
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"authorization":
            authorization = value.decode("latin-1").strip()
        elif lowered == b"x-api-key":
            api_key = value.decode("latin-1").strip()
    if authorization:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer":
            return None, f"the Authorization header uses the {scheme[:20]!r} scheme, not Bearer."
        token = token.strip()
        if not token:
            return None, "the Authorization header has no key after 'Bearer'."
        return token, ""
    if api_key:
        return api_key, ""
    return None, "this request carries no API key."
