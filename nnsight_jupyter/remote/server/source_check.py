"""Reading trace source before it runs: refuse what no trace needs but escapes rely on.

See ``sandbox.py`` for the full list; the checks run on the syntax tree, so they see every
attribute, name, import and annotation the code spells out, wherever it sits (lambdas, nested
functions, f-strings). Names computed at run time are the runtime guards' job.
"""

from __future__ import annotations

import ast
import string
from collections.abc import Iterable

from .policy import SandboxViolation, attribute_problem, is_dunder, module_problem, name_problem

__all__ = ["validate"]


def validate(source: str) -> None:
    """Refuse trace source that uses what the sandbox forbids (see the module docstring).

    Syntax errors are left to the compiler, which reports them with the user's line.

        validate("h = model.transformer.h[0].output.save()")   # fine
        validate("x.__class__")                                 # SandboxViolation
    """
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return
    except (RecursionError, MemoryError, ValueError) as exc:
        raise SandboxViolation(
            f"the trace body cannot be checked ({type(exc).__name__}): it is too deeply nested; simplify it"
        ) from None
    methods: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            methods.update(id(item) for item in node.body if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)))
    for node in ast.walk(tree):
        problem = _node_problem(node, methods)
        if problem is not None:
            line = getattr(node, "lineno", None)
            segment = ast.get_source_segment(source, node) if line is not None else None
            where = f"line {line}" if line is not None else "the trace"
            if segment and len(segment) <= 80 and "\n" not in segment:
                where += f" (`{segment}`)"
            raise SandboxViolation(f"{where}: {problem}")


def _node_problem(node: ast.AST, methods: set[int]) -> str | None:
    if isinstance(node, ast.Attribute):
        if node.attr in ("format", "format_map") and _safe_literal_format(node):
            return None
        return attribute_problem(node.attr)
    if isinstance(node, ast.Name):
        return _binding_problem(node.id)
    if isinstance(node, ast.Import):
        for alias in node.names:
            problem = module_problem(alias.name) or _binding_problem(alias.asname)
            if problem:
                return problem
        return None
    if isinstance(node, ast.ImportFrom):
        if node.level:
            return "relative imports are not available in remote traces"
        if node.module is None:
            return "this import form is not available in remote traces"
        problem = module_problem(node.module)
        if problem:
            return problem
        for alias in node.names:
            if alias.name == "*":
                return f"`from {node.module} import *` is not available in remote traces; import the names you use"
            problem = name_problem(node.module, alias.name) or _binding_problem(alias.asname)
            if problem:
                return problem
        return None
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        if is_dunder(node.name) and id(node) not in methods:
            return f"a function named {node.name!r} would replace an interpreter name; rename it"
        return _annotation_problem([node.returns, *(a.annotation for a in _arguments(node.args))])
    if isinstance(node, ast.Lambda):
        return None
    if isinstance(node, ast.ClassDef):
        return _binding_problem(node.name)
    if isinstance(node, ast.arg):
        return _binding_problem(node.arg)
    if isinstance(node, ast.AnnAssign):
        return _annotation_problem([node.annotation])
    if isinstance(node, ast.ExceptHandler):
        return _binding_problem(node.name)
    if isinstance(node, (ast.Global, ast.Nonlocal)):
        for name in node.names:
            problem = _binding_problem(name)
            if problem:
                return problem
        return None
    if isinstance(node, (ast.MatchAs, ast.MatchStar)):
        return _binding_problem(node.name)
    if isinstance(node, ast.MatchMapping):
        return _binding_problem(node.rest)
    return None


def _binding_problem(name: str | None) -> str | None:
    if name is not None and is_dunder(name):
        return f"the name {name!r} is not available in remote traces: dunder names reach the interpreter's internals"
    return None


def _arguments(args: ast.arguments) -> Iterable[ast.arg]:
    yield from args.posonlyargs
    yield from args.args
    yield from args.kwonlyargs
    if args.vararg:
        yield args.vararg
    if args.kwarg:
        yield args.kwarg


def _annotation_problem(annotations: list[ast.expr | None]) -> str | None:
    for annotation in annotations:
        if annotation is None:
            continue
        for inner in ast.walk(annotation):
            if isinstance(inner, ast.Constant) and isinstance(inner.value, str):
                return (
                    "string annotations are not available in remote traces (typing helpers evaluate them "
                    "as code); write the type itself, e.g. `x: int`"
                )
    return None


def _safe_literal_format(node: ast.Attribute) -> bool:
    """``"{} {name:>4}".format(...)`` on a literal whose fields only name arguments."""
    if not (isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
        return False
    try:
        fields = list(string.Formatter().parse(node.value.value))
    except ValueError:
        return False
    for _, field, spec, _ in fields:
        for text in (field, spec):
            if text and ("." in text or "[" in text or "{" in text):
                return False
    return True
