"""`module.source`: the operations inside a module's forward, read and patched like modules.

`model.layers[0].self_attn.source.apply_rotary_pos_emb_0.output` is the value the first call of
`apply_rotary_pos_emb` in that module's forward returned. Each call in the forward's source is
one operation, named after what it calls (the dotted name joined with `_`: `self.q_proj(...)` is
`self_q_proj`, `torch.matmul(...)` is `torch_matmul`, a method called on another call's result
is its method name, `view`) and numbered per name in the order the source reads, innermost call
first (nnsight's names). `print(module.source)` shows the forward with each line's operations.
An operation has `.output`, `.input`, `.inputs` (read and assigned), `.skip(value)`, `.call(i)`
and, inside a trace, `.source`: the operations of the function it calls.

How it runs. The forward's source is parsed and every call `f(a, b=c)` becomes
`__nnsight_op__("f_0", f, a, b=c)`; the tree is compiled once per function, with the function's
own file name and line numbers (a traceback points at the real library line), inside a maker
function whose parameters are the forward's free variables and the operation caller, so the
rewritten forward reads the library module's globals as they are, and that module is left
untouched. Each module gets its own function from the shared code (one function object). The
module's forward is switched to it only inside a trace that asks for one of its operations, from
that point on in that trace: the module wrapper (`hooks.py`) looks the module's path up in
`Interleaver.sourced`, which stays None in a trace that never uses `.source`, so such a trace
pays one `is None` test per module call and the model's own forward (code object, instance
dictionary) is never changed. An operation is served like a module call: its path
(`layers.0.self_attn.source.apply_rotary_pos_emb_0`) is counted per forward pass, and trace
bodies parked on its input or output get the value and may replace it.

A nested `.source` (of the function an operation calls) is only known when the operation runs:
the first access parks on the operation's callee (kind "fn"), rewrites that function and, from
then on in the trace, calls the rewritten one whenever that operation calls that function.

Values handed to a trace body never include raw modules: a module among an operation's inputs
or outputs (`attention_interface(self, ...)` passes the attention module) is given as its envoy
and turned back into the module when assigned, so a body reaches modules only through envoys,
locally as on a server.

Peeling decorators: a decorated forward (`@deprecate_kwarg(...)`) is found through
`__wrapped__`; the innermost function is rewritten and each wrapper is rebuilt around it from its
own code with the closure cell that held the next function pointing at the rewritten one, so the
decorator still runs. A wrapper that does not hold the next function in a closure cell cannot be
rebuilt, and `.source` says so.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import textwrap
import types
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..errors import ModulePathError, OutOfOrderError, TraceError
from .interleave import Interleaver, Request, current_mediator
from .nested import leaves, map_structure
from .paths import display_path

OP_NAME = "__nnsight_op__"
_MAKER = "__nnsight_make__"
_UNWRAPPED = frozenset({"super", "locals", "vars", "globals", "dir", "eval", "exec"})
"""Callees that read the calling frame: wrapping them would change what they see."""


class Site:
    """One call site in a function's source: its name, and its line in the function's file."""

    __slots__ = ("name", "line")

    def __init__(self, name: str, line: int) -> None:
        self.name = name
        self.line = line


def _callee_name(func: ast.expr) -> str:
    parts: list[str] = []
    node = func
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return "_".join(reversed(parts)) if parts else "unknown"


class _WrapCalls(ast.NodeTransformer):
    """Turns every call `f(...)` in a function body into `__nnsight_op__("f_<n>", f, ...)`."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.sites: list[Site] = []

    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)  # inner calls are numbered first, as nnsight numbers them
        if isinstance(node.func, ast.Name) and node.func.id in _UNWRAPPED:
            return node
        base = _callee_name(node.func)
        index = self.counts.get(base, 0)
        self.counts[base] = index + 1
        name = f"{base}_{index}"
        self.sites.append(Site(name, node.lineno))
        return ast.copy_location(
            ast.Call(
                func=ast.Name(OP_NAME, ast.Load()),
                args=[ast.Constant(name), node.func, *node.args],
                keywords=node.keywords,
            ),
            node,
        )


