"""The JupyterLab extension is installed with the package, and its TypeScript unit tests pass."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from nnsight_jupyter import __version__

ROOT = Path(__file__).resolve().parents[1]


def test_jupyterlab_lists_the_extension_enabled():
    jupyter = Path(sys.executable).with_name("jupyter")
    out = subprocess.run([str(jupyter), "labextension", "list"], capture_output=True, text=True, timeout=120)
    text = re.sub(r"\x1b\[[0-9;]*m", "", out.stdout + out.stderr)
    assert re.search(rf"nnsight-jupyter v{re.escape(__version__)} enabled\s+OK", text), text


def test_typescript_unit_tests():
    npm = shutil.which("npm")
    assert npm, "npm is needed for the front-end's unit tests (scripts/setup.sh checks for it)"
    out = subprocess.run([npm, "--prefix", str(ROOT / "labextension"), "test"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert re.search(r"# fail 0", out.stdout), out.stdout[-2000:]
