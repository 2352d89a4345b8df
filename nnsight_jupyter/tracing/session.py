"""`with model.session():` several traces that share values without saving them.

    with model.session():
        with model.trace("The Eiffel Tower is in"):
            h = model.layers[5].output            # no .save(): the next trace in the session reads it
        with model.trace("The Colosseum is in"):
            model.layers[5].output[:, -1] = h[:, -1]
            logits = model.lm_head.output.save()  # saved: kept after the session

Inside a session each trace hands every name it bound to the session's code as it is. At the end
of the session, names bound in its body that hold tensors none of its traces saved become
`NotSaved` placeholders, as after a single trace: only the session's edge filters.

Locally the body runs where it is written. With `remote=True` the body is sent as one job: the
server runs it with the same engine, each trace inside it running on the server's model, and
sends back what the session saved.
"""

from __future__ import annotations

import ast
import copy
import sys
from types import FunctionType
from typing import TYPE_CHECKING, Any

from .backend import LOCAL
from .saving import NotSaved, holds_unsaved_tensor
from .source import USER_CODES, Block, block_for_frame, compile_with
from .tracer import Tracer, _write_locals

if TYPE_CHECKING:
    from ..models.base import NNsight


class Session(Tracer):
    """What `model.session()` returns; a context manager."""

    saved_ids: dict[int, Any]

    def __init__(self, model: NNsight, *, backend: Any = None, options: dict[str, Any] | None = None) -> None:
        super().__init__(model, (), {}, backend=backend, options={**(options or {}), "session": True})
        self.saved_ids = {}

    def __enter__(self) -> Session:
        frame = sys._getframe(1)
        if self.backend is not LOCAL:
            self._enter(frame)  # the body is skipped here and runs as one remote job
            return self
        self._block = block_for_frame(frame, "model.session()")
        self._frame = frame
        open_session(self.model, self)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        __tracebackhide__ = True
        if self.backend is not LOCAL:
            return super().__exit__(exc_type, exc, tb)
        frame, self._frame = self._frame, None
        close_session(self.model, self)
        if exc_type is None and frame is not None:
            _filter_unsaved(frame, self._block, self.saved_ids)
        del frame
        return False


def open_session(model: Any, session: Session) -> None:
    object.__setattr__(model, "_sessions", (*model._sessions, session))


def close_session(model: Any, session: Session) -> None:
    object.__setattr__(model, "_sessions", tuple(s for s in model._sessions if s is not session))


def _filter_unsaved(frame: Any, block: Block, saved: dict[int, Any]) -> None:
    """Put `NotSaved` placeholders in place of the session body's names that hold unsaved tensors."""
    f_locals = frame.f_locals
    module_level = f_locals is frame.f_globals
    replaced = {}
    for name in block.assigned:
        value = f_locals.get(name, frame.f_globals.get(name)) if not module_level else f_locals.get(name)
        if value is not None and holds_unsaved_tensor(value, saved):
            replaced[name] = NotSaved(name)
    if not replaced:
        return
    if module_level:
        f_locals.update(replaced)
    else:
        _write_locals(frame, replaced, block, f_locals)


def run_session(model: Any, block: Block, ns: dict) -> dict[str, Any]:
    """Run a session's body (received by a server) in `ns`; return the names it bound, unsaved tensors filtered.

    The traces written in the body are found in its syntax tree and each becomes a call that runs
    its compiled body through the engine, so no frame inspection or trace function is needed
    (a server's sandbox refuses both to the code it runs).
    """
    nested = _NestedTraces(block.filename)
    body = [nested.visit(copy.deepcopy(stmt)) for stmt in block.body]
    module = ast.Module(body=body, type_ignores=[])
    ast.fix_missing_locations(module)
    code = compile(module, block.filename, "exec", dont_inherit=True)
    USER_CODES.add(code)

    def run_trace(tracer: Any, index: int) -> None:
        if not isinstance(tracer, Tracer):
            raise TypeError("Inside a remote session, `with` a .trace(...) or .generate(...) of the model.")
        ns.update(tracer.run(nested.blocks[index], ns, module_level=True))

    ns[_RUN_TRACE] = run_trace
    session = Session(model)
    open_session(model, session)
    try:
        FunctionType(code, ns)()
    finally:
        close_session(model, session)
        ns.pop(_RUN_TRACE, None)
    bound = {}
    for name in block.assigned:
        if name in ns:
            value = ns[name]
            bound[name] = NotSaved(name) if holds_unsaved_tensor(value, session.saved_ids) else value
    return bound


_RUN_TRACE = "__nnsight_session_trace__"


class _NestedTraces(ast.NodeTransformer):
    """`with model.trace(...) [as t]: body` -> `__nnsight_session_trace__(model.trace(...), i)`; body compiled apart."""

    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.blocks: list[Block] = []

    def visit_With(self, node: ast.With) -> ast.AST:
        expr = node.items[0].context_expr if len(node.items) == 1 else None
        if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Attribute) and expr.func.attr in _TRACES:
            self.blocks.append(compile_with(node, self.filename))
            call = ast.Call(
                func=ast.Name(id=_RUN_TRACE, ctx=ast.Load()),
                args=[expr, ast.Constant(len(self.blocks) - 1)],
                keywords=[],
            )
            return ast.copy_location(ast.Expr(value=ast.copy_location(call, node)), node)
        self.generic_visit(node)
        return node

    def visit_FunctionDef(self, node: ast.AST) -> ast.AST:
        return node

    visit_AsyncFunctionDef = visit_FunctionDef
    visit_Lambda = visit_FunctionDef
    visit_ClassDef = visit_FunctionDef


_TRACES = {"trace", "generate"}
