"""Real behaviour on the bundled SmolLM2-135M-Instruct: facts, activation patching, steering, padding.

Every check is paired with an independent reference on the same Hugging Face model: plain
forward calls with `register_forward_hook` / `register_forward_pre_hook`, no LanguageModel code.
The model is loaded once for the module.
"""

from __future__ import annotations

import os

import pytest
import torch

from nnsight_jupyter import save
from nnsight_jupyter.models.language import LanguageModel

from ..numerics import assert_rounding_close, transformer_depth_width

pytestmark = pytest.mark.slow

CLEAN = "The Eiffel Tower is in"
CORRUPT = "The Colosseum is in"
POSITIVE = ["I love it", "This is great", "Wonderful"]
NEGATIVE = ["I hate it", "This is terrible", "Awful"]
STEER_PROMPT = "The food at that restaurant was really"
STEER_LAYER = 10


def sensible_threads() -> int:
    """One torch thread on a machine of two cores or fewer, else up to four.

    With two threads on two cores shared with other test processes, OpenMP threads spin-wait for a
    descheduled peer and single forward passes swing from 0.3 s to 7 s.
    """
    cores = os.cpu_count() or 1
    return 1 if cores <= 2 else min(4, cores)


@pytest.fixture(scope="module")
def lm(smollm2_dir):
    threads = torch.get_num_threads()
    torch.set_num_threads(sensible_threads())
    model = LanguageModel(str(smollm2_dir), dispatch=True)
    yield model
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def hf(lm):
    """The plain Hugging Face model, driven directly (no trace is running when references are computed)."""
    return lm._model


@pytest.fixture(scope="module")
def tok(lm):
    return lm.tokenizer


def token_id(tok, text):
    ids = tok(text).input_ids
    assert len(ids) == 1, f"{text!r} is not one token"
    return ids[0]


def hf_logits(hf, ids, hooks=()):
    handles = [module.register_forward_hook(fn) for module, fn in hooks]
    try:
        with torch.no_grad():
            return hf(ids).logits
    finally:
        for h in handles:
            h.remove()


def test_capital_of_france_is_paris(lm, hf, tok):
    with lm.trace("The capital of France is"):
        probs = lm.output.logits[0, -1].softmax(-1).save()
    want = hf_logits(hf, tok("The capital of France is", return_tensors="pt").input_ids)[0, -1].softmax(-1)
    assert tok.decode(probs.argmax()) == " Paris"
    torch.testing.assert_close(probs, want)
    assert probs[token_id(tok, " Paris")] > 0.5


def test_greedy_generation_matches_hf(lm, hf, tok):
    with lm.generate("The capital of France is", max_new_tokens=6) as tracer:
        ids = tracer.result.save()
    enc = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        want = hf.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(ids, want)
    assert lm.last_generation.text[0].startswith(" Paris")


def test_mixed_length_invokes_match_single_runs(lm, hf, tok):
    prompts = ["Hi", "The capital of France is", "One, two, three, four, five, six,"]
    watched = (3, 15, 29)
    with lm.trace() as tracer:
        got = save([])
        for prompt in prompts:
            with tracer.invoke(prompt):
                got.append(([lm.layers[i].output.clone() for i in watched], lm.output.logits))
    for prompt, (hidden, logits) in zip(prompts, got):
        ids = tok(prompt, return_tensors="pt").input_ids
        n = ids.shape[1]
        seen = {}
        hooks = [(hf.model.layers[i], lambda m, a, o, i=i: seen.__setitem__(i, o.clone())) for i in watched]
        want = hf_logits(hf, ids, hooks)
        # A padded batch of 3 against each prompt alone: equal up to float32 rounding.
        depth, width = transformer_depth_width(hf.config)
        assert_rounding_close(logits[:, -n:], want, depth=depth, width=width)
        for i, h in zip(watched, hidden):
            assert_rounding_close(h[:, -n:], seen[i], depth=depth, width=width)


