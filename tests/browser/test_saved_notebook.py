"""A saved notebook with 20 views: its size, the bundle stored once, and nbconvert's HTML opened from file://."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from .conftest import ARTIFACTS, screenshot
from .views import close

TENSORS = 17
CELLS = [
    '''
import torch
from nnsight_jupyter import NNsight, show
from nnsight_jupyter.widgets import JobStatus
net = NNsight(torch.nn.Sequential(*[torch.nn.Linear(32, 32) for _ in range(12)], torch.nn.Linear(32, 4)))
with torch.no_grad(), net.trace(torch.randn(2, 32)) as tracer:
    middle = net[5].output.save()
    out = net.output.save()
''',
    *[f'''
torch.manual_seed({k})
show(torch.randn(4, 96, 200) * {k + 1}, name="t{k}")
''' for k in range(TENSORS)],
    "show(net)",
    "show(tracer)",
    '''
job = JobStatus("job-7", "smollm2")
job.update({"type": "completed"})
job
''',
]


def tensor(k: int) -> torch.Tensor:
    torch.manual_seed(k)
    return torch.randn(4, 96, 200) * (k + 1)


@pytest.fixture(scope="module")
def notebook(open_notebook):
    return open_notebook("twenty_views.ipynb", CELLS)


def test_twenty_views_save_small_and_nbconvert_shows_their_fallbacks(notebook, lab, browser):
    page = notebook.page
    assert page.locator(".nnsj-view").count() == 20
    notebook.save()
    path = lab.folder / "twenty_views.ipynb"
    size = path.stat().st_size
    saved = json.loads(path.read_text())
    assert "widgets" not in saved["metadata"]  # JupyterLab's default: no widget state in the file
    assert size < 1_000_000, size

    html_path = ARTIFACTS / "twenty_views.html"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, "-m", "nbconvert", "--to", "html", "--output-dir", str(ARTIFACTS),
                           str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    offline = browser.new_context(viewport={"width": 1100, "height": 900}, offline=True)
    try:
        view = offline.new_page()
        view.goto(html_path.as_uri())
        assert view.locator(".nnsj-static-tensor").count() == TENSORS
        assert view.locator(".nnsj-static-tree").count() == 1 and view.locator(".nnsj-static-saved").count() == 1
        assert view.locator(".nnsj-job").count() == 1
        images = view.locator(".nnsj-static-tensor img")
        assert images.count() == TENSORS
        assert all(images.nth(i).evaluate("(img) => img.complete && img.naturalWidth > 0") for i in range(TENSORS))
        first = view.locator(".nnsj-static-tensor").nth(3)
        t = tensor(3).double()
        assert close(first.locator("[data-stat='min']").inner_text(), float(t.min()), 4)
        assert close(first.locator("[data-stat='std']").inner_text(), float(t.std()), 4)
        assert view.locator(".nnsj-static-tree").inner_text().count("Linear") >= 1
        screenshot(first, "fallback_tensor_view", readme=True)
        screenshot(view.locator(".nnsj-static-tree"), "fallback_module_tree")
        screenshot(view.locator(".nnsj-static-saved"), "fallback_saved_values")
    finally:
        offline.close()

    # With "save widget state" on, the views' code is stored once, not once per view.
    lab.set_widget_state_saving(True)
    try:
        notebook.page.reload()
        notebook.open()
        page.wait_for_function("() => document.querySelectorAll('.nnsj-view').length === 20", timeout=60_000)
        page.evaluate("() => window.jupyterapp.shell.currentWidget.context.model.dirty = true")
        notebook.save()
        with_state = path.stat().st_size
        text = path.read_text()
        state = json.loads(text)["metadata"]["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
        bundles = [m for m in state.values() if "code" in m["state"] and "hash" in m["state"]]
        assert len(bundles) == 1, len(bundles)
        assert text.count("nnsight-jupyter-views-css") == 1
    finally:
        lab.set_widget_state_saving(False)
    (ARTIFACTS / "saved_notebook_measurements.json").write_text(json.dumps(
        {"views": 20, "saved_bytes": size, "saved_with_widget_state_bytes": with_state}))
    print(f"\nnotebook with 20 views: {size / 1024:.0f} KB saved; {with_state / 1024:.0f} KB with widget state")
