"""The same views in Notebook 7 (its own front-end, the same widget manager): drawn numbers and hover."""

from __future__ import annotations

import pytest
import torch

from .conftest import screenshot
from .views import close, hover, hovered_value, stats

CELLS = [
    '''
import torch
from torch import nn
from nnsight_jupyter import show
torch.manual_seed(3)
x = torch.randn(2, 6, 40)
show(x, name="x")
''',
    "show(nn.Sequential(*[nn.Linear(8, 8) for _ in range(6)], nn.ReLU()))",
]


@pytest.fixture(scope="module")
def notebook(open_notebook):
    return open_notebook("notebook7.ipynb", CELLS, notebook7=True)


def test_views_render_in_notebook_7(notebook):
    torch.manual_seed(3)
    x = torch.randn(2, 6, 40)
    view = notebook.output(0).locator('.nnsj-view[data-view="tensor"]')
    view.wait_for()
    shown = stats(view)
    assert close(shown["mean"], float(x.double().mean()), 4) and close(shown["max"], float(x.max()), 4)
    text = hover(notebook.page, view.locator(".nnsj-heatmap"), 4, 33)
    assert abs(hovered_value(text) - float(x[0, 4, 33])) < 1e-6
    tree = notebook.output(1).locator('.nnsj-view[data-view="module_tree"]')
    tree.wait_for()
    assert tree.locator('.nnsj-vlist-row[data-path="0"] .nnsj-label').inner_text() == "0–5"
    assert tree.locator('.nnsj-vlist-row[data-path="0"] .nnsj-class').inner_text() == "6 × Linear"
    screenshot(view, "notebook7_tensor_view")