class ForwardSource:
    """The rewritten code of one function, built once and shared by every module that runs it.

    Parsing and compiling a Llama attention forward takes about 2 ms (2-core CPU), so the result is
    kept per function (`forward_source`); each module then costs one call of the maker.
    """

    def __init__(self, fn: Callable) -> None:
        layers = [fn]
        while hasattr(layers[-1], "__wrapped__"):
            layers.append(layers[-1].__wrapped__)
        inner = layers[-1]
        if not isinstance(inner, types.FunctionType):
            raise TraceError(
                f"{_describe(fn)} is not a Python function (it is {type(inner).__name__}), so it has no source "
                "to rewrite; read the values around it instead (the inputs and output of its caller)."
            )
        for outer, wrapped in zip(layers, layers[1:]):
            if not isinstance(outer, types.FunctionType) or not any(
                _cell_value(c) is wrapped for c in outer.__closure__ or ()
            ):
                raise TraceError(
                    f"{_describe(fn)} is wrapped by {_describe(outer)}, which does not hold the function it wraps "
                    "in a closure, so .source cannot rebuild it around the rewritten function."
                )
        code = inner.__code__
        try:
            lines, first = inspect.getsourcelines(inner)
        except (OSError, TypeError) as error:
            raise TraceError(
                f"The source of {_describe(fn)} cannot be read ({error}), so its operations cannot be listed."
            ) from None
        text = "".join(lines)
        dedented = textwrap.dedent(text)
        indent = len(lines[0]) - len(lines[0].lstrip()) if lines else 0
        tree = ast.parse(dedented)
        fdef = tree.body[0] if tree.body else None
        if not isinstance(fdef, ast.FunctionDef) or fdef.name != inner.__name__:
            raise TraceError(
                f"{_describe(fn)} is not defined by a `def` statement of its own (a lambda or generated code), "
                "so .source cannot rewrite it."
            )
        ast.increment_lineno(tree, first - 1)
        if indent:
            for node in ast.walk(tree):
                if hasattr(node, "col_offset") and hasattr(node, "end_col_offset"):
                    node.col_offset += indent
                    if node.end_col_offset is not None:
                        node.end_col_offset += indent
        self.text = text
        self.first_line = first
        self.filename = code.co_filename
        self.qualname = inner.__qualname__
        wrapper = _WrapCalls()
        fdef.decorator_list = []
        fdef.body = [wrapper.visit(stmt) for stmt in fdef.body]
        self.sites = wrapper.sites
        self.names = {site.name for site in self.sites}
        # Defaults and annotations are not evaluated again: they are copied from the original.
        args = fdef.args
        args.defaults = []
        args.kw_defaults = [None] * len(args.kwonlyargs)
        fdef.returns = None
        for arg in (*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg):
            if arg is not None:
                arg.annotation = None
        self.freevars = code.co_freevars
        maker = ast.FunctionDef(
            name=_MAKER,
            args=ast.arguments(
                posonlyargs=[],
                args=[ast.arg(OP_NAME), *(ast.arg(name) for name in self.freevars)],
                kwonlyargs=[],
                kw_defaults=[],
                defaults=[],
            ),
            body=[fdef, ast.Return(ast.Name(fdef.name, ast.Load()))],
            decorator_list=[],
            returns=None,
        )
        if "type_params" in ast.FunctionDef._fields:  # Python 3.12+
            maker.type_params = []  # type: ignore[attr-defined]
        ast.copy_location(maker, fdef)
        module = ast.fix_missing_locations(ast.Module(body=[maker], type_ignores=[]))
        scratch: dict[str, Any] = {}
        exec(compile(module, code.co_filename, "exec"), inner.__globals__, scratch)
        self._maker = scratch[_MAKER]
        self._inner = inner
        self._layers = layers

    def instantiate(self, caller: Callable) -> Callable:
        """The rewritten function (with its decorators rebuilt) calling `caller` at each operation."""
        inner = self._inner
        values = [_cell_value(c) for c in inner.__closure__ or ()]
        new = self._maker(caller, *values)
        new.__defaults__ = inner.__defaults__
        new.__kwdefaults__ = inner.__kwdefaults__
        new.__dict__.update(inner.__dict__)
        new.__qualname__ = inner.__qualname__
        for outer, wrapped in zip(reversed(self._layers[:-1]), reversed(self._layers[1:])):
            closure = tuple(types.CellType(new) if _cell_value(c) is wrapped else c for c in outer.__closure__ or ())
            rebuilt = types.FunctionType(outer.__code__, outer.__globals__, outer.__name__, outer.__defaults__, closure)
            rebuilt.__kwdefaults__ = outer.__kwdefaults__
            rebuilt.__dict__.update(outer.__dict__)
            rebuilt.__dict__["__wrapped__"] = new
            rebuilt.__qualname__ = outer.__qualname__
            new = rebuilt
        return new


