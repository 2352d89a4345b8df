"""A view's output carries its first state for the JupyterLab extension's renderer, when it is small."""

from __future__ import annotations

import base64

import numpy as np
import torch

from nnsight_jupyter.widgets import ModuleTree, TensorView
from nnsight_jupyter.widgets.view import SAVED_LIMIT, VIEW_MIME


def _restore(saved: dict) -> dict:
    state = dict(saved["state"])
    for path, data in zip(saved["buffer_paths"], saved["buffers"]):
        node = state
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = base64.b64decode(data)
    return state


def test_a_small_tensors_output_holds_its_state_with_the_buffers_in_base64():
    t = torch.randn(6, 40, generator=torch.Generator().manual_seed(1))
    view = TensorView(t, name="small")
    data, _ = view._repr_mimebundle_()
    saved = data[VIEW_MIME]
    assert saved["view"] == "tensor"
    state = _restore(saved)
    assert state["shape"] == [6, 40] and state["name"] == "small"
    window = np.frombuffer(state["window_data"], dtype=np.float32)
    assert np.array_equal(np.sort(window), np.sort(t.numpy().ravel()))
    assert not any(key.startswith("_") and key != "_view" for key in state)


def test_a_module_trees_output_holds_its_names_and_parents():
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
    saved = ModuleTree(net)._repr_mimebundle_()[0][VIEW_MIME]
    state = _restore(saved)
    assert state["names"][1:] == [name for name, _ in net.named_modules()][1:]
    assert np.frombuffer(state["parents"], dtype=np.int32).tolist()[1:] == [0, 0]


def test_a_large_tensor_is_left_to_its_static_html():
    t = torch.randn(64, 512)
    assert t.numel() * 4 > SAVED_LIMIT
    data, _ = TensorView(t)._repr_mimebundle_()
    assert VIEW_MIME not in data and "text/html" in data
