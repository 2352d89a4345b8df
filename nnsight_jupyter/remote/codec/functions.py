"""A user's function as it travels: its name and source text, cut out of the file it was defined in.

A `def` travels as its dedented block (decorators included); a lambda as the lambda expression
alone, found among the lambdas on its line by the positions of its code. Nothing is compiled
here: the receiving side decides whether and how to.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
import types
from collections.abc import Iterator

from .wire import FunctionSource, Unsupported

__all__ = ["function_to_wire"]


def function_to_wire(function: types.FunctionType) -> FunctionSource:
    """Return the name and source text of a user-defined function or lambda.

    A ``def`` travels as its dedented block (decorators included). A lambda travels as the
    lambda expression alone, cut out of its line with :mod:`ast`, so ``f = lambda x: x * 2``
    sends ``lambda x: x * 2``.
    """
    code = function.__code__
    if code.co_name == "<lambda>":
        return FunctionSource("<lambda>", _lambda_source(function))
    try:
        source = inspect.getsource(function)
    except (OSError, TypeError) as exc:
        raise Unsupported(function, _no_source(function.__qualname__, exc)) from None
    return FunctionSource(function.__name__, textwrap.dedent(source))


def _lambda_source(function: types.FunctionType) -> str:
    code = function.__code__
    try:
        lines, _ = inspect.findsource(function)
    except (OSError, TypeError) as exc:
        raise Unsupported(function, _no_source("<lambda>", exc)) from None
    text = "".join(lines)
    try:
        tree = ast.parse(text)
    except SyntaxError:
        raise Unsupported(
            function,
            f"the file holding this lambda ({code.co_filename}) no longer parses, so its "
            "source cannot be cut out; re-run the cell that defines it",
        ) from None
    candidates = [
        node for node in ast.walk(tree) if isinstance(node, ast.Lambda) and node.lineno == code.co_firstlineno
    ]
    if len(candidates) > 1:
        spans = [span for span in _code_spans(code) if span[:2] != span[2:]]
        holding = [node for node in candidates if spans and _body_holds(node, spans)]
        if holding:
            candidates = [max(holding, key=_body_start)]
    if len(candidates) != 1:
        raise Unsupported(
            function,
            f"cannot tell which lambda on line {code.co_firstlineno} of {code.co_filename} "
            "this is; give it a name with def, or put it on a line of its own",
        )
    segment = ast.get_source_segment(text, candidates[0])
    if segment is None:
        raise Unsupported(function, _no_source("<lambda>", "no source segment"))
    return f"({segment})" if "\n" in segment else segment


def _code_spans(code: types.CodeType) -> Iterator[tuple[int, int, int, int]]:
    """Yield (line, column, end line, end column) for each instruction that has a position."""
    for line, end_line, column, end_column in getattr(code, "co_positions", list)():
        if None not in (line, end_line, column, end_column):
            yield line, column, end_line, end_column


def _body_holds(node: ast.Lambda, spans: list[tuple[int, int, int, int]]) -> bool:
    body = node.body
    start = (body.lineno, body.col_offset)
    end = (body.end_lineno, body.end_col_offset)
    return all(start <= span[:2] and span[2:] <= end for span in spans)


def _body_start(node: ast.Lambda) -> tuple[int, int]:
    return node.body.lineno, node.body.col_offset


def _no_source(name: str, cause: object) -> str:
    return (
        f"the source code of function {name!r} is not available ({cause}); functions travel "
        "as source text, so define it in a notebook cell or a .py file (not with exec or in "
        "the plain Python prompt), or write its body inside the trace instead"
    )
