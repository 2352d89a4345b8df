"""Find the body of a `with model.trace(...)` block and compile it to run beside the forward pass.

A trace body cannot run where it is written: the values it reads do not exist until the model runs,
and several invokes must be batched into one forward pass before any of them runs. So the body is
located in its source, compiled on its own (keeping the original filename and line numbers, so
tracebacks point at the user's lines), and skipped inline.

Source comes from `linecache` (files and notebook cells), from a record of recently compiled
strings (`exec(...)`; IPython's `%%time` parses the cell with `ast.parse`, filename `<unknown>`, and
compiles the tree as `<timed exec>`), or from `sys.orig_argv` for `python -c`. A recorded source
is used only if compiling it gives the very code object that is running. The record is an audit
hook on the `compile` event, installed when the first model is wrapped (`runtime.py`): it only
keeps a reference to the last few sources whose filename is a pseudo-name such as `<string>`, so
a string compiled before then has no recorded source.

Compiling also rewrites four things in the body's syntax tree:
- `x.save()` becomes `__nnsight_save__(x)`, so any value (tuples, lists, numbers) can be saved;
- `with loss.backward(...):` becomes `with __nnsight_backward__(loss, ...):`, a block that runs
  beside the backward pass (`backward.py`), while a plain `loss.backward()` stays torch's call;
- `with tracer.iter[...]:` / `with tracer.all():` (nnsight's older spelling of a step loop)
  become `for _ in tracer.iter[...]:`;
- the body of each `with tracer.invoke(...)` becomes `pass`, and is compiled on its own so that the
  invoke can run later as a separate participant in the batched forward pass.
"""

from __future__ import annotations

import ast
import collections
import copy
import linecache
import sys
import weakref
from dataclasses import dataclass, field
from types import CodeType, FrameType

from ..errors import InvokeError, SourceUnavailableError, TraceError

SAVE_NAME = "__nnsight_save__"
BACKWARD_NAME = "__nnsight_backward__"

_EXEC_SOURCES: collections.deque[tuple[str, object]] = collections.deque(maxlen=64)
_recording = [False]
"""Whether the audit hook records; it cannot be removed from the process, so `runtime.uninstall` turns it off."""


def record_compiled_source(event: str, args: tuple) -> None:
    """The audit hook that keeps the last sources compiled under pseudo-filenames (`runtime.py` installs it)."""
    if event != "compile" or not _recording[0]:
        return
    try:
        source, filename = args
        if isinstance(filename, bytes):
            filename = filename.decode("utf-8", "replace")
        if isinstance(filename, str) and filename.startswith("<") and source is not None:
            _EXEC_SOURCES.append((filename, source))
    except Exception:  # an audit hook must never make compile() fail
        pass


@dataclass(eq=False)
class Block:
    """A compiled `with` body, ready to run as one participant of a trace."""

    code: CodeType
    filename: str
    lineno: int
    as_name: str | None
    assigned: tuple[str, ...]
    body: list[ast.stmt] = field(repr=False)
    invokes: dict[int, Block] = field(default_factory=dict, repr=False)
    text: str | None = field(default=None, repr=False)
    frame_names: frozenset[str] | None = field(default=None, repr=False)
    """The fast (local, cell, free) names of the function whose `with` this is, once known."""

    def remote_source(self) -> tuple[str, int]:
        """The body's source and the line it starts on in the user's file (to ship it to a server)."""
        if self.text is not None:
            return self.text, self.body[0].lineno if self.body else self.lineno
        return ast.unparse(ast.Module(body=self.body, type_ignores=[])), self.body[0].lineno if self.body else 1


_BLOCKS: collections.OrderedDict[tuple[int, int], tuple[CodeType, Block]] = collections.OrderedDict()
"""Compiled blocks by (id of the running code object, offset of its `with`); the code object is kept alive with its
block, so its id cannot be reused while cached (hashing a code object would hash its whole body)."""
_BLOCKS_MAX = 512
USER_CODES: weakref.WeakSet[CodeType] = weakref.WeakSet()
_INVOKES_BY_CODE: weakref.WeakKeyDictionary[CodeType, dict[int, Block]] = weakref.WeakKeyDictionary()


