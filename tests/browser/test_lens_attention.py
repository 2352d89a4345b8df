"""LogitLensView and AttentionView in a real JupyterLab, against plain forwards with hooks (one notebook,
one kernel)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from nnsight_jupyter.widgets.static import Scale

from .conftest import GPT2_SETUP, build_gpt2, screenshot
from .views import cell_centre, hover, pixel

PROMPT, OTHER = "The Eiffel Tower is in the city of", "The Colosseum is in the city of"
SPACED = "Eiffel\tTower  is\nin"  # a tab, a lone space and a newline among its tokens

CELLS = [
    GPT2_SETUP + "\nfrom nnsight_jupyter.analysis import attention_patterns, logit_lens",
    f'''
lens = logit_lens(gpt, {PROMPT!r}, target=" Paris")
other = logit_lens(gpt, {OTHER!r}, target=" Paris")
show(lens, other, titles=("Eiffel Tower", "Colosseum"))
''',
    f'''
show(attention_patterns(gpt, {PROMPT!r}))
''',
    # The README's pictures: the three views on the bundled SmolLM2, where the analyses find something.
    '''
from nnsight_jupyter.analysis import patching_sweep, token_prob
smol = LanguageModel("smollm2")
show(patching_sweep(smol, "The Eiffel Tower is in", "The Colosseum is in", token_prob(" Paris"),
                    layers=range(0, 30, 3), progress=False))
''',
    '''
show(logit_lens(smol, "The Eiffel Tower is in the city of", target=" Paris", layers=range(20, 30)),
     logit_lens(smol, "The Colosseum is in the city of", target=" Paris", layers=range(20, 30)),
     titles=("Eiffel Tower", "Colosseum"))
''',
    '''
show(attention_patterns(smol, "When Mary and John went to the store, John gave a drink to", layers=[16]), head=0)
''',
    f'''
show(logit_lens(gpt, {SPACED!r}))
''',
]


@pytest.fixture(scope="module")
def reference():
    """Per prompt: top-5 tokens and probabilities, the target's probability and rank; eager attention weights."""
    model, tokenizer = build_gpt2()
    paris = tokenizer.encode(" Paris")[0]
    out = {}
    for prompt in (PROMPT, OTHER):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        seen = []

        def keep(module, args, output, seen=seen):
            seen.append(output[0] if isinstance(output, tuple) else output)

        handles = [b.register_forward_hook(keep) for b in model.transformer.h]
        with torch.no_grad():
            model(ids)
            for handle in handles:
                handle.remove()
            probs = torch.stack([model.lm_head(model.transformer.ln_f(o))[0].softmax(-1) for o in seen])
        top = probs.topk(5, dim=-1)
        p = probs[..., paris]
        out[prompt] = {
            "tokens": [tokenizer.decode([i]) for i in ids[0].tolist()],
            "top": [[[tokenizer.decode([i]) for i in row] for row in layer] for layer in top.indices.tolist()],
            "probs": top.values, "target": p, "rank": (probs > p.unsqueeze(-1)).sum(-1) + 1,
        }
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        attentions = model(tokenizer(PROMPT, return_tensors="pt").input_ids, output_attentions=True).attentions
    out["attention"] = torch.stack([a[0] for a in attentions])
    return out


@pytest.fixture(scope="module")
def notebook(open_notebook):
    return open_notebook("lens_attention.ipynb", CELLS)


SYMBOLS = {" ": "\u2423", "\n": "\u21b5", "\t": "\u21e5", "\r": "\u240d"}


def shown(text: str) -> str:
    """A token as the lens writes it: whitespace alone as symbols, line breaks and tabs inside others
    as symbols, then escaped as inside a JSON string."""
    if text and text.isspace():
        text = "".join(SYMBOLS.get(c, "\u00b7") for c in text)
    else:
        text = "".join(SYMBOLS[c] if c in "\n\t\r" else c for c in text)
    return json.dumps(text, ensure_ascii=False)[1:-1]