_EMPTY_CELL = object()


def _cell_value(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:
        return _EMPTY_CELL


def _describe(fn: Any) -> str:
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__
    return f"`{name}`"


_SOURCES: weakref.WeakKeyDictionary[Any, ForwardSource] = weakref.WeakKeyDictionary()


def forward_source(fn: Callable) -> ForwardSource:
    """The rewritten form of `fn` (a plain function, possibly decorated), built on first use."""
    hit = _SOURCES.get(fn)
    if hit is None:
        hit = _SOURCES[fn] = ForwardSource(fn)
    return hit


def make_caller(holder: list, prefix: str) -> Callable:
    """The `__nnsight_op__` of one module (or one operation's callee): counts and serves each call.

    Like a module wrapper (`hooks._make_wrapper`): one counter per operation path and forward pass,
    and the trace is served only where a body waits on that operation.
    """
    paths: dict[str, str] = {}

    def call(name: str, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        il = holder[0]
        if il is None:
            return fn(*args, **kwargs)
        path = paths.get(name)
        if path is None:
            path = paths[name] = prefix + name
        n_in = il.n_in
        index = n_in.get(path, 0)
        n_in[path] = index + 1
        if path in il.wait_in:
            fn = il.serve(path, "fn", index, fn)
            args, kwargs = il.serve(path, "input", index, (args, kwargs))
            callees = il.callees
            if callees is not None and path in callees:
                fn = callees[path](fn)
            out = il.skipped(fn, args, kwargs) if il.skips else fn(*args, **kwargs)
        else:
            callees = il.callees
            if callees is not None and path in callees:
                fn = callees[path](fn)
            out = fn(*args, **kwargs)
        il.n_out[path] = index + 1
        if path in il.wait_out:
            out = il.serve(path, "output", index, out)
        return out

    return call


def module_forward(envoy: Any) -> Callable:
    """The class forward that `envoy.source` rewrites (refused when the module has a forward of its own)."""
    module = envoy._module
    own = module.__dict__.get("forward")
    if own is not None and not any(own is entry[1] for entry in envoy._root._wrappers.entries):
        raise TraceError(
            f"{display_path(envoy._path)} has a forward of its own, set on the module object (by accelerate or "
            "other code), so .source, which rewrites its class's forward, cannot see what it runs."
        )
    return type(module).forward


class SourceEnvoy:
    """The operations of one forward: `source.<name>` for each, `print(source)` for the annotated source."""

    def __init__(self, owner: Any, path: str, fs: ForwardSource, root: Any, *, callee: bool = False) -> None:
        self._owner = owner  # the module's envoy, or the operation whose callee this is
        self._path = path  # the engine path of this source: "<module path>.source" or "<op path>.source"
        self._fs = fs
        self._root = root
        self._callee = callee
        self._ops: dict[str, OperationEnvoy] = {}
        self._bound: Any = None  # the module's rewritten forward, built at the first trace that needs it

    # ----- listing ----------------------------------------------------------------------------
    def __getattr__(self, name: str) -> OperationEnvoy:
        if name.startswith("_"):
            raise AttributeError(name)
        ops = self.__dict__["_ops"]
        op = ops.get(name)
        if op is None:
            if name not in self._fs.names:
                raise self._unknown(name)
            op = ops[name] = OperationEnvoy(self, name)
        self._activate_if_tracing()
        return op

    def _unknown(self, name: str) -> ModulePathError:
        names = [site.name for site in self._fs.sites]
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        return ModulePathError(
            f"{display_path(self._path)} has no operation {name!r}.{hint} Operations are named after what they "
            f"call, numbered from 0 per name; print({display_path(self._path)}) lists all {len(names)}."
        )

    def __iter__(self) -> Iterator[str]:
        return iter([site.name for site in self._fs.sites])

    def __len__(self) -> int:
        return len(self._fs.sites)

    def __contains__(self, name: object) -> bool:
        return name in self._fs.names

    def __dir__(self) -> list[str]:
        return [site.name for site in self._fs.sites]

    def __str__(self) -> str:
        return render(self._fs, display_path(self._path))

    __repr__ = __str__

    # ----- inside a trace ---------------------------------------------------------------------
    def _activate_if_tracing(self) -> None:
        """Naming an operation inside a trace switches its forward over at once, before any value is read.

        So `op = model.source.self_lm_head_0` at the top of a body lets a later line read
        `model.lm_head.output` before `op.output`, although the root module starts first.
        """
        m = current_mediator()
        if m is not None and m.interleaver is not None and m.interleaver.root is self._root:
            self._activate(m)

    def _activate(self, m: Any) -> None:
        """Make the forward (or the callee) run rewritten from now on in this trace."""
        if self._callee:
            return  # switched on by the operation's `.source`
        il = m.interleaver
        owner = self._owner
        path = owner._path
        sourced = il.sourced
        if sourced is not None and path in sourced:
            return
        module = owner._module
        bound = self._bound
        if bound is None or bound.__self__ is not module:
            forward = self._fs.instantiate(make_caller(owner._root._wrappers.holder, self._path + "."))
            bound = self._bound = types.MethodType(forward, module)
        started = il.n_in.get(path, 0)
        here = il.here
        if here is not None and here[:2] == (path, "input") and here[2] == il.pass_idx:
            started -= 1  # being served at its input: this very call runs rewritten
        il.sourced = {**(sourced or {}), path: bound}
        if started > 0 and il.pass_idx >= 0:
            il.source_late[path] = il.pass_idx


class OperationEnvoy:
    """One operation of a forward: `.output`, `.input`, `.inputs`, `.skip()`, `.call(i)`, `.source`."""

    def __init__(self, source: SourceEnvoy, name: str) -> None:
        self._source = source
        self._name = name
        self._path = f"{source._path}.{name}"
        self._callee_source: SourceEnvoy | None = None

    @property
    def name(self) -> str:
        """The operation's name in its forward (`apply_rotary_pos_emb_0`)."""
        return self._name

    @property
    def path(self) -> str:
        """The operation's dotted path inside the model (`model.layers.0.self_attn.source.q_proj_0`)."""
        return self._path

    def __repr__(self) -> str:
        fs = self._source._fs
        line = next(site.line for site in fs.sites if site.name == self._name)
        code = linecache_line(fs, line)
        return f"{display_path(self._path)} ({fs.filename}:{line}: {code.strip()})"

    def _mediator(self, what: str) -> Any:
        m = current_mediator()
        owner = self._source._root
        if m is None or m.interleaver.root is not owner:
            raise TraceError(
                f"{display_path(self._path)}.{what} only has a value inside a trace of this model: "
                "`with model.trace(input):` then read it in the indented block."
            )
        self._source._activate(m)
        return m

    def _key(self, m: Any, kind: str, index: int | None = None) -> tuple:
        path = self._path
        step = m.step
        il: Interleaver = m.interleaver
        owner_path = self._source._owner._path if not self._source._callee else None
        if owner_path is not None and il.source_late.get(owner_path) == step == il.pass_idx:
            module = display_path(owner_path)
            raise OutOfOrderError(
                f"{display_path(path)}.{kind} was requested after the forward pass had already started {module} "
                f"in this pass, before any operation inside it was named, so its operations were not watched. "
                f"Name the operation before the first line that reads a value computed once {module} has "
                f"started (e.g. `op = {display_path(path)}` at the top of the trace body, then `op.{kind}` "
                "where you need it), or read it in a separate trace."
            )
        return (path, kind, step, m.call_base + m.cursor.get(path, 0) if index is None else index)

    @property
    def output(self) -> Any:
        """What the operation returned (inside a trace)."""
        m = self._mediator("output")
        return _to_envoys(m.request(self._key(m, "output")), self._source._root)

    @output.setter
    def output(self, value: Any) -> None:
        m = self._mediator("output")
        m.swap(self._key(m, "output"), _to_modules(value))

    @property
    def inputs(self) -> tuple[tuple, dict]:
        """`(args, kwargs)` the operation was called with (inside a trace)."""
        m = self._mediator("inputs")
        return _to_envoys(m.request(self._key(m, "input")), self._source._root)

    @inputs.setter
    def inputs(self, value: tuple[tuple, dict]) -> None:
        m = self._mediator("inputs")
        if not (isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], dict)):
            raise TraceError(f"{display_path(self._path)}.inputs must be set to a pair (args_tuple, kwargs_dict).")
        m.swap(self._key(m, "input"), (tuple(_to_modules(value[0])), _to_modules(value[1])))

    @property
    def input(self) -> Any:
        """The first positional argument (or the first keyword one if there is none)."""
        args, kwargs = self.inputs
        if not args and not kwargs:
            raise TraceError(f"{display_path(self._path)} was called with no arguments; it has no .input.")
        return args[0] if args else next(iter(kwargs.values()))

    @input.setter
    def input(self, value: Any) -> None:
        m = self._mediator("input")
        key = self._key(m, "input")
        args, kwargs = m.request(key)
        if args:
            new = ((_to_modules(value), *args[1:]), kwargs)
        elif kwargs:
            first = next(iter(kwargs))
            new = (args, {**kwargs, first: _to_modules(value)})
        else:
            raise TraceError(f"{display_path(self._path)} was called with no arguments; it has no .input to set.")
        m.swap(key, new)

    def skip(self, value: Any) -> None:
        """Do not make this call: `value` is its output (inside a trace; ask before it runs)."""
        m = self._mediator("skip()")
        m.interleaver.main.switch(Request("skip", self._key(m, "input"), _to_modules(value)))

    def call(self, index: int) -> _OperationCall:
        """The `index`-th call (from 0) of this operation within one forward pass."""
        if index < 0:
            raise TraceError("call() counts calls from 0; pass a non-negative index.")
        return _OperationCall(self, index)

    def next(self, step: int = 1) -> OperationEnvoy:
        """Move to this operation's next call in this forward pass (for one that runs more than once)."""
        m = self._mediator("next()")
        m.cursor = {**m.cursor, self._path: m.cursor.get(self._path, 0) + step}
        return self

    @property
    def source(self) -> SourceEnvoy:
        """The operations of the function this operation calls (inside a trace, where that function is known)."""
        m = self._mediator("source")
        il = m.interleaver
        callees = il.callees
        if self._callee_source is not None and callees is not None and self._path in callees:
            return self._callee_source
        fn = m.request(self._key(m, "fn"))
        if isinstance(fn, torch.nn.Module):
            root = self._source._root
            where = root._canonical.get(id(fn))
            spelled = display_path(where) + ".source" if where is not None else "that module's envoy's .source"
            raise TraceError(
                f"{display_path(self._path)} calls a module; its operations are {spelled} (a module's .source "
                "is read from its envoy)."
            )
        target = fn.__func__ if isinstance(fn, types.MethodType) else fn
        fs = forward_source(target)
        nested = SourceEnvoy(self, self._path + ".source", fs, self._source._root, callee=True)
        rewritten = fs.instantiate(make_caller(self._source._root._wrappers.holder, nested._path + "."))

        def substitute(current: Any) -> Any:
            if current is target:
                return rewritten
            if isinstance(current, types.MethodType) and current.__func__ is target:
                return types.MethodType(rewritten, current.__self__)
            return current

        il.callees = {**(callees or {}), self._path: substitute}
        self._callee_source = nested
        return nested


