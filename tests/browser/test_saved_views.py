"""The extension's renderer draws a saved notebook's views when their widgets are gone.

A notebook shows a small tensor and a module tree, is saved (without widget state, JupyterLab's
default), its kernel is shut down, and the page is opened again: the widgets' models no longer
exist, so the views must be drawn from the state saved in the outputs, with the tensor's
statistics matching the tensor computed here.
"""

from __future__ import annotations

import torch

from .conftest import NotebookPage, screenshot
from .views import close

CELLS = [
    '''
import torch
from nnsight_jupyter import NNsight, show
torch.manual_seed(3)
small = torch.randn(6, 40)
net = NNsight(torch.nn.Sequential(torch.nn.Linear(40, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)))
''',
    'show(small, name="small")',
    "show(net)",
]


def test_saved_views_render_without_their_widgets(lab, browser):
    torch.manual_seed(3)
    small = torch.randn(6, 40).double()
    lab.write_notebook("saved_views.ipynb", CELLS)
    nb = NotebookPage(lab, browser, "saved_views.ipynb").open()
    try:
        nb.run_all()
        page = nb.page
        page.wait_for_function("() => document.querySelectorAll('.nnsj-view').length === 2", timeout=60_000)
        # Live: the widget renders (nothing drawn from the saved state).
        assert page.locator("[data-source='saved']").count() == 0
        nb.save()
    finally:
        nb.close()
    lab.shutdown_kernels()

    import json
    saved = json.loads((lab.folder / "saved_views.ipynb").read_text())
    kinds = [sorted(o.get("data", {})) for c in saved["cells"] for o in c.get("outputs", [])]
    assert sum("application/vnd.nnsight-jupyter.view+json" in k for k in kinds) == 2, kinds
    again = NotebookPage(lab, browser, "saved_views.ipynb").open()
    try:
        page = again.page
        page.wait_for_function("() => document.querySelectorAll('[data-source=saved] .nnsj-view').length === 2",
                               timeout=60_000)
        view = page.locator("[data-source='saved'] .nnsj-tensor")
        shown = {s.get_attribute("data-stat"): s.inner_text() for s in view.locator("[data-stat]").all()}
        assert close(shown["min"], float(small.min()), 4)
        assert close(shown["max"], float(small.max()), 4)
        assert "small" in view.inner_text()
        tree = page.locator("[data-source='saved'] .nnsj-view").nth(1)
        assert tree.inner_text().count("Linear") >= 2
        screenshot(view, "saved_tensor_view")
        assert not [line for line in again.console if "pageerror" in line]
    finally:
        again.close()
        lab.shutdown_kernels()
