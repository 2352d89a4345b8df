"""The language-level sandbox on its own: what the source check, builtins and modules allow."""

from __future__ import annotations

import operator

import pytest
import torch

from nnsight_jupyter.remote.execute import run_request
from nnsight_jupyter.remote.server import sandbox
from nnsight_jupyter.remote.server.sandbox import SandboxViolation, make_builtins, restricted_import, validate

from .conftest import tokens, trace_request
from .tiny_models import tiny_gpt2

ALLOWED = [
    "h = model.transformer.h[0].output.save()",
    "import torch\nimport torch.nn.functional as F\nfrom torch import nn\ny = F.relu(torch.ones(2))",
    "import math, numpy as np, collections, itertools, functools, operator, typing\n"
    "import dataclasses, statistics, random, re",
    "from collections import OrderedDict, defaultdict\nfrom dataclasses import dataclass, field",
    "s = f'{1.5:.3f} {[1, 2]!r}'\nt = '{} and {name:>4}'.format(1, name='x')",
    "class Probe:\n    def __init__(self, k):\n        self.k = k\n"
    "    def __repr__(self):\n        return 'P'\np = Probe(3)",
    "def f(x: int) -> int:\n    return x + 1\ng = lambda y: y * 2\nz = [f(i) for i in range(3)]",
    "try:\n    1 / 0\nexcept ZeroDivisionError as err:\n    msg = str(err)",
    "x = getattr(model, 'transformer')\ny = hasattr(model, 'lm_head')",
    "match [1, 2]:\n    case [a, *rest]:\n        b = a",
    "_private_local = 1\nx = _private_local",
]

REFUSED = [
    ("x.__class__", "dunder"), ("model._model", "private"), ("g.gi_frame", "frame"), ("f.f_back", "frame"),
    ("tb.tb_next", "frame"), ("c.co_code", "frame"), ("'{0.__class__}'.format(1)", "f-string"),
    ("'{0[0]}'.format([1])", "f-string"), ("t.format(1)", "f-string"), ("t.format_map({})", "f-string"),
    ("__import__('os')", "__import__"), ("x = __builtins__", "__builtins__"), ("import os", "'os'"),
    ("import os.path", "'os.path'"), ("from os import system", "'os'"), ("from torch import _C", "'_C'"),
    ("from torch import *", "import *"), ("from . import x", "relative"), ("import torch.hub", "torch.hub"),
    ("from torch import hub", "torch.hub"), ("from torch import save", "torch.save"),
    ("import numpy.ctypeslib", "ctypes"), ("def __import__():\n    pass", "rename it"),
    ("def f(x: 'str'):\n    pass", "string annotations"), ("x: 'int' = 1", "string annotations"),
    ("try:\n    pass\nexcept Exception as __e__:\n    pass", "dunder"), ("global __builtins__", "dunder"),
    ("import torch as __builtins__", "dunder"), ("lambda __x__: 1", "dunder"),
]


@pytest.mark.parametrize("source", ALLOWED)
def test_normal_trace_code_passes(source):
    validate(source)


@pytest.mark.parametrize(("source", "words"), REFUSED)
def test_forbidden_code_is_refused_with_the_line(source, words):
    with pytest.raises(SandboxViolation) as info:
        validate(source)
    assert words in str(info.value) and str(info.value).startswith("line ")


def test_syntax_errors_are_left_to_the_compiler():
    validate("def (:")


def test_builtins():
    table = make_builtins()
    for name in ("open", "exec", "eval", "compile", "input", "breakpoint", "globals", "locals", "vars", "memoryview"):
        with pytest.raises(SandboxViolation, match=f"{name}\\(\\) is not available"):
            table[name]()
    for name in ("BaseException", "KeyboardInterrupt", "SystemExit", "GeneratorExit"):
        assert name not in table
    with pytest.raises(SandboxViolation):
        table["getattr"](1, "__class__")
    assert table["getattr"](1, "real") == 1 and table["getattr"](1, "nope", 5) == 5
    with pytest.raises(SandboxViolation, match="shared"):
        table["setattr"](torch.Tensor, "x", 1)

    class Box:
        pass

    box = Box()
    table["setattr"](box, "value", 3)
    assert box.value == 3


