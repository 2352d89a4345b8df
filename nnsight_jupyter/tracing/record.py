"""What a model's latest trace ran on, read and saved: kept for the notebook views.

A tensor shown after a trace gets token labels when it came from a language model's trace, and
the module tree marks the modules whose values the trace read and saved. For that, every
successful local trace leaves one `TraceRecord` on its model (`model._last_trace`): the
`input_ids` of the batched call, weak references to the saved tensors and to the module values the
body read, and each invoke's rows. Weak references, because a record must not keep a tensor alive
that the user deleted. Cost at the end of a trace: one small object and one weak reference per
saved tensor and per module read; `benchmarks/overhead.py` sees no difference.

A remote trace runs the same engine on the server, which sends back the record's summary
(`TraceRecord.summary`: token ids, module marks, each saved name's rows) with the result; the
client rebuilds a record on its own model around the tensors it decoded (`record_summary`), so
the views label and mark remotely saved values as they do local ones. The server keeps no record
after the job: it would hold one user's token ids where the next user's job runs.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

_models: weakref.WeakSet[Any] = weakref.WeakSet()


_Tensor = torch.Tensor
_ref = weakref.ref


def _refs(values: Any) -> list[weakref.ref]:
    """Weak references to the tensors among `values` (and directly inside tuples or lists among them)."""
    refs = []
    for v in values:
        if isinstance(v, _Tensor):
            refs.append(_ref(v))
        elif isinstance(v, (tuple, list)):
            refs.extend(_ref(t) for t in v if isinstance(t, _Tensor))
    return refs


class TraceRecord:
    """One finished trace, as the views need it."""

    __slots__ = ("input_ids", "saved", "reads", "invokes", "marks", "__weakref__")

    def __init__(
        self,
        input_ids: Any,
        saved: dict[int, Any],
        reads: list[tuple[str, Any]],
        invokes: list[tuple[Any, dict[str, Any]]],
    ) -> None:
        self.input_ids = input_ids if type(input_ids) is _Tensor and input_ids.dim() <= 2 else None
        self.saved: list[weakref.ref] = _refs(saved.values())
        self.reads: list[tuple[str, list[weakref.ref]]] = [
            (path, [_ref(value)] if isinstance(value, _Tensor) else _refs((value,))) for path, value in reads
        ]
        self.invokes: list[tuple[Any, list[weakref.ref]]] = (
            [(rows, _refs(values.values())) for rows, values in invokes] if invokes else []
        )
        self.marks: dict[str, str] | None = None  # set for a record rebuilt from a summary (no reads)

    def saved_tensors(self) -> list[torch.Tensor]:
        return [t for t in (ref() for ref in self.saved) if t is not None]

    def holds(self, tensor: torch.Tensor) -> bool:
        """Whether `tensor` is one of the values this trace saved."""
        return any(ref() is tensor for ref in self.saved)

    def rows_of(self, tensor: torch.Tensor) -> Any:
        """The batch rows (`Rows`) of the invoke that saved `tensor`; None for a single-input trace."""
        for rows, refs in self.invokes:
            if any(ref() is tensor for ref in refs):
                return rows
        return None

    def module_marks(self) -> dict[str, str]:
        """Module path -> "saved" (its value, or a view of it, was saved) or "read"."""
        if self.marks is not None:
            return dict(self.marks)
        storages = set()
        for t in self.saved_tensors():
            try:
                storages.add((t.device, t.untyped_storage().data_ptr()))
            except (RuntimeError, NotImplementedError):
                continue
        marks: dict[str, str] = {}
        for path, refs in self.reads:
            kind = "read"
            for ref in refs:
                t = ref()
                if t is None:
                    continue
                try:
                    if (t.device, t.untyped_storage().data_ptr()) in storages:
                        kind = "saved"
                except (RuntimeError, NotImplementedError):
                    continue
            if marks.get(path) != "saved":
                marks[path] = kind
        return marks

    def summary(self, bound: dict[str, Any]) -> dict[str, Any]:
        """What a client needs to rebuild this record around its own copies of the `bound` values.

        Keys: ``input_ids`` (a tensor or None), ``marks`` (path -> kind), ``rows`` (name ->
        ``[start, size, total]`` for each bound tensor an invoke saved).
        """
        rows: dict[str, list[int]] = {}
        for name, value in bound.items():
            if isinstance(value, _Tensor):
                found = self.rows_of(value)
                if found is not None:
                    rows[name] = [found.start, found.size, found.total]
        return {"input_ids": self.input_ids, "marks": self.module_marks(), "rows": rows}


def record_summary(model: Any, summary: dict[str, Any], bound: dict[str, Any]) -> None:
    """Leave on `model` the record a remote run summarised, holding the tensors of `bound`."""
    from .batching import Rows

    ids = summary.get("input_ids")
    by_rows: dict[Rows, dict[str, Any]] = {}
    for name, span in dict(summary.get("rows") or {}).items():
        if name in bound and isinstance(span, (list, tuple)) and len(span) == 3:
            by_rows.setdefault(Rows(int(span[0]), int(span[1]), int(span[2])), {})[name] = bound[name]
    invokes = list(by_rows.items())
    record = TraceRecord(ids if isinstance(ids, _Tensor) else None, {id(v): v for v in bound.values()}, [], invokes)
    marks = summary.get("marks")
    record.marks = {str(k): str(v) for k, v in marks.items()} if isinstance(marks, dict) else {}
    if "_last_trace" not in model.__dict__:
        _models.add(model)
    object.__setattr__(model, "_last_trace", record)


def take_record(model: Any) -> TraceRecord | None:
    """Remove and return `model`'s record (a server does so after each job)."""
    return model.__dict__.pop("_last_trace", None)


def record_trace(
    model: Any,
    call_kwargs: dict,
    saved: dict[int, Any],
    reads: list[tuple[str, Any]],
    mediators: list[Any],
    per_mediator: list[dict[str, Any]],
) -> None:
    """Leave the record of a successful trace on `model` (replacing the previous one)."""
    invokes = [(m.rows, values) for m, values in zip(mediators[1:], per_mediator[1:])] if len(mediators) > 1 else []
    record = TraceRecord(call_kwargs.get("input_ids"), saved, reads, invokes)
    if "_last_trace" not in model.__dict__:
        _models.add(model)
    object.__setattr__(model, "_last_trace", record)


def last_trace(model: Any) -> TraceRecord | None:
    return model.__dict__.get("_last_trace")


def trace_saving(tensor: torch.Tensor) -> tuple[Any, TraceRecord] | None:
    """The model, and the record of its latest trace, that saved `tensor` (None if no live trace did)."""
    for model in list(_models):
        record = last_trace(model)
        if record is not None and record.holds(tensor):
            return model, record
    return None
