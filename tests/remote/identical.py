"""Bit-for-bit comparison of values from a local and a remote run."""

from __future__ import annotations

from typing import Any

import torch


def assert_identical(a: Any, b: Any) -> None:
    """Same types and structure; tensors equal in dtype, shape and every bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.detach(), b.detach())
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_identical(x, y)
    elif isinstance(a, dict):
        assert set(a) == set(b)
        for k in a:
            assert_identical(a[k], b[k])
    else:
        assert a == b
