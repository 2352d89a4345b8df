"""What the engine installs in the process, when, and how to take it off again.

Importing nnsight_jupyter changes nothing outside the package. Three things are installed the
first time they are needed, once per process:

- **a source recorder** (an audit hook on the `compile` event), when the first model is
  wrapped. A `with model.trace(...)` block inside a string passed to `exec` has no file to read
  its source from; the hook keeps the last few sources compiled under names such as `<string>`
  (references only, no copies), so the block can be found. Python cannot remove an audit hook,
  so `uninstall` switches it off and drops what it kept.
- **`Tensor.save`**, at the first trace: `x.save()` inside a trace body marks a value to keep.
  Outside a trace it explains itself (or defers to another library's `.save()` on every object).
- **a pass-through wrapper of `torch.autograd.backward`**, at the first trace: inside a trace
  the first backward pass snapshots the traced model's parameter gradients, so a run that fails
  afterwards can put them back; outside a trace it only passes the call on.

Installing them per trace and taking them off after would cost every trace two attribute
swaps and a hook list walk for nothing; `uninstall()` exists for tools and tests that need
torch exactly as it was.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

import torch

from . import source
from .saving import tensor_save

__all__ = ["install_source_recorder", "install_trace_hooks", "installed", "snapshot_parameter_grads", "uninstall"]

_lock = threading.Lock()
_hook_added = False
_original_backward: Any = None


def install_source_recorder() -> None:
    """Start recording sources compiled under pseudo-filenames (idempotent)."""
    global _hook_added
    if source._recording[0]:
        return
    with _lock:
        if not _hook_added:
            sys.addaudithook(source.record_compiled_source)
            _hook_added = True
        source._recording[0] = True


def install_trace_hooks() -> None:
    """`Tensor.save` and the backward guard (and the source recorder, if it was taken off), before a trace runs."""
    global _original_backward
    if not source._recording[0]:
        install_source_recorder()
    if "save" not in torch.Tensor.__dict__:
        torch.Tensor.save = tensor_save  # type: ignore[attr-defined]
    if _original_backward is None:
        _original_backward = torch.autograd.backward
        torch.autograd.backward = _guarded_backward


def snapshot_parameter_grads(trace: Any) -> None:
    """Before a trace's first backward pass: keep its model's parameter gradients, to put back if the trace fails."""
    if trace is not None and trace.grad_snapshot is None:
        trace.grad_snapshot = [
            (p, None if p.grad is None else p.grad.detach().clone()) for p in trace.root._module.parameters()
        ]


def _guarded_backward(*args: Any, **kwargs: Any) -> Any:
    from .interleave import current_trace

    snapshot_parameter_grads(current_trace())
    return (_original_backward or torch.autograd.backward)(*args, **kwargs)


def installed() -> dict[str, bool]:
    """Which of the three are in place now."""
    return {
        "source recorder": source._recording[0],
        "Tensor.save": torch.Tensor.__dict__.get("save") is tensor_save,
        "backward guard": torch.autograd.backward is _guarded_backward,
    }


def uninstall() -> None:
    """Put torch back as it was and stop recording sources; the next model or trace installs them again."""
    global _original_backward
    with _lock:
        source._recording[0] = False
        source._EXEC_SOURCES.clear()
        if torch.Tensor.__dict__.get("save") is tensor_save:
            del torch.Tensor.save  # type: ignore[attr-defined]
        if _original_backward is not None and torch.autograd.backward is _guarded_backward:
            torch.autograd.backward = _original_backward
        _original_backward = None
