"""Kill -9 the server with jobs queued, one running and a small and a large one just finished; restart on
the same folder; nothing is lost."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from .conftest import TINY, Client, free_port, trace_request

ROOT = Path(__file__).resolve().parents[3]
SLOW = "t = 0\nfor i in range(4_000_000):\n    t += i\nx = t\n"
# A 2 MiB result: one of those kept in files.
BIG = "import torch\nx = (torch.arange(2**19, dtype=torch.float32) * 3).save()\n"


def _start(data_dir: Path, key_file: Path, port: int, engine: str = "local") -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "nnsight_jupyter.remote.serve", "--models", TINY, "--port", str(port),
         "--data-dir", str(data_dir), "--api-key-file", str(key_file), "--threads", "1", "--log-level", "warning",
         "--engine", engine],
        # A file, not a pipe nobody reads while the server runs: a full pipe would stall its logging.
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=(data_dir.parent / f"server-{port}.log").open("ab"),
    )


def _ready(http: httpx.Client, headers: dict[str, str], process: subprocess.Popen, timeout: float = 180) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log = Path(process.stderr.name).read_text(errors="replace")
            raise AssertionError(f"the server exited: {log[-2000:]}")
        try:
            models = http.get("/models", headers=headers).json()["models"]
            if models[0]["state"] == "ready":
                return models
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError("the server did not become ready")


def _gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_kill_9_loses_no_job(tmp_path, key_file, engine):
    """On the Ray engine the server starts its own Ray instance, whose processes and actors die with it."""
    port = free_port()
    data_dir = tmp_path / "data"
    first = _start(data_dir, key_file[0], port, engine)
    second = None
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            client = Client(http, key_file[1])
            models = _ready(http, client.headers, first)
            worker_pid = models[0]["replicas"][0]["pid"]
            actor_pid = models[0]["replicas"][0].get("actor_pid")
            assert (actor_pid is not None) == (engine == "ray")
            done = client.submit(trace_request("x = 'finished just before the kill'"))
            big = client.submit(trace_request(BIG))
            slow = client.submit(trace_request(SLOW))
            quick = [client.submit(trace_request(f"x = {i} * 2")) for i in range(8)]
            deadline = time.monotonic() + 30
            while client.status(slow)["status"] != "running":
                assert time.monotonic() < deadline
                time.sleep(0.01)
            assert all(client.status(j)["status"] == "queued" for j in quick)
            assert client.status(done)["status"] == "completed" and client.status(big)["status"] == "completed"
            # Downloaded before the kill, so served from the server's memory; the same bytes must come
            # from disk after it.
            before = client.http.get(f"/jobs/{big}/result", headers=client.headers)
            assert before.status_code == 200 and len(before.content) >= 2**21
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=10)
            assert _gone(worker_pid), "the worker outlived the killed server"
            assert actor_pid is None or _gone(actor_pid), "the replica's Ray actor outlived the killed server"

            second = _start(data_dir, key_file[0], port, engine)
            _ready(http, client.headers, second)
            # A Ray-engine server starts a Ray instance and an actor before its first job: more to wait for.
            patience = 180 if engine == "ray" else 60
            status = client.wait(slow, timeout=patience)
            assert status["status"] == "completed" and status["attempts"] == 2, (status["error"], status["attempts"])
            assert client.result(slow).saved["x"] == sum(range(4_000_000))
            requeued = [e for e in client.events(slow) if e.get("requeued")]
            assert len(requeued) == 1 and "restarted" in requeued[0]["reason"]
            for i, job_id in enumerate(quick):
                assert client.wait(job_id, timeout=patience)["status"] == "completed"
                assert client.result(job_id).saved["x"] == i * 2
            assert client.result(done).saved["x"] == "finished just before the kill"
            after = client.http.get(f"/jobs/{big}/result", headers=client.headers)
            assert after.status_code == 200 and after.content == before.content
            assert torch.equal(client.result(big).saved["x"], torch.arange(2**19, dtype=torch.float32) * 3)
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()


def test_a_second_server_on_the_same_folder_is_refused(tmp_path, key_file):
    from nnsight_jupyter.remote.server.jobs import DataDirInUse, JobStore

    store = JobStore(tmp_path / "jobs.sqlite3", clock=time.time)
    try:
        with pytest.raises(DataDirInUse, match="--data-dir"):
            JobStore(tmp_path / "jobs.sqlite3", clock=time.time)
    finally:
        store.close()
    JobStore(tmp_path / "jobs.sqlite3", clock=time.time).close()
