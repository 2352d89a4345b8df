"""ModuleTree in a real JupyterLab: rows, folding, search, copy, badges, and 10,000 modules scrolling."""

from __future__ import annotations

import json
import re

import pytest
import torch

from .conftest import ARTIFACTS, screenshot

SETUP = '''
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from nnsight_jupyter import LanguageModel, show

def build_llama():
    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=30, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1000, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()

llama = LanguageModel(build_llama())
ids = torch.arange(1, 9).unsqueeze(0)
with torch.no_grad(), llama.trace(ids):
    mlp = llama.layers[3].mlp.output.save()
    last = llama.layers[5].output[0, -1].save()
'''

CELLS = [
    SETUP,
    "show(llama, ids)",
    '''
wide = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Sequential(nn.Linear(8, 8 + i % 2), nn.Tanh()))
                       for i in range(2000)])
print(len(list(wide.modules())), "modules")
show(wide)
''',
    '''
deep = nn.Sequential(*[nn.Linear(16, 16) for _ in range(1000)])
show(deep)
''',
]


def build_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=30, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1000, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def count(n: float) -> str:
    """The view's parameter format (1234567 -> 1.23M), written out independently."""
    if n < 1000:
        return str(int(n))
    for unit in "KMBT":
        n /= 1000
        if n < 1000:
            break
    return f"{n:.0f}{unit}" if n >= 100 else f"{n:.1f}{unit}" if n >= 10 else f"{n:.2f}{unit}"


@pytest.fixture(scope="module")
def notebook(open_notebook):
    return open_notebook("module_tree.ipynb", CELLS)


def tree(notebook, cell):
    view = notebook.output(cell).locator('.nnsj-view[data-view="module_tree"]')
    view.wait_for()
    return view


def row(view, path):
    return view.locator(f'.nnsj-vlist-row[data-path="{path}"]')


def cells(locator) -> list[str]:
    return [s.strip() for s in locator.locator("span").all_inner_texts()]


def test_rows_show_each_modules_class_parameters_and_shapes(notebook):
    model = build_llama()
    view = tree(notebook, 1)
    root = row(view, "")
    assert root.locator(".nnsj-label").inner_text() == "model"
    assert root.locator(".nnsj-class").inner_text() == "LlamaForCausalLM"
    assert root.locator('[data-field="params"]').get_attribute("title") == f"{sum(p.numel() for p in model.parameters()):,}"
    layers = row(view, "model.layers")
    assert layers.locator(".nnsj-label").inner_text() == "layers.0–29"
    assert layers.locator(".nnsj-class").inner_text() == "30 × LlamaDecoderLayer"
    assert layers.locator('[data-field="params"]').inner_text() == count(
        sum(p.numel() for p in model.model.layers.parameters()))
    seen = {}
    def record(path):
        def hook(module, args, out):
            seen.setdefault(path, (args[0].shape, out))
        return hook

    hooks = [m.register_forward_hook(record(p)) for p, m in model.named_modules() if p in ("lm_head", "model.norm")]
    with torch.no_grad():
        model(torch.arange(1, 9).unsqueeze(0))
    for h in hooks:
        h.remove()
    for path in ("lm_head", "model.norm"):
        shape_in, out = seen[path]
        expected = f"[{', '.join(map(str, shape_in))}] → [{', '.join(map(str, out.shape))}]"
        assert row(view, path).locator('[data-field="shapes"]').inner_text() == expected
    screenshot(view, "module_tree", readme=True)


def test_a_folded_run_expands_on_click(notebook):
    view = tree(notebook, 1)
    before = int(view.locator(".nnsj-vlist").get_attribute("data-count"))
    row(view, "model.layers").click()
    view.page.wait_for_function("(el) => +el.dataset.count > 30", arg=view.locator(".nnsj-vlist").element_handle())
    assert int(view.locator(".nnsj-vlist").get_attribute("data-count")) == before + 30
    assert row(view, "model.layers.0").locator(".nnsj-label").inner_text() == "0"
    view.locator(".nnsj-vlist").evaluate("(el) => { el.scrollTop = el.scrollHeight; }")
    assert row(view, "model.layers.29").locator(".nnsj-label").inner_text() == "29"
    view.locator(".nnsj-vlist").evaluate("(el) => { el.scrollTop = 0; }")
    row(view, "model.layers").click()  # folds again
    view.page.wait_for_function("([el, n]) => +el.dataset.count === n",
                                arg=[view.locator(".nnsj-vlist").element_handle(), before])


