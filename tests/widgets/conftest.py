"""Fixtures for the view tests: a tiny random GPT-2 wrapped as a LanguageModel, with the real GPT-2 tokenizer."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def tiny_gpt2(gpt2_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    from nnsight_jupyter import LanguageModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, n_positions=64)).eval()
    return LanguageModel(hf, tokenizer=gpt2_tokenizer), hf


def decode_png(data: bytes):
    """Pixels of an 8-bit palette PNG with no interlacing, as RGB uint8 [h, w, 3] (an independent reader)."""
    import struct
    import zlib

    import numpy as np

    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        chunks.setdefault(kind, b"")
        chunks[kind] += data[pos + 8:pos + 8 + length]
        pos += 12 + length
    width, height, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, colour) == (8, 3)
    palette = np.frombuffer(chunks[b"PLTE"], dtype=np.uint8).reshape(-1, 3)
    raw = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), dtype=np.uint8).reshape(height, width + 1)
    assert (raw[:, 0] == 0).all()
    return palette[raw[:, 1:]]
