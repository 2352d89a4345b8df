"""Fixtures for the model wrappers: tiny random causal LMs (the real GPT-2 tokenizer is in tests/conftest.py).

Tiny random models check plumbing (padding, positions, aliases, generation steps) in
milliseconds; the real GPT-2 tokenizer gives real token ids and real prompt lengths.
"""

from __future__ import annotations

import pytest
import torch

GPT2_VOCAB = 50257


def _tiny_config(kind: str):
    import transformers as T

    common = dict(vocab_size=GPT2_VOCAB, bos_token_id=GPT2_VOCAB - 1, eos_token_id=GPT2_VOCAB - 1)
    if kind == "gpt2":
        return T.GPT2Config(n_layer=3, n_embd=32, n_head=4, n_positions=128, **common)
    if kind == "llama":
        return T.LlamaConfig(num_hidden_layers=3, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
                             **common)
    if kind == "gemma3":
        return T.Gemma3TextConfig(num_hidden_layers=3, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                                  sliding_window=16, pad_token_id=0, **common)
    raise ValueError(kind)


def build_tiny(kind: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random causal LM of the given family over GPT-2's vocabulary, in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_tiny_config(kind), dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return model


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def tiny_hf(request):
    """(family, HF model) for a tiny random GPT-2 and Llama."""
    return request.param, build_tiny(request.param)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, gpt2_tokenizer):
    """A saved tiny Llama + tokenizer folder, for loading by path (lazy or dispatched)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    build_tiny("llama", seed=1).save_pretrained(folder)
    gpt2_tokenizer.save_pretrained(folder)
    return folder
