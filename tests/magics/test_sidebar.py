"""The kernel side of the JupyterLab sidebar, driven through a stand-in comm.

What the sidebar lists is checked against the model and the tensors themselves: module names
from `named_modules()`, parameter counts from `parameters()`, saved shapes from the tensors.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
import torch

from nnsight_jupyter import NNsight, sidebar
from nnsight_jupyter.remote import submitted


class FakeComm:
    """Records what the kernel sends; `deliver` plays a message from the front end."""

    def __init__(self) -> None:
        self.sent: list[tuple[dict, list]] = []
        self.at: list[float] = []  # time.monotonic() of each message sent
        self.handler = None
        self.closer = None

    def on_msg(self, f):
        self.handler = f

    def on_close(self, f):
        self.closer = f

    def send(self, data: dict, buffers: Any = None) -> None:
        self.at.append(time.monotonic())
        self.sent.append((data, list(buffers or [])))

    def events(self, event: str, since: float = 0.0, until: float = float("inf")) -> list[dict]:
        sent = zip(list(self.sent), list(self.at))
        return [d for (d, _), t in sent if d.get("event") == event and since <= t <= until]

    def deliver(self, data: dict) -> tuple[dict, list]:
        self.handler({"content": {"data": data}})
        return self.sent[-1]


@pytest.fixture
def shell():
    from IPython.core.interactiveshell import InteractiveShell

    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "nnsight_jupyter")
    yield ip
    for name in ("net", "hidden", "out", "plain"):
        ip.user_ns.pop(name, None)


@pytest.fixture
def net(shell):
    torch.manual_seed(0)
    model = NNsight(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2)))
    shell.user_ns["net"] = model
    shell.user_ns["torch"] = torch
    shell.run_cell(
        "with net.trace(torch.ones(2, 4)):\n"
        "    hidden = net[0].output.save()\n"
        "    out = net.output.save()\n"
        "plain = torch.zeros(5)\n",
    ).raise_error()
    return model


def test_snapshot_lists_models_and_what_their_last_trace_saved(shell, net):
    snap = sidebar.snapshot(shell)
    module = net._module
    # The shell is shared with other tests, which may have left models of their own in it.
    assert [m for m in snap["models"] if m["name"] == "net"] == [
        {
            "name": "net",
            "class": "Sequential",
            "modules": len(list(module.modules())),
            "params": sum(p.numel() for p in module.parameters()),
            "variable": True,
        }
    ]
    saved = {s["name"]: s for s in snap["saved"] if s["model"] == "net"}
    assert set(saved) == {"hidden", "out"}
    assert saved["out"]["shape"] == [2, 2]
    assert saved["hidden"]["shape"] == list(shell.user_ns["hidden"].shape)
    assert saved["hidden"]["dtype"] == "float32"
    assert "plain" not in saved  # a tensor no trace saved


def test_a_model_only_trace_magic_holds_is_not_a_notebook_name(shell, net):
    """The patching-sweep template uses a notebook name as is and loads a `%%trace` alias itself."""
    magics = shell._nnsight_jupyter[0]
    alias = NNsight(torch.nn.Linear(2, 2))
    magics._models["tiny-alias"] = alias
    try:
        listed = {m["name"]: m for m in sidebar.snapshot(shell)["models"]}
        assert listed["tiny-alias"]["variable"] is False
        assert listed["net"]["variable"] is True
    finally:
        del magics._models["tiny-alias"]


def test_requests_answer_by_id_with_tree_and_tensor_state(shell, net):
    comm = FakeComm()
    session = sidebar.SidebarSession(shell, comm)
    try:
        data, buffers = comm.deliver({"id": "a", "kind": "tree", "model": "net"})
        assert data["id"] == "a" and data["ok"] is True
        names = [name.rsplit(".", 1)[-1] for name, _ in net._module.named_modules()]
        assert data["state"]["names"][1:] == names[1:]
        assert len(buffers) == len(data["buffer_paths"])

        data, buffers = comm.deliver({"id": "b", "kind": "open", "name": "hidden"})
        assert data["ok"] is True and data["state"]["shape"] == list(shell.user_ns["hidden"].shape)
        data, _ = comm.deliver({"id": "c", "kind": "tiles", "target": "hidden", "index": [0, 0],
                                "rows_axis": 0, "cols_axis": 1, "tiles": [[0, 0]]})
        assert data["id"] == "c"

        data, _ = comm.deliver({"id": "d", "kind": "open", "name": "nothing"})
        assert data == {"id": "d", "ok": False, "error": "KeyError: \"'nothing' is not in the notebook any more\""}
        data, _ = comm.deliver({"id": "e", "kind": "cancel", "job": "no-such-job"})
        assert data["ok"] is False and "was not submitted from this kernel" in data["error"]
    finally:
        session.close()


def test_snapshots_follow_cells_only_while_the_sidebar_is_open(shell, net, no_remote_settings, live_server,
                                                               monkeypatch):
    from nnsight_jupyter.settings import CONFIG

    monkeypatch.setattr(CONFIG, "host", live_server.url)
    monkeypatch.setattr(CONFIG, "sidebar_poll", 0.1)
    comm = FakeComm()
    session = sidebar.SidebarSession(shell, comm)
    shell.run_cell("x_sidebar = 1")
    assert comm.sent and comm.sent[-1][0]["event"] == "snapshot"
    wait_for(lambda: comm.events("health"))  # the watcher runs while the comm is open
    requests_before = live_server.health_requests()
    assert requests_before >= 1
    comm.closer({})
    session.watcher.join(timeout=5)
    assert not session.watcher.is_alive()
    count = len(comm.sent)
    shell.run_cell("x_sidebar = 2")
    time.sleep(0.5)  # five intervals
    assert len(comm.sent) == count
    assert live_server.health_requests() == requests_before  # closed: not one request to the server
    assert session not in sidebar._sessions
    shell.user_ns.pop("x_sidebar", None)


def test_jobs_show_the_server_status_and_cancel_asks_the_server():
    class Client:
        host = "http://server"

        def __init__(self) -> None:
            self.states = {"j1": {"status": "queued", "position": 1}, "j2": {"status": "error",
                                                                           "error": {"message": "out of memory"}}}

        def status(self, job_id):
            return self.states[job_id]

        def cancel(self, job_id):
            self.states[job_id] = {"status": "cancelled"}
            return {"job_id": job_id, "status": "cancelled"}

    from nnsight_jupyter.remote.client import JobHandle

    client = Client()
    submitted.clear()
    try:
        submitted.record(JobHandle(client, "j1", "tiny"))
        submitted.record(JobHandle(client, "j2", "tiny"))
        jobs = sidebar.job_list()
        assert [(j["job_id"], j["status"], j["position"], j["error"]) for j in jobs] == [
            ("j2", "error", None, "out of memory"),
            ("j1", "queued", 1, None),
        ]
        answer = sidebar.cancel_job("j1")
        assert answer["status"] == "cancelled" and client.states["j1"] == {"status": "cancelled"}
    finally:
        submitted.clear()


@pytest.fixture
def no_remote_settings(monkeypatch, tmp_path):
    """No host from this machine's environment or config file, and a daemon folder of the test's own."""
    from nnsight_jupyter.settings import CONFIG

    monkeypatch.setattr(CONFIG, "host", None)
    monkeypatch.delenv("NNSIGHT_JUPYTER_HOST", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("NNSIGHT_JUPYTER_DAEMON_DIR", str(tmp_path / "daemon"))
    submitted.clear()
    yield tmp_path / "daemon"
    submitted.clear()


def test_remote_hosts_are_the_configured_server_or_the_local_daemon_then_those_jobs_went_to(no_remote_settings):
    import json

    from nnsight_jupyter.remote.client import JobHandle
    from nnsight_jupyter.settings import CONFIG

    class Client:
        def __init__(self, host: str) -> None:
            self.host = host

    assert sidebar.remote_hosts() == []
    no_remote_settings.mkdir()
    (no_remote_settings / "daemon.json").write_text(json.dumps({"port": 4567, "pid": 1, "api_key": "k"}))
    assert sidebar.remote_hosts() == [{"host": "http://127.0.0.1:4567", "source": "local daemon"}]
    CONFIG.host = "http://server:8000/"
    submitted.record(JobHandle(Client("http://server:8000"), "j1", "tiny"))
    submitted.record(JobHandle(Client("http://other:9000"), "j2", "tiny"))
    assert sidebar.remote_hosts() == [
        {"host": "http://server:8000", "source": "configured"},
        {"host": "http://other:9000", "source": "jobs"},
    ]
    assert sidebar.snapshot(type("Shell", (), {"user_ns": {}})())["remote"] == sidebar.remote_hosts()


class Served:
    """The real server app under uvicorn on 127.0.0.1, in a thread of this process, counting its `/health` GETs."""

    def __init__(self, folder) -> None:
        import threading

        import uvicorn

        from nnsight_jupyter.remote.server.app import create_app

        from ..remote.server.conftest import free_port, make_config

        app = create_app(make_config(folder, None))
        self._health = 0

        async def counting(scope, receive, send):
            if scope["type"] == "http" and scope["path"] == "/health":
                self._health += 1
            await app(scope, receive, send)

        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.uv = uvicorn.Server(uvicorn.Config(counting, host="127.0.0.1", port=port, log_level="warning",
                                                timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.uv.run, daemon=True)
        self.thread.start()
        wait_for(lambda: self.uv.started or not self.thread.is_alive(), 30)
        assert self.uv.started, "uvicorn did not start"

    def health_requests(self) -> int:
        return self._health

    def stop(self) -> None:
        self.uv.should_exit = True
        self.thread.join(timeout=15)


def wait_for(done, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while not (value := done()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
    return value


@pytest.fixture
def live_server(tmp_path):
    served = Served(tmp_path / "server")
    yield served
    served.stop()


@pytest.fixture
def stranger():
    """An HTTP server that is not an nnsight-jupyter server: every path is 404."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class NotFound(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the standard library's name
            self.send_error(404)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_health_says_which_servers_answer_with_their_versions(live_server, stranger):
    import httpx

    import nnsight_jupyter
    from nnsight_jupyter.remote.protocol import PROTOCOL_VERSION

    from ..remote.server.conftest import free_port

    closed = f"http://127.0.0.1:{free_port()}"
    url = live_server.url
    rows = sidebar.health([{"host": url, "source": "configured"}, {"host": closed, "source": "jobs"},
                           {"host": stranger, "source": "jobs"}])
    ok, down, other = rows
    assert httpx.get(f"{url}/health").json()["package_version"] == nnsight_jupyter.__version__
    assert ok == {"host": url, "source": "configured", "status": "ok", "error": None,
                  "package_version": nnsight_jupyter.__version__, "protocol_version": PROTOCOL_VERSION}
    assert down["status"] == "unreachable"
    assert down["error"].startswith(f"nothing listens at {closed.removeprefix('http://')} (connection refused). ")
    assert "Errno" not in down["error"]
    assert f"Jobs of this kernel went to {closed}, which no longer answers" in down["error"]
    assert other["status"] == "error" and "HTTP 404" in other["error"] and "nnsight-jupyter server" in other["error"]
    bad = sidebar.health([{"host": "not a url", "source": "configured"}])[0]
    assert bad["status"] == "unreachable" and bad["error"].startswith("'not a url' is not a server address")
    # Each way the sidebar learns of a server says what to do when it does not answer.
    stopped, configured = sidebar.health([{"host": closed, "source": "local daemon"},
                                          {"host": closed, "source": "configured"}])
    assert stopped["status"] == "unreachable" and "the next remote=True trace starts it again" in stopped["error"]
    assert configured["status"] == "unreachable"
    assert f"Start the server at {closed}" in configured["error"] and "%nnsight config host=URL" in configured["error"]