def test_patching_the_residual_stream_restores_paris_at_later_layers(lm, hf, tok):
    paris = token_id(tok, " Paris")
    n_layers = len(lm.layers)
    with lm.trace(CLEAN):
        clean = save([layer.output[0, -1].clone() for layer in lm.layers])
        p_clean = lm.output.logits[0, -1].softmax(-1)[paris].save()
    with lm.trace(CORRUPT):
        p_corrupt = lm.output.logits[0, -1].softmax(-1)[paris].save()
    with lm.trace([CORRUPT] * n_layers):
        for i in range(n_layers):
            lm.layers[i].output[i, -1] = clean[i]
        p_patched = lm.output.logits[:, -1].softmax(-1)[:, paris].save()
    effects = (p_patched - p_corrupt).detach()

    clean_ids = tok(CLEAN, return_tensors="pt").input_ids
    corrupt_ids = tok(CORRUPT, return_tensors="pt").input_ids
    stored = {}
    hooks = [(layer, lambda m, a, o, i=i: stored.__setitem__(i, o[0, -1].clone()))
             for i, layer in enumerate(hf.model.layers)]
    ref_clean = hf_logits(hf, clean_ids, hooks)[0, -1].softmax(-1)[paris]
    ref_corrupt = hf_logits(hf, corrupt_ids)[0, -1].softmax(-1)[paris]

    def patch(i):
        def hook(module, args, output):
            output = output.clone()
            output[i, -1] = stored[i]
            return output
        return hook

    patched = hf_logits(hf, corrupt_ids.repeat(n_layers, 1),
                        [(layer, patch(i)) for i, layer in enumerate(hf.model.layers)])
    ref_effects = patched[:, -1].softmax(-1)[:, paris] - ref_corrupt

    torch.testing.assert_close(p_clean.detach(), ref_clean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(p_corrupt.detach(), ref_corrupt, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(effects, ref_effects, rtol=1e-3, atol=1e-5)
    assert p_clean > 10 * p_corrupt
    later = effects[n_layers // 2:]
    assert (later > 0).sum() > len(later) / 2, f"per-layer effects {effects.tolist()}"
    assert later.max() > 0.1
    torch.testing.assert_close(effects[-1], p_clean.detach() - p_corrupt.detach(), rtol=1e-3, atol=1e-4)


def steering_vector_reference(hf, tok):
    """Mean of (positive - negative) inputs to block 10 at the last token, each sentence run alone."""
    rows = {}

    def grab(module, args):
        rows["x"] = args[0][0, -1].clone()

    handle = hf.model.layers[STEER_LAYER].register_forward_pre_hook(grab)
    try:
        vectors = []
        for text in POSITIVE + NEGATIVE:
            with torch.no_grad():
                hf(tok(text, return_tensors="pt").input_ids)
            vectors.append(rows["x"])
    finally:
        handle.remove()
    k = len(POSITIVE)
    return (torch.stack(vectors[:k]) - torch.stack(vectors[k:])).mean(0)


def test_a_sentiment_steering_vector_flips_good_to_bad(lm, hf, tok):
    good, bad = token_id(tok, " good"), token_id(tok, " bad")
    with lm.trace() as tracer:
        last = save([])
        for text in POSITIVE + NEGATIVE:
            with tracer.invoke(text):
                last.append(lm.layers[STEER_LAYER].input[:, -1])
    k = len(POSITIVE)
    vector = (torch.cat(last[:k]) - torch.cat(last[k:])).mean(0).detach()
    torch.testing.assert_close(vector, steering_vector_reference(hf, tok), rtol=1e-3, atol=1e-3)

    diffs = {}
    for coefficient in (0.0, -2.0):
        with lm.trace(STEER_PROMPT):
            lm.layers[STEER_LAYER].input = lm.layers[STEER_LAYER].input + coefficient * vector
            logits = lm.output.logits[0, -1].save()
        handle = hf.model.layers[STEER_LAYER].register_forward_pre_hook(
            lambda m, args, c=coefficient: (args[0] + c * vector, *args[1:]))
        try:
            with torch.no_grad():
                want = hf(tok(STEER_PROMPT, return_tensors="pt").input_ids).logits[0, -1]
        finally:
            handle.remove()
        torch.testing.assert_close(logits.detach(), want, rtol=1e-4, atol=1e-3)
        diffs[coefficient] = (logits[good] - logits[bad]).item()
    assert diffs[0.0] > 0 > diffs[-2.0], diffs

    with lm.generate(STEER_PROMPT, max_new_tokens=4) as tracer:
        for step in tracer.all():
            lm.layers[STEER_LAYER].input = lm.layers[STEER_LAYER].input - 2.0 * vector
        steered = tracer.result.save()
    handle = hf.model.layers[STEER_LAYER].register_forward_pre_hook(
        lambda m, args: (args[0] - 2.0 * vector, *args[1:]))
    try:
        enc = tok(STEER_PROMPT, return_tensors="pt")
        with torch.no_grad():
            want = hf.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    finally:
        handle.remove()
    assert torch.equal(steered, want)
    assert lm.last_generation.text[0].startswith(" bad")