def test_logit_lens_cells_hover_and_target_modes(notebook, reference):
    page = notebook.page
    view = notebook.output(1).locator('.nnsj-view[data-view="logit_lens"]')
    view.wait_for()
    tables = view.locator("table.nnsj-lens-grid")
    assert tables.count() == 2
    assert view.locator(".nnsj-ph-where").all_inner_texts() == ["Eiffel Tower", "Colosseum"]
    scale = Scale(0.0, 1.0)
    select = view.locator('select[data-role="mode"]')
    for index, prompt in enumerate((PROMPT, OTHER)):
        ref = reference[prompt]
        table = tables.nth(index)
        heads = table.locator("thead th[data-pos]").evaluate_all("(ths) => ths.map((t) => t.title)")
        assert heads == [f"{p} {json.dumps(t)}" for p, t in enumerate(ref["tokens"])]
        select.select_option("target_prob")
        for layer in range(2):
            cells = table.locator(f'td[data-layer="{layer}"]')
            texts = cells.all_inner_texts()
            assert [float(t) for t in texts] == pytest.approx(ref["target"][layer].tolist(), rel=0.01, abs=5e-4)
        select.select_option("target_rank")
        ranks = [int(t.replace(",", "")) for t in table.locator('td[data-layer="1"]').all_inner_texts()]
        assert ranks == ref["rank"][1].tolist()
        select.select_option("top")
        for layer, position in [(0, 0), (1, len(ref["tokens"]) - 1)]:
            cell = table.locator(f'td[data-layer="{layer}"][data-pos="{position}"]')
            assert cell.inner_text().strip() == shown(ref["top"][layer][position][0]).strip()
            colour = cell.evaluate("(td) => getComputedStyle(td).backgroundColor")
            assert colour == "rgb({}, {}, {})".format(*scale.rgb(float(ref["probs"][layer, position, 0])))
            cell.hover()
            tip = view.locator(".nnsj-lens-tip")
            page.wait_for_function("([tip, l, p]) => tip.dataset.layer === String(l) && tip.dataset.pos === String(p)"
                                   " && tip.style.display === 'block'", arg=[tip.element_handle(), layer, position])
            lines = tip.inner_text().split("\n")
            assert lines[0] == f'layer {layer} · position {position} "{shown(ref["tokens"][position])}"'
            for k in range(5):
                token, prob = re.match(r'\s*\d+\. "(.*)"  (\S+)$', lines[1 + k]).groups()
                assert token == shown(ref["top"][layer][position][k])
                assert float(prob) == pytest.approx(float(ref["probs"][layer, position, k]), rel=1e-3)
            assert '" Paris": probability' in lines[6]
            assert lines[6].endswith(f"rank {int(ref['rank'][layer, position]):,}")
    page.mouse.move(0, 0)
    select.select_option("target_prob")
    screenshot(view, "logit_lens_gpt2")
    select.select_option("top")


