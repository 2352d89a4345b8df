"""The logit lens's and the attention view's static fallbacks in nbconvert's HTML, opened in a browser
without a kernel or network: tokens (whitespace as ␣ ↵ ⇥, exact tokens in titles), the lens's top tokens
and target probabilities, and the attention pattern's pixels, checked against plain forwards."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from nnsight_jupyter.widgets.static import Scale

from .conftest import ARTIFACTS, GPT2_SETUP, build_gpt2, screenshot
from .test_attention_long import visible

LENS = "Paris:\n\n  is\tthe"

CELLS = [
    GPT2_SETUP + """
from nnsight_jupyter.analysis import attention_patterns, logit_lens
""",
    f"""
show(logit_lens(gpt, {LENS!r}, target=" the"))
""",
    f"""
show(attention_patterns(gpt, {LENS!r}), layer=1, head=2)
""",
]


@pytest.fixture(scope="module")
def reference():
    """The tokenizer's tokens, the lens by hand with forward hooks, and eager attention weights."""
    model, tokenizer = build_gpt2()
    the = tokenizer.encode(" the")[0]
    ids = tokenizer(LENS, return_tensors="pt").input_ids
    out = {}
    with torch.no_grad():
        seen = []
        handles = [b.register_forward_hook(lambda m, a, o: seen.append(o[0] if isinstance(o, tuple) else o))
                   for b in model.transformer.h]
        model(ids)
        for handle in handles:
            handle.remove()
        probs = torch.stack([model.lm_head(model.transformer.ln_f(o))[0].softmax(-1) for o in seen])
        model.config._attn_implementation = "eager"
        out["attention"] = torch.stack([a[0] for a in model(ids, output_attentions=True).attentions])
    top = probs.topk(5, dim=-1)
    out["lens_target"] = probs[..., the]
    out["lens_tokens"] = [tokenizer.decode([i]) for i in ids[0].tolist()]
    out["lens_top"] = [[[tokenizer.decode([i]) for i in row] for row in layer] for layer in top.indices.tolist()]
    out["lens_probs"] = top.values
    return out


@pytest.fixture(scope="module")
def notebook(open_notebook):
    return open_notebook("static_fallbacks.ipynb", CELLS)


def test_prompt_holds_space_newline_and_tab_tokens(reference):
    assert {" ", "\n\n", "\t"} <= set(reference["lens_tokens"])


def test_nbconvert_html_shows_the_lens_and_the_attention_pattern_without_a_kernel(notebook, lab, browser, reference):
    notebook.save()
    path = lab.folder / "static_fallbacks.ipynb"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, "-m", "nbconvert", "--to", "html", "--output-dir", str(ARTIFACTS),
                           str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    offline = browser.new_context(viewport={"width": 1100, "height": 900}, offline=True)
    try:
        page = offline.new_page()
        page.goto((ARTIFACTS / "static_fallbacks.html").as_uri())
        tokens = reference["lens_tokens"]
        lens = page.locator(".nnsj-static-lens")
        assert lens.count() == 1
        tables = lens.locator("table")
        assert tables.count() == 2  # the top token, the target's probability
        for t in range(2):
            heads = tables.nth(t).locator("thead th").evaluate_all(
                "(ths) => ths.map((th) => [th.textContent, th.title])")
            assert heads[1:] == [[f"{p} {visible(x)}", f"{p} {json.dumps(x)}"] for p, x in enumerate(tokens)]
        for layer in range(2):
            row = tables.nth(0).locator("tbody tr").nth(layer).locator("td").evaluate_all(
                "(tds) => tds.map((td) => [td.textContent, td.title])")
            top = reference["lens_top"][layer]
            assert [text for text, _ in row] == [visible(k[0]) for k in top]
            for (_, title), names, probs in zip(row, top, reference["lens_probs"][layer].tolist()):
                lines = [re.match(r'(".*") (\S+)$', line).groups() for line in title.split("\n")]
                assert [json.loads(token) for token, _ in lines] == names
                assert [float(p) for _, p in lines] == pytest.approx(probs, abs=5e-4)
            shown = tables.nth(1).locator("tbody tr").nth(layer).locator("td").all_inner_texts()
            assert [float(v) for v in shown] == pytest.approx(reference["lens_target"][layer].tolist(), abs=5e-4)

        attention = page.locator(".nnsj-static-attention")
        assert attention.count() == 1
        attn = reference["attention"]
        n = attn.shape[-1]
        labels = attention.locator("[data-pos]").evaluate_all("(ds) => ds.map((d) => [d.textContent, d.title])")
        assert labels == [[f"{q} {visible(x)}"[:16], f"{q} {json.dumps(x)}"] for q, x in enumerate(tokens)]
        image = attention.locator("img[data-role='pattern']")
        assert (image.get_attribute("data-layer"), image.get_attribute("data-head")) == ("1", "2")
        drawn = image.evaluate("""(img) => {
            const canvas = document.createElement('canvas');
            canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
            const context = canvas.getContext('2d');
            context.drawImage(img, 0, 0);
            return {size: canvas.width, data: Array.from(context.getImageData(0, 0, canvas.width, canvas.height).data)};
        }""")
        assert drawn["size"] == n
        scale = Scale(0.0, 1.0)
        for q in range(n):
            for k in range(n):
                got = tuple(drawn["data"][(q * n + k) * 4:(q * n + k) * 4 + 3])
                want = (245, 245, 245) if k > q else scale.rgb(float(attn[1, 2, q, k]))
                assert max(abs(a - b) for a, b in zip(got, want)) <= 3, (q, k, got, want)
        scores = attention.locator("table")
        positions = torch.arange(1, n)
        prev = attn[..., positions, positions - 1].mean(-1)
        first = attn[..., :, 0].mean(-1)
        for t, expected in enumerate((prev, first)):
            for layer in range(2):
                shown = scores.nth(t).locator("tbody tr").nth(layer).locator("td").all_inner_texts()
                assert [float(v) for v in shown] == pytest.approx(expected[layer].tolist(), abs=5e-3)
        screenshot(attention, "fallback_attention")
        screenshot(lens, "fallback_logit_lens")
    finally:
        offline.close()
