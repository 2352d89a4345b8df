"""ruff (lint and format) and mypy on nnsight_jupyter/, as configured in pyproject.toml, are clean."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("command", [("ruff", "check", "nnsight_jupyter"),
                                     ("ruff", "format", "--check", "nnsight_jupyter"),
                                     ("mypy",)], ids=["ruff-lint", "ruff-format", "mypy"])
def test_clean(command):
    done = _run(*command)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
