"""What a remote trace's own code may name, import and touch: the language-level sandbox.

User code reaches the server as source text. Before anything is compiled, :func:`validate`
(``source_check.py``) reads its syntax tree and refuses what no trace needs but every known
escape uses; while it runs, the builtins, the importer and the modules it gets (this module)
enforce the rest, with the same rules (``policy.py``). The process-level layers (audit hook,
Landlock, namespaces, rlimits) are in ``lockdown.py`` and hold even if this layer is bypassed;
the model-state checks are in ``integrity.py``.

Refused by reading the source (:func:`validate`)
    - any attribute starting with ``_``: dunders (``__class__``, ``__subclasses__``,
      ``__globals__``, ``__builtins__``, ``__dict__``, ``__code__``...) and the engine's private
      state (``model._model``, ``envoy._module``); a trace uses the envoy tree, not raw modules
    - frame, generator, coroutine, traceback and code introspection (``f_globals``, ``f_back``,
      ``gi_frame``, ``cr_frame``, ``tb_frame``, ``co_code``, and everything with those prefixes)
    - ``str.format`` / ``format_map`` except on a literal whose fields are plain names or
      positions: a format string can walk attributes (``"{0.__class__}".format(x)``)
    - dunder names (``__import__``, ``__builtins__``) and binding them
    - imports outside :data:`ALLOWED_MODULES`, denied submodules and names, relative and ``*``
      imports
    - string annotations (typing helpers would ``eval`` them outside these checks)

Refused while running
    - builtins: ``open``, ``exec``, ``eval``, ``compile``, ``input``, ``breakpoint``, ``globals``,
      ``locals``, ``vars``, ``memoryview``, ``help``, ``exit``/``quit`` raise
      :class:`SandboxViolation` saying why; ``getattr``/``hasattr``/``setattr``/``delattr`` apply
      the attribute rules above to names computed at run time; ``BaseException``,
      ``KeyboardInterrupt`` and ``SystemExit`` are absent, so a stopped job cannot name what stops it
    - modules arrive as read-only proxies (:class:`ModuleProxy`): attributes that are modules
      outside the allowlist (``torch.os``), denied functions (``torch.save``, ``numpy.load``,
      ``torch.set_default_dtype``, ``typing.get_type_hints``) and any assignment are refused;
      ``operator.attrgetter``/``methodcaller`` are replaced by checked versions

Allowed imports: ``torch`` (except the submodules in :data:`DENIED_MODULES`), ``math``,
``numpy``, ``einops`` (if installed), ``collections``, ``itertools``, ``functools``,
``operator``, ``typing``, ``dataclasses``, ``statistics``, ``random``, ``re``. Everything else is
refused with a message that lists them; a server operator who needs more edits
:data:`ALLOWED_MODULES`.
"""

from __future__ import annotations

import builtins as _builtins
import functools
import importlib
import operator
import types
from collections.abc import Callable
from typing import Any

from .bounds import SafeType, guard_class, guard_numpy, safe_build_class
from .policy import (
    ALLOWED_MODULES,
    DENIED_MODULES,
    SandboxViolation,
    check_attribute,
    module_problem,
    name_problem,
)
from .source_check import validate

__all__ = [
    "ALLOWED_MODULES",
    "DENIED_MODULES",
    "ModuleProxy",
    "SandboxViolation",
    "check_attribute",
    "harden_engine",
    "make_builtins",
    "preimport",
    "restricted_import",
    "validate",
]


def _refuse(name: str, why: str) -> Callable[..., Any]:
    def refused(*_: Any, **__: Any) -> Any:
        raise SandboxViolation(f"{name}() is not available in remote traces: {why}")

    refused.__name__ = name
    refused.__qualname__ = name
    return refused


_REFUSED_BUILTINS = {
    "open": "the server gives traces no file access; send data as variables of the trace",
    "exec": "only the trace's own source runs, after the sandbox has checked it",
    "eval": "only the trace's own source runs, after the sandbox has checked it",
    "compile": "only the trace's own source runs, after the sandbox has checked it",
    "input": "a remote trace has no keyboard to read from",
    "breakpoint": "there is no debugger on the server; run the trace locally (without remote=) to debug it",
    "globals": "it exposes the interpreter's namespaces; use the names directly",
    "locals": "it exposes the interpreter's namespaces; use the names directly",
    "vars": "it exposes objects' internal dictionaries; read the attributes you need",
    "memoryview": "it exposes raw memory; use tensors or bytes",
    "help": "there is no help system on the server",
    "exit": "a trace ends when its code ends",
    "quit": "a trace ends when its code ends",
    "copyright": "not available on the server",
    "credits": "not available on the server",
    "license": "not available on the server",
    "aiter": "asynchronous iteration is not available in remote traces",
    "anext": "asynchronous iteration is not available in remote traces",
}

