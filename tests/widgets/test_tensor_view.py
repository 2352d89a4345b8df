"""TensorView's state, messages, token labels and static fallback, against plain torch."""

from __future__ import annotations

import gc
import json
import re

import numpy as np
import pytest
import torch
from ipywidgets.widgets.widget import _remove_buffers

from nnsight_jupyter.widgets import TensorView
from nnsight_jupyter.widgets.static import Scale

from .conftest import decode_png


def message_size(widget) -> int:
    """Bytes of the widget's first message: its JSON state plus binary buffers."""
    state, _, buffers = _remove_buffers(widget.get_state())
    return len(json.dumps(state)) + sum(memoryview(b).nbytes for b in buffers)


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_a_1gb_tensor_sends_one_small_first_message_and_is_not_copied():
    big = torch.randn(2048, 2048).expand(64, -1, -1).contiguous()
    assert big.numel() * big.element_size() == 2**30
    before = rss()
    view = TensorView(big, name="big")
    grown = rss() - before
    assert view.tensor is big
    assert grown < 64 * 2**20, f"building the view allocated {grown / 2**20:.0f} MB"
    size = message_size(view)
    assert size <= 256 * 1024, size
    state, paths, buffers = _remove_buffers(view.get_state())
    assert sorted(map(tuple, paths)) == [("hist_counts",), ("window_data",)]  # values as binary, never JSON
    first = np.frombuffer(buffers[paths.index(["window_data"])], dtype=np.float32).reshape(64, 512)
    assert np.array_equal(first, big[0, :64, :512].numpy())
    data, _ = view._repr_mimebundle_()
    assert len(data["text/html"].encode()) < 100 * 1024


