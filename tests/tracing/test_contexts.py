"""`with model.trace(...)` in scripts, functions, exec'd strings, notebook cells and `%%time` cells."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from nnsight_jupyter import NNsight

SCRIPT = textwrap.dedent(
    """
    import torch
    from nnsight_jupyter import NNsight

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    x = torch.randn(3, 4)
    seen = {}
    handle = net[0].register_forward_hook(lambda m, a, o: seen.setdefault("ref", o.detach().clone()))
    net(x)
    handle.remove()
    model = NNsight(net)
    with model.trace(x):
        hidden = model[0].output.save()
    print("MATCH" if torch.equal(hidden, seen["ref"]) else "MISMATCH")
    """
)


def _run_python(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], input=stdin, capture_output=True, text=True, timeout=120)


def test_script_file(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    done = _run_python(str(script))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "MATCH"


def test_python_dash_c():
    done = _run_python("-c", SCRIPT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "MATCH"


def test_stdin_has_no_source_and_says_why():
    done = _run_python("-", stdin=SCRIPT)
    assert done.returncode != 0
    assert "SourceUnavailableError" in done.stderr
    assert "no readable source" in done.stderr


def _net_and_reference():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    x = torch.randn(3, 4)
    with torch.no_grad():
        expected = net[1](net[0](x))
    return net, x, expected


def test_exec_of_a_string():
    net, x, expected = _net_and_reference()
    ns = {"model": NNsight(net), "x": x}
    exec("with model.trace(x):\n    hidden = model[1].output.save()\n", ns)
    assert torch.equal(ns["hidden"], expected)


def test_exec_of_a_string_inside_a_function():
    net, x, expected = _net_and_reference()
    ns = {"model": NNsight(net), "x": x}
    exec(
        "def grab():\n"
        "    with model.trace(x):\n"
        "        hidden = model[1].output.save()\n"
        "    return hidden\n"
        "result = grab()\n",
        ns,
    )
    assert torch.equal(ns["result"], expected)


def test_nested_function_and_comprehension_see_body_names():
    net, x, expected = _net_and_reference()
    model = NNsight(net)

    def run():
        scale = 2.0
        with model.trace(x):
            h = model[1].output
            rows = [h[i] * scale for i in range(h.shape[0])]
            stacked = torch.stack(rows).save()
        return stacked

    assert torch.equal(run(), expected * 2.0)


@pytest.fixture(scope="module")
def shell():
    from IPython.core.interactiveshell import InteractiveShell

    return InteractiveShell.instance()


def test_notebook_cell(shell):
    net, x, expected = _net_and_reference()
    shell.user_ns.update(model=NNsight(net), x=x)
    result = shell.run_cell("with model.trace(x):\n    hidden = model[1].output.save()\n")
    result.raise_error()
    assert torch.equal(shell.user_ns["hidden"], expected)


def test_time_cell_magic(shell):
    net, x, expected = _net_and_reference()
    shell.user_ns.update(model=NNsight(net), x=x)
    result = shell.run_cell("%%time\nwith model.trace(x):\n    timed = model[1].output.save()\n")
    result.raise_error()
    assert torch.equal(shell.user_ns["timed"], expected)


def test_function_defined_in_one_cell_called_from_another(shell):
    net, x, expected = _net_and_reference()
    shell.user_ns.update(model=NNsight(net), x=x)
    shell.run_cell("def grab():\n    with model.trace(x):\n        h = model[1].output.save()\n    return h\n").raise_error()
    shell.run_cell("grabbed = grab()").raise_error()
    assert torch.equal(shell.user_ns["grabbed"], expected)


def test_cell_error_points_at_the_cell_line(shell, capsys):
    net, x, _ = _net_and_reference()
    shell.user_ns.update(model=NNsight(net), x=x)
    result = shell.run_cell("with model.trace(x):\n    h = model[1].output\n    h.no_such_method()\n")
    assert isinstance(result.error_in_exec, AttributeError)
    frames = [f for f in __import__("traceback").extract_tb(result.error_in_exec.__traceback__)]
    assert frames[-1].lineno == 3
    assert "no_such_method" in frames[-1].line
