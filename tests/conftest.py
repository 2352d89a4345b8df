"""Fixtures shared by the whole test suite."""

from __future__ import annotations

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