def test_health_of_a_server_that_never_answers_says_so():
    """A socket that accepts connections but never answers: the row says so after the health timeout."""
    import socket

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        where = "127.0.0.1:%d" % silent.getsockname()[1]
        [row] = sidebar.health([{"host": f"http://{where}", "source": "configured"}])
    assert row["status"] == "unreachable"
    assert row["error"].startswith(f"no answer from {where} within {sidebar.HEALTH_TIMEOUT_S:g} s. Start the server")


def test_a_health_request_is_answered_by_id_from_a_thread(shell, no_remote_settings, stranger):
    from nnsight_jupyter.settings import CONFIG

    CONFIG.host = stranger
    comm = FakeComm()
    session = sidebar.SidebarSession(shell, comm)
    try:
        comm.handler({"content": {"data": {"id": "h", "kind": "health"}}})
        deadline = time.monotonic() + 10
        while not any(data.get("id") == "h" for data, _ in comm.sent):
            assert time.monotonic() < deadline, comm.sent
            time.sleep(0.02)
        answer = next(data for data, _ in comm.sent if data.get("id") == "h")
        assert answer["ok"] is True
        assert [(h["host"], h["status"]) for h in answer["hosts"]] == [(stranger, "error")]
    finally:
        session.close()


def test_the_kernel_checks_the_version_the_extension_opens_the_comm_with(shell):
    import nnsight_jupyter

    ours = nnsight_jupyter.__version__
    comm = FakeComm()
    sidebar._open_handler(shell)(comm, {"content": {"data": {"protocol": sidebar.PROTOCOL, "version": "9.9.9"}}})
    try:
        text = comm.sent[-1][0]["mismatch"]
        assert "extension 9.9.9" in text and f"nnsight-jupyter {ours}" in text and "pip install -U" in text
    finally:
        for session in list(sidebar._sessions):
            session.close()
    for opened_with, differs in [({"protocol": sidebar.PROTOCOL, "version": ours}, False),
                                 ({"protocol": sidebar.PROTOCOL, "version": f"{ours}+local.3"}, False),
                                 ({"protocol": sidebar.PROTOCOL + 1, "version": ours}, True),
                                 ({}, False)]:  # an extension that does not say: only its own check runs
        session = sidebar.SidebarSession(shell, FakeComm(), opened_with)
        try:
            assert (session.snapshot()["mismatch"] is not None) == differs, opened_with
        finally:
            session.close()


