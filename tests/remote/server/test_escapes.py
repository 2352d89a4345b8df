"""Escape attempts against the real server: each is refused with a clear error, and the server
keeps serving (the same normal trace, run after every attempt, gives the values a local run gives).

Every attempt names the layer expected to stop it:

- ``source``: ``sandbox.validate`` reads the source and refuses it before anything is compiled
- ``builtins``: the trace's builtins (``open``, ``exec``... raise; ``getattr`` checks names)
- ``modules``: the importer and read-only module proxies (denied modules and functions)
- ``engine``: the engine's string paths (``model.resolve``) checked like ``getattr``
- ``limits``: time, memory and result-size limits, enforced by the worker and the server
- ``integrity``: the after-job check of the model and shared state (the worker is replaced)
- ``os``: Landlock, refusing file access from native code no Python hook sees
- ``bounds``: arrays and tensors built from strides, offsets or addresses must stay inside the
  buffer they are built from (``bounds.py``, or numpy's and torch's own checks where they have them)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from nnsight_jupyter.remote.execute import run_request
from nnsight_jupyter.remote.protocol import FunctionSource, TraceRequest

from .conftest import Client, tokens, trace_request
from .tiny_models import tiny_gpt2


@dataclass(frozen=True)
class Attempt:
    name: str
    layer: str
    source: str
    expect: str
    words: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)
    variables: dict[str, Any] = field(default_factory=dict)
    status: str = "error"


SV = "SandboxViolation"
ATTEMPTS = [
    Attempt("read a file with open", "builtins", 'data = open("/etc/passwd").read()', SV, ("open()", "file access")),
    Attempt("import os", "source", 'import os\nos.system("id")', SV, ("'os'", "cannot be imported")),
    Attempt("import subprocess", "source", 'import subprocess\nsubprocess.run(["id"])', SV, ("subprocess",)),
    Attempt("import socket", "source", 'import socket\nsocket.create_connection(("1.1.1.1", 80))', SV, ("socket",)),
    Attempt("import ctypes", "source", "import ctypes\nctypes.CDLL(None)", SV, ("ctypes",)),
    Attempt("import importlib", "source", 'import importlib\nimportlib.import_module("os")', SV, ("importlib",)),
    Attempt("import sys", "source", "import sys\nf = sys._getframe()", SV, ("sys",)),
    Attempt("import signal", "source", "import signal\nsignal.alarm(1)", SV, ("signal",)),
    Attempt("import gc", "source", "import gc\nobjs = gc.get_objects()", SV, ("gc",)),
    Attempt("fork bomb through os", "source", "import os\nwhile True:\n    os.fork()", SV, ("'os'",)),
    Attempt("fork bomb through torch.multiprocessing", "source",
            "import torch.multiprocessing as mp\nmp.Process(target=print).start()", SV, ("starts processes",)),
    Attempt("__import__ by name", "source", 'os = __import__("os")', SV, ("__import__",)),
    Attempt("__builtins__ by name", "source", 'b = __builtins__["open"]', SV, ("__builtins__",)),
    Attempt("walk __subclasses__", "source", "classes = ().__class__.__bases__[0].__subclasses__()", SV,
            ("__class__",)),
    Attempt("object.__subclasses__", "source", "classes = object.__subclasses__()", SV, ("__subclasses__",)),
    Attempt("function __globals__", "source", "f = lambda: 0\ng = f.__globals__", SV, ("__globals__",)),
    Attempt("builtin method __self__", "source", "b = print.__self__", SV, ("__self__",)),
    Attempt("__dict__ of a class", "source", "d = type(model).__dict__", SV, ("__dict__",)),
    Attempt("__code__ of a function", "source", "def f():\n    pass\nc = f.__code__", SV, ("__code__",)),
    Attempt("getattr with a computed dunder", "builtins", 'cls = getattr((), "__cla" + "ss__")', SV, ("__class__",)),
    Attempt("functools.reduce over getattr", "builtins",
            'import functools\nx = functools.reduce(getattr, ["__class__", "__base__"], 1)', SV, ("__class__",)),
    Attempt("format string attribute walk", "source", 's = "{0.__class__.__base__}".format(1)', SV, ("f-string",)),
    Attempt("format on a computed template", "source", 't = "{0}"\ns = t.format(model)', SV, ("f-string",)),
    Attempt("format reached through getattr", "builtins", 'f = getattr("{0.__class__}", "for" + "mat")', SV,
            ("f-string",)),
    Attempt("raw model through _model", "source", "raw = model._model", SV, ("'_model'", "private")),
    Attempt("raw module through getattr", "builtins", 'raw = getattr(model.transformer, "_mod" + "ule")', SV,
            ("'_module'",)),
    Attempt("raw model through model.resolve", "engine", 'raw = model.resolve("_model")', SV, ("'_model'",)),
    Attempt("globals through model.resolve", "engine", 'g = model.resolve("transformer.forward.__globals__")',
            SV, ("__globals__",)),
    Attempt("source internals through a private name", "source", "f = model.transformer.h[0].attn.source._fs", SV,
            ("'_fs'",)),
    Attempt("source internals through model.resolve", "engine",
            'f = model.resolve("transformer.h.0.attn.source._fs")', SV, ("'_fs'",)),
    Attempt("globals of the function an operation returns", "builtins",
            "f = model.transformer.h[0].attn.source.ALL_ATTENTION_FUNCTIONS_get_interface_0.output\n"
            'g = getattr(f, "__glob" + "als__")', SV, ("__globals__",)),
    Attempt("patch the attention class from a trace function swapped in as an operation's callee", "integrity",
            "def grab(module, query, *args, **kwargs):\n"
            "    type(module).forward = None\n"
            "    return query.transpose(1, 2), None\n"
            "model.transformer.h[0].attn.source.ALL_ATTENTION_FUNCTIONS_get_interface_0.output = grab\n"
            "out = model.output.save()\n", "ModelModifiedError", ("GPT2Attention",)),
    Attempt("generator frame", "source", "g = (i for i in [1])\nf = g.gi_frame.f_back.f_globals", SV,
            ("gi_frame", "frame")),
    Attempt("generator frame through getattr", "builtins", 'g = (i for i in [1])\nf = getattr(g, "gi_" + "frame")',
            SV, ("gi_frame",)),
    Attempt("traceback frame", "source", "try:\n    1 / 0\nexcept Exception as e:\n    f = e.__traceback__.tb_frame",
            SV, ("__traceback__",)),
    Attempt("exec", "builtins", 'exec("import os")', SV, ("exec()",)),
    Attempt("eval", "builtins", 'x = eval("1 + 1")', SV, ("eval()",)),
    Attempt("compile", "builtins", 'c = compile("1", "x", "eval")', SV, ("compile()",)),
    Attempt("globals()", "builtins", "g = globals()", SV, ("globals()",)),
    Attempt("vars()", "builtins", "v = vars(model)", SV, ("vars()",)),
    Attempt("memoryview", "builtins", 'm = memoryview(b"abc")', SV, ("memoryview()",)),
    Attempt("input", "builtins", "x = input()", SV, ("input()",)),
    Attempt("breakpoint", "builtins", "breakpoint()", SV, ("breakpoint()",)),
    Attempt("os through torch.os", "modules", 'import torch\ntorch.os.system("id")', SV, ("torch.os", "'os'")),
    Attempt("sys through torch.sys", "modules", "import torch\ns = torch.sys.modules", SV, ("torch.sys",)),
    Attempt("torch.load a file", "modules", 'import torch\nx = torch.load("/etc/passwd")', SV, ("torch.load",)),
    Attempt("torch.save a file", "modules", 'import torch\ntorch.save(1, "/tmp/nnsj-pwned")', SV, ("torch.save",)),
    Attempt("numpy.fromfile", "modules", 'import numpy\nx = numpy.fromfile("/etc/passwd")', SV, ("numpy.fromfile",)),
    Attempt("ctypes through numpy.ctypeslib", "modules", "import numpy\nc = numpy.ctypeslib", SV, ("ctypes",)),
    Attempt("operator.attrgetter dunder", "modules", 'import operator\nc = operator.attrgetter("__class__")(1)', SV,
            ("__class__",)),
    Attempt("typing.get_type_hints evaluates strings", "modules",
            "import typing\nh = typing.get_type_hints(print)", SV, ("evaluates strings",)),
    Attempt("string annotation", "source", 'def f(x: "().__class__"):\n    pass', SV, ("string annotations",)),
    Attempt("from torch import _C", "source", "from torch import _C", SV, ("'_C'",)),
    Attempt("import *", "source", "from torch import *", SV, ("import *",)),
    Attempt("global default dtype", "modules", "import torch\ntorch.set_default_dtype(torch.float64)", SV,
            ("shared with every later job",)),
    Attempt("module attribute assignment", "modules", "import torch\ntorch.relu = print", SV, ("read-only",)),
    Attempt("module named in options", "modules", "x = os", SV, ("'os'",), options={"modules": {"os": "os"}}),
    Attempt("function variable with a dunder", "source", "y = f(1)", SV, ("__class__",),
            variables={"f": FunctionSource("f", "def f(x):\n    return x.__class__\n")}),
    Attempt("write a file with ndarray.tofile", "builtins",
            'import torch\ntorch.zeros(4).numpy().tofile("/tmp/nnsj-pwned")', SV, ("open()",)),
    Attempt("read a file from native code", "os",
            'import torch\ns = torch.UntypedStorage.from_file("/etc/passwd", False, 8)', "", ("ermission",)),
    Attempt("infinite loop", "limits", "while True:\n    pass", "TimeoutError", ("time limit of 1 s",),
            options={"timeout": 1.0}),
    Attempt("loop that swallows the stop", "limits",
            "while True:\n    try:\n        while True:\n            pass\n    except:\n        pass", "TimeoutError",
            ("did not stop", "replaced"), options={"timeout": 1.0}),
    Attempt("huge integer power", "limits", "x = 7 ** (10 ** 10)", "TimeoutError", ("time limit",),
            options={"timeout": 1.0}),
    Attempt("memory bomb: one huge tensor", "limits", "import torch\nx = torch.ones(2 ** 34)", "MemoryError",
            ("--max-job-memory-mb",)),
    Attempt("memory bomb: growing list", "limits",
            "import torch\nxs = []\nwhile True:\n    xs.append(torch.ones(2 ** 24))", "MemoryError|MemoryLimitExceeded",
            ("--max-job-memory-mb",)),
    Attempt("memory held under the address-space cap", "limits",
            "import torch\nx = torch.ones(250_000_000)\nwhile True:\n    pass", "MemoryLimitExceeded",
            ("--max-job-memory-mb", "replaced")),
    Attempt("memory bomb: python list", "limits", "x = [0] * (2 ** 36)", "MemoryError", ("--max-job-memory-mb",)),
    Attempt("huge result", "limits", "import torch\nbig = torch.zeros(2 ** 21).save()", "ResultTooLarge",
            ("--max-result-mb",)),
    Attempt("unbounded recursion", "limits", "def f(n):\n    return f(n + 1)\nf(0)", "RecursionError"),
    Attempt("edit weights in place through .data", "integrity",
            "model.transformer.h[0].attn.c_attn.weight.data.zero_()", "WorkerDied", ("SIGSEGV", "read-only")),
    Attempt("replace weights through .data", "integrity",
            "import torch\nw = model.transformer.h[0].attn.c_attn.weight\nw.data = torch.zeros_like(w)",
            "ModelModifiedError", ("parameter transformer.h.0.attn.c_attn.weight", "replaced this worker")),
    Attempt("edit a weight in place with autograd off", "integrity",
            "import torch\nwith torch.no_grad():\n    model.transformer.h[0].attn.c_attn.bias.add_(1)",
            "WorkerDied", ("SIGSEGV",)),
    Attempt("leave a forward hook", "integrity",
            "model.transformer.h[0].register_forward_hook(lambda m, i, o: o * 0)", "ModelModifiedError",
            ("hooks",)),
    Attempt("global module hook", "integrity",
            "import torch\ntorch.nn.modules.module.register_module_forward_hook(lambda m, i, o: None)",
            "ModelModifiedError", ("global module hook",)),
    Attempt("patch a torch class", "integrity", "import torch\ntorch.Tensor.relu = None", "ModelModifiedError",
            ("torch.Tensor",)),
    Attempt("patch the engine's Envoy class", "integrity", "T = type(model.transformer.h[0])\nT.forward = None",
            "ModelModifiedError", ("Envoy",)),
    Attempt("patch the Parameter class", "integrity",
            "T = type(model.transformer.h[0].attn.c_attn.weight)\nT.extra = 1", "ModelModifiedError",
            ("Parameter",)),
    Attempt("set a module attribute", "integrity", "model.transformer.h[0].mlp.act = None", "ModelModifiedError",
            ("module",)),
    Attempt("numpy as_strided past the end", "bounds",
            "import numpy as np\nx = np.lib.stride_tricks.as_strided(np.zeros(4), (4096,), (8,))", SV,
            ("as_strided", "32-byte buffer")),
    Attempt("numpy as_strided before the start", "bounds",
            "import numpy as np\na = np.zeros(4)[3:]\nx = np.lib.stride_tricks.as_strided(a, (64,), (-8,))", SV,
            ("as_strided", "inside the array")),
    Attempt("numpy as_strided imported by name", "bounds",
            "from numpy.lib.stride_tricks import as_strided\nimport numpy as np\nx = as_strided(np.zeros(1), (9,), (0,))"
            "\ny = as_strided(np.zeros(2), (2,), (4096,))", SV, ("as_strided",)),
    Attempt("torch.from_numpy of a strided numpy view", "bounds",
            "import numpy as np, torch\nx = torch.from_numpy(np.lib.stride_tricks.as_strided(np.zeros(2), (512,), (8,)))",
            SV, ("as_strided",)),
    Attempt("numpy ndarray with a negative offset", "bounds",
            "import numpy as np\nx = np.ndarray((64,), np.uint8, buffer=np.zeros(8, np.uint8), offset=-64)", SV,
            ("numpy.ndarray", "-64")),
    Attempt("numpy ndarray with strides past its buffer", "bounds",
            "import numpy as np\nx = np.ndarray((64,), np.uint8, buffer=np.zeros(8, np.uint8), strides=(64,))",
            "ValueError", ("strides",)),
    Attempt("numpy ndarray class reached through type()", "bounds",
            "import numpy as np\nT = type(np.zeros(1))\nx = T((32,), np.uint8, buffer=bytes(8), offset=-32)", SV,
            ("numpy.ndarray",)),
    Attempt("numpy recarray with a negative offset", "bounds",
            "import numpy as np\nx = np.recarray((8,), dtype=[('a', np.uint8)], buf=bytes(8), offset=-8)", SV,
            ("numpy.recarray",)),
    Attempt("numpy rec.array with a negative offset", "bounds",
            "import numpy as np\nx = np.rec.array(bytes(8), dtype=[('a', np.uint8)], shape=(8,), offset=-64)", SV,
            ("numpy.rec.array",)),
    Attempt("numpy frombuffer past the end", "bounds",
            "import numpy as np\nx = np.frombuffer(bytes(8), np.uint8, count=4096, offset=4)", "ValueError",
            ("buffer",)),
    Attempt("numpy resize without the reference check", "bounds",
            "import numpy as np\na = np.zeros(1024)\nb = a[:]\na.resize(1, refcheck=False)", SV, ("'resize'",)),
    Attempt("a class with __array_interface__", "bounds",
            "import numpy as np\nclass A:\n    @property\n    def __array_interface__(self):\n"
            "        return {'shape': (64,), 'typestr': '|u1', 'data': (4096, True), 'version': 3}\nx = np.asarray(A())",
            SV, ("__array_interface__",)),
    Attempt("a class that answers every attribute", "bounds",
            "import numpy as np\nclass A:\n    def __getattr__(self, name):\n"
            "        return {'shape': (64,), 'typestr': '|u1', 'data': (4096, True), 'version': 3}\nx = np.asarray(A())",
            SV, ("__getattr__",)),
    Attempt("type() with __array_interface__", "bounds",
            "import numpy as np\nA = type('A', (), {'__array_' + 'interface__': {'shape': (64,), 'typestr': '|u1', "
            "'data': (4096, True), 'version': 3}})\nx = np.asarray(A())", SV, ("__array_interface__",)),
    Attempt("a metaclass reached through type()", "bounds",
            "import torch\nM = type(torch.Tensor)\nA = M('A', (torch.Tensor,), {'__getattr__': lambda self, name: 1})", SV,
            ("__getattr__",)),
    Attempt("dataclasses.make_dataclass with a protocol field", "bounds",
            "import dataclasses\nA = dataclasses.make_dataclass('A', ['__array_interface__'])", SV,
            ("make_dataclass",)),
    Attempt("functools.update_wrapper copying an array's address", "bounds",
            "import functools, numpy as np\ndef f():\n    pass\n"
            "functools.update_wrapper(f, np.zeros(4), assigned=('__array_' + 'interface__',))", SV,
            ("update_wrapper",)),
    Attempt("the real ndarray class through mro", "bounds",
            "import numpy as np\nT = np.recarray.mro()[1]", SV, ("'mro'",)),
    Attempt("torch as_strided past the end", "bounds",
            "import torch\nx = torch.zeros(4).as_strided((4096,), (1,))", "RuntimeError", ("out of bounds",)),
    Attempt("torch as_strided with a storage offset", "bounds",
            "import torch\nx = torch.as_strided(torch.zeros(4), (2,), (1,), 4096)", "RuntimeError",
            ("out of bounds",)),
    Attempt("torch set_ with a storage offset", "bounds",
            "import torch\na = torch.zeros(4)\nx = torch.empty(0).set_(a.untyped_storage(), 4096, (4,), (1,))", SV,
            ("'set_'",)),
    Attempt("torch set_ reached through getattr", "bounds",
            "import torch\nf = getattr(torch.empty(0), 'se' + 't_')", SV, ("'set_'",)),
    Attempt("torch storage shrunk under a view", "bounds",
            "import torch\na = torch.zeros(1024)\nb = a[:]\na.untyped_storage().resize_(0)\nx = b + 1", SV,
            ("not available", "storage")),
    Attempt("torch frombuffer past the end", "bounds",
            "import torch\nx = torch.frombuffer(bytearray(8), dtype=torch.uint8, count=4096)", "ValueError",
            ("buffer",)),
]

NORMAL = "h = model.transformer.h[1].output.save()\nlogits = model.lm_head.output.save()\n"


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    model = tiny_gpt2()
    result = run_request(model, trace_request(NORMAL, tokens(7)))
    assert result.error is None
    return result.saved


def test_the_corpus_is_large_enough():
    assert len(ATTEMPTS) >= 30
    assert len({a.name for a in ATTEMPTS}) == len(ATTEMPTS)


@pytest.mark.parametrize("attempt", ATTEMPTS, ids=[a.name for a in ATTEMPTS])
def test_escape_attempt_is_refused_and_the_server_keeps_serving(engine_server: Client, attempt: Attempt,
                                                                expected: dict[str, torch.Tensor]) -> None:
    request = trace_request(attempt.source, tokens(3), **attempt.options)
    if attempt.variables:
        request = TraceRequest(request.model_id, request.source, request.options, attempt.variables)
    job_id = engine_server.submit(request)
    status = engine_server.wait(job_id, timeout=60)
    assert status["status"] == attempt.status, status
    result = engine_server.result(job_id)
    assert result.error is not None, result
    if attempt.expect:
        assert result.error.type_name in attempt.expect.split("|"), result.error
    text = f"{result.error.type_name}: {result.error.message}\n{result.error.traceback}"
    for word in attempt.words:
        assert word in text, text
    assert status["error"]["type"] == result.error.type_name
    assert not os.path.exists("/tmp/nnsj-pwned")

    normal = engine_server.run(trace_request(NORMAL, tokens(7)))
    assert normal.error is None, normal.error
    for name, value in expected.items():
        assert torch.allclose(normal.saved[name], value, atol=1e-6), name
