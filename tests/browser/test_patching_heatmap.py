"""PatchingHeatmap in a real JupyterLab: cells, labels, hover, click, export and streaming against plain forwards."""

from __future__ import annotations

import json
import re

import pytest
import torch

from nnsight_jupyter.widgets.static import Scale

from .conftest import GPT2_SETUP, NotebookPage, build_gpt2, screenshot
from .views import cell_centre, hover, pixel

CLEAN, CORRUPTED = "The Eiffel Tower is in", "The Colosseum is in"
# Ten tokens each, with a tab, a lone space and a newline among them.
SPACED_CLEAN, SPACED_CORRUPTED = "The Colosseum\t  is\nin", "Eiffel\tTower  is\nin"
SYMBOLS = {" ": "\u2423", "\n": "\u21b5", "\t": "\u21e5"}
N_CELLS = 2 * 7  # two layers x seven tokens

CELLS = [
    GPT2_SETUP + "\nfrom nnsight_jupyter.analysis import patching_sweep, token_prob",
    f'''
sweep = patching_sweep(gpt, {CLEAN!r}, {CORRUPTED!r}, token_prob(" Paris"), progress=False)
show(sweep)
''',
    f'''
from nnsight_jupyter.widgets import live_sweep
slow = lambda result, cells: time.sleep(0.4)
live = live_sweep(gpt, {CLEAN!r}, {CORRUPTED!r}, token_prob(" Paris"), batch_size=2, progress=False, on_update=slow)
''',
    f'''
spaced = patching_sweep(gpt, {SPACED_CLEAN!r}, {SPACED_CORRUPTED!r}, token_prob(" Paris"), progress=False)
show(spaced)
''',
]


@pytest.fixture(scope="module")
def reference():
    """Every cell's P(" Paris") and top tokens from plain forwards with a hook, and both baselines."""
    model, tokenizer = build_gpt2()
    clean = tokenizer(CLEAN, return_tensors="pt").input_ids
    corrupted = tokenizer(CORRUPTED, return_tensors="pt").input_ids
    paris = tokenizer.encode(" Paris")[0]
    blocks = model.transformer.h
    with torch.no_grad():
        saved = []
        handles = [b.register_forward_hook(lambda m, a, out: saved.append(out[0].clone())) for b in blocks]
        clean_probs = model(clean).logits[0, -1].softmax(-1)
        for handle in handles:
            handle.remove()
        corrupted_probs = model(corrupted).logits[0, -1].softmax(-1)
        values = torch.zeros(len(blocks), clean.shape[1])
        tops = {}
        for layer, block in enumerate(blocks):
            for position in range(clean.shape[1]):
                def patch(m, a, out, layer=layer, position=position):
                    out = out.clone()
                    out[0, position] = saved[layer][position]
                    return out
                handle = block.register_forward_hook(patch)
                probs = model(corrupted).logits[0, -1].softmax(-1)
                handle.remove()
                values[layer, position] = probs[paris]
                top = probs.topk(5)
                tops[layer, position] = ([tokenizer.decode([i]) for i in top.indices.tolist()], top.values.tolist())
    return {
        "values": values, "tops": tops, "clean": float(clean_probs[paris]), "corrupted": float(corrupted_probs[paris]),
        "clean_tokens": [tokenizer.decode([i]) for i in clean[0].tolist()],
        "corrupted_tokens": [tokenizer.decode([i]) for i in corrupted[0].tolist()],
    }


@pytest.fixture(scope="module")
def notebook(lab, browser):
    """The notebook, with every `data-done` value any view shows recorded while the cells run."""
    lab.write_notebook("patching_heatmap.ipynb", CELLS)
    page = NotebookPage(lab, browser, "patching_heatmap.ipynb").open()
    page.page.evaluate("""() => {
        window.__done = [];
        new MutationObserver((records) => records.forEach((r) => {
            if (r.target.closest('.jp-CodeCell') === document.querySelectorAll('.jp-CodeCell')[2])
                window.__done.push(r.target.dataset.done + '/' + r.target.dataset.running);
        })).observe(document.body, {subtree: true, attributes: true, attributeFilter: ['data-done']});
    }""")
    page.run_all()
    yield page
    page.close()
    lab.shutdown_kernels()


def view_in(notebook, cell):
    view = notebook.output(cell).locator('.nnsj-view[data-view="patching_heatmap"]')
    view.wait_for()
    return view


