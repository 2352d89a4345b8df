"""With no host configured, `remote=True` starts a local backend daemon and reuses it."""

from __future__ import annotations

import json

import torch

from nnsight_jupyter import LanguageModel
from nnsight_jupyter.remote import daemon
from nnsight_jupyter.remote.config import ENV_API_KEY, ENV_HOST


def test_remote_without_a_host_uses_a_local_daemon(tmp_path, monkeypatch):
    monkeypatch.setenv("NNSIGHT_JUPYTER_DAEMON_DIR", str(tmp_path / "daemon"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv(ENV_HOST, raising=False)
    monkeypatch.delenv(ENV_API_KEY, raising=False)
    model = LanguageModel("smollm2")
    prompt = "The capital of France is"
    try:
        with model.trace(prompt, remote=True):
            remote_logits = model.lm_head.output[0, -1].save()
        first = json.loads((tmp_path / "daemon" / "daemon.json").read_text())
        assert first["models"] == ["smollm2"]
        assert (tmp_path / "daemon" / "daemon.json").stat().st_mode & 0o077 == 0
        with model.trace(prompt, remote=True):
            again = model.lm_head.output[0, -1].save()
        assert json.loads((tmp_path / "daemon" / "daemon.json").read_text())["pid"] == first["pid"]
    finally:
        daemon.stop_daemon()
    with torch.no_grad(), model.trace(prompt):
        local_logits = model.lm_head.output[0, -1].save()
    assert torch.equal(remote_logits, local_logits)
    assert torch.equal(again, local_logits)
    assert model.tokenizer.decode(int(remote_logits.argmax())) == " Paris"


def _fake_daemons(monkeypatch, tmp_path, busy: bool):
    """Daemons that are state only: starting one takes a moment and is recorded in `started.txt`."""
    import os
    import time

    monkeypatch.setenv("NNSIGHT_JUPYTER_DAEMON_DIR", str(tmp_path / "daemon"))
    live: set[int] = set()

    def start(models, *, name=""):
        time.sleep(0.5)  # long enough for a second starter to arrive while this one holds the lock
        port = 40000 + len(live) + 100 * os.getpid() % 1000
        with open(tmp_path / "started.txt", "a") as handle:
            handle.write(f"{os.getpid()} {','.join(models)} {name}\n")
        live.add(port)
        return {"pid": os.getpid(), "port": port, "api_key": f"key-{port}", "models": models}

    monkeypatch.setattr(daemon, "start_daemon", start)
    monkeypatch.setattr(daemon, "_alive", lambda state: True)
    monkeypatch.setattr(daemon, "_busy", lambda state: busy)
    monkeypatch.setattr(daemon, "_kill", lambda state: (tmp_path / "killed.txt").open("a").write(f"{state['port']}\n"))


def test_two_kernels_starting_at_once_get_one_daemon_and_one_key(tmp_path, monkeypatch):
    import multiprocessing

    _fake_daemons(monkeypatch, tmp_path, busy=False)
    context = multiprocessing.get_context("fork")
    answers = context.Queue()

    def kernel():
        client = daemon.local_daemon_client("m")
        answers.put((client.host, client.api_key))

    kernels = [context.Process(target=kernel) for _ in range(2)]
    for process in kernels:
        process.start()
    got = [answers.get(timeout=30) for _ in kernels]
    for process in kernels:
        process.join(timeout=30)
    assert got[0] == got[1]
    assert len((tmp_path / "started.txt").read_text().splitlines()) == 1


def test_adding_a_model_does_not_restart_a_daemon_with_jobs(tmp_path, monkeypatch):
    _fake_daemons(monkeypatch, tmp_path, busy=True)
    first = daemon.local_daemon_client("m")
    second = daemon.local_daemon_client("other")
    assert second.host != first.host and not (tmp_path / "killed.txt").exists()
    assert daemon.local_daemon_client("m").host == first.host
    assert daemon.local_daemon_client("other").host == second.host
    state = json.loads((tmp_path / "daemon" / "daemon.json").read_text())
    assert state["models"] == ["m"] and [d["models"] for d in state["others"]] == [["other"]]


def test_adding_a_model_to_an_idle_daemon_restarts_it_with_both(tmp_path, monkeypatch):
    _fake_daemons(monkeypatch, tmp_path, busy=False)
    first = daemon.local_daemon_client("m")
    second = daemon.local_daemon_client("other")
    assert (tmp_path / "killed.txt").read_text().split() == [first.host.rsplit(":", 1)[1]]
    state = json.loads((tmp_path / "daemon" / "daemon.json").read_text())
    assert state["models"] == ["m", "other"] and second.host.endswith(str(state["port"]))
