"""SavedValues and show(): the table of what a trace saved, and each row's TensorView on request."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nnsight_jupyter import NNsight, show
from nnsight_jupyter.show import view_for
from nnsight_jupyter.tracing.saving import NotSaved
from nnsight_jupyter.widgets import ModuleTree, SavedValues, TensorView


def test_rows_and_previews():
    torch.manual_seed(0)
    h = torch.randn(1, 5, 300)
    norms = [float(i) ** 0.5 for i in range(30)]
    layers = [torch.randn(2, 3) for _ in range(4)]
    table = SavedValues({"h": h, "norms": norms, "layers": layers, "n": 3, "note": "hello", "gone": NotSaved("gone")})
    rows = {r["name"]: r for r in table.rows}
    assert list(rows) == ["h", "norms", "layers", "n", "note"]
    assert rows["h"]["shape"] == [1, 5, 300] and rows["h"]["dtype"] == "float32" and rows["h"]["openable"]
    assert rows["h"]["summary"].startswith(f"mean {h.mean().item():.4g}")
    assert rows["norms"]["shape"] == [30] and rows["layers"]["shape"] == [4, 2, 3]
    assert rows["n"] == {**rows["n"], "kind": "value", "summary": "3", "openable": False}
    previews = np.frombuffer(table.previews, dtype=np.float32)
    r = rows["h"]
    mini = previews[r["offset"]:r["offset"] + 5 * 48].reshape(r["preview"])
    assert r["preview"] == [5, 48]
    columns = torch.linspace(0, 299, 48).round().long()
    assert np.array_equal(mini, h[0][:, columns].numpy())
    spark = previews[rows["norms"]["offset"]:][:30]
    assert np.allclose(spark, norms)


def test_opening_a_row_sends_its_tensor_view_and_routes_its_requests():
    h = torch.randn(2, 7, 9)
    table = SavedValues({"h": h})
    sent = []
    table.send = lambda content, buffers=None: sent.append((content, buffers))
    table._on_request(table, {"id": "1", "kind": "open", "name": "h"}, [])
    reply, buffers = sent[-1]
    assert reply["ok"] and reply["state"]["shape"] == [2, 7, 9] and ["window_data"] in reply["buffer_paths"]
    first = np.frombuffer(buffers[reply["buffer_paths"].index(["window_data"])], dtype=np.float32)
    assert np.array_equal(first.reshape(7, 9), h[0].numpy())
    table._on_request(table, {"id": "2", "kind": "tiles", "target": "h", "index": [1, 0, 0], "rows_axis": 1,
                              "cols_axis": 2, "tiles": [[0, 0]]}, [])
    reply, buffers = sent[-1]
    assert reply["ok"] and np.array_equal(np.frombuffer(buffers[0], dtype=np.float32).reshape(7, 9), h[1].numpy())
    table._on_request(table, {"id": "3", "kind": "open", "name": "nope"}, [])
    assert not sent[-1][0]["ok"] and "nope" in sent[-1][0]["error"]


def test_tracer_saved_and_show_tracer():
    net = NNsight(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)))
    x = torch.randn(5, 3)
    with net.trace(x) as tracer:
        hidden = net[0].output.save()
        unsaved = net[1].output * 2
        out = net.output.save()
    assert set(tracer.saved) == {"hidden", "out"} and tracer.saved["out"] is out
    table = view_for(tracer)
    assert isinstance(table, SavedValues) and [r["name"] for r in table.rows] == ["hidden", "out"]


def test_show_picks_the_view_and_explains_what_it_cannot_show(monkeypatch):
    shown = []
    monkeypatch.setattr("IPython.display.display", lambda obj: shown.append(obj))
    net = torch.nn.Sequential(torch.nn.Linear(3, 4))
    show(torch.zeros(2, 2))
    show(net)
    show(NNsight(net)[0])
    show({"a": torch.ones(3)})
    show([torch.ones(2), torch.zeros(2)])
    kinds = [TensorView, ModuleTree, ModuleTree, SavedValues, TensorView]
    assert len(shown) == len(kinds) and all(isinstance(v, k) for v, k in zip(shown, kinds))
    with pytest.raises(TypeError, match="show\\(\\) has no view for a str. It shows tensors, models"):
        show("hello")


def test_static_fallback_lists_every_value_with_its_picture():
    import base64
    import re

    from nnsight_jupyter.widgets.static import Scale

    from .conftest import decode_png

    torch.manual_seed(1)
    h = torch.randn(3, 4)
    table = SavedValues({"h": h, "n": 7}, title="saved")
    data, _ = table._repr_mimebundle_()
    page = data["text/html"]
    assert page.index("<b>h</b>") < page.index("<b>n</b>") and "[3, 4]" in page
    assert f"mean {h.mean().item():.4g}".replace("e-0", "e-") in page
    png = base64.b64decode(re.search(r"src='data:image/png;base64,([^']+)'", page).group(1))
    pixels = decode_png(png)
    scale = Scale(float(h.min()), float(h.max()))
    assert pixels.shape == (3, 4, 3)
    for r, c in [(0, 0), (2, 3)]:
        assert max(abs(int(a) - int(b)) for a, b in zip(pixels[r, c], scale.rgb(float(h[r, c])))) <= 3
    assert data["text/plain"].splitlines() == [f"h: [3, 4] float32  {table._rows[0].summary_text()}", "n: int  7"]