def scale_of(reference):
    c = reference["corrupted"]
    limit = max(abs(reference["clean"] - c), float((reference["values"] - c).abs().max()))
    return Scale(-limit, limit)


def test_cells_labels_and_colours_match_plain_forwards(notebook, reference):
    view = view_in(notebook, 1)
    heatmap = view.locator(".nnsj-heatmap")
    notebook.page.wait_for_function("(root) => root.dataset.drawn", arg=view.element_handle())
    labels = view.locator(".nnsj-hm-cols .nnsj-hm-label").evaluate_all("(ls) => ls.map((l) => l.title)")
    # A title quotes each token exactly, as JSON does.
    expected = [f"{p} {json.dumps(a)}" if a == b else f"{p} {json.dumps(a)} / {json.dumps(b)}"
                for p, (a, b) in enumerate(zip(reference["clean_tokens"], reference["corrupted_tokens"]))]
    assert labels == expected
    rows = view.locator(".nnsj-hm-rows .nnsj-hm-label").evaluate_all("(ls) => ls.map((l) => l.title)")
    assert rows == ["layer 0", "layer 1"]
    assert float(view.locator('[data-field="clean"]').inner_text()) == pytest.approx(reference["clean"], rel=1e-5)
    assert float(view.locator('[data-field="corrupted"]').inner_text()) == pytest.approx(reference["corrupted"], rel=1e-5)
    scale, c = scale_of(reference), reference["corrupted"]
    for layer, position in [(0, 0), (0, 4), (1, 5)]:
        value = float(reference["values"][layer, position])
        text = hover(notebook.page, heatmap, layer, position)
        shown = float(re.search(r"= (\S+)", text).group(1))
        assert shown == pytest.approx(value, rel=1e-5), text
        assert f"layer {layer}, position {expected[position]}" in text
        shown_clean, shown_corrupted = map(float, re.search(r"clean (\S+) · corrupted (\S+)", text).groups())
        assert (shown_clean, shown_corrupted) == (pytest.approx(reference["clean"], rel=1e-5),
                                                  pytest.approx(reference["corrupted"], rel=1e-5))
        drawn = pixel(heatmap, layer, position)
        assert max(abs(a - b) for a, b in zip(drawn, scale.rgb(value - c))) <= 3, (drawn, scale.rgb(value - c))
    legend = view.locator(".nnsj-colourbar")
    assert float(legend.get_attribute("data-lo")) + float(legend.get_attribute("data-hi")) == pytest.approx(2 * c)
    notebook.page.mouse.move(0, 0)


def test_clicking_a_cell_lists_that_runs_top_tokens(notebook, reference):
    view = view_in(notebook, 1)
    heatmap = view.locator(".nnsj-heatmap")
    for layer, position in [(1, 2), (0, 5)]:
        hover(notebook.page, heatmap, layer, position)
        notebook.page.mouse.click(*cell_centre(heatmap, layer, position))
        chosen = view.locator('[data-role="chosen"]')
        notebook.page.wait_for_function("([el, index]) => el.dataset.index === index",
                                        arg=[chosen.element_handle(), json.dumps([layer, position], separators=(",", ":"))])
        tokens = chosen.locator("li").evaluate_all("(ls) => ls.map((l) => [l.dataset.token, +l.dataset.prob])")
        names, probs = reference["tops"][layer, position]
        assert [t for t, _ in tokens] == names
        assert [p for _, p in tokens] == pytest.approx(probs, abs=1e-6)
    clean_top = view.locator('[data-role="clean"] li').first.get_attribute("data-token")
    assert clean_top  # the clean run's own top tokens sit beside the patched run's
    notebook.page.mouse.move(0, 0)
    screenshot(view, "patching_heatmap_gpt2")


