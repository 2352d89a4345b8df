"""AttentionView on a 520-token prompt in a real JupyterLab: drawn, exact on hover, masked cells hatched,
and every message the kernel sends bounded (a whole layer would be 12.6 MB, over the 10 MB websocket limit)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from nnsight_jupyter.widgets.static import Scale

from .conftest import ARTIFACTS, GPT2_SETUP, ROOT, NotebookPage, build_gpt2, screenshot
from .views import hover, pixel

LONG = "The cat  sat on the mat.\nx\ty = 1\n" * 40
TILE_BYTES = 128 * 128 * 4
FIRST_MESSAGE_LIMIT = 256 * 1024

CELLS = [
    GPT2_SETUP + '''
import nnsight_jupyter
from nnsight_jupyter.analysis import attention_patterns
print(nnsight_jupyter.__file__)
torch.manual_seed(0)
long_gpt = LanguageModel(GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=48, n_head=12, n_positions=1024,
                                                    attn_implementation="eager")).eval(), tokenizer=tokenizer)
''',
    f'''
show(attention_patterns(long_gpt, {LONG!r}), layer=1, head=5)
''',
]


@pytest.fixture(scope="module")
def reference():
    """The prompt's tokens and the model's eager attention weights from a plain Hugging Face call."""
    from transformers import GPT2Config, GPT2LMHeadModel

    _, tokenizer = build_gpt2()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=48, n_head=12, n_positions=1024,
                                       attn_implementation="eager")).eval()
    ids = tokenizer(LONG, return_tensors="pt").input_ids
    with torch.no_grad():
        attentions = model(ids, output_attentions=True).attentions
    return {"tokens": [tokenizer.decode([i]) for i in ids[0].tolist()],
            "attention": torch.stack([a[0] for a in attentions])}


@pytest.fixture(scope="module")
def notebook(lab, browser):
    """The notebook, with the size of every websocket frame the page received from the kernel."""
    lab.write_notebook("attention_long.ipynb", CELLS)
    page = NotebookPage(lab, browser, "attention_long.ipynb")
    page.frames, page.sent = [], []

    def watch(ws):
        if "/api/kernels/" in ws.url:
            ws.on("framereceived", lambda payload: page.frames.append(
                payload if isinstance(payload, bytes) else payload.encode()))
            ws.on("framesent", lambda payload: page.sent.append(
                payload if isinstance(payload, bytes) else payload.encode()))

    page.page.on("websocket", watch)
    page.open()
    page.run_all()
    yield page
    page.close()
    lab.shutdown_kernels()


def test_the_kernel_runs_this_checkout(notebook):
    printed = notebook.output(0).inner_text().strip().splitlines()[-1]
    assert printed == str(ROOT / "nnsight_jupyter" / "__init__.py")


def content(frame: bytes) -> dict:
    """The message content of a kernel websocket frame: JSON, or the v1 binary protocol's parts
    (a count of offsets, the offsets, then channel, header, parent header, metadata, content, buffers)."""
    if frame[:1] == b"{":
        return json.loads(frame)["content"]
    count = int.from_bytes(frame[:8], "little")
    offsets = [int.from_bytes(frame[8 * (i + 1):8 * (i + 2)], "little") for i in range(count)] + [len(frame)]
    return json.loads(frame[offsets[4]:offsets[5]])


def test_every_message_is_bounded(notebook, reference):
    view = notebook.output(1).locator('.nnsj-view[data-view="attention"]')
    view.wait_for()
    notebook.page.wait_for_function("(root) => root.dataset.shown === '5' && root.dataset.tokens === 'all'",
                                    arg=view.element_handle())
    n = len(reference["tokens"])
    heads = reference["attention"].shape[1]
    assert n >= 512 and heads * n * n * 4 > 10 * 2**20
    first = [f for f in notebook.frames if b'"_view": "attention"' in f or b'"_view":"attention"' in f]
    assert len(first) == 1, [len(f) for f in first]
    assert len(first[0]) <= FIRST_MESSAGE_LIMIT, len(first[0])
    # the first message holds the first 512 tokens; the view asked for the rest
    state = content(first[0])["data"]["state"]
    assert state["n_tokens"] == n and state["tokens"] == reference["tokens"][:512]
    rest = [content(f)["data"]["content"] for f in notebook.frames if b'"tokens"' in f and b'"start"' in f]
    rest = [c for c in rest if c.get("start") == 512]
    assert len(rest) == 1 and rest[0]["tokens"] == reference["tokens"][512:]
    # scroll far into the pattern and across heads, so tiles and rows are asked for
    heatmap = view.locator(".nnsj-heatmap")
    for row, col in [(n - 1, n - 2), (300, 150)]:
        hover(notebook.page, heatmap, row, col)
    view.locator(".nnsj-attn-thumb").nth(9).click()
    hover(notebook.page, heatmap, 400, 399)
    view.locator('select[data-role="layer"]').select_option("0")
    notebook.page.wait_for_function("(root) => root.dataset.layer === '0'", arg=view.element_handle())
    notebook.page.wait_for_timeout(300)
    sizes = [len(f) for f in notebook.frames]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "attention_long_frames.json").write_text(json.dumps(
        {"tokens": n, "heads": heads, "first_message": len(first[0]), "largest": sorted(sizes)[-5:],
         "frames": len(sizes), "total": sum(sizes)}))
    assert max(sizes) <= 16 * TILE_BYTES + 4096, sorted(sizes)[-5:]
    # tiles right of the diagonal are all masked: the view fills them itself and never asks for one
    asked = [tuple(t) for f in notebook.sent if b'"tiles"' in f
             for t in content(f).get("data", {}).get("content", {}).get("tiles", [])]
    assert asked and all(c <= r for r, c in asked), asked
    notebook.page.mouse.move(0, 0)


def test_hover_shows_the_exact_probability_and_masked_cells(notebook, reference):
    page = notebook.page
    view = notebook.output(1).locator('.nnsj-view[data-view="attention"]')
    view.wait_for()
    heatmap = view.locator(".nnsj-heatmap")
    view.locator('select[data-role="layer"]').select_option("1")
    view.locator(".nnsj-attn-thumb").nth(5).click()
    page.wait_for_function("(root) => root.dataset.layer === '1' && root.dataset.shown === '5'",
                           arg=view.element_handle())
    attn = reference["attention"][1, 5]
    n = attn.shape[0]
    scale = Scale(0.0, 1.0)
    for row, col in [(3, 1), (n - 1, 0), (n - 1, n - 1), (300, 299), (200, 130)]:
        text = hover(page, heatmap, row, col)
        assert text.startswith(f"head 5 · query {row} {json.dumps(reference['tokens'][row])} "), text
        value = float(attn[row, col])
        assert float(re.search(r"attention (\S+)", text).group(1)) == pytest.approx(value, abs=1e-6)
        assert max(abs(a - b) for a, b in zip(pixel(heatmap, row, col), scale.rgb(value))) <= 1
        keys = view.locator(".nnsj-attn-token[data-value]").evaluate_all(
            "(ts) => ts.map((t) => [+t.dataset.pos, +t.dataset.value])")
        assert [k for k, _ in keys] == list(range(row + 1))
        assert [v for _, v in keys] == pytest.approx(attn[row, : row + 1].tolist(), abs=1e-6)
    for row, col in [(0, 1), (10, 400), (250, 251)]:
        text = hover(page, heatmap, row, col)
        assert "masked" in text and "attention" not in text.split("\n")[1], text
        colours = cell_colours(heatmap, row, col)
        assert len(colours) >= 2 and all(r == g == b for r, g, b in colours), colours  # grey hatching
        assert all(max(abs(a - b) for a, b in zip(c, scale.rgb(0.0))) > 30 for c in colours)
    page.mouse.move(0, 0)
    screenshot(view, "attention_long")


def visible(token: str) -> str:
    """A whitespace-only token as the views draw it (␣ ↵ ⇥); other tokens with newlines and tabs as arrows."""
    symbols = {" ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍"}
    if token and token.isspace():
        return "".join(symbols.get(c, "·") for c in token)
    return "".join(symbols[c] if c in "\n\t\r" else c for c in token)


def test_whitespace_tokens_are_visible_with_the_exact_token_in_the_title(notebook, reference):
    view = notebook.output(1).locator('.nnsj-view[data-view="attention"]')
    heatmap = view.locator(".nnsj-heatmap")
    hover(notebook.page, heatmap, 8, 0)
    tokens = reference["tokens"]
    notebook.page.wait_for_function("(root) => root.dataset.tokens === 'all'", arg=view.element_handle())
    labels = heatmap.locator(".nnsj-hm-rows .nnsj-hm-label").evaluate_all(
        "(ls) => ls.map((l) => [+l.dataset.row, l.textContent, l.title])")
    seen = set()
    for row, text, title in labels:
        assert title == f"{row} {json.dumps(tokens[row])}"
        assert text == f"{row} {visible(tokens[row])}"[:16] or text.endswith("…")
        seen.add(tokens[row])
    assert {" ", "\n", "\t"} <= seen  # all three kinds were among the labels checked
    strip = view.locator(".nnsj-attn-token").evaluate_all("(ts) => ts.map((t) => [t.textContent, t.title])")
    assert strip == [[visible(t), f"{k} {json.dumps(t)}"] for k, t in enumerate(tokens)]
    assert {"␣", "↵", "⇥"} <= {text for text, _ in strip}
    notebook.page.mouse.move(0, 0)


def cell_colours(heatmap, row, col) -> set[tuple[int, int, int]]:
    """The distinct colours drawn inside one cell (its border pixels left out)."""
    heatmap.evaluate("() => new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)))")
    pixels = heatmap.evaluate("""(root, [row, col]) => {
        const canvas = root.querySelector('.nnsj-hm-canvas');
        const scroll = root.querySelector('.nnsj-hm-scroll');
        const d = root.dataset;
        const ratio = canvas.width / canvas.getBoundingClientRect().width;
        const x = Math.ceil((col * +d.cellWidth - scroll.scrollLeft) * ratio) + 2;
        const y = Math.ceil((row * +d.cellHeight - scroll.scrollTop) * ratio) + 2;
        const w = Math.floor(+d.cellWidth * ratio) - 4, h = Math.floor(+d.cellHeight * ratio) - 4;
        return Array.from(canvas.getContext('2d').getImageData(x, y, w, h).data);
    }""", [row, col])
    return {tuple(pixels[i:i + 3]) for i in range(0, len(pixels), 4)}


def test_thumbnails_are_block_maxima(notebook, reference):
    view = notebook.output(1).locator('.nnsj-view[data-view="attention"]')
    view.locator('select[data-role="layer"]').select_option("1")
    notebook.page.wait_for_function("(root) => root.dataset.layer === '1'", arg=view.element_handle())
    attn = reference["attention"][1]
    n = attn.shape[-1]
    drawn = view.locator(".nnsj-attn-thumb canvas").nth(2).evaluate("""(canvas) => ({size: canvas.width,
        data: Array.from(canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data)})""")
    size = drawn["size"]
    assert size == 64
    edges = [(i * n // size, -(-(i + 1) * n // size)) for i in range(size)]
    scale = Scale(0.0, 1.0)
    for i, j in [(0, 0), (10, 3), (63, 0), (63, 63), (40, 40), (20, 21), (5, 60)]:
        (a, b), (c, d) = edges[i], edges[j]
        got = tuple(drawn["data"][(i * size + j) * 4:(i * size + j) * 4 + 3])
        if c > b - 1:  # every cell of the block is masked: the blank of the light theme
            assert got == (245, 245, 245), (i, j, got)
        else:
            expected = scale.rgb(round(float(attn[2, a:b, c:d].max()) * 254) / 254)
            assert max(abs(x - y) for x, y in zip(got, expected)) <= 1, (i, j, got, expected)
