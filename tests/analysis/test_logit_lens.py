"""`logit_lens` against the same computation by hand: layer outputs from forward hooks, then the
model's own final norm and unembedding called directly on them."""

from __future__ import annotations

import pytest
import torch

from nnsight_jupyter import NNsight
from nnsight_jupyter.analysis import LogitLensResult, logit_lens

from .conftest import VOCAB, build_tiny

PROMPT = torch.randint(0, VOCAB, (6,), generator=torch.Generator().manual_seed(3))


def parts(hf):
    if hasattr(hf, "transformer"):
        return hf.transformer.h, hf.transformer.ln_f, hf.lm_head
    return hf.model.layers, hf.model.norm, hf.lm_head


def by_hand(hf, ids, layers, softcap=None):
    """Each layer's output (forward hooks) through the final norm and lm_head, as probabilities."""
    blocks, norm, head = parts(hf)
    outputs = {}
    handles = [blocks[i].register_forward_hook(
        lambda m, args, out, i=i: outputs.__setitem__(i, out[0] if isinstance(out, tuple) else out))
        for i in layers]
    try:
        with torch.no_grad():
            final = hf(ids.unsqueeze(0)).logits[0]
            probs = []
            for i in layers:
                logits = head(norm(outputs[i]))[0]
                if softcap:
                    logits = torch.tanh(logits / softcap) * softcap
                probs.append(logits.softmax(-1))
    finally:
        for h in handles:
            h.remove()
    return torch.stack(probs), final.softmax(-1)


def check(lens: LogitLensResult, probs: torch.Tensor, target: int | None) -> None:
    # The same model, the same shapes, the same operations in the same order: equal bit for bit.
    k = lens.top_ids.shape[-1]
    expected = probs.topk(k, dim=-1)
    assert torch.equal(lens.top_probs, expected.values) and torch.equal(lens.top_ids, expected.indices)
    if target is not None:
        p = probs[..., target]
        assert torch.equal(lens.target_probs, p)
        assert torch.equal(lens.target_ranks, (probs > p.unsqueeze(-1)).sum(-1) + 1)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])
def test_equals_final_norm_and_unembedding_by_hand(family):
    hf = build_tiny(family)
    model = NNsight(hf)
    lens = logit_lens(model, PROMPT, top_k=4, target=17)
    probs, final = by_hand(hf, PROMPT, [0, 1, 2])
    assert lens.top_ids.shape == (3, 6, 4) and lens.layers == [0, 1, 2] and lens.dims == ("layer", "position")
    check(lens, probs, 17)
    # The last layer read through the final norm and unembedding is the model's own prediction.
    assert torch.equal(lens.top_probs[-1], final.topk(4, dim=-1).values)
    some = logit_lens(model, PROMPT.tolist(), layers=[-1, 0], top_k=2)
    assert some.layers == [0, 2] and some.target is None and some.target_probs is None
    check(some, probs[[0, 2]], None)


def test_gemma_soft_capping_is_applied():
    hf = build_tiny("gemma3")
    hf.config.final_logit_softcapping = 3.0  # small enough to change the distribution visibly
    model = NNsight(hf)
    lens = logit_lens(model, PROMPT, target=5)
    probs, final = by_hand(hf, PROMPT, [0, 1, 2], softcap=3.0)
    check(lens, probs, 5)
    assert torch.equal(lens.top_probs[-1], final.topk(5, dim=-1).values)
    uncapped, _ = by_hand(hf, PROMPT, [0, 1, 2])
    assert (uncapped.topk(5, dim=-1).values - lens.top_probs).abs().max() > 1e-3


def test_result_reading_and_display():
    model = NNsight(build_tiny("llama"))
    lens = logit_lens(model, PROMPT, target=9)
    assert lens.top_tokens(2, -1)[0] == (str(int(lens.top_ids[2, -1, 0])), float(lens.top_probs[2, -1, 0]))
    assert lens.top_tokens(-1, 0) == lens.top_tokens(2, 0)
    with pytest.raises(ValueError, match="was not read"):
        logit_lens(model, PROMPT, layers=[0]).top_tokens(1, 0)
    text = repr(lens)
    assert "3 layers x 6 positions" in text and "target '9'" in text
    page = lens._repr_html_()
    assert page.count("<tr>") == 2 * (1 + 3)  # two tables, each a header row and a row per layer
    assert "probability of &#x27;9&#x27;" in page
    for p in lens.target_probs.reshape(-1).tolist():
        assert f">{p:.3f}<" in page


def test_bad_input():
    model = NNsight(build_tiny("gpt2"))
    with pytest.raises(ValueError, match="top_k"):
        logit_lens(model, PROMPT, top_k=0)
    with pytest.raises(TypeError, match="no tokenizer"):
        logit_lens(model, PROMPT, target=" Paris")
    with pytest.raises(ValueError, match="one sequence"):
        logit_lens(model, torch.zeros(2, 3, dtype=torch.long))


@pytest.mark.slow
def test_smollm2_by_hand_and_with_text(smollm2):
    hf = smollm2._model
    tok = smollm2.tokenizer
    prompt = "The Eiffel Tower is in the city of"
    layers = [0, 10, 20, 29]
    lens = logit_lens(smollm2, prompt, target=" Paris", layers=layers)
    ids = torch.tensor(tok(prompt).input_ids)
    probs, final = by_hand(hf, ids, layers)
    paris = tok(" Paris").input_ids[0]
    check(lens, probs, paris)
    assert lens.target == paris and lens.tokens[1] == " E"
    assert lens.top_tokens(29, -1)[0][0] == " Paris"  # the model's own answer at the last layer
    assert int(lens.target_ranks[-1, -1]) == 1 and int(lens.target_ranks[0, -1]) > 100


def test_the_static_table_draws_whitespace_tokens_as_the_view_does(gpt2_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    from nnsight_jupyter.models.language import LanguageModel

    tokenizer = gpt2_tokenizer
    torch.manual_seed(0)
    model = LanguageModel(GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=32)).eval(),
                          tokenizer=tokenizer)
    prompt = "Eiffel\tTower  is\nin"
    tokens = [tokenizer.decode([i]) for i in tokenizer(prompt).input_ids]
    assert {" ", "\n", "\t"} <= set(tokens)
    page = logit_lens(model, prompt)._repr_html_()
    symbols = {" ": "\u2423", "\n": "\u21b5", "\t": "\u21e5"}
    for p, t in enumerate(tokens):
        shown = "".join(symbols[c] for c in t) if t.isspace() else t
        assert f">{p} {shown}<" in page, (p, t)