def test_attention_thumbnails_scores_hover_and_lock(notebook, reference):
    page = notebook.page
    view = notebook.output(2).locator('.nnsj-view[data-view="attention"]')
    view.wait_for()
    attn = reference["attention"]
    n = attn.shape[-1]
    thumbs = view.locator(".nnsj-attn-thumb")
    assert thumbs.count() == attn.shape[1]
    q = torch.arange(1, n)
    for head in range(attn.shape[1]):
        thumb = thumbs.nth(head)
        assert float(thumb.get_attribute("data-prev")) == pytest.approx(float(attn[0, head, q, q - 1].mean()), abs=1e-6)
        assert float(thumb.get_attribute("data-first")) == pytest.approx(float(attn[0, head, :, 0].mean()), abs=1e-6)
    heatmap = view.locator(".nnsj-heatmap")
    labels = heatmap.locator(".nnsj-hm-rows .nnsj-hm-label").evaluate_all("(ls) => ls.map((l) => l.title)")
    assert labels == [f"{i} {json.dumps(t)}" for i, t in enumerate(reference[PROMPT]["tokens"])]
    # hovering a thumbnail shows that head large; clicking locks it
    thumbs.nth(2).hover()
    page.wait_for_function("(root) => root.dataset.shown === '2'", arg=view.element_handle())
    thumbs.nth(3).click()
    page.mouse.move(0, 0)
    page.wait_for_function("(root) => root.dataset.shown === '3' && root.dataset.locked === '3'",
                           arg=view.element_handle())
    scale = Scale(0.0, 1.0)
    for row, col in [(4, 2), (n - 1, 0), (n - 1, n - 1)]:
        text = hover(page, heatmap, row, col)
        value = float(attn[0, 3, row, col])
        assert text.startswith(f"head 3 · query {row} ")
        assert float(re.search(r"attention (\S+)", text).group(1)) == pytest.approx(value, abs=1e-6)
        assert max(abs(a - b) for a, b in zip(pixel(heatmap, row, col), scale.rgb(value))) <= 1
        # the token strip colours every key by the hovered query's attention to it
        keys = view.locator(".nnsj-attn-token[data-value]").evaluate_all(
            "(ts) => ts.map((t) => [+t.dataset.pos, +t.dataset.value])")
        assert [k for k, _ in keys] == list(range(row + 1))
        assert [v for _, v in keys] == pytest.approx(attn[0, 3, row, : row + 1].tolist(), abs=1e-6)
    # click the pattern to lock a query; it stays when the mouse leaves
    hover(page, heatmap, 5, 1)
    page.mouse.click(*cell_centre(heatmap, 5, 1))
    page.mouse.move(0, 0)
    page.wait_for_function("(root) => root.dataset.query === '5'", arg=view.element_handle())
    # another layer comes from the kernel on request
    view.locator('select[data-role="layer"]').select_option("1")
    page.wait_for_function("(root) => root.dataset.layer === '1'", arg=view.element_handle())
    text = hover(page, heatmap, 6, 3)
    assert float(re.search(r"attention (\S+)", text).group(1)) == pytest.approx(float(attn[1, 3, 6, 3]), abs=1e-6)
    previous = float(attn[1, 0, q, q - 1].mean())
    assert float(thumbs.nth(0).get_attribute("data-prev")) == pytest.approx(previous, abs=1e-6)
    page.mouse.move(0, 0)
    screenshot(view, "attention_gpt2")


def test_readme_pictures_on_smollm2(notebook):
    """The three views on a real model, for the README: drawn complete, with the answer where it belongs."""
    page = notebook.page
    sweep = notebook.output(3).locator('.nnsj-view[data-view="patching_heatmap"]')
    sweep.wait_for()
    page.wait_for_function("(root) => root.dataset.drawn && root.dataset.done === '60'", arg=sweep.element_handle())
    hover(page, sweep.locator(".nnsj-heatmap"), 8, 5)
    page.mouse.click(*cell_centre(sweep.locator(".nnsj-heatmap"), 8, 5))
    page.wait_for_function("(el) => el.dataset.index === '[8,5]'",
                           arg=sweep.locator('[data-role="chosen"]').element_handle())
    assert sweep.locator('[data-role="patched"] li').first.get_attribute("data-token") == " Paris"
    page.mouse.move(0, 0)
    screenshot(sweep, "patching_heatmap", readme=True)
    lens = notebook.output(4).locator('.nnsj-view[data-view="logit_lens"]')
    lens.wait_for()
    last = lens.locator('table[data-panel="0"] td[data-layer="9"][data-pos="8"]')
    assert float(last.inner_text()) > 0.3  # P(" Paris") at the last layer, the view's first mode with a target
    lens.locator('select[data-role="mode"]').select_option("top")
    assert last.inner_text().strip() == "Paris"
    screenshot(lens, "logit_lens", readme=True)
    attention = notebook.output(5).locator('.nnsj-view[data-view="attention"]')
    attention.wait_for()
    page.wait_for_function("(root) => root.dataset.shown === '0'", arg=attention.element_handle())
    hover(page, attention.locator(".nnsj-heatmap"), 11, 10)
    page.mouse.move(0, 0)
    screenshot(attention, "attention", readme=True)


