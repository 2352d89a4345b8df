"""Model factories for server tests: ``tests.remote.server.tiny_models:tiny_gpt2`` as a --models spec.

The weights come from a fixed seed, so the worker process and the test process build the same
model and a trace run in either gives the same values.
"""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from nnsight_jupyter import NNsight

VOCAB = 97


def tiny_gpt2() -> NNsight:
    """A 2-layer, 32-wide random GPT-2 (about 60k parameters); builds in milliseconds."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=0,
                            eos_token_id=0)
        module = GPT2LMHeadModel(config).eval()
    finally:
        torch.random.set_rng_state(generator_state)
    return NNsight(module)


def broken() -> NNsight:
    """A factory that fails, to test how a model that cannot load is reported."""
    raise RuntimeError("this test model never loads")