_SAFE_BUILTINS = (
    "abs",
    "all",
    "any",
    "ascii",
    "bin",
    "bool",
    "bytearray",
    "bytes",
    "callable",
    "chr",
    "classmethod",
    "complex",
    "dict",
    "dir",
    "divmod",
    "enumerate",
    "filter",
    "float",
    "format",
    "frozenset",
    "hash",
    "hex",
    "id",
    "int",
    "isinstance",
    "issubclass",
    "iter",
    "len",
    "list",
    "map",
    "max",
    "min",
    "next",
    "object",
    "oct",
    "ord",
    "pow",
    "print",
    "property",
    "range",
    "repr",
    "reversed",
    "round",
    "set",
    "slice",
    "sorted",
    "staticmethod",
    "str",
    "sum",
    "super",
    "tuple",
    "type",
    "zip",
    "None",
    "Ellipsis",
    "NotImplemented",
    "False",
    "True",
    "ArithmeticError",
    "AssertionError",
    "AttributeError",
    "BufferError",
    "EOFError",
    "Exception",
    "FloatingPointError",
    "ImportError",
    "IndexError",
    "KeyError",
    "LookupError",
    "MemoryError",
    "ModuleNotFoundError",
    "NameError",
    "NotImplementedError",
    "OSError",
    "OverflowError",
    "PermissionError",
    "RecursionError",
    "ReferenceError",
    "RuntimeError",
    "StopAsyncIteration",
    "StopIteration",
    "TimeoutError",
    "TypeError",
    "UnboundLocalError",
    "UnicodeError",
    "ValueError",
    "ZeroDivisionError",
    "Warning",
    "UserWarning",
    "DeprecationWarning",
    "RuntimeWarning",
    "FutureWarning",
)


def safe_getattr(obj: Any, name: str, *default: Any) -> Any:
    """``getattr`` that applies the sandbox's attribute rules to computed names."""
    check_attribute(name)
    return getattr(obj, name, *default)


def safe_hasattr(obj: Any, name: str) -> bool:
    check_attribute(name)
    return hasattr(obj, name)


def safe_setattr(obj: Any, name: str, value: Any) -> None:
    check_attribute(name)
    if isinstance(obj, (type, types.ModuleType, ModuleProxy)):
        raise SandboxViolation(
            f"setting {name!r} on {getattr(obj, '__name__', 'a class')} is not available in remote traces: "
            "classes and modules are shared with every later job on this server"
        )
    setattr(obj, name, value)


def safe_delattr(obj: Any, name: str) -> None:
    check_attribute(name)
    if isinstance(obj, (type, types.ModuleType, ModuleProxy)):
        raise SandboxViolation(
            f"deleting {name!r} from a class or module is not available in remote traces: they are shared "
            "with every later job on this server"
        )
    delattr(obj, name)


def safe_attrgetter(*names: str) -> Callable[[Any], Any]:
    """``operator.attrgetter`` that refuses what ``getattr`` refuses."""
    for name in names:
        if not isinstance(name, str):
            raise TypeError("attribute name must be a string")
        for part in name.split("."):
            check_attribute(part)
    return operator.attrgetter(*names)


def safe_methodcaller(name: str, /, *args: Any, **kwargs: Any) -> Callable[[Any], Any]:
    """``operator.methodcaller`` that refuses what ``getattr`` refuses."""
    check_attribute(name)
    return operator.methodcaller(name, *args, **kwargs)


def _default_names(assigned: Any, updated: Any) -> None:
    if not set(assigned) <= set(functools.WRAPPER_ASSIGNMENTS) or not set(updated) <= set(functools.WRAPPER_UPDATES):
        raise SandboxViolation(
            "functools.update_wrapper and functools.wraps copy only their default attributes in remote traces "
            "(other names can carry raw memory addresses); leave out assigned= and updated="
        )


def safe_update_wrapper(
    wrapper: Any,
    wrapped: Any,
    assigned: Any = functools.WRAPPER_ASSIGNMENTS,
    updated: Any = functools.WRAPPER_UPDATES,
) -> Any:
    """``functools.update_wrapper`` limited to the attributes it copies by default."""
    _default_names(assigned, updated)
    return functools.update_wrapper(wrapper, wrapped, assigned, updated)


def safe_wraps(
    wrapped: Any, assigned: Any = functools.WRAPPER_ASSIGNMENTS, updated: Any = functools.WRAPPER_UPDATES
) -> Any:
    """``functools.wraps`` limited to the attributes it copies by default."""
    _default_names(assigned, updated)
    return functools.wraps(wrapped, assigned, updated)


_REPLACEMENTS: dict[int, Any] = {
    id(operator.attrgetter): safe_attrgetter,
    id(operator.methodcaller): safe_methodcaller,
    id(functools.update_wrapper): safe_update_wrapper,
    id(functools.wraps): safe_wraps,
}


