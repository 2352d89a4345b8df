"""`attention_patterns` on models running SDPA, against the attention weights of the same weights
loaded in eager mode and run by plain Hugging Face with `output_attentions=True`."""

from __future__ import annotations

import pytest
import torch

from nnsight_jupyter import NNsight
from nnsight_jupyter.analysis import AttentionPatterns, attention_patterns

from .conftest import VOCAB, build_tiny

PROMPT = torch.randint(0, VOCAB, (7,), generator=torch.Generator().manual_seed(5))


def eager_weights(hf, ids):
    """The model's own eager attention weights: switched to eager by hand, `output_attentions=True`."""
    before = hf.config._attn_implementation
    hf.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            out = hf(ids.unsqueeze(0), output_attentions=True)
    finally:
        hf.config._attn_implementation = before
    return torch.stack([a[0] for a in out.attentions])


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])
def test_sdpa_model_gives_its_eager_attention_weights_and_stays_sdpa(family):
    hf = build_tiny(family)
    assert hf.config._attn_implementation == "sdpa"
    expected = eager_weights(hf, PROMPT)
    model = NNsight(hf)
    att = attention_patterns(model, PROMPT)
    assert att.patterns.shape == (3, 4, 7, 7) and att.dims == ("layer", "head", "query", "key")
    # The same weights, the same eager kernel, the same shapes: equal bit for bit.
    assert torch.equal(att.patterns, expected)
    torch.testing.assert_close(att.patterns.sum(-1), torch.ones(3, 4, 7), rtol=0, atol=1e-5)
    assert hf.config._attn_implementation == "sdpa"
    some = attention_patterns(model, PROMPT, layers=[2])
    assert torch.equal(some.patterns, expected[2:]) and torch.equal(some.head(2, 1), expected[2, 1])
    if family == "gemma3":  # sliding window of 4: layer 0 is a sliding layer; no weight beyond the window
        assert float(att.patterns[0, :, 6, :3].abs().max()) == 0.0


def test_scores_by_hand():
    att = attention_patterns(NNsight(build_tiny("llama")), PROMPT)
    p = att.patterns
    previous = torch.stack([p[..., q, q - 1] for q in range(1, 7)], -1).mean(-1)
    torch.testing.assert_close(att.previous_token_scores(), previous)
    torch.testing.assert_close(att.first_token_scores(), p[..., :, 0].mean(-1))
    page = att._repr_html_()
    assert "previous-token score" in page
    assert page.count("<tr>") == 2 * (1 + 3)  # two tables, each a header row and a row per layer
    assert "strongest previous-token head" in repr(att) and isinstance(att, AttentionPatterns)
    assert att.labels("key")[0] == f"0 {str(int(PROMPT[0]))!r}"


class _Boom(Exception):
    pass


def test_mode_is_put_back_after_an_error_or_ctrl_c():
    hf = build_tiny("gpt2")
    model = NNsight(hf)
    for error in (_Boom, KeyboardInterrupt):
        def fail(module, args, out, error=error):
            assert hf.config._attn_implementation == "eager"  # eager inside the call
            raise error()

        handle = hf.transformer.h[1].register_forward_hook(fail)
        try:
            with pytest.raises(error):
                attention_patterns(model, PROMPT)
        finally:
            handle.remove()
        assert hf.config._attn_implementation == "sdpa"
        assert hf.config.__dict__["_attn_implementation_internal"] == "sdpa"


def test_an_eager_model_stays_eager():
    hf = build_tiny("llama")
    hf.config._attn_implementation = "eager"
    expected = eager_weights(hf, PROMPT)
    att = attention_patterns(NNsight(hf), PROMPT)
    assert torch.equal(att.patterns, expected)
    assert hf.config._attn_implementation == "eager"


@pytest.mark.slow
def test_smollm2(smollm2):
    hf = smollm2._model
    prompt = "When Mary and John went to the store, John gave a drink to"
    ids = torch.tensor(smollm2.tokenizer(prompt).input_ids)
    att = attention_patterns(smollm2, prompt, layers=[0, 15, 29])
    expected = eager_weights(hf, ids)[[0, 15, 29]]
    assert att.patterns.shape == (3, 9, len(ids), len(ids))  # 9 query heads (3 key/value heads)
    assert torch.equal(att.patterns, expected)
    assert hf.config._attn_implementation == "sdpa" and att.tokens[1] == " Mary"
