"""`tracer.cache(...)` with nnsight's options, checked against plain forward hooks on the same model."""

from __future__ import annotations

import torch

from nnsight_jupyter.models.language import LanguageModel

from .conftest import build_tiny

PROMPTS = ["The capital of France is", "Hello"]


def _hooked(hf, layer_path, run):
    """Every (input, output) a plain forward hook sees on one module while `run()` runs."""
    seen = []
    layer = hf.get_submodule(layer_path)
    handle = layer.register_forward_hook(lambda mod, args, out: seen.append((args[0].detach(), out.detach())))
    try:
        with torch.no_grad():
            run()
    finally:
        handle.remove()
    return seen


def _layer0(family):
    return "transformer.h.0" if family == "gpt2" else "model.layers.0"


def test_options_modules_inputs_output_dtype_and_root_spelling(tiny_hf, gpt2_tokenizer):
    family, hf = tiny_hf
    model = LanguageModel(hf, tokenizer=gpt2_tokenizer)
    enc = gpt2_tokenizer(PROMPTS[0], return_tensors="pt")
    (expected_in, expected_out), = _hooked(hf, _layer0(family), lambda: hf(**enc))
    with torch.no_grad(), model.trace(PROMPTS[0]) as tracer:
        cache = tracer.cache(modules=[model.layers[0]], include_inputs=True, dtype=torch.float64)
        bare = tracer.cache(modules=[f"model.{_layer0(family)}"], include_output=False, include_inputs=True)
    assert list(cache) == [_layer0(family)]
    by_root = cache.model.layers[0]  # nnsight: a leading `model` is the root; shared names work
    native = cache["model." + _layer0(family)]
    assert torch.equal(by_root.output, expected_out.double())
    assert native.output.dtype == torch.float64 and torch.equal(native.input, expected_in.double())
    assert bare[_layer0(family)].output is None
    assert torch.equal(bare[_layer0(family)].input, expected_in)


def test_generation_keeps_one_entry_per_step(tiny_hf, gpt2_tokenizer):
    family, hf = tiny_hf
    model = LanguageModel(hf, tokenizer=gpt2_tokenizer)
    enc = gpt2_tokenizer(PROMPTS[0], return_tensors="pt")
    seen = _hooked(
        hf, _layer0(family),
        lambda: hf.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=gpt2_tokenizer.pad_token_id),
    )
    with torch.no_grad(), model.generate(PROMPTS[0], max_new_tokens=3) as tracer:
        cache = tracer.cache(modules=[model.layers[0]])
    outputs = cache.model.layers[0].output
    assert isinstance(outputs, list) and len(outputs) == len(seen) == 3
    for got, (_, expected) in zip(outputs, seen):
        assert torch.equal(got, expected)


def test_a_cache_declared_in_an_invoke_holds_its_rows(tiny_hf, gpt2_tokenizer):
    family, hf = tiny_hf
    model = LanguageModel(hf, tokenizer=gpt2_tokenizer)
    with torch.no_grad(), model.trace() as tracer:
        with tracer.invoke(PROMPTS[0]):
            first = tracer.cache(modules=[model.layers[0]])
        with tracer.invoke(PROMPTS[1]):
            second = tracer.cache(modules=[model.layers[0]])
        with tracer.invoke():
            both = tracer.cache(modules=[model.layers[0]])
    batch = gpt2_tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    pos = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    (_, expected), = _hooked(hf, _layer0(family), lambda: hf(**batch, position_ids=pos))
    assert torch.equal(both.model.layers[0].output, expected)
    assert torch.equal(first.model.layers[0].output, expected[:1])
    assert torch.equal(second.model.layers[0].output, expected[1:])