class ModuleProxy:
    """A read-only view of an allowed module, handed to trace code instead of the module itself."""

    __slots__ = ("_nnsj_module", "__name__")

    def __init__(self, module: types.ModuleType) -> None:
        object.__setattr__(self, "_nnsj_module", module)
        object.__setattr__(self, "__name__", module.__name__)

    def __getattr__(self, name: str) -> Any:
        module = object.__getattribute__(self, "_nnsj_module")
        problem = name_problem(module.__name__, name)
        if problem is not None:
            raise SandboxViolation(problem)
        try:
            value = getattr(module, name)
        except AttributeError:
            submodule = f"{module.__name__}.{name}"
            if module_problem(submodule) is not None:
                raise
            try:
                value = importlib.import_module(submodule)
            except ImportError:
                raise AttributeError(f"module {module.__name__!r} has no attribute {name!r}") from None
        return _guard(value, f"{module.__name__}.{name}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise SandboxViolation(
            f"modules are read-only in remote traces (setting {self.__name__}.{name}): they are shared with "
            "every later job on this server"
        )

    def __delattr__(self, name: str) -> None:
        raise SandboxViolation(f"modules are read-only in remote traces (deleting {self.__name__}.{name})")

    def __dir__(self) -> list[str]:
        module = object.__getattribute__(self, "_nnsj_module")
        names = []
        for name in dir(module):
            if name_problem(module.__name__, name) is not None:
                continue
            value = getattr(module, name, None)
            if isinstance(value, types.ModuleType) and module_problem(value.__name__) is not None:
                continue
            names.append(name)
        return names

    def __repr__(self) -> str:
        return f"<module {self.__name__!r} (read-only in remote traces)>"


_PROXIES: dict[str, ModuleProxy] = {}


def _guard(value: Any, where: str) -> Any:
    replacement = _REPLACEMENTS.get(id(value))
    if replacement is not None:
        return replacement
    if isinstance(value, types.ModuleType):
        problem = module_problem(value.__name__)
        if problem is not None:
            raise SandboxViolation(f"{where} is the module {value.__name__!r}: {problem}")
        return proxy_for(value)
    if where.startswith("numpy."):
        return guard_numpy(value, where)
    if isinstance(value, type):
        return guard_class(value)
    return value


def proxy_for(module: types.ModuleType) -> ModuleProxy:
    proxy = _PROXIES.get(module.__name__)
    if proxy is None or object.__getattribute__(proxy, "_nnsj_module") is not module:
        proxy = _PROXIES[module.__name__] = ModuleProxy(module)
    return proxy


def restricted_import(name: str, globals: Any = None, locals: Any = None, fromlist: Any = (), level: int = 0) -> Any:
    """The ``__import__`` of trace code: allowed modules only, as read-only proxies."""
    if level:
        raise SandboxViolation("relative imports are not available in remote traces")
    if not isinstance(name, str):
        raise TypeError("module name must be a string")
    problem = module_problem(name)
    if problem is not None:
        raise SandboxViolation(problem)
    for item in fromlist or ():
        if item == "*":
            raise SandboxViolation(f"`from {name} import *` is not available in remote traces")
        problem = name_problem(name, item)
        if problem is not None:
            raise SandboxViolation(problem)
    module = importlib.import_module(name)
    if fromlist:
        return proxy_for(module)
    return proxy_for(importlib.import_module(name.partition(".")[0]))


def make_builtins() -> dict[str, Any]:
    """A fresh builtins mapping for one job's trace code."""
    table: dict[str, Any] = {name: getattr(_builtins, name) for name in _SAFE_BUILTINS}
    for name, why in _REFUSED_BUILTINS.items():
        table[name] = _refuse(name, why)
    table.update(
        getattr=safe_getattr,
        hasattr=safe_hasattr,
        setattr=safe_setattr,
        delattr=safe_delattr,
        __import__=restricted_import,
        __build_class__=safe_build_class,
        type=SafeType,
        __name__="__remote_trace__",
    )
    return table


def preimport() -> list[str]:
    """Import every allowed module now, while the worker may still read files; returns those present."""
    present = []
    for name in ALLOWED_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            continue
        present.append(name)
    for extra in (
        "torch.nn",
        "torch.nn.functional",
        "torch.linalg",
        "torch.fft",
        "torch.special",
        "torch.autograd",
        "collections.abc",
        "numpy.linalg",
        "numpy.random",
    ):
        try:
            importlib.import_module(extra)
        except ImportError:
            pass
    return present


_engine_rule: list[Callable[[], None]] = []


def harden_engine() -> Callable[[], None]:
    """Make the engine's string paths obey the attribute rules in this process; returns the undo.

    ``envoy.resolve("a.b")`` and ``envoy.add_alias(name, "a.b")`` turn strings into attribute
    lookups, so ``model.resolve("_model.forward.__globals__")`` would reach what the source check
    refuses to let code spell out. The engine's path-rule hook (``tracing.envoy.add_path_rule``)
    makes them refuse the same names ``getattr`` refuses. Calling it again adds nothing.
    """
    from ...tracing.envoy import add_path_rule

    if not _engine_rule:
        remove = add_path_rule(check_attribute)

        def undo() -> None:
            remove()
            _engine_rule.clear()

        _engine_rule.append(undo)
    return _engine_rule[0]
