"""Envoy: a stand-in for one module of the wrapped model.

Attribute and index access mirror the module tree (`model.transformer.h[5].attn`), so paths read
as they do on the torch model. Inside a trace, `.output`, `.input` and `.inputs` park the running
trace body until the forward pass reaches the module, then give the real value; assigning to them
replaces the value for the rest of the forward pass. Outside a trace they explain how to get one.

`.source` lists the operations inside the module's forward, each read and patched like a module
(`operations.py`).

Children whose names clash with these properties (BERT has a child module named `output`) stay
reachable as `envoy.child("output")` or `envoy.output_`.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..errors import ModulePathError, TraceError
from .hooks import ModuleWrappers
from .interleave import Request, current_mediator
from .paths import display_path

_RESERVED = {"output", "input", "inputs", "source"}

_PATH_RULES: list[Callable[[str], None]] = []


def add_path_rule(rule: Callable[[str], None]) -> Callable[[], None]:
    """Check every name a string path reaches with `rule`, which raises to refuse it; returns the undo.

    `envoy.resolve("a.b")` and `envoy.add_alias(name, "a.b")` turn strings into attribute lookups,
    which code reading the source cannot see. A process that runs other people's traces (a
    server's worker) adds its attribute rule here, so computed paths obey the same rule as
    written ones::

        remove = add_path_rule(check_attribute)   # raises for "_model", "__globals__", ...
        ...
        remove()
    """
    _PATH_RULES.append(rule)

    def remove() -> None:
        if rule in _PATH_RULES:
            _PATH_RULES.remove(rule)

    return remove


def _check_path(*names: str) -> None:
    for name in names:
        for part in name.split("."):
            for rule in _PATH_RULES:
                rule(part)


def first_argument(args: tuple, kwargs: dict) -> Any:
    """What `.input` means: the first positional argument, else the first keyword one, else None."""
    if args:
        return args[0]
    return next(iter(kwargs.values()), None)


class Envoy:
    """Proxy for one module: children by attribute or index, values by `.output` / `.input` / `.inputs`.

    `Envoy(module)` is a root: it indexes the whole module tree (each module's path, and the
    wrappers a trace installs) and can be traced on its own; the envoys below it share that index.
    """

    _envoy_classes: Any = None  # `envoys=` of the root (see renaming.py)
    _renames: Any = None  # `rename=` of the root
    _sessions: tuple = ()  # the root's open `model.session()` blocks
    _edits: tuple = ()  # the root's `model.edit()` blocks, run in each of its traces

    def __init__(self, module: torch.nn.Module, path: str = "", root: Envoy | None = None) -> None:
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_root", root if root is not None else self)
        object.__setattr__(self, "_children", {})
        object.__setattr__(self, "_aliases", {})
        if root is None:
            self._index()
        self._build_children()

    def _index(self) -> None:
        """At the root: every module's canonical path, and the wrappers a trace of this tree installs.

        Wrapping the first model is the engine's first use: the source recorder goes in then
        (see `runtime.py`).
        """
        from .runtime import install_source_recorder

        install_source_recorder()
        canonical: dict[int, str] = {}
        paths: list[tuple[str, torch.nn.Module]] = []
        for name, module in self._module.named_modules():
            canonical[id(module)] = name
            paths.append((name, module))
        object.__setattr__(self, "_canonical", canonical)
        object.__setattr__(self, "_paths", paths)
        object.__setattr__(self, "_wrappers", ModuleWrappers(paths))
        if "_interleaver" not in self.__dict__:
            object.__setattr__(self, "_interleaver", None)

    def _refresh(self) -> None:
        """Re-read the module tree (after a module was mounted or replaced)."""
        root = self._root
        root._index()
        Envoy.__init__(root, root._module, "", root)
        if root._renames:
            from .renaming import apply_renames

            apply_renames(root, root._renames)

    def _build_children(self) -> None:
        children: dict[str, Envoy] = {}
        canonical = self._root._canonical
        classes = self._root._envoy_classes
        for name, child in self._module.named_children():
            path = canonical.get(id(child), f"{self._path}.{name}" if self._path else name)
            if classes is None:
                children[name] = Envoy(child, path, self._root)
            else:
                from .renaming import envoy_class_for

                children[name] = envoy_class_for(classes, child, path)(child, path, self._root)
        for name in list(self.__dict__):
            if isinstance(self.__dict__[name], Envoy) and not name.startswith("_"):
                del self.__dict__[name]
        for name, envoy in children.items():
            # Found by plain attribute lookup, without a __getattr__ call, unless the name is taken.
            if (
                name.isidentifier()
                and not name.startswith("_")
                and not hasattr(type(self), name)
                and name not in self.__dict__
            ):
                object.__setattr__(self, name, envoy)
        object.__setattr__(self, "_children", children)
        object.__setattr__(self, "_child_list", tuple(children.values()))

    # ----- tree navigation -------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        children = self.__dict__.get("_children")
        if children is None:
            raise AttributeError(name)
        if name in children:
            return children[name]
        aliases = self.__dict__.get("_aliases")
        if aliases and name in aliases:
            return self.resolve(aliases[name])
        if name.endswith("_") and name[:-1] in _RESERVED and name[:-1] in children:
            return children[name[:-1]]
        module = self.__dict__["_module"]
        try:
            value = getattr(module, name)
        except AttributeError:
            raise self._path_error(name) from None
        return value

    def _path_error(self, name: str) -> ModulePathError:
        where = display_path(self._path)
        if name.startswith("_"):
            # Libraries probe private names all the time (`getattr(x, "_repr_html_", None)`,
            # `hasattr(x, "__array__")`); module paths are never private, so no suggestions are
            # looked for: over SmolLM2's attribute names they cost 3.6 ms per probe.
            return ModulePathError(f"{where} ({type(self._module).__name__}) has no attribute {name!r}.")
        options = list(
            dict.fromkeys([*self._children, *self._aliases, *(n for n in dir(self._module) if not n.startswith("_"))])
        )
        close = difflib.get_close_matches(name, options, n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        kids = ", ".join(self._children) or "none"
        return ModulePathError(
            f"{where} ({type(self._module).__name__}) has no attribute or child module {name!r}.{hint} "
            f"Its child modules: {kids}."
        )

    def resolve(self, relative_path: str) -> Any:
        """The envoy (or attribute) at a dotted path below this one: `model.resolve("transformer.h.0")`."""
        if _PATH_RULES and isinstance(relative_path, str):
            _check_path(relative_path)
        node: Any = self
        for part in relative_path.split(".") if relative_path else []:
            if part.startswith("_"):
                raise ModulePathError(
                    f"{relative_path!r}: module paths name child modules and public attributes; {part!r} is private."
                )
            node = node[int(part)] if part.isdigit() and isinstance(node, Envoy) else getattr(node, part)
        return node

    def add_alias(self, name: str, relative_path: str) -> None:
        """Make `envoy.<name>` another way to reach `relative_path` (used for architecture-agnostic names)."""
        if _PATH_RULES:
            _check_path(name)
        self.resolve(relative_path)
        self._aliases[name] = relative_path

    def child(self, name: str) -> Envoy:
        """The child envoy called `name` (also for names such as `output` that clash with properties)."""
        try:
            return self._children[name]
        except KeyError:
            raise self._path_error(name) from None

    def __getitem__(self, key: int | str | slice) -> Any:
        children = self._child_list
        if isinstance(key, int):
            try:
                return children[key]
            except IndexError:
                if not children:
                    raise ModulePathError(f"{display_path(self._path)} has no child modules to index.") from None
                raise ModulePathError(
                    f"{display_path(self._path)} has {len(children)} children; index {key} is out of range."
                ) from None
        if isinstance(key, slice):
            return list(children[key])
        if key in self._children:
            return self._children[key]
        raise self._path_error(str(key))

    def __iter__(self) -> Iterator[Envoy]:
        return iter(self._children.values())

    def __len__(self) -> int:
        return len(self._children)

    def __contains__(self, name: object) -> bool:
        return name in self._children

    def modules(self) -> Iterator[Envoy]:
        """This envoy and every envoy below it, depth first."""
        yield self
        for child in self._children.values():
            yield from child.modules()

    @property
    def path(self) -> str:
        """Dotted path of the module inside the model ('' for the root)."""
        return self._path

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _RESERVED:
            object.__setattr__(self, name, value)
            return
        if name.startswith("_"):
            object.__setattr__(self, name, value)
            return
        setattr(self._module, name, value)
        if isinstance(value, torch.nn.Module):
            self._root._refresh()

    def __repr__(self) -> str:
        return repr(self._module)

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(self._children) | set(self._aliases) | set(dir(self._module)))

    # ----- values inside a trace ------------------------------------------------------------
    def _mediator(self, what: str):
        m = current_mediator()
        if m is None or m.interleaver.root is not self._root:
            raise TraceError(
                f"{display_path(self._path)}.{what} only has a value inside a trace of this model: "
                f"`with model.trace(input):` then read it in the indented block."
            )
        return m

    @property
    def output(self) -> Any:
        """The module's return value for the current call (inside a trace)."""
        m = self._mediator("output")
        return m.request(m.location(self._path, "output"))

    @output.setter
    def output(self, value: Any) -> None:
        m = self._mediator("output")
        m.swap(m.location(self._path, "output"), value)

    @property
    def inputs(self) -> tuple[tuple, dict]:
        """`(args, kwargs)` the module was called with (inside a trace)."""
        m = self._mediator("inputs")
        return m.request(m.location(self._path, "input"))

    @inputs.setter
    def inputs(self, value: tuple[tuple, dict]) -> None:
        m = self._mediator("inputs")
        if not (isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], dict)):
            raise TraceError(f"{display_path(self._path)}.inputs must be set to a pair (args_tuple, kwargs_dict).")
        m.swap(m.location(self._path, "input"), (tuple(value[0]), value[1]))

    @property
    def input(self) -> Any:
        """The first positional argument of the call (or the first keyword one if it has none)."""
        return _required_input(self._path, *self.inputs)

    @input.setter
    def input(self, value: Any) -> None:
        m = self._mediator("input")
        args, kwargs = m.request(m.location(self._path, "input"))
        if args:
            new = ((value, *args[1:]), kwargs)
        elif kwargs:
            first = next(iter(kwargs))
            new = (args, {**kwargs, first: value})
        else:
            raise TraceError(f"{display_path(self._path)} was called with no arguments; it has no .input to set.")
        m.swap(m.location(self._path, "input"), new)

    @property
    def source(self) -> Any:
        """The operations inside this module's forward: `.source.<name>.output`; print it to list them."""
        src = self.__dict__.get("_source")
        if src is None:
            from .operations import SourceEnvoy, forward_source, module_forward

            fs = forward_source(module_forward(self))
            src = SourceEnvoy(self, f"{self._path}.source" if self._path else "source", fs, self._root)
            object.__setattr__(self, "_source", src)
        src._activate_if_tracing()
        return src

    def skip(self, value: Any) -> None:
        """Do not run this module's forward in this call: `value` is its output (inside a trace).

        Ask before the forward pass reaches the module; `.output` then reads `value`.
        """
        m = self._mediator("skip()")
        m.interleaver.main.switch(Request("skip", m.location(self._path, "input"), value))

    def next(self, step: int = 1) -> Envoy:
        """Move to the module's next call in this forward pass (for modules that run more than once)."""
        m = self._mediator("next()")
        m.cursor = {**m.cursor, self._path: m.cursor.get(self._path, 0) + step}
        return self

    def call(self, index: int) -> _CallView:
        """The `index`-th call (from 0) of this module within one forward pass."""
        if index < 0:
            raise TraceError("call() counts calls from 0; pass a non-negative index.")
        return _CallView(self, index)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the module on new inputs, outside the traced forward pass (e.g. a logit lens)."""
        m = current_mediator()
        if m is None or m.interleaver.root is not self._root:
            return self._module(*args, **kwargs)
        with self._root._wrappers.paused():
            return self._module(*args, **kwargs)


class _CallView:
    """`.output` / `.input` / `.inputs` of one numbered call of a module."""

    def __init__(self, envoy: Envoy, index: int) -> None:
        self._envoy = envoy
        self._index = index

    def _key(self, what: str, kind: str) -> tuple:
        m = self._envoy._mediator(what)
        return m, (self._envoy._path, kind, m.step, self._index)

    @property
    def output(self) -> Any:
        m, key = self._key("output", "output")
        return m.request(key)

    @output.setter
    def output(self, value: Any) -> None:
        m, key = self._key("output", "output")
        m.swap(key, value)

    @property
    def inputs(self) -> tuple[tuple, dict]:
        m, key = self._key("inputs", "input")
        return m.request(key)

    @property
    def input(self) -> Any:
        return _required_input(self._envoy._path, *self.inputs)


def _required_input(path: str, args: tuple, kwargs: dict) -> Any:
    if not args and not kwargs:
        raise TraceError(f"{display_path(path)} was called with no arguments; it has no .input.")
    return first_argument(args, kwargs)