class _OperationCall:
    """`.output` / `.input` / `.inputs` of one numbered call of an operation."""

    def __init__(self, op: OperationEnvoy, index: int) -> None:
        self._op = op
        self._index = index

    @property
    def output(self) -> Any:
        m = self._op._mediator("output")
        return _to_envoys(m.request(self._op._key(m, "output", self._index)), self._op._source._root)

    @output.setter
    def output(self, value: Any) -> None:
        m = self._op._mediator("output")
        m.swap(self._op._key(m, "output", self._index), _to_modules(value))

    @property
    def inputs(self) -> tuple[tuple, dict]:
        m = self._op._mediator("inputs")
        return _to_envoys(m.request(self._op._key(m, "input", self._index)), self._op._source._root)

    @property
    def input(self) -> Any:
        args, kwargs = self.inputs
        return args[0] if args else next(iter(kwargs.values()), None)


def _has_module(value: Any) -> bool:
    return any(isinstance(leaf, torch.nn.Module) for leaf in leaves(value))


def _to_envoys(value: Any, root: Any) -> Any:
    """`value` with each module of the model replaced by its envoy (a module from elsewhere is refused)."""
    if not _has_module(value):
        return value

    def swap(leaf: Any) -> Any:
        if not isinstance(leaf, torch.nn.Module):
            return leaf
        path = root._canonical.get(id(leaf))
        if path is None:
            raise TraceError(
                f"An operation's value holds a {type(leaf).__name__} module that is not part of this model; "
                "a trace reaches modules only through the model's envoys."
            )
        node = root
        for part in path.split(".") if path else ():
            node = node._children[part]
        return node

    return map_structure(value, swap)


