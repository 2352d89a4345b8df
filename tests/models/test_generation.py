"""`model.generate(...)`: interventions on every step, on a range of steps, or on one step.

References are plain `hf_model.generate` runs, with torch forward hooks for the interventions;
a hook that fires on the k-th call of the top-level forward is generation step k.
"""

from __future__ import annotations

import torch

from nnsight_jupyter import save
from nnsight_jupyter.models.language import LanguageModel

from .conftest import build_tiny

PROMPT = "The capital of France is"
N = 6


def native_layers(hf, family):
    return hf.transformer.h if family == "gpt2" else hf.model.layers


def hf_generate(hf, tok, prompt, n=N, **kwargs):
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = hf.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id,
                          output_logits=True, return_dict_in_generate=True, **kwargs)
    return out.sequences, torch.stack(out.logits, dim=1), enc.input_ids.shape[1]


def add_at_layer(layer, vector, steps=None):
    """A forward hook adding `vector` to a layer's output, on all calls or on the chosen call numbers."""
    calls = {"n": 0}

    def hook(module, args, output):
        step = calls["n"]
        calls["n"] += 1
        if steps is None or step in steps:
            return output + vector
        return output

    return layer.register_forward_hook(hook)


def test_plain_generate_gives_the_same_tokens_as_hf(tiny_hf, gpt2_tokenizer):
    family, hf = tiny_hf
    model = LanguageModel(hf, tokenizer=gpt2_tokenizer)
    with model.generate(PROMPT, max_new_tokens=N) as tracer:
        ids = tracer.result.save()
    want, _, _ = hf_generate(hf, gpt2_tokenizer, PROMPT)
    assert torch.equal(ids, want)


def test_every_step_values_are_saved_per_step(tiny_hf, gpt2_tokenizer):
    family, hf = tiny_hf
    model = LanguageModel(hf, tokenizer=gpt2_tokenizer)
    with model.generate(PROMPT, max_new_tokens=N) as tracer:
        hidden = save([])
        logits = save([])
        for step in tracer.all():
            hidden.append(model.layers[1].output)
            logits.append(model.output.logits[:, -1])
        ids = tracer.result.save()
    seen = []
    handle = native_layers(hf, family)[1].register_forward_hook(lambda m, a, o: seen.append(o.clone()))
    want_ids, want_logits, n_prompt = hf_generate(hf, gpt2_tokenizer, PROMPT)
    handle.remove()
    assert torch.equal(ids, want_ids)
    assert len(hidden) == len(logits) == N == len(seen)
    assert hidden[0].shape[1] == n_prompt and all(h.shape[1] == 1 for h in hidden[1:])
    for got, want in zip(hidden, seen):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.stack(logits, dim=1), want_logits)


def test_steering_every_step_changes_the_continuation(tiny_hf, gpt2_tokenizer):
    family, hf = tiny_hf
    model = LanguageModel(hf, tokenizer=gpt2_tokenizer)
    torch.manual_seed(1)
    vector = torch.randn(hf.config.hidden_size) * 4
    with model.generate(PROMPT, max_new_tokens=N) as tracer:
        for step in tracer.all():
            model.layers[1].output[:] += vector
        steered = tracer.result.save()
    clean, _, n_prompt = hf_generate(hf, gpt2_tokenizer, PROMPT)
    handle = add_at_layer(native_layers(hf, family)[1], vector)
    want, _, _ = hf_generate(hf, gpt2_tokenizer, PROMPT)
    handle.remove()
    assert torch.equal(steered, want)
    assert not torch.equal(steered[:, n_prompt:], clean[:, n_prompt:])


def test_steering_a_range_of_steps(tiny_hf, gpt2_tokenizer):
    family, hf = tiny_hf
    model = LanguageModel(hf, tokenizer=gpt2_tokenizer)
    torch.manual_seed(2)
    vector = torch.randn(hf.config.hidden_size) * 4
    with model.generate(PROMPT, max_new_tokens=N) as tracer:
        for step in tracer.iter[1:3]:
            model.layers[0].output[:] += vector
        ids = tracer.result.save()
    handle = add_at_layer(native_layers(hf, family)[0], vector, steps={1, 2})
    want, _, _ = hf_generate(hf, gpt2_tokenizer, PROMPT)
    handle.remove()
    assert torch.equal(ids, want)