def block_for_frame(frame: FrameType, what: str = "model.trace(...)") -> Block:
    """Return the compiled body of the `with` statement the frame is executing now."""
    code = frame.f_code
    key = (id(code), frame.f_lasti)
    hit = _BLOCKS.get(key)
    if hit is not None and hit[0] is code:
        return hit[1]
    invokes = _INVOKES_BY_CODE.get(frame.f_code)
    if invokes is not None and frame.f_lineno in invokes:
        return invokes[frame.f_lineno]
    tree, filename, lines = _module_tree(frame, what)
    node = _find_with(tree, frame.f_lineno)
    if node is None:
        raise SourceUnavailableError(
            f"Could not find the `with {what}` statement at line {frame.f_lineno} of {filename}. "
            "The source on disk may have changed since it was loaded; re-run the cell or restart the script."
        )
    block = compile_with(node, filename, lines)
    _BLOCKS[key] = (code, block)
    if len(_BLOCKS) > _BLOCKS_MAX:
        _BLOCKS.popitem(last=False)
    return block


def compile_source(source: str, filename: str = "<trace>", *, first_line: int = 1) -> Block:
    """Compile free-standing trace-body source (a `%%trace` cell, or a body received by a server)."""
    try:
        tree = ast.parse(source, filename=filename)
    except SyntaxError as exc:
        raise TraceError(f"The trace body is not valid Python: {exc.msg} (line {exc.lineno}).") from exc
    if first_line != 1:
        ast.increment_lineno(tree, first_line - 1)
    block = _compile_body(tree.body, filename, lineno=first_line, as_name=None, allow_invokes=True)
    block.text = source
    return block


def compile_invokes(source: str, filename: str, count: int, inputs_name: str, *, first_line: int = 1) -> Block:
    """A trace body that runs `source` once per input, each as its own invoke: `%%trace` with several prompts.

    Every copy keeps the source's own line numbers, so tracebacks point at the cell; the invoke
    headers get distinct line numbers past the end of the source, which is how each is found.
    """
    try:
        tree = ast.parse(source, filename=filename)
    except SyntaxError as exc:
        raise TraceError(f"The trace body is not valid Python: {exc.msg} (line {exc.lineno}).") from exc
    ast.increment_lineno(tree, first_line - 1)
    header = first_line + len(source.splitlines()) + 1
    statements: list[ast.stmt] = []
    for i in range(count):
        line = header + i
        call = ast.parse(f"tracer.invoke({inputs_name}[{i}])", mode="eval").body
        for node in ast.walk(call):
            node.lineno = node.end_lineno = line  # type: ignore[attr-defined]
            node.col_offset, node.end_col_offset = 0, 1  # type: ignore[attr-defined]
        with_node = ast.With(items=[ast.withitem(context_expr=call)], body=copy.deepcopy(tree.body))
        with_node.lineno = with_node.end_lineno = line
        with_node.col_offset, with_node.end_col_offset = 0, 1
        statements.append(with_node)
    return _compile_body(statements, filename, lineno=first_line, as_name=None, allow_invokes=True)


def compile_with(node: ast.With, filename: str, lines: list[str] | None = None) -> Block:
    item = _trace_item(node)
    target = item.optional_vars
    as_name = target.id if isinstance(target, ast.Name) else None
    if target is not None and as_name is None:
        raise TraceError(f"line {node.lineno}: write `with ... as tracer:` with a plain name after `as`.")
    block = _compile_body(node.body, filename, lineno=node.lineno, as_name=as_name, allow_invokes=True)
    block.text = _body_text(node, lines)
    return block


def _body_text(node: ast.With, lines: list[str] | None) -> str | None:
    """The body's own lines, unindented, when the file's text is at hand and the body has lines of its own."""
    first, last = node.body[0], node.body[-1]
    if not lines or first.lineno == node.lineno or (last.end_lineno or 0) > len(lines):
        return None
    indent = first.col_offset
    out = []
    for line in lines[first.lineno - 1 : last.end_lineno]:
        line = line.rstrip("\r\n")
        out.append(line[indent:] if line[:indent].strip() == "" else line.lstrip())
    return "\n".join(out) + "\n"


_TRACE_METHODS = {"trace", "generate", "session", "scan", "edit"}


def _trace_item(node: ast.With) -> ast.withitem:
    """The item of a `with` statement that opens the trace (`with torch.no_grad(), model.trace(x):`)."""
    for item in reversed(node.items):
        expr = item.context_expr
        if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Attribute) and expr.func.attr in _TRACE_METHODS:
            return item
    return node.items[-1]


