"""TensorView in a real JupyterLab: numbers, token labels, hover, sliders and theme against plain torch."""

from __future__ import annotations

import json
import math
import statistics

import numpy as np
import pytest
import torch

from nnsight_jupyter.widgets.static import Scale

from .conftest import ARTIFACTS, GPT2_SETUP, build_gpt2, screenshot
from .views import close, hover, hovered_value, pixel, stats, wait_drawn

PROMPT = "The Eiffel Tower is in Paris"

CELLS = [
    GPT2_SETUP,
    f'''
with torch.no_grad(), gpt.trace({PROMPT!r}):
    h = gpt.transformer.h[0].output.save()
show(h, name="h")
''',
    '''
x4 = torch.linspace(-2, 3, 2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
x4[1, 2, 3, 4] = float("nan")
x4[0, 0, 0, 1] = float("inf")
show(x4, name="x4")
''',
    '''
show(torch.arange(12.0).sqrt(), name="norms", labels={0: [f"layer {i}" for i in range(12)]})
''',
    '''
base = torch.sin(torch.arange(2048) * 0.01)[:, None] * torch.cos(torch.arange(2048) * 0.01)[None, :]
big = base.expand(64, -1, -1) + torch.arange(64, dtype=torch.float32).view(64, 1, 1)
assert big.numel() * big.element_size() == 2**30
t0 = time.perf_counter()
show(big, name="big")
print(f"shown in {time.perf_counter() - t0:.3f} s")
''',
]