def test_an_edit_on_step_2_leaves_steps_0_and_1_alone(tiny_hf, gpt2_tokenizer):
    family, hf = tiny_hf
    model = LanguageModel(hf, tokenizer=gpt2_tokenizer)
    torch.manual_seed(3)
    vector = torch.randn(hf.config.hidden_size) * 4
    with model.generate(PROMPT, max_new_tokens=N) as tracer:
        logits = save([])
        for step in tracer.iter[0:2]:
            logits.append(model.output.logits[:, -1])
        for step in tracer.iter[2]:
            model.layers[1].output[:] += vector
            logits.append(model.output.logits[:, -1])
        for step in tracer.iter[3:]:
            logits.append(model.output.logits[:, -1])
    got = torch.stack(logits, dim=1)
    _, clean, _ = hf_generate(hf, gpt2_tokenizer, PROMPT)
    handle = add_at_layer(native_layers(hf, family)[1], vector, steps={2})
    _, want, _ = hf_generate(hf, gpt2_tokenizer, PROMPT)
    handle.remove()
    assert got.shape == clean.shape
    torch.testing.assert_close(got[:, :2], clean[:, :2], rtol=0, atol=0)
    assert not torch.allclose(got[:, 2], clean[:, 2])
    torch.testing.assert_close(got, want)


def test_invokes_of_different_lengths_generate_what_each_prompt_generates_alone(tiny_hf, gpt2_tokenizer):
    family, hf = tiny_hf
    model = LanguageModel(hf, tokenizer=gpt2_tokenizer)
    prompts = ["Hi", "The quick brown fox jumps over the", "One two three", PROMPT]
    with model.generate(max_new_tokens=N) as tracer:
        results = save([])
        for prompt in prompts:
            with tracer.invoke(prompt):
                results.append(tracer.result)
    width = max(len(gpt2_tokenizer(p).input_ids) for p in prompts)
    for prompt, ids in zip(prompts, results):
        want, _, n_prompt = hf_generate(hf, gpt2_tokenizer, prompt)
        new = want[0, n_prompt:]
        assert ids.shape[0] == 1
        assert ids[0, width - n_prompt:width].tolist() == want[0, :n_prompt].tolist()
        assert ids[0, width:width + len(new)].tolist() == new.tolist()


def test_text_of_the_generation(gpt2_tokenizer):
    hf = build_tiny("llama")
    model = LanguageModel(hf, tokenizer=gpt2_tokenizer)
    with model.generate(PROMPT, max_new_tokens=N) as tracer:
        for step in tracer.all():
            pass
        ids = tracer.result.save()
    want, _, n_prompt = hf_generate(hf, gpt2_tokenizer, PROMPT)
    assert model.decode(ids[0]) == gpt2_tokenizer.decode(want[0], skip_special_tokens=True)
    assert model.decode(ids) == [gpt2_tokenizer.decode(want[0], skip_special_tokens=True)]
    run = model.last_generation
    assert run.prompt_length == n_prompt
    assert torch.equal(run.new_tokens, want[:, n_prompt:])
    assert run.text == [gpt2_tokenizer.decode(want[0, n_prompt:], skip_special_tokens=True)]
    assert run.full_text == [gpt2_tokenizer.decode(want[0], skip_special_tokens=True)]


def test_greedy_by_default_even_if_the_model_config_samples(gpt2_tokenizer):
    hf = build_tiny("gpt2", seed=5)
    hf.generation_config.do_sample = True
    hf.generation_config.top_k = 0
    model = LanguageModel(hf, tokenizer=gpt2_tokenizer)
    with model.generate(PROMPT, max_new_tokens=N) as tracer:
        greedy = tracer.result.save()
    want, _, _ = hf_generate(hf, gpt2_tokenizer, PROMPT)
    assert torch.equal(greedy, want)

    torch.manual_seed(7)
    with model.generate(PROMPT, max_new_tokens=N, do_sample=True, temperature=3.0) as tracer:
        sampled = tracer.result.save()
    enc = gpt2_tokenizer(PROMPT, return_tensors="pt")
    torch.manual_seed(7)
    with torch.no_grad():
        want_sampled = hf.generate(**enc, max_new_tokens=N, do_sample=True, temperature=3.0,
                                   pad_token_id=gpt2_tokenizer.pad_token_id)
    assert torch.equal(sampled, want_sampled)
    assert not torch.equal(sampled, greedy)