def test_state_describes_the_tensor():
    x = torch.linspace(-2, 3, 2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    x[1, 2, 3, 4] = float("nan")
    view = TensorView(x, name="x")
    finite = x[torch.isfinite(x)].double()
    assert view.shape == [2, 3, 4, 5] and view.dtype == "float32" and view.device == "cpu"
    assert (view.rows_axis, view.cols_axis, view.index) == (2, 3, [0, 0, 0, 0])
    assert view.stats["min"] == float(finite.min()) and view.stats["max"] == float(finite.max())
    assert view.stats["mean"] == pytest.approx(float(finite.mean()), rel=1e-6)
    assert view.stats["nan"] == 1 and view.tokens is None
    assert view.window["range"] == [float(x[0, 0].min()), float(x[0, 0].max())]


def replies(view):
    sent = []
    view.send = lambda content, buffers=None: sent.append((content, buffers))
    return sent


def test_tile_requests_answer_with_the_slice_by_id():
    x = torch.randn(3, 100, 700)
    view = TensorView(x)
    sent = replies(view)
    view._on_request(view, {"id": "r1", "kind": "tiles", "index": [2, 0, 0], "rows_axis": 2, "cols_axis": 1,
                            "tiles": [[0, 0], [1, 0]]}, [])
    content, buffers = sent[-1]
    assert content["id"] == "r1" and content["ok"] and content["sizes"] == [[64, 100], [64, 100]]
    plane = x[2].t()
    for k, buf in enumerate(buffers):
        got = np.frombuffer(buf, dtype=np.float32).reshape(64, 100)
        assert np.array_equal(got, plane[64 * k:64 * (k + 1)].numpy())
    assert content["range"] == [float(plane.min()), float(plane.max())]


def test_a_bad_request_gets_an_error_reply_and_the_view_keeps_serving():
    view = TensorView(torch.zeros(2, 3, 4))
    sent = replies(view)
    view._on_request(view, {"id": "a", "kind": "tiles", "index": [9, 0, 0], "rows_axis": 1, "cols_axis": 2,
                            "tiles": [[0, 0]]}, [])
    assert sent[-1][0] == {"id": "a", "ok": False, "error": "ValueError: index 9 is out of range for dim 0 of size 2"}
    view._on_request(view, {"id": "b", "kind": "frobnicate"}, [])
    assert not sent[-1][0]["ok"] and "frobnicate" in sent[-1][0]["error"]
    view._on_request(view, {"id": "c", "kind": "tiles", "index": [1, 0, 0], "rows_axis": 1, "cols_axis": 2,
                            "tiles": [[0, 0]]}, [])
    assert sent[-1][0]["ok"]


@pytest.mark.parametrize("remote", [False, "local"])  # "local": through the codec and the server's run_request
def test_a_saved_tensor_of_a_language_model_trace_knows_its_tokens(tiny_gpt2, gpt2_tokenizer, remote):
    model, hf = tiny_gpt2
    object.__setattr__(model, "remote_id", "tiny-gpt2")  # the name a server would load it by
    prompt = "The Eiffel Tower is in Paris"
    with torch.no_grad(), model.trace(prompt, remote=remote):
        h = model.transformer.h[0].output.save()
        logits = model.lm_head.output[0].save()
        last = model.lm_head.output[0, -1].save()
    ids = gpt2_tokenizer(prompt).input_ids
    words = [gpt2_tokenizer.decode([i]) for i in ids]
    view = TensorView(h)
    assert view.tokens == {"axes": [1], "batch_axis": 0, "rows": [words]}
    assert TensorView(logits).tokens == {"axes": [0], "batch_axis": None, "rows": [words]}
    assert TensorView(last).tokens is None  # no sequence axis left
    assert TensorView(h.clone()).tokens is None  # not a value the trace saved
    assert TensorView(h, tokens=False).tokens is None


@pytest.mark.parametrize("remote", [False, "local"])
def test_each_invoke_gets_its_own_prompts_tokens(tiny_gpt2, gpt2_tokenizer, remote):
    model, _ = tiny_gpt2
    object.__setattr__(model, "remote_id", "tiny-gpt2")
    short, long = "Hello world", "The capital of France is Paris"
    with torch.no_grad(), model.trace(remote=remote) as tracer:
        with tracer.invoke(short):
            a = model.transformer.h[1].output.save()
        with tracer.invoke(long):
            b = model.transformer.h[1].output.save()
    pad = gpt2_tokenizer.decode([gpt2_tokenizer.pad_token_id])
    long_words = [gpt2_tokenizer.decode([i]) for i in gpt2_tokenizer(long).input_ids]
    short_ids = gpt2_tokenizer(short).input_ids
    short_words = [pad] * (len(long_words) - len(short_ids)) + [gpt2_tokenizer.decode([i]) for i in short_ids]
    assert TensorView(a).tokens["rows"] == [short_words]  # left padded, as the model saw it
    assert TensorView(b).tokens["rows"] == [long_words]


def test_the_trace_record_does_not_keep_tensors_alive(tiny_gpt2):
    import weakref

    model, _ = tiny_gpt2

    def run():
        with torch.no_grad(), model.trace("Hello world"):
            h = model.transformer.h[0].output.save()
        return weakref.ref(h)

    ref = run()
    gc.collect()
    assert ref() is None
    assert model._last_trace.saved_tensors() == []


def test_static_fallback_shows_the_numbers_and_a_picture_of_the_slice():
    x = torch.linspace(-1, 2, 3 * 8 * 10).reshape(3, 8, 10)
    x[0, 2, 3] = float("nan")
    view = TensorView(x, name="x")
    data, _ = view._repr_mimebundle_()
    page = data["text/html"]
    finite = x[torch.isfinite(x)].double()
    assert re.search(r"data-stat='min'>([^<]+)<", page).group(1) == f"{float(finite.min()):.4g}".rstrip("0").rstrip(".")
    assert "data-stat='NaN'>1<" in page and "Tensor[3, 8, 10]" in page
    png = re.search(r"src='data:image/png;base64,([^']+)'", page).group(1)
    import base64

    pixels = decode_png(base64.b64decode(png))
    assert pixels.shape == (8, 10, 3)
    scale = Scale(float(finite.min()), float(finite.max()))
    for r, c in [(0, 0), (5, 7), (7, 9)]:
        assert max(abs(int(a) - int(b)) for a, b in zip(pixels[r, c], scale.rgb(float(x[0, r, c])))) <= 3
    assert tuple(pixels[2, 3]) == (224, 64, 251)  # NaN
    assert data["text/plain"].startswith("x: Tensor[3, 8, 10] torch.float32 cpu\nmin -1")


def test_scalars_meta_tensors_and_complex_values():
    assert TensorView(torch.tensor(2.5))._repr_mimebundle_()[0]["text/plain"].endswith("= 2.5")
    meta = TensorView(torch.empty(3, 4, device="meta"))
    assert meta.stats is None and "no values" in meta.note
    with pytest.raises(TypeError, match="tensor.real"):
        TensorView(torch.zeros(2, dtype=torch.complex64))


def test_labels_name_the_entries_of_a_dim():
    view = TensorView(torch.zeros(2, 3), labels={-1: ["a", "b", "c"]})
    assert view.labels == {"1": ["a", "b", "c"]}
    with pytest.raises(ValueError, match="labels for dim 0 has 3 entries; that dim has size 2"):
        TensorView(torch.zeros(2, 3), labels={0: ["a", "b", "c"]})
    with pytest.raises(ValueError, match="the tensor has 2 dims"):
        TensorView(torch.zeros(2, 3), labels={2: []})
