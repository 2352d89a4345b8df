"""PatchingHeatmap's state, requests, streaming and static fallback, against plain Hugging Face forwards."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from nnsight_jupyter import show
from nnsight_jupyter.analysis import patching_sweep, token_prob
from nnsight_jupyter.show import view_for
from nnsight_jupyter.widgets import PatchingHeatmap
from nnsight_jupyter.widgets.static import Scale
from tests.analysis.conftest import hook_value, patched_logits

CLEAN, CORRUPTED = "The Eiffel Tower is in", "The Colosseum is in"


@pytest.fixture
def sweep(tiny_gpt2, gpt2_tokenizer):
    model, hf = tiny_gpt2
    result = patching_sweep(model, CLEAN, CORRUPTED, token_prob(" Paris"), progress=False, batch_size=3)
    return model, hf, gpt2_tokenizer, result


def plain(hf, tokenizer, layer, position):
    """P(" Paris") and the top-5 of the corrupted run with layer `layer`'s output at `position` taken from clean."""
    clean = tokenizer(CLEAN, return_tensors="pt").input_ids[0]
    corrupted = tokenizer(CORRUPTED, return_tensors="pt").input_ids[0]
    block = hf.transformer.h[layer]
    source = hook_value(block, "output", hf, clean)[position]

    def edit(tensor):
        tensor[position] = source

    probs = patched_logits(block, "output", hf, corrupted, edit).softmax(-1)
    paris = tokenizer.encode(" Paris")[0]
    top = probs.topk(5)
    return float(probs[paris]), [tokenizer.decode([i]) for i in top.indices.tolist()], top.values.tolist()


def test_state_carries_the_grid_labels_and_baselines(sweep):
    model, hf, tokenizer, result = sweep
    view = view_for(result)
    assert isinstance(view, PatchingHeatmap)
    assert view.dims == ["layer", "position"] and view.shape == [2, len(tokenizer(CLEAN).input_ids)]
    values = np.frombuffer(view.values, dtype=np.float32).reshape(view.shape)
    for layer, position in [(0, 0), (1, 3), (1, -1)]:
        expected, _, _ = plain(hf, tokenizer, layer, position)
        assert values[layer, position] == pytest.approx(expected, abs=1e-6)
    assert np.frombuffer(view.computed, dtype=np.uint8).all()
    clean_tokens = [tokenizer.decode([i]) for i in tokenizer(CLEAN).input_ids]
    corrupted_tokens = [tokenizer.decode([i]) for i in tokenizer(CORRUPTED).input_ids]
    for p, label in enumerate(view.labels["position"]):
        a, b = clean_tokens[p], corrupted_tokens[p]
        assert label == (f"{p} {a}" if a == b else f"{p} {a} / {b}")
    assert view.labels["layer"] == ["layer 0", "layer 1"]
    paris = tokenizer.encode(" Paris")[0]
    with torch.no_grad():
        for prompt, baseline, run in [(CLEAN, view.clean_baseline, "clean"),
                                      (CORRUPTED, view.corrupted_baseline, "corrupted")]:
            probs = hf(tokenizer(prompt, return_tensors="pt").input_ids).logits[0, -1].softmax(-1)
            assert baseline == pytest.approx(float(probs[paris]), abs=1e-6)
            top = probs.topk(5)
            assert [t for t, _ in view.baseline_top[run]] == [tokenizer.decode([i]) for i in top.indices.tolist()]
    with pytest.raises(TypeError, match="patching_sweep"):
        PatchingHeatmap(torch.zeros(2, 2))


def test_a_clicked_cell_gets_its_patched_runs_top_tokens(sweep):
    _, hf, tokenizer, result = sweep
    view = PatchingHeatmap(result)
    sent = []
    view.send = lambda content, buffers=None: sent.append(content)
    view._on_request(view, {"id": "a", "kind": "top", "index": [1, 2]}, [])
    reply = sent[-1]
    assert reply["id"] == "a" and reply["ok"] and reply["computed"]
    value, tokens, probs = plain(hf, tokenizer, 1, 2)
    assert reply["value"] == pytest.approx(value, abs=1e-6)
    assert [t for t, _ in reply["tokens"]] == tokens
    assert [p for _, p in reply["tokens"]] == pytest.approx(probs, abs=1e-6)
    view._on_request(view, {"id": "b", "kind": "top", "index": [5, 0]}, [])
    assert sent[-1]["ok"] is False and "outside the sweep's grid" in sent[-1]["error"]


