"""The sidebar and the local daemon: a daemon that stops is shown unreachable with what to do, and the
next remote trace brings it back healthy.

With no server configured, the notebook's `%%trace ... --remote` cell starts the local daemon
(`nnsight-jupyter serve` on 127.0.0.1, serving the bundled SmolLM2) in a folder of this test's own.
The test reads where it runs from its `daemon.json`, asks its `/health` directly, and stops it from
outside the kernel as anything else might (a signal to its process group), with no cell running:
the sidebar learns it from the kernel's watcher thread alone.
"""

from __future__ import annotations

import json
import os
import signal
import time

import httpx
import pytest

from nnsight_jupyter.remote.daemon import stop_daemon

from .conftest import NotebookPage, screenshot

pytestmark = pytest.mark.slow

SIDEBAR = "#nnsight-jupyter-sidebar"
PROMPT = "The capital of France is"
TRACE = f'%%trace smollm2 "{PROMPT}" --remote\nlogits = model.lm_head.output[0, -1].save()'


def wait_health(page, host: str, health: str, timeout_s: float = 60) -> str:
    """The text of `host`'s row once the sidebar shows it with `health` (ok, unreachable, ...)."""
    row = f"{SIDEBAR} .nnsj-sb-host[data-host='{host}']"
    page.wait_for_function(f"() => document.querySelector(\"{row}\")?.dataset.health === '{health}'",
                           timeout=timeout_s * 1000)
    return page.locator(row).inner_text()


def run_code(page, code: str) -> dict:
    """Run `code` in the notebook's kernel and return its reply's content (status, and the error if any)."""
    return page.evaluate("""(code) => window.jupyterapp.shell.currentWidget.sessionContext.session.kernel
        .requestExecute({code}).done.then((reply) => reply.content)""", code)


def test_a_stopped_local_daemon_is_shown_and_the_next_remote_trace_brings_it_back(lab, browser, tmp_path,
                                                                                  monkeypatch):
    folder = tmp_path / "daemon"
    monkeypatch.setenv("NNSIGHT_JUPYTER_DAEMON_DIR", str(folder))  # for stop_daemon() at the end
    setup = f"""%load_ext nnsight_jupyter
import os
os.environ["NNSIGHT_JUPYTER_DAEMON_DIR"] = {str(folder)!r}
os.environ["XDG_CONFIG_HOME"] = {str(tmp_path / "config")!r}
os.environ.pop("NNSIGHT_JUPYTER_HOST", None)
from nnsight_jupyter.settings import CONFIG
CONFIG.host = None
CONFIG.sidebar_poll = 1"""
    lab.write_notebook("daemon.ipynb", [setup, TRACE])
    nb = NotebookPage(lab, browser, "daemon.ipynb").open()
    page = nb.page
    with nb.checked(cleanup=stop_daemon):
        page.evaluate("() => window.jupyterapp.shell.activateById('nnsight-jupyter-sidebar')")
        nb.run_all()
        first = json.loads((folder / "daemon.json").read_text())
        host = f"http://127.0.0.1:{first['port']}"
        version = httpx.get(f"{host}/health", timeout=10).json()["package_version"]
        text = wait_health(page, host, "ok")
        assert "(local daemon)" in text and f"ok (server {version})" in text

        # The daemon stops; no cell runs, and the sidebar says so and what to do.
        os.killpg(first["pid"], signal.SIGTERM)
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{host}/health", timeout=2)
            except httpx.ConnectError:
                break
            assert time.monotonic() < deadline, "the daemon still answers after SIGTERM"
            time.sleep(0.2)
        text = wait_health(page, host, "unreachable", 30)
        assert "(local daemon)" in text and "unreachable: nothing listens at" in text
        assert "The local daemon has stopped since it was started; the next remote=True trace starts it again" in text
        screenshot(page.locator(SIDEBAR), "sidebar-daemon-stopped")

        # The next remote trace starts it again (a new process on a new port); the sidebar shows that one healthy.
        reply = run_code(page, TRACE)
        assert reply["status"] == "ok", reply
        again = json.loads((folder / "daemon.json").read_text())
        assert again["pid"] != first["pid"]
        new_host = f"http://127.0.0.1:{again['port']}"
        assert httpx.get(f"{new_host}/health", timeout=10).json()["package_version"] == version
        text = wait_health(page, new_host, "ok", 30)
        assert "(local daemon)" in text and f"ok (server {version})" in text
        if new_host != host:  # the stopped one is still listed, as where the first job went
            old = page.locator(f"{SIDEBAR} .nnsj-sb-host[data-host='{host}']").inner_text()
            assert "(jobs)" in old and "which no longer answers" in old
        screenshot(page.locator(SIDEBAR), "sidebar-daemon-back")