def test_modules_are_read_only_proxies():
    torch_proxy = restricted_import("torch")
    assert torch_proxy.ones(2).sum() == 2 and torch_proxy.nn.functional.relu is torch.nn.functional.relu
    for attribute, words in (("os", "'os'"), ("sys", "'sys'"), ("save", "torch.save"), ("hub", "torch.hub"),
                             ("_C", "private"), ("set_default_dtype", "shared")):
        with pytest.raises(SandboxViolation, match=words):
            getattr(torch_proxy, attribute)
    with pytest.raises(SandboxViolation, match="read-only"):
        torch_proxy.relu = None
    assert "os" not in dir(torch_proxy) and "ones" in dir(torch_proxy)
    assert restricted_import("torch.nn", fromlist=("functional",)).functional.relu is torch.nn.functional.relu
    with pytest.raises(SandboxViolation, match="'os'"):
        restricted_import("os")
    with pytest.raises(SandboxViolation, match="relative"):
        restricted_import("x", level=1)
    op = restricted_import("operator")
    with pytest.raises(SandboxViolation):
        op.attrgetter("__class__")
    assert op.attrgetter("real")(3) == 3 and op.add is operator.add


def test_harden_engine_checks_string_paths():
    from nnsight_jupyter.tracing.envoy import Envoy

    resolve, add_alias = Envoy.resolve, Envoy.add_alias
    model = tiny_gpt2()
    undo = sandbox.harden_engine()
    try:
        assert model.resolve("transformer.h.0") is model.transformer.h[0]
        with pytest.raises(SandboxViolation, match="_model"):
            model.resolve("_model")
        with pytest.raises(SandboxViolation, match="__globals__"):
            model.add_alias("g", "transformer.forward.__globals__")
        with pytest.raises(SandboxViolation, match="__init__"):
            model.add_alias("__init__", "transformer")
        assert Envoy.resolve is resolve and Envoy.add_alias is add_alias, "the hook patches no Envoy method"
    finally:
        undo()
    with pytest.raises(AttributeError):
        model.resolve("transformer.forward.__globals__x")


def test_a_sandboxed_run_gives_the_same_values_as_a_plain_one():
    model = tiny_gpt2()
    request = trace_request("import torch\nh = model.transformer.h[1].output.save()\nn = torch.linalg.norm(h).save()",
                            tokens(4))
    plain = run_request(model, request)
    boxed = run_request(model, request, builtins=make_builtins(), validate=validate, importer=restricted_import)
    assert boxed.error is None and torch.equal(plain.saved["h"], boxed.saved["h"])
    assert torch.equal(plain.saved["n"], boxed.saved["n"])


def test_views_inside_their_buffer_and_ordinary_classes_still_work():
    """The bounds checks refuse only what leaves a buffer: the same code gives numpy's own values."""
    import numpy as np

    source = (
        "import numpy as np, torch\n"
        "from dataclasses import dataclass\n"
        "a = np.arange(12.0)\n"
        "w = np.lib.stride_tricks.as_strided(a, (5, 4), (16, 8))\n"
        "s = np.lib.stride_tricks.sliding_window_view(a, 3)\n"
        "b = np.ndarray((3,), np.float64, buffer=a, offset=16)\n"
        "assert isinstance(a, np.ndarray) and type(a) is np.ndarray and isinstance(int, type)\n"
        "@dataclass\n"
        "class Box:\n"
        "    k: int\n"
        "Q = type('Q', (), {'k': 2})\n"
        "h = model.transformer.h[0].output.detach().numpy()[0, ::2]\n"
        "out = {'w': torch.tensor(w), 's': torch.tensor(s), 'b': torch.tensor(b), 'h': torch.from_numpy(h.copy()),\n"
        "       'k': torch.tensor(Box(1).k + Q.k)}\n"
        "saved = torch.cat([v.flatten().double() for v in out.values()]).save()\n"
    )
    model = tiny_gpt2()
    result = run_request(model, trace_request(source, tokens(1)), builtins=make_builtins(), validate=validate,
                         importer=restricted_import)
    assert result.error is None, result.error
    a = np.arange(12.0)
    with torch.no_grad():
        hidden = model.transformer.h[0](model.transformer.drop(
            model.transformer.wte(tokens(1)) + model.transformer.wpe(torch.arange(tokens(1).shape[1]))))
    hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    expected = torch.cat([
        torch.tensor(np.stack([a[i:i + 4] for i in range(0, 10, 2)])).flatten(),
        torch.tensor(np.stack([a[i:i + 3] for i in range(10)])).flatten(),
        torch.tensor(a[2:5]),
        hidden[0, ::2].flatten().double(),
        torch.tensor([3.0], dtype=torch.float64),
    ])
    assert torch.equal(result.saved["saved"], expected)