def _to_modules(value: Any) -> Any:
    """`value` with each envoy replaced by its module (for values assigned back to an operation)."""
    from .envoy import Envoy

    if not any(isinstance(leaf, Envoy) for leaf in leaves(value)):
        return value
    return map_structure(value, lambda leaf: leaf._module if isinstance(leaf, Envoy) else leaf)


def linecache_line(fs: ForwardSource, line: int) -> str:
    lines = fs.text.splitlines()
    index = line - fs.first_line
    return lines[index] if 0 <= index < len(lines) else ""


def render(fs: ForwardSource, title: str) -> str:
    """The function's source with its file line numbers, each call's operation name beside its line.

    A line with several operations shows the first beside the code and the others below it,
    marked `+`.
    """
    by_line: dict[int, list[str]] = {}
    for site in fs.sites:
        by_line.setdefault(site.line, []).append(site.name)
    width = max((len(site.name) for site in fs.sites), default=0)
    out = [f"{title}: {fs.qualname} ({fs.filename}:{fs.first_line})", ""]
    for offset, code in enumerate(fs.text.rstrip("\n").splitlines()):
        line = fs.first_line + offset
        names = by_line.get(line)
        if not names:
            out.append(f" {'':{width}}    {line:4d}  {code}")
            continue
        out.append(f" {names[0]:{width}} -> {line:4d}  {code}")
        for name in names[1:]:
            out.append(f" {name:{width}} ->    +")
    return "\n".join(out)