def test_a_running_sweep_streams_its_cells_into_the_view(tiny_gpt2):
    model, _ = tiny_gpt2
    views, seen, sent = [], [], []

    def on_update(result, cells):
        if not views:
            views.append(PatchingHeatmap(result, running=True))
            views[0].observe(lambda change: sent.append(bytes(change["new"])), "values")
        view = views[0]
        view.update(result, cells, force=True)
        seen.append(int(np.frombuffer(view.computed, dtype=np.uint8).sum()))
        values = np.frombuffer(view.values, dtype=np.float32)
        assert np.isnan(values).sum() == values.size - seen[-1]  # cells still to come stay empty

    result = patching_sweep(model, CLEAN, CORRUPTED, token_prob(" Paris"), progress=False, batch_size=4,
                            on_update=on_update)
    views[0].finish(result)
    assert seen == list(range(4, result.values.numel(), 4)) + [result.values.numel()]
    assert views[0].done == result.values.numel() and not views[0].running
    # every chunk's values were sent (a trait aliasing the sweep's tensor would never change)
    assert len(sent) == len(seen) - 1
    assert np.array_equal(np.frombuffer(sent[-1], dtype=np.float32), result.values.reshape(-1).numpy())


def test_static_fallback_colours_cells_around_the_corrupted_baseline(sweep):
    _, _, tokenizer, result = sweep
    data, _ = PatchingHeatmap(result)._repr_mimebundle_()
    page = data["text/html"]
    c = result.corrupted_baseline
    limit = max(abs(result.clean_baseline - c), float((result.values - c).abs().max()))
    scale = Scale(-limit, limit)
    cells = re.findall(r"background:rgb\((\d+),(\d+),(\d+)\)'[^>]*>([^<]*)</td>", page)
    assert len(cells) == result.values.numel()
    for (r, g, b, text), value in zip(cells, result.values.reshape(-1).tolist()):
        assert (int(r), int(g), int(b)) == scale.rgb(value - c)
        assert float(text) == pytest.approx(value, rel=5e-3)
    assert "corrupted" in page and "&#x27; Paris&#x27;" in page  # the top tokens on hover
    assert data["text/plain"] == repr(result)


def test_show_displays_the_heatmap(sweep):
    *_, result = sweep
    assert show(result) is None
    with pytest.raises(TypeError, match="no other arguments"):
        view_for(result, labels={})


def test_head_sweeps_label_heads_and_a_third_axis_gets_the_largest_change_in_the_fallback(tiny_gpt2):
    model, _ = tiny_gpt2
    metric = token_prob(" Paris")
    heads = patching_sweep(model, CLEAN, CORRUPTED, metric, site="head", over=("layer", "head"), progress=False)
    view = PatchingHeatmap(heads)
    assert view.dims == ["layer", "head"] and view.labels["head"] == ["head 0", "head 1"]
    cube = patching_sweep(model, CLEAN, CORRUPTED, metric, site="head", over=("layer", "position", "head"),
                          progress=False)
    view = PatchingHeatmap(cube)
    assert view.shape == list(cube.values.shape) and len(view.shape) == 3
    values = np.frombuffer(view.values, dtype=np.float32).reshape(view.shape)
    assert np.array_equal(values, cube.values.numpy())  # row-major [layer, position, head], as the view reads it
    page = view._repr_mimebundle_()[0]["text/html"]
    shown = [float(t) for t in re.findall(r"background:rgb\([^)]*\)'[^>]*>([^<]*)</td>", page)]
    c = cube.corrupted_baseline
    pick = (cube.values - c).abs().argmax(-1, keepdim=True)
    expected = cube.values.gather(-1, pick).reshape(-1).tolist()
    assert shown == pytest.approx(expected, rel=5e-3)
    assert "the head with the largest change" in page