def _compile_body(
    stmts: list[ast.stmt], filename: str, *, lineno: int, as_name: str | None, allow_invokes: bool
) -> Block:
    body = copy.deepcopy(stmts)
    original = copy.deepcopy(stmts)
    extractor = _InvokeExtractor(filename, allow_invokes)
    body = [extractor.visit(_SaveRewriter().visit(stmt)) for stmt in body]
    module = ast.Module(body=body, type_ignores=[])
    ast.fix_missing_locations(module)
    code = compile(module, filename, "exec", dont_inherit=True)
    USER_CODES.add(code)
    invokes: dict[int, Block] = {}
    for header, inner in extractor.found:
        for line in header:
            invokes[line] = inner
    if invokes:
        _INVOKES_BY_CODE[code] = invokes
    return Block(
        code=code,
        filename=filename,
        lineno=lineno,
        as_name=as_name,
        assigned=tuple(sorted(assigned_names(original))),
        body=original,
        invokes=invokes,
    )


class _SaveRewriter(ast.NodeTransformer):
    """`x.save()` -> `__nnsight_save__(x)`; `with t.backward(...):` -> `with __nnsight_backward__(t, ...):`."""

    def visit_With(self, node: ast.With) -> ast.AST:
        self.generic_visit(node)
        if len(node.items) == 1 and _is_step_selection(node.items[0].context_expr):
            # `with tracer.iter[1:3]:` (nnsight's older spelling) is the loop `for _ in tracer.iter[1:3]:`.
            item = node.items[0]
            target = item.optional_vars or ast.Name(id="__nnsight_step__", ctx=ast.Store())
            loop = ast.For(target=target, iter=item.context_expr, body=node.body, orelse=[])
            return ast.copy_location(loop, node)
        for item in node.items:
            expr = item.context_expr
            if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Attribute) and expr.func.attr == "backward":
                item.context_expr = ast.copy_location(
                    ast.Call(
                        func=ast.Name(id=BACKWARD_NAME, ctx=ast.Load()),
                        args=[expr.func.value, *expr.args],
                        keywords=expr.keywords,
                    ),
                    expr,
                )
        return node

    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr == "save" and not node.args and not node.keywords:
            return ast.copy_location(
                ast.Call(func=ast.Name(id=SAVE_NAME, ctx=ast.Load()), args=[func.value], keywords=[]), node
            )
        return node


def _is_step_selection(expr: ast.AST) -> bool:
    """`tracer.iter[...]` or `tracer.all()`."""
    if isinstance(expr, ast.Subscript):
        return isinstance(expr.value, ast.Attribute) and expr.value.attr == "iter"
    return (
        isinstance(expr, ast.Call)
        and isinstance(expr.func, ast.Attribute)
        and expr.func.attr == "all"
        and not expr.args
        and not expr.keywords
    )


def _is_invoke(node: ast.AST) -> bool:
    if not isinstance(node, ast.With) or len(node.items) != 1:
        return False
    expr = node.items[0].context_expr
    return isinstance(expr, ast.Call) and isinstance(expr.func, ast.Attribute) and expr.func.attr == "invoke"


class _InvokeExtractor(ast.NodeTransformer):
    """Replace each invoke body by `pass` and compile the body on its own."""

    def __init__(self, filename: str, allow: bool) -> None:
        self.filename = filename
        self.allow = allow
        self.found: list[tuple[range, Block]] = []

    def visit_With(self, node: ast.With) -> ast.AST:
        if not _is_invoke(node):
            self.generic_visit(node)
            return node
        if not self.allow:
            raise InvokeError(
                f"{self.filename}, line {node.lineno}: invokes cannot be nested; "
                "open each `with tracer.invoke(...)` directly in the trace body."
            )
        item = node.items[0]
        header_end = max(item.context_expr.end_lineno or node.lineno, node.lineno)
        if item.optional_vars is not None:
            header_end = max(header_end, item.optional_vars.end_lineno or header_end)
        target = item.optional_vars
        as_name = target.id if isinstance(target, ast.Name) else None
        inner = _compile_body(node.body, self.filename, lineno=node.lineno, as_name=as_name, allow_invokes=False)
        self.found.append((range(node.lineno, header_end + 1), inner))
        placeholder = ast.copy_location(ast.Pass(), node.body[0])
        return ast.copy_location(ast.With(items=node.items, body=[placeholder]), node)

    def visit_FunctionDef(self, node: ast.AST) -> ast.AST:
        return node

    visit_AsyncFunctionDef = visit_FunctionDef
    visit_Lambda = visit_FunctionDef
    visit_ClassDef = visit_FunctionDef