def test_health_and_jobs_keep_coming_while_a_cell_runs(shell, no_remote_settings, live_server, monkeypatch):
    """A busy kernel reads no request, so the watcher thread pushes what changes during a cell."""
    import threading

    import httpx

    import nnsight_jupyter
    from nnsight_jupyter.remote.client import JobHandle
    from nnsight_jupyter.settings import CONFIG

    class Client:  # stands for the job's server: its answers are what the sidebar must show
        host = live_server.url

        def __init__(self) -> None:
            self.states = {job: {"status": "running"}}

        def status(self, job_id):
            return dict(self.states[job_id])

    job = f"job-{uuid.uuid4().hex}"
    client = Client()
    submitted.record(JobHandle(client, job, "tiny"))
    monkeypatch.setattr(CONFIG, "host", live_server.url)
    monkeypatch.setattr(CONFIG, "sidebar_poll", 0.2)
    version = httpx.get(f"{live_server.url}/health").json()["package_version"]
    assert version == nnsight_jupyter.__version__

    comm = FakeComm()
    session = sidebar.SidebarSession(shell, comm)
    stopped = threading.Event()

    def meanwhile():  # while the cell sleeps: see the server healthy, then stop it and finish the job
        wait_for(lambda: any(h["status"] == "ok" for e in comm.events("health", began) for h in e["hosts"]))
        wait_for(lambda: comm.events("jobs", began))
        live_server.stop()
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{live_server.url}/health")
        client.states[job] = {"status": "completed"}
        stopped.set()

    try:
        began = time.monotonic()
        other = threading.Thread(target=meanwhile, daemon=True)
        other.start()
        shell.run_cell("import time\ntime.sleep(4)").raise_error()
        ended = time.monotonic()
        other.join(timeout=10)
        assert stopped.is_set()

        health = [e["hosts"] for e in comm.events("health", began, ended)]
        assert all(len(hosts) == 1 for hosts in health), health
        # first as the server answered before it stopped, last as it is now (nothing listens)
        assert health[0][0]["status"] == "ok" and health[0][0]["package_version"] == version
        assert health[-1][0]["status"] == "unreachable"
        assert health[-1][0]["host"] == live_server.url and "nothing listens at" in health[-1][0]["error"]
        assert f"Start the server at {live_server.url}" in health[-1][0]["error"]  # what to do about it
        jobs = [[(j["job_id"], j["status"]) for j in e["jobs"]] for e in comm.events("jobs", began, ended)]
        assert jobs == [[(job, "running")], [(job, "completed")]]
    finally:
        session.close()


def test_the_poll_interval_is_a_setting_and_a_bad_one_says_what_to_set(shell, monkeypatch):
    from nnsight_jupyter.settings import CONFIG

    monkeypatch.setattr(CONFIG, "sidebar_poll", None)
    shell.run_cell("%nnsight config sidebar_poll=0.5").raise_error()
    assert CONFIG.resolved_sidebar_poll() == 0.5
    for bad in ("0", "-1", "soon", "inf", "nan"):
        error = str(shell.run_cell(f"%nnsight config sidebar_poll={bad}").error_in_exec)
        assert f"sidebar_poll is {bad!r}" in error and "positive number of seconds" in error, error
        assert CONFIG.sidebar_poll == 0.5  # left as it was
