"""`model.edit()`: interventions kept on a model and run in every later trace of it.

    with model.edit() as ablated:                 # a new model over the same module, with this edit
        model.layers[3].mlp.output[:] = 0
    with ablated.trace("Hello"):                  # the edit runs first, then the body sees its effect
        logits = ablated.lm_head.output.save()

    with model.edit(inplace=True):                # the model itself keeps the edit
        ...
    model.clear_edits()                           # and drops it again

The block is captured like a trace body and not run. Each later trace of the edited model starts
it beside its own body, on the whole batch, ahead of the body at every module, so the body reads
the edited values. The names the block reads are looked up when it is written; envoys of the
model it was written against are read on the edited model. An edit that fails makes the trace
fail with the edit's line in the traceback.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .envoy import Envoy
from .tracer import FrameNamespace, Tracer

if TYPE_CHECKING:
    from ..models.base import NNsight
    from .source import Block


@dataclass(frozen=True)
class Edit:
    """One captured `model.edit()` block: its compiled body and the values of the names it reads."""

    block: Block
    values: dict[str, Any]
    fallback: dict
    written_on: Any  # the root envoy the block's envoys belong to

    def namespace(self, model: Any) -> dict:
        """The block's namespace for a trace of `model`: envoys of the model it was written on, read on `model`."""
        values = dict(self.values)
        if model is not self.written_on:
            for name, value in values.items():
                if isinstance(value, Envoy) and value._root is self.written_on:
                    values[name] = model.resolve(value._path) if value._path else model
        return FrameNamespace(values, fallback=self.fallback)


class EditTracer(Tracer):
    """What `model.edit()` returns: captures its block as an edit instead of running it."""

    def __init__(self, model: NNsight, *, inplace: bool) -> None:
        super().__init__(model, (), {})
        self.inplace = inplace
        self.edited = model if inplace else model._copy_with_edits()

    def __enter__(self) -> Any:
        import sys

        self._enter(sys._getframe(1))
        return self.edited

    def run(self, block: Block, namespace: dict, *, module_level: bool = False) -> dict[str, Any]:
        if block.invokes:
            raise ValueError("An edit applies to every input of later traces: write it without tracer.invoke(...).")
        values = {}
        for name in _read_names(block):
            try:
                values[name] = namespace[name]
            except KeyError:
                continue
        fallback = getattr(namespace, "fallback", None)
        if fallback is None:
            fallback = namespace
        edit = Edit(block, values, fallback, self.model)
        target = self.edited
        object.__setattr__(target, "_edits", (*target._edits, edit))
        return {block.as_name: self.edited} if block.as_name else {}


def _read_names(block: Block) -> set[str]:
    names: set[str] = set()
    for stmt in block.body:
        for node in ast.walk(stmt):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
                names.add(node.id)
    return names


def start_edits(il: Any, model: Any, save: Any) -> None:
    """Add the model's edits to a starting trace, ahead of its body at every module."""
    from .source import SAVE_NAME

    for k, edit in enumerate(model._edits):
        ns = edit.namespace(model)
        ns[SAVE_NAME] = save
        m = il.add(edit.block.code, ns, assigned=(), rows=None, label="edit", index=k - len(model._edits))
        il.start(m)
