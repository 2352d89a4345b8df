"""The package as a whole: what importing it does, what it exports, and how its parts depend on each other."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import nnsight_jupyter

PACKAGE = Path(nnsight_jupyter.__file__).parent

_FRESH_IMPORT = r"""
import sys
events = []
sys.addaudithook(lambda event, args: events.append(event) if event == "sys.addaudithook" else None)
import torch
import torch.nn.modules.module as module_globals
torch_before = {
    "backward": torch.autograd.backward,
    "Tensor": dict(vars(torch.Tensor)),
    "Module": dict(vars(torch.nn.Module)),
    "hooks": [len(getattr(module_globals, n)) for n in dir(module_globals) if n.startswith("_global_")
              and isinstance(getattr(module_globals, n), dict)],
}
import nnsight_jupyter, nnsight_jupyter.remote, nnsight_jupyter.remote.protocol, nnsight_jupyter.magics
from nnsight_jupyter.tracing import runtime
assert events == [], f"importing added an audit hook: {events}"
assert torch.autograd.backward is torch_before["backward"]
assert dict(vars(torch.Tensor)) == torch_before["Tensor"], "importing changed torch.Tensor"
assert dict(vars(torch.nn.Module)) == torch_before["Module"], "importing changed torch.nn.Module"
assert not any(runtime.installed().values()), runtime.installed()

net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU())
model = nnsight_jupyter.NNsight(net)
assert events == ["sys.addaudithook"], events
with model.trace(torch.ones(1, 3)):
    out = model[0].output.save()
assert all(runtime.installed().values()), runtime.installed()
assert torch.autograd.backward is not torch_before["backward"]

runtime.uninstall()
assert not any(runtime.installed().values()), runtime.installed()
assert torch.autograd.backward is torch_before["backward"]
assert dict(vars(torch.Tensor)) == torch_before["Tensor"]
with model.trace(torch.ones(1, 3)):
    again = model[0].output.save()
assert torch.equal(out, again) and all(runtime.installed().values())
print("ok")
"""


def test_importing_installs_nothing_and_first_use_installs_what_uninstall_takes_off():
    done = subprocess.run([sys.executable, "-c", _FRESH_IMPORT], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_the_remote_package_exports_what_the_readme_uses():
    import nnsight_jupyter.remote as remote

    assert remote.__all__ == ["CONFIG", "JobHandle", "LocalSimulation", "RemoteBackend", "RemoteClient",
                              "RemoteConfig", "job", "stop_daemon"]
    from nnsight_jupyter import settings
    from nnsight_jupyter.remote import backends, client, daemon

    assert remote.CONFIG is settings.CONFIG and remote.RemoteConfig is settings.RemoteConfig
    assert remote.job is client.job and remote.JobHandle is client.JobHandle
    assert remote.RemoteClient is client.RemoteClient and remote.stop_daemon is daemon.stop_daemon
    assert remote.LocalSimulation is backends.LocalSimulation and remote.RemoteBackend is backends.RemoteBackend
    readme = (PACKAGE.parent / "README.md").read_text()
    used = set()
    for line in readme.splitlines():
        if line.startswith("from nnsight_jupyter.remote import "):
            used |= {name.strip() for name in line.split("import", 1)[1].split("#")[0].split(",")}
        assert "nnsight_jupyter.remote." not in line or "nnsight_jupyter.remote.job(" in line, line
    assert used and used <= set(remote.__all__)


def _imports(path: Path) -> list[str]:
    """The modules of this package a file imports (at any depth, TYPE_CHECKING blocks excluded)."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if module.endswith(".__init__"):
        module = module[: -len(".__init__")]
        package = module
    else:
        package = module.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(n) for n in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.append(target)
            found += [f"{target}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
    return [name for name in found if name.startswith("nnsight_jupyter")]


def import_graph() -> dict[str, set[str]]:
    """Which part of the package imports which: `tracing`, `models`, `remote`, `remote.server`, top-level modules."""

    def part(module: str) -> str:
        pieces = module.split(".")[1:]
        if not pieces:
            return "nnsight_jupyter"
        if pieces[0] == "remote" and len(pieces) > 1 and pieces[1] == "server":
            return "remote.server"
        if pieces[0] in ("tracing", "models", "remote", "widgets"):
            return pieces[0]
        return pieces[0]

    modules = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
               for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        source = part(name)
        for target in _imports(path):
            if target not in modules:
                continue
            dest = part(target)
            if dest != source:
                graph.setdefault(source, set()).add(dest)
        graph.setdefault(source, set())
    return graph


def test_the_engine_imports_nothing_outside_itself_but_errors():
    graph = import_graph()
    assert graph["tracing"] <= {"errors"}, graph["tracing"]
    assert graph["errors"] == set()


def test_no_import_cycle_runs_through_tracing():
    graph = import_graph()
    seen: set[str] = set()
    stack = list(graph["tracing"])
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        stack.extend(graph.get(node, ()))
    assert "tracing" not in seen


def test_only_the_settings_module_reads_the_environment():
    for path in PACKAGE.rglob("*.py"):
        if path.name == "settings.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            assert "os.environ.get(" not in line and "os.getenv(" not in line, f"{path.name}:{number}: {line.strip()}"


def test_nothing_outside_the_engine_touches_a_tracers_private_attributes():
    private = {"_args", "_kwargs", "_generate", "_generate_kwargs", "_interleaver", "_block", "_frame",
               "_pending_invokes", "_frozen", "_has_input", "_untraced"}
    for path in PACKAGE.rglob("*.py"):
        if "tracing" in path.relative_to(PACKAGE).parts:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in private:
                owner = ast.unparse(node.value)
                assert "tracer" not in owner.lower(), f"{path.relative_to(PACKAGE)}:{node.lineno}: {owner}.{node.attr}"


def test_the_readme_layout_names_every_part_of_the_package():
    readme = (PACKAGE.parent / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    for path in sorted(PACKAGE.iterdir()):
        if path.name.startswith("_") or path.name == "py.typed" or path.suffix not in ("", ".py"):
            continue
        assert f"nnsight_jupyter/{path.name}{'/' if path.is_dir() else ''}" in layout, path.name
    for folder in ("tracing", "remote"):
        for path in sorted((PACKAGE / folder).glob("*.py")):
            if path.name == "__init__.py" or path.stem in ("cache", "scan", "tracer", "batching", "saving",
                                                             "interleave", "envoy"):
                continue
            assert path.stem in layout, f"{folder}/{path.name}"
    for path in sorted((PACKAGE / "remote" / "codec").glob("*.py")):
        if path.name != "__init__.py":
            assert path.stem in layout, f"remote/codec/{path.name}"