def test_search_by_glob_and_by_substring(notebook):
    model = build_llama()
    view = tree(notebook, 1)
    search = view.locator(".nnsj-search")
    paths = [p for p, _ in model.named_modules()]
    for query, pattern in [("layers.*.mlp", r"(^|\.)layers\.[^.]*\.mlp$"), ("rotary", r"rotary")]:
        search.fill(query)
        expected = [p for p in paths if re.search(pattern, p)]
        view.page.wait_for_function("([el, n]) => el.dataset.matches === String(n)", arg=[view.element_handle(), len(expected)])
        shown = view.locator(".nnsj-tree-row.nnsj-match").evaluate_all("(rows) => rows.map((r) => r.dataset.path)")
        assert shown == expected[:len(shown)] and len(shown) >= min(len(expected), 10)
    search.fill("layers.*.mlp")
    screenshot(view, "module_tree_search")
    search.fill("")


def test_clicking_a_module_copies_its_access_path_and_a_save_line(notebook):
    view = tree(notebook, 1)
    view.locator(".nnsj-search").fill("layers.3.mlp")
    target = row(view, "model.layers.3.mlp")
    target.click()
    view.page.wait_for_function("(el) => el.dataset.copied === 'model.layers[3].mlp'", arg=view.element_handle())
    assert view.page.evaluate("() => navigator.clipboard.readText()") == "model.layers[3].mlp"
    assert view.locator('[data-field="line"]').inner_text() == "out = model.layers[3].mlp.output.save()"
    assert target.locator('[data-badge="saved"]').count() == 1  # saved by the trace in the setup cell
    view.locator(".nnsj-search").fill("")


def test_badges_mark_the_modules_the_last_trace_saved(notebook):
    view = tree(notebook, 1)
    assert row(view, "model.layers").locator('[data-badge="inside"]').inner_text() == "2 marked"
    row(view, "model.layers").click()
    view.page.wait_for_selector('.nnsj-vlist-row[data-path="model.layers.5"] [data-badge="saved"]')
    row(view, "model.layers").click()


def scroll_through(view) -> dict:
    """Scroll a list from top to bottom in steps, one per frame; the page measures frame times."""
    return view.locator(".nnsj-vlist").evaluate("""async (list) => {
        const frames = [];
        let last = performance.now();
        const steps = 60;
        for (let i = 1; i <= steps; i++) {
            list.scrollTop = (list.scrollHeight - list.clientHeight) * i / steps;
            await new Promise((done) => requestAnimationFrame(done));
            const now = performance.now();
            frames.push(now - last);
            last = now;
        }
        await new Promise((done) => requestAnimationFrame(done));
        const rows = Array.from(list.querySelectorAll('.nnsj-vlist-row[data-index]'));
        const lastRow = rows.reduce((a, b) => (+a.dataset.index > +b.dataset.index ? a : b));
        return {frames, rendered: rows.length, last: lastRow.dataset.path, count: +list.dataset.count};
    }""")


def test_ten_thousand_modules_render_and_scroll(notebook):
    view = tree(notebook, 2)
    assert "12001 modules" in notebook.output(2).inner_text()
    result = scroll_through(view)
    frames = sorted(result["frames"])
    assert result["count"] == 1 + 2000 * 4 and result["rendered"] < 100  # only the visible rows are in the DOM
    assert result["last"] == "1999.2"
    median, worst = frames[len(frames) // 2], frames[-1]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "module_tree_measurements.json").write_text(json.dumps(
        {"rows": result["count"], "frame_ms": result["frames"], "frame_ms_median": median, "frame_ms_max": worst}))
    print(f"\n10,000-module tree ({result['count']} rows open): scroll frames median {median:.1f} ms, worst {worst:.1f} ms")
    screenshot(view, "module_tree_12k")


def test_a_thousand_layers_fold_into_one_row_and_unfold(notebook):
    view = tree(notebook, 3)
    root = row(view, "")
    assert root.locator(".nnsj-label").inner_text() == "model.0–999"
    assert root.locator(".nnsj-class").inner_text() == "1000 × Linear"
    assert int(view.locator(".nnsj-vlist").get_attribute("data-count")) == 1
    root.locator(".nnsj-twisty").click()
    result = scroll_through(view)
    assert result["count"] == 1001 and result["last"] == "999" and result["rendered"] < 100


def test_dark_theme(notebook):
    from .views import colours

    view = tree(notebook, 1)
    notebook.set_theme(dark=True)
    try:
        background, text = colours(view)
        assert background < 60 and text > 150
        assert colours(row(view, "model.layers").locator(".nnsj-class"))[1] > 150
        screenshot(view, "module_tree_dark")
    finally:
        notebook.set_theme(dark=False)
