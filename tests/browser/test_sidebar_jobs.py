"""The sidebar's remote jobs: a queued job is cancelled from the sidebar, and the server says so.

A real server (uvicorn on 127.0.0.1, the tiny GPT-2 of the server tests, one worker) runs in this
process; the health tests stop it or point the kernel elsewhere and read what the sidebar says.
The notebook submits two jobs with `blocking=False`: one that keeps the worker busy and one that
waits behind it. The sidebar must show the second as queued, and its cancel button must
cancel it on the server, which this test asks directly over HTTP.
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn

from nnsight_jupyter.remote.server.app import create_app
from nnsight_jupyter.remote.server.auth import create_api_key

from ..remote.server.conftest import _wait_ready, free_port, make_config
from .conftest import NotebookPage, screenshot

ROOT = Path(__file__).resolve().parents[2]
SIDEBAR = "#nnsight-jupyter-sidebar"
INTERRUPT = "() => window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.interrupt()"


@contextlib.contextmanager
def serving(tmp_path):
    """The server running, as `(http, key, stop)`: an HTTP client with the key, and a way to stop it early."""
    key = create_api_key(tmp_path / "keys.txt", "notebook")
    config = make_config(tmp_path / "server", tmp_path / "keys.txt", max_job_seconds=60.0)
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(create_app(config), host="127.0.0.1", port=port, log_level="warning",
                                       timeout_graceful_shutdown=2))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    headers = {"Authorization": f"Bearer {key}"}

    def stop():
        uv.should_exit = True
        thread.join(timeout=15)

    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30, headers=headers) as http:
            _wait_ready(http, headers)
            yield http, key, stop
    finally:
        stop()


@pytest.fixture
def server(tmp_path):
    with serving(tmp_path) as (http, key, _stop):
        yield http, key


def test_cancel_a_queued_job_from_the_sidebar(lab, browser, server):
    http, key = server
    setup = f'''
import sys, torch
sys.path.insert(0, {str(ROOT)!r})
from tests.remote.server.tiny_models import tiny_gpt2
from nnsight_jupyter.remote.client import RemoteClient
client = RemoteClient({str(http.base_url)!r}, {key!r}, show_status=False)
tiny = tiny_gpt2()
object.__setattr__(tiny, "remote_id", "tiny")
X = torch.randint(1, 97, (1, 6), generator=torch.Generator().manual_seed(0))
'''
    submit = '''
with tiny.trace(X, remote=client, blocking=False) as busy:
    total = 0
    for i in range(10**10):
        total += i
with tiny.trace(X, remote=client, blocking=False) as waiting:
    h = tiny.transformer.h[0].output.save()
print(busy.job.job_id, waiting.job.job_id)
'''
    lab.write_notebook("jobs.ipynb", ["%load_ext nnsight_jupyter", setup, submit])
    nb = NotebookPage(lab, browser, "jobs.ipynb").open()
    page = nb.page
    busy = waiting = None
    with nb.checked(cleanup=lambda: busy and http.post(f"/jobs/{busy}/cancel")):
        page.evaluate("() => window.jupyterapp.shell.activateById('nnsight-jupyter-sidebar')")
        nb.run_all()
        busy, waiting = nb.output(2).inner_text().split()
        assert http.get(f"/jobs/{waiting}").json()["status"] == "queued"

        row = page.locator(f"{SIDEBAR} .nnsj-sb-job[data-job='{waiting}']")
        row.wait_for(timeout=30_000)
        assert row.get_attribute("data-status") == "queued"
        position = http.get(f"/jobs/{waiting}").json()["position"]
        assert f"queued ({position + 1}" in row.inner_text()
        screenshot(page.locator(SIDEBAR), "sidebar-jobs")

        row.locator(".nnsj-sb-cancel").click()
        page.wait_for_function(
            f"() => document.querySelector(\"{SIDEBAR} .nnsj-sb-job[data-job='{waiting}']\").dataset.status"
            " === 'cancelled'", timeout=30_000)
        assert http.get(f"/jobs/{waiting}").json()["status"] == "cancelled"
        assert "cancelled" in row.inner_text()
        # The busy job was left alone.
        assert http.get(f"/jobs/{busy}").json()["status"] in ("queued", "loading", "running")


def test_the_sidebar_shows_the_servers_health(lab, browser, server):
    from ..remote.server.conftest import free_port

    http, _key = server
    host = str(http.base_url).rstrip("/")
    closed = f"http://127.0.0.1:{free_port()}"
    lab.write_notebook("health.ipynb", ["%load_ext nnsight_jupyter\nfrom nnsight_jupyter.settings import CONFIG\n"
                                        f"CONFIG.host = {host!r}"])
    nb = NotebookPage(lab, browser, "health.ipynb").open()
    page = nb.page
    with nb.checked():
        page.evaluate("() => window.jupyterapp.shell.activateById('nnsight-jupyter-sidebar')")
        nb.run_all()
        row = page.locator(f"{SIDEBAR} .nnsj-sb-host[data-host='{host}']")
        page.wait_for_function(f"() => document.querySelector(\"{SIDEBAR} .nnsj-sb-host[data-host='{host}']\")"
                               "?.dataset.health === 'ok'", timeout=30_000)
        version = http.get("/health").json()["package_version"]
        assert f"ok (server {version})" in row.inner_text()
        assert "(configured)" in row.inner_text()
        screenshot(page.locator(SIDEBAR), "sidebar-health")

        # Another host, where nothing listens: the next cell's snapshot names it and it is checked at once.
        page.evaluate("""(code) => window.jupyterapp.shell.currentWidget.sessionContext.session.kernel
            .requestExecute({code}).done.then(() => undefined)""", f"CONFIG.host = {closed!r}")
        down = page.locator(f"{SIDEBAR} .nnsj-sb-host[data-host='{closed}'][data-health='unreachable']")
        down.wait_for(timeout=30_000)
        assert "unreachable: nothing listens at" in down.inner_text()
        assert f"Start the server at {closed}" in down.inner_text()  # and what to do about it
        assert page.locator(f"{SIDEBAR} .nnsj-sb-host").count() == 1


def test_health_and_jobs_change_in_the_sidebar_while_a_cell_runs(lab, browser, tmp_path):
    """A busy kernel answers no request, yet the sidebar sees a job end and the server stop during a long cell."""
    with serving(tmp_path) as (http, key, stop):
        host = str(http.base_url).rstrip("/")
        version = http.get("/health").json()["package_version"]
        setup = f'''%load_ext nnsight_jupyter
import sys, torch
sys.path.insert(0, {str(ROOT)!r})
from tests.remote.server.tiny_models import tiny_gpt2
from nnsight_jupyter.remote.client import RemoteClient
from nnsight_jupyter.settings import CONFIG
CONFIG.host = {host!r}
CONFIG.sidebar_poll = 1
client = RemoteClient({host!r}, {key!r}, show_status=False)
tiny = tiny_gpt2()
object.__setattr__(tiny, "remote_id", "tiny")
X = torch.randint(1, 97, (1, 6), generator=torch.Generator().manual_seed(0))
with tiny.trace(X, remote=client, blocking=False) as busy:
    total = 0
    for i in range(10**10):
        total += i
print(busy.job.job_id)
'''
        lab.write_notebook("health_busy.ipynb", [setup])
        nb = NotebookPage(lab, browser, "health_busy.ipynb").open()
        page = nb.page
        row = f"{SIDEBAR} .nnsj-sb-host[data-host='{host}']"
        with nb.checked(cleanup=lambda: page.evaluate(INTERRUPT)):
            page.evaluate("() => window.jupyterapp.shell.activateById('nnsight-jupyter-sidebar')")
            nb.run_all()
            job = nb.output(0).inner_text().strip()
            job_row = f"{SIDEBAR} .nnsj-sb-job[data-job='{job}']"
            page.wait_for_function(f"() => document.querySelector(\"{row}\")?.dataset.health === 'ok'",
                                   timeout=30_000)
            assert f"ok (server {version})" in page.locator(row).inner_text()
            page.locator(job_row).wait_for(timeout=30_000)
            assert page.locator(job_row).get_attribute("data-status") in ("queued", "loading", "running")

            page.evaluate("""() => { window.__sleep = window.jupyterapp.shell.currentWidget.sessionContext.session
                .kernel.requestExecute({code: 'import time\\ntime.sleep(120)'}); }""")
            busy = "window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.status === 'busy'"
            page.wait_for_function(f"() => {busy}", timeout=30_000)

            # The job is cancelled on the server, not from the sidebar: its row follows while the cell runs.
            http.post(f"/jobs/{job}/cancel")
            deadline = time.monotonic() + 30
            while http.get(f"/jobs/{job}").json()["status"] != "cancelled":
                assert time.monotonic() < deadline, http.get(f"/jobs/{job}").json()
                time.sleep(0.2)
            page.wait_for_function(
                f"() => document.querySelector(\"{job_row}\")?.dataset.status === 'cancelled' && {busy}",
                timeout=30_000)
            assert "cancelled" in page.locator(job_row).inner_text()

            stop()
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"{host}/health", timeout=5)
            # The row turns unreachable while the same cell still runs (the kernel is busy throughout).
            page.wait_for_function(
                f"() => document.querySelector(\"{row}\")?.dataset.health === 'unreachable' && {busy}",
                timeout=30_000)
            text = page.locator(row).inner_text()
            assert "unreachable: nothing listens at" in text
            assert f"Start the server at {host}" in text and "%nnsight config host=URL" in text
            assert page.evaluate(f"() => {busy}")
            screenshot(page.locator(SIDEBAR), "sidebar-health-busy")
