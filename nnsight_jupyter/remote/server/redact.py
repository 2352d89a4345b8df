"""Server details kept out of what users see: its paths, host name and environment values.

What a job prints, raises or saves, and what ``GET /models`` reports, can carry them without any
attack: ``model.config.name_or_path`` is the folder the model was loaded from, a library's
traceback names the Python installation, the sandbox report names folders it could not hide.
:class:`Redactor` replaces each such string with a placeholder; it is built once per process
(the server's and each worker's, before the sandbox scrubs the environment) and applied to job
logs, error messages and tracebacks, saved strings, and the models listing.

Cost: one ``re.sub`` over each log line and error text (a few microseconds), nothing on tensors.
"""

from __future__ import annotations

import os
import re
import site
import socket
import sys
from collections.abc import Iterable
from typing import Any

__all__ = ["Redactor"]

_MIN_PATH = 5  # shorter paths (/tmp, /usr) name nothing about this machine
_MIN_VALUE = 8


def _server_paths(extra: Iterable[str]) -> set[str]:
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, os.getcwd(), os.path.expanduser("~"), *extra}
    try:
        paths.update(site.getsitepackages())
    except AttributeError:
        pass
    paths.update(p for p in sys.path if p)
    resolved = set()
    for path in paths:
        if not path or not os.path.isabs(path):
            continue
        for variant in (path, os.path.realpath(path)):
            variant = variant.rstrip("/")
            if len(variant) >= _MIN_PATH:
                resolved.add(variant)
    return resolved


def _environment_values() -> set[str]:
    values = set()
    for value in os.environ.values():
        for part in value.split(os.pathsep):
            # Words ("true", "xterm") and numbers are not the server's; paths, keys and addresses are.
            if len(part) >= _MIN_VALUE and not part.isalpha() and not part.isdigit():
                values.add(part)
    return values


class Redactor:
    """Replaces server paths, the host name and environment values in text with placeholders."""

    def __init__(self, extra_paths: Iterable[str] = ()) -> None:
        replacements: dict[str, str] = {}
        for value in _environment_values():
            replacements[value] = "<server setting>"
        for path in _server_paths(extra_paths):
            replacements[path] = "<server path>"
        for host in {socket.gethostname(), socket.getfqdn()}:
            if len(host) >= 4 and host != "localhost":
                replacements[host] = "<server host>"
        self.replacements = replacements
        ordered = sorted(replacements, key=len, reverse=True)
        self.pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    @classmethod
    def for_server(cls, config: Any) -> Redactor:
        """The server's own: its data folder, key file and model specs among the paths it hides."""
        return cls([str(config.data_dir), str(config.api_key_file or ""), *(m.spec for m in config.models)])

    def text(self, text: str) -> str:
        if self.pattern is None or not text:
            return text
        return self.pattern.sub(lambda match: self.replacements[match.group(0)], text)

    def value(self, value: Any) -> Any:
        """``value`` with every string in it (through dicts, lists and tuples) redacted."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {self.value(k): self.value(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.value(v) for v in value]
        if isinstance(value, tuple) and type(value) is tuple:
            return tuple(self.value(v) for v in value)
        return value