def test_svg_and_png_export(notebook, reference, tmp_path):
    view = view_in(notebook, 1)
    with notebook.page.expect_download() as download:
        view.locator('button[data-export="svg"]').click()
    path = tmp_path / download.value.suggested_filename
    download.value.save_as(path)
    assert path.name == "patching_resid_layer_position.svg"
    svg = path.read_text()
    cells = re.findall(r'<rect x="[^"]+" y="[^"]+" width="[^"]+" height="[^"]+" fill="rgb\((\d+), (\d+), (\d+)\)"'
                       r'[^>]*data-row="(\d+)" data-col="(\d+)" data-value="([^"]+)"', svg)
    assert len(cells) == N_CELLS
    scale, c = scale_of(reference), reference["corrupted"]
    for r, g, b, row, col, value in cells:
        expected = float(reference["values"][int(row), int(col)])
        assert float(value) == pytest.approx(expected, rel=1e-5)
        assert max(abs(int(x) - y) for x, y in zip((r, g, b), scale.rgb(expected - c))) <= 3
    for token in reference["clean_tokens"][1:]:
        assert token.replace("&", "&amp;") in svg
    width, height = (int(v) for v in re.search(r'<svg[^>]* width="(\d+)" height="(\d+)"', svg).groups())
    with notebook.page.expect_download() as download:
        view.locator('button[data-export="png"]').click()
    png = tmp_path / download.value.suggested_filename
    download.value.save_as(png)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert (int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")) == (2 * width, 2 * height)


def test_a_running_sweep_fills_the_heatmap_chunk_by_chunk(notebook, reference):
    view = view_in(notebook, 2)
    seen = notebook.page.evaluate("() => window.__done")
    done = [int(s.split("/")[0]) for s in seen]
    assert done == sorted(done) and done[-1] == N_CELLS, seen
    partial = [d for d in done if 0 < d < N_CELLS]
    assert len(set(partial)) >= 3, seen  # cells arrived while the sweep ran, not all at the end
    assert seen[-1] == f"{N_CELLS}/false"
    assert view.get_attribute("data-done") == str(N_CELLS)
    text = hover(notebook.page, view.locator(".nnsj-heatmap"), 1, 3)
    assert float(re.search(r"= (\S+)", text).group(1)) == pytest.approx(float(reference["values"][1, 3]), rel=1e-5)


def test_dark_theme(notebook, reference):
    view = view_in(notebook, 1)
    heatmap = view.locator(".nnsj-heatmap")
    notebook.set_theme(dark=True)
    try:
        background = view.evaluate("(el) => getComputedStyle(el).backgroundColor")
        assert sum(int(v) for v in background[background.index("(") + 1:background.index(")")].split(",")[:3]) / 3 < 80
        c = reference["corrupted"]
        limit = max(abs(reference["clean"] - c), float((reference["values"] - c).abs().max()))
        dark = Scale(-limit, limit, dark=True)
        for layer, position in [(1, 3), (0, 3)]:  # unchanged (the corrupted baseline itself), and moved
            value = float(reference["values"][layer, position])
            drawn = pixel(heatmap, layer, position)
            assert max(abs(a - b) for a, b in zip(drawn, dark.rgb(value - c))) <= 3, (drawn, dark.rgb(value - c))
        assert heatmap.get_attribute("data-palette") == "diverging-dark"
        assert sum(pixel(heatmap, 1, 3)) / 3 < 80  # "no change" sinks into the dark background
        screenshot(view, "patching_heatmap_dark")
    finally:
        notebook.set_theme(dark=False)


def test_whitespace_tokens_are_drawn_as_symbols_and_quoted_exactly(notebook):
    _, tokenizer = build_gpt2()
    clean = [tokenizer.decode([i]) for i in tokenizer(SPACED_CLEAN).input_ids]
    corrupted = [tokenizer.decode([i]) for i in tokenizer(SPACED_CORRUPTED).input_ids]
    assert {" ", "\n", "\t"} <= set(clean), clean  # the prompt really holds such tokens

    def drawn(token):
        return "".join(SYMBOLS[c] for c in token) if token.isspace() else token

    view = view_in(notebook, 3)
    notebook.page.wait_for_function("(root) => root.dataset.drawn", arg=view.element_handle())
    labels = view.locator(".nnsj-hm-cols .nnsj-hm-label")
    texts = labels.evaluate_all("(ls) => ls.map((l) => l.textContent)")
    titles = labels.evaluate_all("(ls) => ls.map((l) => l.title)")
    pairs = list(enumerate(zip(clean, corrupted)))
    assert texts == [f"{p} {drawn(a)}" if a == b else f"{p} {drawn(a)} / {drawn(b)}" for p, (a, b) in pairs]
    assert titles == [f"{p} {json.dumps(a)}" if a == b else f"{p} {json.dumps(a)} / {json.dumps(b)}"
                      for p, (a, b) in pairs]
    heatmap = view.locator(".nnsj-heatmap")
    for token in (" ", "\n"):
        position = clean.index(token)
        assert corrupted[position] == token
        text = hover(notebook.page, heatmap, 1, position)
        assert f"layer 1, position {position} {json.dumps(token)}" in text, text
    notebook.page.mouse.move(0, 0)
    screenshot(view, "patching_heatmap_whitespace")