def assigned_names(stmts: list[ast.stmt]) -> set[str]:
    """Names bound at the top level of a block (not inside nested functions, classes or comprehensions)."""
    names: set[str] = set()

    class Visitor(ast.NodeVisitor):
        def visit_Name(self, node: ast.Name) -> None:
            if isinstance(node.ctx, ast.Store):
                names.add(node.id)

        def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
            names.add(node.name)
            for deco in node.decorator_list:
                self.visit(deco)

        visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

        def visit_ClassDef(self, node: ast.ClassDef) -> None:
            names.add(node.name)
            for deco in node.decorator_list:
                self.visit(deco)

        def visit_Lambda(self, node: ast.Lambda) -> None:
            return None

        def visit_ListComp(self, node: ast.AST) -> None:
            for gen in node.generators:  # type: ignore[attr-defined]
                self.visit(gen.iter)

        visit_SetComp = visit_ListComp
        visit_DictComp = visit_ListComp
        visit_GeneratorExp = visit_ListComp

        def visit_NamedExpr(self, node: ast.NamedExpr) -> None:
            names.add(node.target.id)
            self.visit(node.value)

        def visit_Import(self, node: ast.Import | ast.ImportFrom) -> None:
            for alias in node.names:
                if alias.name != "*":
                    names.add(alias.asname or alias.name.split(".")[0])

        visit_ImportFrom = visit_Import

    visitor = Visitor()
    for stmt in stmts:
        visitor.visit(stmt)
    return names


def _find_with(tree: ast.AST, lineno: int) -> ast.With | None:
    best: ast.With | None = None
    for node in ast.walk(tree):
        if isinstance(node, ast.With) and node.body:
            header_end = max((item.context_expr.end_lineno or node.lineno) for item in node.items)
            if node.lineno <= lineno <= header_end and (best is None or node.lineno >= best.lineno):
                best = node
    return best


_TREES: collections.OrderedDict[tuple[str, int], ast.Module] = collections.OrderedDict()


def _parse_cached(filename: str, text: str) -> ast.Module:
    key = (filename, hash(text))
    tree = _TREES.get(key)
    if tree is None:
        tree = ast.parse(text, filename=filename)
        _TREES[key] = tree
        if len(_TREES) > 64:
            _TREES.popitem(last=False)
    return tree


def _module_tree(frame: FrameType, what: str) -> tuple[ast.Module, str, list[str] | None]:
    filename = frame.f_code.co_filename
    lines = linecache.getlines(filename, frame.f_globals)
    if lines:
        try:
            tree = _parse_cached(filename, "".join(lines))
        except SyntaxError:
            tree = None
        if tree is not None and _find_with(tree, frame.f_lineno) is not None:
            return tree, filename, lines
    for recorded_name, source in reversed(list(_EXEC_SOURCES)):
        if recorded_name != filename and recorded_name != "<unknown>":
            continue
        tree = _tree_from_recorded(filename, source)
        if tree is not None and _defines_code(tree, filename, frame.f_code):
            text = source.decode("utf-8", "replace") if isinstance(source, (bytes, bytearray)) else source
            return tree, filename, text.splitlines(keepends=True) if isinstance(text, str) else None
    if filename == "<string>" and "-c" in sys.orig_argv:
        text = sys.orig_argv[sys.orig_argv.index("-c") + 1]
        tree = _parse_cached(filename, text)
        if _find_with(tree, frame.f_lineno) is not None:
            return tree, filename, text.splitlines(keepends=True)
    raise SourceUnavailableError(
        f"Cannot read the source of this `with {what}` block (it runs from {filename!r}, line {frame.f_lineno}). "
        "The engine needs the block's source to run it beside the forward pass. "
        "Run it from a file, a notebook cell, or exec() a string compiled after the model was wrapped; "
        "code typed into a plain `python` prompt or piped through stdin has no readable source."
    )


def _tree_from_recorded(filename: str, source: object) -> ast.Module | None:
    if isinstance(source, ast.Module):
        return source
    if isinstance(source, (bytes, bytearray)):
        source = bytes(source).decode("utf-8", "replace")
    if not isinstance(source, str):
        return None
    try:
        return _parse_cached(filename, source)
    except SyntaxError:
        return None


def _defines_code(tree: ast.Module, filename: str, target: CodeType) -> bool:
    try:
        top = compile(tree, filename, "exec", dont_inherit=True)
    except (SyntaxError, ValueError, TypeError):
        return False
    stack = [top]
    while stack:
        code = stack.pop()
        if (
            code.co_name == target.co_name
            and code.co_firstlineno == target.co_firstlineno
            and code.co_names == target.co_names
            and code.co_varnames == target.co_varnames
        ):
            return True
        stack.extend(c for c in code.co_consts if isinstance(c, CodeType))
    return False