def test_dark_theme(notebook, reference):
    """Both views in JupyterLab Dark: dark backgrounds, light text, the same value colours, dark masked cells."""
    from .test_attention_long import cell_colours
    from .views import colours, luminance

    page = notebook.page
    notebook.set_theme(dark=True)
    try:
        lens = notebook.output(1).locator('.nnsj-view[data-view="logit_lens"]')
        lens.locator('select[data-role="mode"]').select_option("top")
        assert luminance(lens.evaluate("(el) => getComputedStyle(el).backgroundColor")) < 80
        head = lens.locator("table.nnsj-lens-grid").first.locator("thead th").first
        assert colours(head)[1] > 150  # light axis text
        ref = reference[PROMPT]
        scale = Scale(0.0, 1.0, dark=True)
        for layer, position in [(0, 0), (1, 3)]:
            cell = lens.locator(f'table[data-panel="0"] td[data-layer="{layer}"][data-pos="{position}"]')
            colour = cell.evaluate("(td) => getComputedStyle(td).backgroundColor")
            assert colour == "rgb({}, {}, {})".format(*scale.rgb(float(ref["probs"][layer, position, 0])))
            cell.hover()
            tip = lens.locator(".nnsj-lens-tip")
            page.wait_for_function("(tip) => tip.style.display === 'block'", arg=tip.element_handle())
            background, text = colours(tip)
            assert background < 80 and text > 150
        page.mouse.move(0, 0)
        screenshot(lens, "logit_lens_dark")
        attention = notebook.output(2).locator('.nnsj-view[data-view="attention"]')
        assert luminance(attention.evaluate("(el) => getComputedStyle(el).backgroundColor")) < 80
        attention.locator('select[data-role="layer"]').select_option("0")
        attention.locator(".nnsj-attn-thumb").nth(1).click()
        page.wait_for_function("(root) => root.dataset.layer === '0' && root.dataset.shown === '1'",
                               arg=attention.element_handle())
        heatmap = attention.locator(".nnsj-heatmap")
        attn = reference["attention"]
        text = hover(page, heatmap, 5, 2)
        assert float(re.search(r"attention (\S+)", text).group(1)) == pytest.approx(float(attn[0, 1, 5, 2]), abs=1e-6)
        assert max(abs(a - b) for a, b in zip(pixel(heatmap, 5, 2), scale.rgb(float(attn[0, 1, 5, 2])))) <= 1
        masked = cell_colours(heatmap, 1, 6)
        assert len(masked) >= 2 and all(r == g == b and r < 120 for r, g, b in masked), masked
        corner = attention.locator(".nnsj-attn-thumb canvas").nth(1).evaluate(
            "(c) => Array.from(c.getContext('2d').getImageData(c.width - 1, 0, 1, 1).data.slice(0, 3))")
        assert corner == [30, 30, 30]  # a masked thumbnail pixel sinks into the dark background
        page.mouse.move(0, 0)
        screenshot(attention, "attention_dark")
    finally:
        notebook.set_theme(dark=False)


def test_logit_lens_draws_whitespace_tokens_as_symbols_and_titles_them_exactly(notebook):
    _, tokenizer = build_gpt2()
    tokens = [tokenizer.decode([i]) for i in tokenizer(SPACED).input_ids]
    assert {" ", "\n", "\t"} <= set(tokens), tokens
    page = notebook.page
    view = notebook.output(6).locator('.nnsj-view[data-view="logit_lens"]')
    view.wait_for()
    heads = view.locator("table.nnsj-lens-grid thead th[data-pos]")
    assert heads.evaluate_all("(ths) => ths.map((t) => t.textContent)") == [
        f"{p} {shown(t)}" for p, t in enumerate(tokens)]
    assert heads.evaluate_all("(ths) => ths.map((t) => t.title)") == [
        f"{p} {json.dumps(t)}" for p, t in enumerate(tokens)]
    assert {"\u2423", "\u21b5", "\u21e5"} <= {shown(t) for t in tokens}
    position = tokens.index("\n")
    view.locator(f'td[data-layer="0"][data-pos="{position}"]').hover()
    tip = view.locator(".nnsj-lens-tip")
    page.wait_for_function("([tip, p]) => tip.dataset.pos === String(p) && tip.style.display === 'block'",
                           arg=[tip.element_handle(), position])
    assert tip.inner_text().split("\n")[0] == f'layer 0 · position {position} "\u21b5"'
    page.mouse.move(0, 0)
    screenshot(view, "logit_lens_whitespace")