def x4_reference() -> torch.Tensor:
    x4 = torch.linspace(-2, 3, 2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    x4[1, 2, 3, 4] = float("nan")
    x4[0, 0, 0, 1] = float("inf")
    return x4


def big_reference(i: int) -> torch.Tensor:
    base = torch.sin(torch.arange(2048) * 0.01)[:, None] * torch.cos(torch.arange(2048) * 0.01)[None, :]
    return base + torch.tensor(float(i))


@pytest.fixture(scope="module")
def reference():
    """h computed with the plain Hugging Face model and a forward hook, and the prompt's tokens."""
    model, tokenizer = build_gpt2()
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    seen = []
    handle = model.transformer.h[0].register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        model(ids)
    handle.remove()
    out = seen[0][0] if isinstance(seen[0], tuple) else seen[0]
    return {"h": out, "tokens": [tokenizer.decode([i]) for i in ids[0].tolist()]}


@pytest.fixture(scope="module")
def notebook(open_notebook):
    return open_notebook("tensor_view.ipynb", CELLS)


def view_in(notebook, cell):
    view = notebook.output(cell).locator('.nnsj-view[data-view="tensor"]')
    view.wait_for()
    return view


def test_header_shows_the_tensors_statistics(notebook, reference):
    for cell, tensor, name in [(1, reference["h"], "h"), (2, x4_reference(), "x4")]:
        view = view_in(notebook, cell)
        values = tensor.double().numpy()
        finite = values[np.isfinite(values)]
        shown = stats(view)
        assert close(shown["min"], finite.min(), 4) and close(shown["max"], finite.max(), 4), shown
        assert close(shown["mean"], finite.mean(), 4) and close(shown["std"], finite.std(ddof=1), 4), shown
        assert int(shown["nan"]) == int(np.isnan(values).sum())
        assert int(shown["inf"]) == int(np.isinf(values).sum())
        assert view.locator(".nnsj-shape").inner_text() == f"Tensor[{', '.join(map(str, tensor.shape))}]"
        assert view.locator('[data-field="dtype"]').inner_text() == "float32"
        bars = view.locator(".nnsj-hist rect[data-count]")
        counts = [float(bars.nth(i).get_attribute("data-count")) for i in range(bars.count())]
        assert sum(counts) == finite.size  # every finite value in exactly one bin
    screenshot(view_in(notebook, 1), "tensor_view_tokens", readme=True)


def test_sequence_axis_carries_the_prompts_tokens(notebook, reference):
    view = view_in(notebook, 1)
    labels = view.locator(".nnsj-hm-rows .nnsj-hm-label")
    shown = [labels.nth(i).get_attribute("title") for i in range(labels.count())]
    assert shown == [f"{i}: {t}" for i, t in enumerate(reference["tokens"])]


def test_hover_reads_the_value_under_the_mouse(notebook, reference):
    view = view_in(notebook, 1)
    heatmap = view.locator(".nnsj-heatmap")
    h = reference["h"]
    scale = Scale(float(h.min()), float(h.max()))
    for row, col in [(0, 0), (2, 17), (len(reference["tokens"]) - 1, h.shape[-1] - 1)]:
        text = hover(notebook.page, heatmap, row, col)
        expected = float(h[0, row, col])
        assert text.startswith(f"h[0, {row}, {col}] = ")
        assert abs(hovered_value(text) - expected) <= 1e-5 * max(1.0, abs(expected)), (text, expected)
        assert f'{row}: "{reference["tokens"][row]}"' in text
        assert max(abs(a - b) for a, b in zip(pixel(heatmap, row, col), scale.rgb(expected))) <= 1


def test_sliders_fetch_the_chosen_slice(notebook):
    page = notebook.page
    view = view_in(notebook, 2)
    heatmap = view.locator(".nnsj-heatmap")
    x4 = x4_reference()
    view.locator('input.nnsj-index[data-axis="0"]').fill("1")
    view.locator('input.nnsj-index[data-axis="0"]').press("Enter")
    view.locator('input.nnsj-index[data-axis="1"]').fill("2")
    view.locator('input.nnsj-index[data-axis="1"]').press("Enter")
    wait_drawn(page, view, [1, 2, 0, 0])
    assert math.isnan(hovered_value(hover(page, heatmap, 3, 4)))
    text = hover(page, heatmap, 1, 3)
    assert text.startswith("x4[1, 2, 1, 3] = ") and abs(hovered_value(text) - float(x4[1, 2, 1, 3])) < 1e-6
    finite = x4[torch.isfinite(x4)]
    scale = Scale(float(finite.min()), float(finite.max()))
    assert pixel(heatmap, 1, 3) == scale.rgb(float(x4[1, 2, 1, 3]))
    assert pixel(heatmap, 3, 4) == (224, 64, 251)  # NaN's own colour
    ordered = np.sort(finite.double().numpy())
    p01, p99 = ordered[int(np.floor(0.01 * (len(ordered) - 1)))], ordered[int(np.ceil(0.99 * (len(ordered) - 1)))]
    view.locator('select[data-role="colour"]').select_option("percentiles")
    robust = Scale(float(p01), float(p99))
    page.wait_for_function("([root, hi]) => root.querySelector('.nnsj-colourbar').dataset.hi === hi",
                           arg=[view.element_handle(), repr(robust.hi)])
    assert pixel(heatmap, 1, 3) == robust.rgb(float(x4[1, 2, 1, 3]))
    screenshot(view, "tensor_view_slices")


def test_named_entries_label_a_1d_tensor(notebook):
    view = view_in(notebook, 3)
    labels = view.locator(".nnsj-hm-cols .nnsj-hm-label").evaluate_all("(ls) => ls.map((l) => l.title)")
    assert labels == [f"layer {i}" for i in range(12)]
    text = hover(notebook.page, view.locator(".nnsj-heatmap"), 0, 7)
    assert text == f"norms[7] = {math.sqrt(7):.7g}  (layer 7)"
    screenshot(view, "tensor_view_labels")


def test_a_1gb_tensor_shows_and_its_slider_answers(notebook):
    page = notebook.page
    out = notebook.output(4)
    shown_s = float(out.locator(".jp-OutputArea-output").filter(has_text="shown in").inner_text().split()[2])
    view = view_in(notebook, 4)
    heatmap = view.locator(".nnsj-heatmap")
    slider = view.locator('input.nnsj-slider[data-axis="0"]')
    times = []
    for i in [1, 7, 63, 20, 40, 5, 33, 62, 2, 50]:
        slider.evaluate("(el, v) => { el.value = String(v); el.dispatchEvent(new Event('input')); }", i)
        wait_drawn(page, view, [i, 0, 0])
        times.append(float(view.get_attribute("data-slice-ms")))
    text = hover(page, heatmap, 100, 200)
    expected = big_reference(50)
    assert abs(hovered_value(text) - float(expected[100, 200])) < 1e-5
    view.locator('select[data-role="colour"]').select_option("slice")
    slice_scale = Scale(float(expected.min()), float(expected.max()))
    assert slice_scale.kind == "sequential"
    page.wait_for_function("(root) => root.dataset.palette === 'sequential'", arg=heatmap.element_handle())
    assert pixel(heatmap, 100, 200) == slice_scale.rgb(float(expected[100, 200]))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "tensor_view_measurements.json").write_text(json.dumps(
        {"show_1gb_s": shown_s, "slider_ms": times, "slider_ms_median": statistics.median(times)}, indent=1))
    print(f"\n1 GB tensor shown in {shown_s:.3f} s; slider to a new slice in {statistics.median(times):.1f} ms "
          f"(median of {len(times)}, max {max(times):.1f} ms)")
    page.mouse.move(0, 0)
    screenshot(view, "tensor_view_1gb")


def test_dark_theme(notebook, reference):
    page = notebook.page
    view = view_in(notebook, 1)
    notebook.set_theme(dark=True)
    try:
        background = view.evaluate("(el) => getComputedStyle(el).backgroundColor")
        rgb = [int(v) for v in background[background.index("(") + 1:background.index(")")].split(",")[:3]]
        assert sum(rgb) / 3 < 80, background
        heatmap = view.locator(".nnsj-heatmap")
        h = reference["h"]
        flat = h[0].abs().argmin()
        row, col = int(flat // h.shape[-1]), int(flat % h.shape[-1])
        assert max(Scale(float(h.min()), float(h.max()), dark=True).rgb(float(h[0, row, col]))) < 80
        assert pixel(heatmap, row, col) == Scale(float(h.min()), float(h.max()), dark=True).rgb(float(h[0, row, col]))
        assert heatmap.get_attribute("data-palette") == "diverging-dark"
        assert sum(pixel(heatmap, row, col)) / 3 < 80  # values near 0 sink into the dark background  # values near 0 sink into the dark background
        screenshot(view, "tensor_view_dark", readme=True)
    finally:
        notebook.set_theme(dark=False)
