"""Give each invoke its own rows of a batched value, and put edited rows back.

Several invokes run as one forward pass over a batch; invoke *i* owns rows `[start, start+size)`.
A value is narrowed with `Tensor.narrow`, a view, so in-place edits by an invoke land in the batch
the model keeps computing with. A whole-value assignment is spliced back with `torch.cat`, which
keeps autograd intact. Containers (tuples, lists, dicts, Hugging Face `ModelOutput`s) are handled
element by element; only tensors whose first dimension is the batch size are narrowed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .nested import leaves, map_structure, rebuild


@dataclass(frozen=True)
class Rows:
    """The rows of a batch that belong to one invoke."""

    start: int
    size: int
    total: int


def rows_for(sizes: list[int | None]) -> list[Rows | None]:
    """Consecutive row ranges for invokes of these sizes (None: an empty invoke, which sees every row)."""
    total = sum(size for size in sizes if size is not None)
    rows: list[Rows | None] = []
    start = 0
    for size in sizes:
        if size is None:
            rows.append(None)
        else:
            rows.append(Rows(start, size, total))
            start += size
    return rows


def narrow(value: Any, rows: Rows | None) -> Any:
    if rows is None or (rows.start == 0 and rows.size == rows.total):
        return value
    start, size, total = rows.start, rows.size, rows.total

    def own_rows(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == total:
            return v.narrow(0, start, size)
        return v

    return map_structure(value, own_rows)


def splice(full: Any, rows: Rows | None, new: Any) -> Any:
    """Return `full` with the invoke's rows replaced by `new`."""
    if rows is None or (rows.start == 0 and rows.size == rows.total):
        return new
    if isinstance(full, torch.Tensor):
        if not isinstance(new, torch.Tensor):
            new = torch.as_tensor(new, dtype=full.dtype, device=full.device)
        if full.dim() == 0 or full.shape[0] != rows.total:
            return new
        new = new.to(dtype=full.dtype, device=full.device).expand(rows.size, *full.shape[1:])
        parts = []
        if rows.start:
            parts.append(full.narrow(0, 0, rows.start))
        parts.append(new)
        end = rows.start + rows.size
        if end < rows.total:
            parts.append(full.narrow(0, end, rows.total - end))
        return torch.cat(parts, dim=0)
    if isinstance(full, (tuple, list)) and isinstance(new, (tuple, list)) and len(full) == len(new):
        items = [splice(f, rows, n) if f is not n else f for f, n in zip(full, new)]
        return rebuild(full, items)
    if isinstance(full, dict) and isinstance(new, dict):
        merged = {k: (splice(full[k], rows, v) if k in full and full[k] is not v else v) for k, v in new.items()}
        return rebuild(full, merged)
    return new


def batch_size_of(value: Any) -> int | None:
    """The size of the first dimension of the first tensor (of at least one dimension) found in `value`."""
    for leaf in leaves(value):
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return leaf.shape[0]
    return None
