"""The sandbox's rules: which modules, names and attributes trace code may use, and why not.

The source check (``source_check.py``) and the runtime guards (``sandbox.py``) ask the same
questions here, so a name refused when written out is refused when computed at run time, with
the same message. Operators who need more modules edit :data:`ALLOWED_MODULES`.
"""

from __future__ import annotations

from ...errors import SandboxViolation

__all__ = [
    "ALLOWED_MODULES",
    "DENIED_MODULES",
    "DENIED_NAMES",
    "SandboxViolation",
    "attribute_problem",
    "check_attribute",
    "is_dunder",
    "module_problem",
    "name_problem",
]


ALLOWED_MODULES: tuple[str, ...] = (
    "torch",
    "math",
    "numpy",
    "einops",
    "collections",
    "itertools",
    "functools",
    "operator",
    "typing",
    "dataclasses",
    "statistics",
    "random",
    "re",
)
"""Top-level modules a trace may import (with their submodules, minus :data:`DENIED_MODULES`)."""

DENIED_MODULES: dict[str, str] = {
    "torch.hub": "it downloads code and weights",
    "torch.multiprocessing": "it starts processes",
    "torch.distributed": "it opens network connections",
    "torch.utils.cpp_extension": "it compiles and loads native code",
    "torch.utils.data": "its loaders start worker processes",
    "torch.utils.tensorboard": "it writes files",
    "torch.utils.benchmark": "it compiles code",
    "torch.package": "it reads and writes archives",
    "torch.serialization": "it reads and writes files",
    "torch.onnx": "it writes files",
    "torch.jit": "it compiles and loads code",
    "torch.fx": "it generates and executes code",
    "torch.export": "it generates and executes code",
    "torch.compiler": "it compiles code",
    "torch.library": "it registers operators for every later job",
    "torch.ops": "it loads native libraries",
    "torch.classes": "it loads native libraries",
    "torch.profiler": "it writes files",
    "torch.testing": "it is for test suites, not traces",
    "numpy.ctypeslib": "it exposes ctypes",
    "numpy.f2py": "it compiles code",
    "numpy.distutils": "it compiles code",
    "numpy.testing": "it is for test suites, not traces",
    "numpy.lib.format": "it reads and writes files",
    "numpy.lib.npyio": "it reads and writes files",
}
"""Submodules of allowed packages that are refused anyway, with the reason given to the user."""

DENIED_NAMES: dict[str, dict[str, str]] = {
    "torch": dict.fromkeys(("save", "load", "from_file", "compile"), "it reads or writes files or compiles code")
    | dict.fromkeys(
        (
            "set_default_dtype",
            "set_default_device",
            "set_default_tensor_type",
            "set_num_threads",
            "set_num_interop_threads",
            "use_deterministic_algorithms",
            "set_deterministic_debug_mode",
            "set_flush_denormal",
            "set_printoptions",
            "set_warn_always",
            "set_float32_matmul_precision",
        ),
        "it changes settings shared with every later job on this server",
    ),
    "numpy": dict.fromkeys(
        (
            "load",
            "save",
            "savez",
            "savez_compressed",
            "loadtxt",
            "savetxt",
            "genfromtxt",
            "fromfile",
            "memmap",
            "fromregex",
            "DataSource",
            "tofile",
        ),
        "it reads or writes files",
    )
    | dict.fromkeys(
        ("set_printoptions", "seterr", "seterrcall", "setbufsize"),
        "it changes settings shared with every later job on this server",
    ),
    "typing": dict.fromkeys(("get_type_hints", "ForwardRef"), "it evaluates strings as code"),
    "functools": dict.fromkeys(("singledispatch", "singledispatchmethod"), "it evaluates annotations as code"),
    "random": dict.fromkeys(("SystemRandom",), "it reads the operating system's entropy source"),
}
"""Names of allowed modules that are refused, per module, with the reason given to the user."""

DENIED_ATTRIBUTES: dict[str, str] = (
    dict.fromkeys(
        ("set_", "untyped_storage", "storage"),
        "it points tensors at raw storage with offsets and strides nothing checks; use slicing, view or reshape",
    )
    | dict.fromkeys(
        ("resize_", "resize"),
        "resizing memory in place leaves its other views pointing outside it; use reshape or make a new "
        "array or tensor (torch.zeros, numpy.zeros)",
    )
    | {
        "mro": "it reaches classes past the sandbox's checked stand-ins; use isinstance",
        "make_dataclass": "it makes classes from names computed at run time; write a @dataclass class",
    }
)
"""Attribute names refused on any object (see ``bounds.py``), with the reason given to the user."""

INTROSPECTION_PREFIXES = ("f_", "gi_", "cr_", "ag_", "tb_", "co_")

_ALLOWED_TEXT = ", ".join(m for m in ALLOWED_MODULES)


# ----- names -------------------------------------------------------------------------------
def is_dunder(name: str) -> bool:
    return name.startswith("__") and name.endswith("__") and len(name) > 4


def attribute_problem(name: object) -> str | None:
    """Why ``obj.<name>`` is refused, or None if it is allowed."""
    if not isinstance(name, str):
        return None
    if name.startswith("_"):
        if is_dunder(name):
            return (
                f"the attribute {name!r} is not available in remote traces: dunder attributes reach the "
                "interpreter's internals"
            )
        return (
            f"the attribute {name!r} is not available in remote traces: names starting with '_' are "
            "private (the model is reached through its envoys, e.g. model.transformer.h[0].output)"
        )
    if name.startswith(INTROSPECTION_PREFIXES):
        return (
            f"the attribute {name!r} is not available in remote traces: frame, generator, traceback "
            "and code objects are not inspectable on the server"
        )
    why = DENIED_ATTRIBUTES.get(name)
    if why is not None:
        return f"the attribute {name!r} is not available in remote traces: {why}"
    if name in ("format", "format_map"):
        return (
            f"str.{name} with a computed template is not available in remote traces (a template such "
            "as '{0.__class__}' reaches attributes); use an f-string, e.g. f\"{x:.3f}\""
        )
    return None


def check_attribute(name: object) -> None:
    """Raise :class:`SandboxViolation` if ``name`` may not be read, written or deleted."""
    problem = attribute_problem(name)
    if problem is not None:
        raise SandboxViolation(problem)


def module_problem(dotted: str) -> str | None:
    """Why importing ``dotted`` is refused, or None."""
    top = dotted.partition(".")[0]
    if top not in ALLOWED_MODULES:
        return (
            f"module {dotted!r} cannot be imported in remote traces; the server allows {_ALLOWED_TEXT} "
            "(send data as variables of the trace instead of reading it on the server)"
        )
    if any(part.startswith("_") for part in dotted.split(".")):
        return f"module {dotted!r} is private; import its public package instead"
    for denied, why in DENIED_MODULES.items():
        if dotted == denied or dotted.startswith(denied + "."):
            return f"module {dotted!r} cannot be used in remote traces: {why}"
    return None


def name_problem(module: str, name: str) -> str | None:
    """Why ``module.name`` is refused (as attribute or ``from module import name``), or None."""
    problem = attribute_problem(name)
    if problem is not None:
        return problem
    full = f"{module}.{name}"
    for denied, why in DENIED_MODULES.items():
        if full == denied or full.startswith(denied + "."):
            return f"{full} cannot be used in remote traces: {why}"
    why = DENIED_NAMES.get(module, {}).get(name)
    if why is not None:
        return f"{full} cannot be used in remote traces: {why}"
    return None
