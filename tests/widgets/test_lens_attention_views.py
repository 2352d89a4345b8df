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


def test_attention_view_sends_one_layer_and_the_others_on_request(tiny_gpt2, gpt2_tokenizer):
    model, hf = tiny_gpt2
    patterns = attention_patterns(model, PROMPT)
    expected = plain_attention(hf, gpt2_tokenizer, PROMPT)
    layers, heads, n, _ = expected.shape
    view = view_for(patterns, layer=1, head=1)
    assert isinstance(view, AttentionView) and (view.layer, view.head, view.n_heads) == (1, 1, heads)
    assert view.tokens == [gpt2_tokenizer.decode([i]) for i in gpt2_tokenizer(PROMPT).input_ids]
    np.testing.assert_allclose(np.frombuffer(view.pattern, dtype=np.float32).reshape(heads, n, n),
                               expected[1].numpy(), atol=1e-6)
    _, paths, _ = _remove_buffers(view.get_state())
    assert paths == [["pattern"]]  # one layer in the first message
    q = torch.arange(1, n)
    np.testing.assert_allclose(view.prev_scores, expected[..., q, q - 1].mean(-1).numpy(), atol=1e-6)
    np.testing.assert_allclose(view.first_scores, expected[..., 0].mean(-1).numpy(), atol=1e-6)
    replies = []
    view.send = lambda content, buffers=None: replies.append((content, buffers))
    view._on_request(view, {"id": "x", "kind": "layer", "index": 0}, [])
    content, buffers = replies[-1]
    assert content == {"index": 0, "id": "x", "ok": True}
    np.testing.assert_allclose(np.frombuffer(buffers[0], dtype=np.float32).reshape(heads, n, n),
                               expected[0].numpy(), atol=1e-6)
    view._on_request(view, {"id": "y", "kind": "layer", "index": 9}, [])
    assert replies[-1][0]["ok"] is False and "outside" in replies[-1][0]["error"]
    assert "previous-token score" in view._repr_mimebundle_()[0]["text/html"]
    with pytest.raises(ValueError, match="was not read"):
        AttentionView(patterns, layer=5)
