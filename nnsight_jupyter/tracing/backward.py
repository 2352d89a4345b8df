"""`with loss.backward():` inside a trace: read and edit gradients as the backward pass computes them.

    with model.trace(x):
        h = model.layers[3].output
        loss = model.output.logits.sum()
        with loss.backward():
            g = h.grad.save()             # the gradient flowing into h, without retain_grad()
            h.grad = g * 0                # earlier layers see the edited gradient

The compiler rewrites `with <tensor>.backward(...):` in a trace body into
`with __nnsight_backward__(<tensor>, ...):` (see `source.py`), so a plain `loss.backward()` stays
torch's own call. The backward pass runs in a greenlet of its own, started at the first `.grad`
read. Reading `t.grad` puts a one-shot hook on `t` and switches to the backward pass; when the
hook fires, it switches back with the gradient, and the body runs until it reads the next
gradient or leaves the block, at which point the hook returns the (possibly replaced) gradient
and the backward pass goes on. Autograd's worker threads are switched off for the pass
(`torch.autograd.set_multithreading_enabled(False)`), so every hook runs on this thread.

Gradients arrive in reverse order of the forward pass; a `.grad` the pass has already gone
past (or one `loss` does not depend on) is reported when the pass ends, at the line that asked.

`Tensor.grad` is replaced by a property only while such a block is open, so `.grad` elsewhere
(optimizers read it for every parameter) costs nothing extra. An exception in the block stops the
backward pass, removes every hook it added, and puts the property back; the trace then puts back
parameter gradients as they were before its first backward pass.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from greenlet import getcurrent, greenlet

from ..errors import OutOfOrderError, TraceError
from .batching import narrow, splice
from .interleave import current_mediator

_BASE_GRAD: Any = torch._C.TensorBase.__dict__["grad"]
_active: dict[Any, list[BackwardPass]] = {}
"""Open backward blocks by the greenlet of the trace body that opened them."""


class _Finished:
    """Handed to a body waiting for a gradient when the backward pass ended without it."""


class _AbortBackward(Exception):
    """Thrown into a paused backward pass to end it after the block failed."""


def _grad_get(tensor: torch.Tensor) -> Any:
    stack = _active.get(getcurrent())
    if stack:
        return stack[-1].read(tensor)
    return _BASE_GRAD.__get__(tensor)


def _grad_set(tensor: torch.Tensor, value: Any) -> None:
    stack = _active.get(getcurrent())
    if stack:
        stack[-1].write(tensor, value)
        return
    _BASE_GRAD.__set__(tensor, value)


def _grad_del(tensor: torch.Tensor) -> None:
    _BASE_GRAD.__delete__(tensor)


_GRAD_PROPERTY = property(_grad_get, _grad_set, _grad_del, _BASE_GRAD.__doc__)


def _install_property() -> None:
    if torch.Tensor.__dict__.get("grad") is not _GRAD_PROPERTY:
        torch.Tensor.grad = _GRAD_PROPERTY  # type: ignore[assignment]


def _remove_property() -> None:
    if not _active and torch.Tensor.__dict__.get("grad") is _GRAD_PROPERTY:
        del torch.Tensor.grad


def backward_block(tensor: Any, *args: Any, **kwargs: Any) -> BackwardPass:
    """What `with tensor.backward(...):` becomes in a trace body."""
    if not isinstance(tensor, torch.Tensor):
        # Not a tensor: call its own backward (it may be a context manager of its own).
        return tensor.backward(*args, **kwargs)
    return BackwardPass(tensor, args, kwargs)


class BackwardPass:
    """One `with loss.backward(...):` block; a context manager for the trace body."""

    def __init__(self, tensor: torch.Tensor, args: tuple, kwargs: dict) -> None:
        self.tensor = tensor
        self.args = args
        self.kwargs = kwargs
        self.body: Any = None
        self.runner: greenlet | None = None
        self.waiting: torch.Tensor | None = None
        self.serving: torch.Tensor | None = None
        self.replacement: Any = None
        self.received: dict[int, tuple[torch.Tensor, Any]] = {}
        self.passed: set[int] = set()
        self.handles: list[Any] = []
        self.finished = False
        self.rows: Any = None

    def __enter__(self) -> BackwardPass:
        m = current_mediator()
        if m is None:
            raise TraceError("`with loss.backward():` is for inside a trace; outside one, call loss.backward().")
        if not self.tensor.requires_grad:
            raise TraceError(
                "This value does not require grad, so there is no backward pass to run: compute the loss from "
                "model values read in the trace (e.g. model.output), with gradients enabled."
            )
        from .runtime import snapshot_parameter_grads

        snapshot_parameter_grads(m.interleaver)
        self.rows = m.rows
        self.body = getcurrent()
        _active.setdefault(self.body, []).append(self)
        _install_property()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> Literal[False]:
        __tracebackhide__ = True
        try:
            if exc_type is None:
                self._run_to_end()
            else:
                self._abandon()
        finally:
            for handle in self.handles:
                handle.remove()
            self.handles = []
            stack = _active.get(self.body)
            if stack:
                stack.remove(self)
                if not stack:
                    del _active[self.body]
            _remove_property()
            self.received = {}
        return False

    # ----- the backward pass, in its own greenlet ---------------------------------------------------
    def _run(self) -> Any:
        with torch.autograd.set_multithreading_enabled(False):
            try:
                torch.autograd.backward(self.tensor, *self.args, **self.kwargs)
            except _AbortBackward:
                pass
        self.finished = True
        return _Finished

    def _resume(self) -> Any:
        """Let the backward pass run until it hands back a gradient (or ends); returns what it handed back."""
        if self.finished:
            return _Finished
        if self.runner is None:
            self.runner = greenlet(self._run, parent=self.body)
        return self.runner.switch()

    def _run_to_end(self) -> None:
        self.waiting = None
        while not self.finished:
            self._resume()

    def _abandon(self) -> None:
        runner = self.runner
        if runner is not None and not runner.dead and runner:
            try:
                runner.throw(_AbortBackward())
            except _AbortBackward:
                pass
        self.finished = True

    def _hook(self, tensor: torch.Tensor, redirected: bool) -> Any:
        def hook(grad: torch.Tensor) -> Any:
            if self.waiting is not tensor:
                return None
            self.waiting = None
            self.serving = tensor
            self.replacement = None
            value = narrow(grad, self.rows) if redirected else grad
            self.received[id(tensor)] = (tensor, value)
            self.body.switch(value)  # the body runs until its next .grad read or the end of the block
            self.serving = None
            self.passed.add(id(tensor))
            new = self.replacement
            self.replacement = None
            if new is None:
                return None
            return splice(grad, self.rows, new) if redirected else new

        return hook

    def _rows_of_batch(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """For an invoke's rows of a batched value: the whole batch, whose gradient the backward pass computes."""
        rows, base = self.rows, tensor._base
        if rows is None or base is None or base.dim() == 0 or base.shape[0] != rows.total:
            return None
        if tensor.shape != (rows.size, *base.shape[1:]):
            return None
        return base

    # ----- the body's side ------------------------------------------------------------------------
    def read(self, tensor: torch.Tensor) -> Any:
        key = id(tensor)
        got = self.received.get(key)
        if got is not None and got[0] is tensor:
            if self.serving is tensor and self.replacement is not None:
                return self.replacement
            return got[1]
        if self.finished:
            raise self._not_reached()
        if not tensor.requires_grad:
            raise TraceError(
                "This tensor does not require grad, so it has no gradient in this backward pass. Read .grad of "
                "values the loss was computed from (module outputs and inputs read in this trace)."
            )
        base = self._rows_of_batch(tensor)
        target = tensor if base is None else base
        self.handles.append(target.register_hook(self._hook(tensor, base is not None)))
        self.waiting = tensor
        self.serving = None
        message = self._resume()
        if message is _Finished:
            self.waiting = None
            raise self._not_reached()
        return message

    def write(self, tensor: torch.Tensor, value: Any) -> None:
        if id(tensor) in self.passed and self.serving is not tensor:
            raise OutOfOrderError(
                "This gradient was already passed on to earlier layers: assign .grad while it is the latest "
                "gradient read, i.e. right after reading it and before reading the gradient of an earlier value."
            )
        if self.serving is not tensor:
            self.read(tensor)
        if isinstance(value, torch.Tensor):
            value = value.detach()
        self.replacement = value

    def _not_reached(self) -> OutOfOrderError:
        return OutOfOrderError(
            "The backward pass ended without computing this gradient: either it had already gone past it "
            "(gradients arrive in reverse order of the forward pass, so read the gradient of later layers "
            "first), or the loss does not depend on this value."
        )
