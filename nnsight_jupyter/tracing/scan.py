"""Shapes and dtypes of every module, from a run on fake tensors.

Under torch's `FakeTensorMode` every operation computes only the metadata of its result, so the
model's real weights are read for their shapes but no arithmetic runs; a 70B model scans as fast
as a small one. Plain forward hooks record each module's inputs and outputs and are removed when
the scan ends, whatever happens.

`model.scan(x)` returns a `Scan`, usable two ways: as the table of every module's shapes
(computed by the call), or, as nnsight spells it, as a trace whose body runs beside the fake
run: `with model.scan(x): dim = model.layers[0].output.shape[-1]`. Values read there are fake
tensors: keep their shapes and dtypes, not the tensors.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ScanError
from .envoy import first_argument
from .nested import map_structure
from .paths import display_path, normalise_path
from .tracer import Tracer

if TYPE_CHECKING:
    from ..models.base import NNsight


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype

    def __str__(self) -> str:
        return f"{list(self.shape)} {str(self.dtype).replace('torch.', '')}"


def describe(value: Any) -> Any:
    """Replace every tensor in a nested value by its shape and dtype, and other values by their type's name."""
    return map_structure(value, _describe_leaf, plain=True)


def _describe_leaf(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return TensorInfo(tuple(value.shape), value.dtype)
    return None if value is None else type(value).__name__


@dataclass(frozen=True)
class ModuleShapes:
    """What one module received and returned during the scan (first call)."""

    path: str
    type_name: str
    inputs: Any
    output: Any

    @property
    def input(self) -> Any:
        return first_argument(*self.inputs)


class ScanResult(Mapping[str, ModuleShapes]):
    """Per-module shapes, in the order the modules ran."""

    def __init__(self, entries: dict[str, ModuleShapes]) -> None:
        self._entries = entries

    def __getitem__(self, key: str) -> ModuleShapes:
        if key in self._entries:
            return self._entries[key]
        return self._entries[normalise_path(key)]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        lines = []
        for path, entry in self._entries.items():
            out = entry.output
            text = str(out) if isinstance(out, TensorInfo) else _short(out)
            lines.append(f"{display_path(path):<48} {entry.type_name:<24} -> {text}")
        return "\n".join(lines)


def _short(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(_short(v) for v in value) + ")"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_short(v)}" for k, v in value.items()) + "}"
    return str(value)


class Scan(Tracer):
    """What `model.scan(x)` returns: a mapping of module paths to shapes, or a `with` block on fake tensors."""

    def __init__(self, model: NNsight, args: tuple, kwargs: dict) -> None:
        super().__init__(model, args, kwargs)
        self._shapes = scan(model, args, kwargs)

    def _call_model(self, model: NNsight, args: tuple, kwargs: dict) -> Any:
        from torch._subclasses.fake_tensor import FakeTensorMode

        mode = FakeTensorMode(allow_non_fake_inputs=True)
        with mode:
            return model._run_forward(_to_fake(args, mode), _to_fake(kwargs, mode))

    @property
    def shapes(self) -> ScanResult:
        """Every module's input and output shapes, in the order the modules ran."""
        return self._shapes

    def __getitem__(self, key: str) -> ModuleShapes:
        return self.shapes[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def __contains__(self, key: object) -> bool:
        return key in self.shapes

    def keys(self) -> Any:
        return self.shapes.keys()

    def values(self) -> Any:
        return self.shapes.values()

    def items(self) -> Any:
        return self.shapes.items()

    def get(self, key: str, default: Any = None) -> Any:
        return self.shapes.get(key, default)

    def __repr__(self) -> str:
        return repr(self.shapes)


def scan(model: NNsight, inputs: tuple, kwargs: dict) -> ScanResult:
    from torch._subclasses.fake_tensor import FakeTensorMode

    prepared = model._prepare_input(*inputs, **kwargs)
    args, call_kwargs, _ = model._batch_inputs([prepared])
    entries: dict[str, ModuleShapes] = {}
    order: list[str] = []
    handles = []

    def recorder(path: str, module: torch.nn.Module):
        def pre(mod: torch.nn.Module, a: tuple, kw: dict) -> None:
            order.append(path)

        def post(mod: torch.nn.Module, a: tuple, kw: dict, out: Any) -> None:
            if path not in entries:
                entries[path] = ModuleShapes(path, type(mod).__name__, (describe(a), describe(kw)), describe(out))

        return pre, post

    try:
        for path, module in model._paths:
            pre, post = recorder(path, module)
            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(module.register_forward_hook(post, with_kwargs=True))
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        with mode:
            fake_args = _to_fake(args, mode)
            fake_kwargs = _to_fake(call_kwargs, mode)
            try:
                model._run_forward(fake_args, fake_kwargs)
            except Exception as exc:
                last = display_path(order[-1]) if order else "the start of the forward pass"
                raise ScanError(
                    f"Shape propagation stopped in {last}: {type(exc).__name__}: {exc}. Modules before it were "
                    "recorded; a module whose result depends on data values cannot be scanned with fake tensors."
                ) from exc
    finally:
        for handle in handles:
            handle.remove()
    ordered = {p: entries[p] for p in dict.fromkeys(order) if p in entries}
    return ScanResult(ordered)


def _to_fake(value: Any, mode: Any) -> Any:
    return map_structure(value, lambda v: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v)
