"""LogitLensView and AttentionView: state, requests and fallbacks against plain Hugging Face forwards."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ipywidgets.widgets.widget import _remove_buffers

from nnsight_jupyter.analysis import attention_patterns, logit_lens
from nnsight_jupyter.show import view_for
from nnsight_jupyter.widgets import AttentionView, LogitLensView

PROMPT, OTHER = "The Eiffel Tower is in the city of", "The Colosseum is in the city of"


def plain_lens(hf, tokenizer, prompt, target):
    """Top-5 and the target's probability and rank per layer and position, by hand with forward hooks."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    outs = []
    handles = [b.register_forward_hook(lambda m, a, out: outs.append(out[0] if isinstance(out, tuple) else out))
               for b in hf.transformer.h]
    with torch.no_grad():
        hf(ids)
        for handle in handles:
            handle.remove()
        probs = torch.stack([hf.lm_head(hf.transformer.ln_f(o))[0].softmax(-1) for o in outs])
    top = probs.topk(5, dim=-1)
    p = probs[..., target]
    return top.indices, top.values, p, (probs > p.unsqueeze(-1)).sum(-1) + 1


def test_logit_lens_state_is_the_top_k_of_each_layer(tiny_gpt2, gpt2_tokenizer):
    model, hf = tiny_gpt2
    paris = gpt2_tokenizer.encode(" Paris")[0]
    lens = logit_lens(model, PROMPT, target=" Paris")
    other = logit_lens(model, OTHER, target=" Paris")
    view = view_for(lens, other, titles=("Eiffel", "Colosseum"))
    assert isinstance(view, LogitLensView) and view.mode == "target_prob"
    for p, prompt, title in zip(view.panels, [PROMPT, OTHER], ["Eiffel", "Colosseum"]):
        ids, probs, target_p, ranks = plain_lens(hf, gpt2_tokenizer, prompt, paris)
        layers, n = ids.shape[:2]
        assert p["title"] == title and p["layers"] == [0, 1] and p["k"] == 5 and p["target"] == " Paris"
        assert p["tokens"] == [gpt2_tokenizer.decode([i]) for i in gpt2_tokenizer(prompt).input_ids]
        shown_ids = np.frombuffer(p["top_ids"], dtype=np.int32).reshape(layers, n, 5)
        assert np.array_equal(shown_ids, ids.numpy())
        np.testing.assert_allclose(np.frombuffer(p["top_probs"], dtype=np.float32).reshape(layers, n, 5),
                                   probs.numpy(), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(np.frombuffer(p["target_probs"], dtype=np.float32).reshape(layers, n),
                                   target_p.numpy(), rtol=1e-5, atol=1e-9)
        assert np.array_equal(np.frombuffer(p["target_ranks"], dtype=np.int32).reshape(layers, n), ranks.numpy())
        for i in set(ids.reshape(-1).tolist()):
            assert view.vocab[str(i)] == gpt2_tokenizer.decode([i])
    # only the top-k travels: no buffer the size of the vocabulary
    _, _, buffers = _remove_buffers(view.get_state())
    assert max(memoryview(b).nbytes for b in buffers) < hf.config.vocab_size
    data, _ = view._repr_mimebundle_()
    assert data["text/html"].count("<table") == 4  # top tokens and target probability, for each prompt
    assert "LogitLensResult" in data["text/plain"]
    with pytest.raises(ValueError, match="different layers"):
        LogitLensView(lens, logit_lens(model, OTHER, layers=[1]))
    with pytest.raises(TypeError, match="logit_lens"):
        LogitLensView(torch.zeros(3))


def plain_attention(hf, tokenizer, prompt):
    before = hf.config._attn_implementation
    hf.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            out = hf(tokenizer(prompt, return_tensors="pt").input_ids, output_attentions=True)
    finally:
        hf.config._attn_implementation = before
    return torch.stack([a[0] for a in out.attentions])


def block_max(pattern, size):
    """[size, size] block maxima of a [n, n] pattern, blocks from floor(i*n/size) to ceil((i+1)*n/size), by loops."""
    n = pattern.shape[-1]
    edges = [(i * n // size, -(-(i + 1) * n // size)) for i in range(size)]
    return torch.tensor([[float(pattern[a:b, c:d].max()) for c, d in edges] for a, b in edges])


def state_size(view):
    """Bytes of the view's first message: its JSON state and its binary buffers."""
    import json

    state, _, buffers = _remove_buffers(view.get_state())
    return len(json.dumps(state).encode()) + sum(memoryview(b).nbytes for b in buffers)


def test_attention_view_sends_thumbnails_and_tiles_on_request(tiny_gpt2, gpt2_tokenizer):
    model, hf = tiny_gpt2
    patterns = attention_patterns(model, PROMPT)
    expected = plain_attention(hf, gpt2_tokenizer, PROMPT)
    layers, heads, n, _ = expected.shape
    view = view_for(patterns, layer=1, head=1)
    assert isinstance(view, AttentionView) and (view.layer, view.head, view.n_heads) == (1, 1, heads)
    assert view.tokens == [gpt2_tokenizer.decode([i]) for i in gpt2_tokenizer(PROMPT).input_ids]
    # a short prompt: thumbnails at full size, every head's whole pattern in the first message
    assert view.thumb_size == n and view.preload_heads == list(range(heads))
    np.testing.assert_allclose(np.frombuffer(view.preload, dtype=np.float32).reshape(heads, n, n),
                               expected[1].numpy(), atol=1e-6)
    thumbs = np.frombuffer(view.thumbs, dtype=np.uint8).reshape(heads, n, n)
    above = np.triu(np.ones((n, n), dtype=bool), 1)
    assert (thumbs[:, above] == 255).all()
    np.testing.assert_allclose(thumbs[:, ~above], np.round(expected[1].numpy()[:, ~above] * 254), atol=1)
    q = torch.arange(1, n)
    np.testing.assert_allclose(np.frombuffer(view.prev_scores, dtype=np.float32).reshape(layers, heads),
                               expected[..., q, q - 1].mean(-1).numpy(), atol=1e-6)
    np.testing.assert_allclose(np.frombuffer(view.first_scores, dtype=np.float32).reshape(layers, heads),
                               expected[..., 0].mean(-1).numpy(), atol=1e-6)
    replies = []
    view.send = lambda content, buffers=None: replies.append((content, buffers))
    view._on_request(view, {"id": "x", "kind": "layer", "index": 0}, [])
    content, buffers = replies[-1]
    assert content == {"index": 0, "id": "x", "ok": True}
    layer0 = np.frombuffer(buffers[0], dtype=np.uint8).reshape(heads, n, n)
    np.testing.assert_allclose(layer0[:, ~above], np.round(expected[0].numpy()[:, ~above] * 254), atol=1)
    view._on_request(view, {"id": "y", "kind": "layer", "index": 9}, [])
    assert replies[-1][0]["ok"] is False and "outside" in replies[-1][0]["error"]
    assert "previous-token score" in view._repr_mimebundle_()[0]["text/html"]
    with pytest.raises(ValueError, match="was not read"):
        AttentionView(patterns, layer=5)


def test_a_long_prompts_attention_view_bounds_every_message(gpt2_tokenizer):
    """512 tokens x 12 heads: a whole layer is 12.6 MB; the first message stays under 256 KB, the rest on request."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from nnsight_jupyter import LanguageModel
    from nnsight_jupyter.widgets.attention import MAX_TILES, TILE

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=48, n_head=12, n_positions=1024)).eval()
    model = LanguageModel(hf, tokenizer=gpt2_tokenizer)
    ids = torch.randint(0, 50000, (520,), generator=torch.Generator().manual_seed(1))
    patterns = attention_patterns(model, ids)
    hf.config._attn_implementation = "eager"
    with torch.no_grad():
        expected = torch.stack([a[0] for a in hf(ids[None], output_attentions=True).attentions])
    n, heads = 520, 12
    view = AttentionView(patterns, layer=1, head=3)
    assert expected[1].numel() * 4 > 10 * 2**20  # what the whole layer would have been
    assert state_size(view) <= 256 * 1024
    assert view.preload_heads == [3]
    np.testing.assert_allclose(np.frombuffer(view.preload, dtype=np.float32).reshape(TILE, TILE),
                               expected[1, 3, :TILE, :TILE].numpy(), atol=1e-6)
    size = view.thumb_size
    assert size == 64
    thumbs = np.frombuffer(view.thumbs, dtype=np.uint8).reshape(heads, size, size)
    for head in (0, 7):
        reference = block_max(expected[1, head], size)
        edges = [(i * n // size, -(-(i + 1) * n // size)) for i in range(size)]
        all_masked = torch.tensor([[c > b - 1 for c, _ in edges] for _, b in edges])
        assert (thumbs[head][all_masked.numpy()] == 255).all()
        np.testing.assert_allclose(thumbs[head][~all_masked.numpy()],
                                   np.round(reference[~all_masked].numpy() * 254), atol=1)
    replies = []
    view.send = lambda content, buffers=None: replies.append((content, buffers))
    view._on_request(view, {"id": "t", "kind": "tiles", "layer": 0, "head": 5, "tiles": [[1, 0], [4, 4], [4, 2]]}, [])
    content, buffers = replies[-1]
    assert content["ok"] and content["tiles"] == [[1, 0], [4, 4], [4, 2]]
    for (r, c), data in zip(content["tiles"], buffers):
        block = expected[0, 5, r * TILE:(r + 1) * TILE, c * TILE:(c + 1) * TILE]
        np.testing.assert_allclose(np.frombuffer(data, dtype=np.float32).reshape(block.shape), block.numpy(), atol=1e-6)
    assert max(memoryview(b).nbytes for b in buffers) <= TILE * TILE * 4
    view._on_request(view, {"id": "r", "kind": "row", "layer": 1, "head": 11, "query": 400}, [])
    np.testing.assert_allclose(np.frombuffer(replies[-1][1][0], dtype=np.float32), expected[1, 11, 400].numpy(),
                               atol=1e-6)
    too_many = [[0, 0]] * (MAX_TILES + 1)
    for bad, words in [({"kind": "tiles", "layer": 0, "head": 0, "tiles": too_many}, "at most"),
                       ({"kind": "tiles", "layer": 0, "head": 12, "tiles": [[0, 0]]}, "head 12 is outside"),
                       ({"kind": "tiles", "layer": 0, "head": 0, "tiles": [[9, 0]]}, "outside the 520 x 520"),
                       ({"kind": "row", "layer": 2, "head": 0, "query": 0}, "layer index 2"),
                       ({"kind": "pixels"}, "not 'pixels'")]:
        view._on_request(view, {"id": "b", **bad}, [])
        assert replies[-1][0]["ok"] is False and words in replies[-1][0]["error"], replies[-1][0]
    view._on_request(view, {"id": "ok", "kind": "row", "layer": 0, "head": 0, "query": 0}, [])
    assert replies[-1][0]["ok"]  # still serving after the bad requests
    # the static fallback: the shown head as 128 x 128 block maxima in the view's colours, masked blocks blank
    import base64
    import re

    from nnsight_jupyter.widgets.static import Scale

    from .conftest import decode_png

    page = view._repr_mimebundle_()[0]["text/html"]
    assert len(page) < 64 * 1024
    assert "data-pos" not in page  # 520 row labels would not fit the picture's 128 rows
    src = re.search(r"<img data-role='pattern' data-layer='1' data-head='3'[^>]* src='data:image/png;base64,([^']+)'",
                    page).group(1)
    pixels = decode_png(base64.b64decode(src))
    assert pixels.shape == (128, 128, 3)
    reference = block_max(expected[1, 3], 128)
    edges = [(i * n // 128, -(-(i + 1) * n // 128)) for i in range(128)]
    scale = Scale(0.0, 1.0)
    for i, j in [(0, 0), (5, 1), (64, 63), (127, 0), (127, 127), (100, 101), (3, 120)]:
        (_, b), (c, _) = edges[i], edges[j]
        want = (245, 245, 245) if c > b - 1 else scale.rgb(float(reference[i, j]))
        assert max(abs(int(x) - y) for x, y in zip(pixels[i, j], want)) <= 3, (i, j, pixels[i, j], want)


def test_an_8k_token_prompts_first_message_holds_its_first_tokens_and_the_rest_come_in_chunks(gpt2_tokenizer):
    """8,192 tokens: the first message stays the size of a short prompt's; every token arrives, in bounded replies."""
    import json
    from pathlib import Path

    from nnsight_jupyter.analysis.attention import AttentionPatterns
    from nnsight_jupyter.widgets.attention import TOKENS_FIRST

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text() * 3
    ids = gpt2_tokenizer(text).input_ids[:8192]
    n = len(ids)
    assert n == 8192
    expected = [gpt2_tokenizer.decode([i]) for i in ids]
    patterns = torch.ones(n, n).tril()
    patterns = (patterns / patterns.sum(-1, keepdim=True))[None, None]
    token_text = dict(zip(ids, expected))
    view = AttentionView(AttentionPatterns(layers=[0], prompt_ids=ids, patterns=patterns, token_text=token_text))
    assert view.n_tokens == n and view.tokens == expected[:TOKENS_FIRST]
    assert len(json.dumps(expected).encode()) > 50 * 1024  # what the whole list would have been
    first = patterns[..., :TOKENS_FIRST, :TOKENS_FIRST]
    short = AttentionView(AttentionPatterns(layers=[0], prompt_ids=ids[:TOKENS_FIRST], patterns=first,
                                            token_text=token_text))
    assert state_size(view) <= state_size(short) + 256 <= 256 * 1024
    replies = []
    view.send = lambda content, buffers=None: replies.append((content, buffers))
    got = list(view.tokens)
    while len(got) < n:
        view._on_request(view, {"id": "t", "kind": "tokens", "start": len(got)}, [])
        content, buffers = replies[-1]
        assert content["ok"] and content["start"] == len(got) and not buffers
        assert len(json.dumps(content).encode()) <= 32 * 1024
        got += content["tokens"]
    assert got == expected
    for start in (-1, n):
        view._on_request(view, {"id": "b", "kind": "tokens", "start": start}, [])
        assert replies[-1][0]["ok"] is False and f"token {start} is outside 0..{n - 1}" in replies[-1][0]["error"]
