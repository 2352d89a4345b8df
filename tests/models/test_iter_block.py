"""`with tracer.iter[...]:` (nnsight's block spelling of a step loop), checked against plain HF generate with hooks."""

from __future__ import annotations

import torch

from nnsight_jupyter.models.language import LanguageModel

from .test_generation import PROMPT, add_at_layer, hf_generate, native_layers


def test_iter_block_steers_the_chosen_steps(tiny_hf, gpt2_tokenizer):
    family, hf = tiny_hf
    model = LanguageModel(hf, tokenizer=gpt2_tokenizer)
    torch.manual_seed(2)
    vector = torch.randn(hf.config.hidden_size) * 4
    with model.generate(PROMPT, max_new_tokens=6) as tracer:
        with tracer.iter[1:3] as step:
            model.layers[0].output[:] += vector
            last = step
        ids = tracer.result.save()
    handle = add_at_layer(native_layers(hf, family)[0], vector, steps={1, 2})
    want, _, _ = hf_generate(hf, gpt2_tokenizer, PROMPT)
    handle.remove()
    assert torch.equal(ids, want)
    assert last == 2
