"""The process-level layers, tested as if the language sandbox had been bypassed.

A child process applies ``lockdown.apply`` and then, with the full Python language and real
``os``, ``socket``, ``subprocess`` and ``ctypes``, tries what an escaped trace would try. The
audit hook must refuse it, and Landlock and the network namespace must refuse it on their own.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import sys
from pathlib import Path

import pytest
import torch

from nnsight_jupyter.remote.server import lockdown

LINUX_ROOT = sys.platform.startswith("linux") and os.geteuid() == 0


def _child(connection, layers: dict, secret: str, port: int) -> None:
    import ctypes
    import subprocess
    import threading

    import torch

    from nnsight_jupyter.remote import protocol
    from nnsight_jupyter.remote.server import lockdown

    torch.ones(8, 8) @ torch.ones(8, 8)
    large = torch.randn(2**21)  # 8 MiB: joined without the native calls the audit hook refuses
    report = lockdown.apply(memory_bytes=256 * 2**20, protected=[Path(secret).parent], **layers)
    lockdown.set_user_files({"<remote trace>"})
    results: dict[str, str] = {}

    def attempt(name, action):
        try:
            action()
            results[name] = "allowed"
        except BaseException as exc:
            results[name] = f"{type(exc).__name__}: {exc}"

    attempt("read /etc/passwd", lambda: open("/etc/passwd").read())
    attempt("read a secret", lambda: open(secret).read())
    attempt("write /tmp", lambda: open("/tmp/nnsj-lockdown-test", "w").write("x"))
    attempt("list /", lambda: os.listdir("/"))
    attempt("create a socket", lambda: socket.socket())
    attempt("connect", lambda: socket.create_connection(("127.0.0.1", port), timeout=2).close())
    attempt("subprocess", lambda: subprocess.run(["true"], check=True))
    attempt("os.system", lambda: os.system("true"))
    attempt("fork", lambda: os.fork())
    attempt("signal the parent", lambda: os.kill(os.getppid(), 0))
    attempt("ctypes", lambda: ctypes.CDLL(None).getpid())
    attempt("native file read", lambda: torch.from_file("/etc/passwd", size=4, dtype=torch.uint8))
    attempt("start a thread", lambda: threading.Thread(target=print).start())
    attempt("frame from trace code",
            lambda: exec(compile("import sys\nsys._getframe()", "<remote trace>", "exec"), {}))
    attempt("allocate 1 GiB", lambda: bytearray(2**30))
    attempt("import a new stdlib module", lambda: __import__("wave"))
    attempt("compute", lambda: float(torch.ones(3) @ torch.ones(3)))
    attempt("read a library file", lambda: open(torch.__file__).read(10))
    attempt("frame from library code", lambda: sys._getframe())
    attempt("encode a large message", lambda: _same(protocol.decode(protocol.encode(large)), large))
    connection.send_bytes(json.dumps({"report": report.as_json(), "results": results}).encode())


def _same(received, sent) -> None:
    if not torch.equal(received, sent):
        raise AssertionError("the tensor changed on its way through the codec")


def _run(tmp_path: Path, **layers) -> tuple[dict, dict]:
    secret = tmp_path / "data" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("api keys")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        context = multiprocessing.get_context("forkserver")
        parent, child = context.Pipe()
        process = context.Process(target=_child, args=(child, layers, str(secret), listener.getsockname()[1]))
        process.start()
        child.close()
        if not parent.poll(120):
            process.kill()
            raise AssertionError("the locked-down child did not answer")
        answer = json.loads(parent.recv_bytes())
        process.join(10)
    written = Path("/tmp/nnsj-lockdown-test")
    answer["results"]["file exists afterwards"] = str(written.exists())
    written.unlink(missing_ok=True)
    return answer["report"], answer["results"]


def _refused(results: dict, *names: str) -> None:
    for name in names:
        assert results[name] != "allowed", f"{name} was allowed"


@pytest.mark.skipif(not LINUX_ROOT, reason="the full lockdown needs Linux and root")
def test_every_layer_together(tmp_path):
    report, results = _run(tmp_path)
    assert {"audit hook", "environment scrubbed"} <= set(report["active"])
    _refused(results, "read /etc/passwd", "read a secret", "write /tmp", "list /", "create a socket", "connect",
             "subprocess", "os.system", "fork", "signal the parent", "ctypes", "native file read",
             "frame from trace code", "allocate 1 GiB")
    for name in ("read /etc/passwd", "create a socket", "subprocess", "fork", "ctypes"):
        assert "not allowed on this server" in results[name], results[name]
    assert results["allocate 1 GiB"].startswith("MemoryError")
    assert results["file exists afterwards"] == "False"
    for name in ("import a new stdlib module", "compute", "read a library file", "frame from library code",
                 "encode a large message"):
        assert results[name] == "allowed", (name, results[name])


@pytest.mark.skipif(lockdown.landlock_abi() < 1, reason="this kernel has no Landlock")
def test_landlock_alone_refuses_files_and_tcp(tmp_path):
    report, results = _run(tmp_path, network=False, privileges=False, audit=False)
    assert any(layer.startswith("Landlock") for layer in report["active"]), report
    _refused(results, "read /etc/passwd", "read a secret", "write /tmp", "list /", "native file read")
    assert "Permission denied" in results["read /etc/passwd"]
    assert results["file exists afterwards"] == "False"
    if lockdown.landlock_abi() >= 4:
        _refused(results, "connect")
    for name in ("import a new stdlib module", "compute", "read a library file"):
        assert results[name] == "allowed", (name, results[name])


@pytest.mark.skipif(not LINUX_ROOT, reason="network namespaces need root")
def test_network_namespace_alone_cuts_the_network(tmp_path):
    report, results = _run(tmp_path, privileges=False, landlock=False, audit=False)
    assert "network namespace (no interfaces)" in report["active"]
    _refused(results, "connect")
    assert results["create a socket"] == "allowed" and results["read /etc/passwd"] == "allowed"


def test_library_roots_leave_out_folders_holding_protected_paths():
    prefix = Path(sys.prefix).resolve()
    assert prefix in lockdown.library_roots()
    assert prefix not in lockdown.library_roots([prefix / "server-data"])
