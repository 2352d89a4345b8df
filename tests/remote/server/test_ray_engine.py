"""The Ray engine (``serve --engine ray``) on a local Ray instance: replicas as actors, faults,
scaling and unloading. The remote client suite and the escape corpus also run against it
(``engine_server`` in ``test_client.py`` and ``test_escapes.py``)."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from starlette.testclient import TestClient

from nnsight_jupyter.models.language import LanguageModel
from nnsight_jupyter.remote.execute import run_request
from nnsight_jupyter.remote.protocol import TraceRequest
from nnsight_jupyter.remote.server.app import create_app
from nnsight_jupyter.remote.server.auth import create_api_key
from nnsight_jupyter.remote.server.config import parse_model_specs

from .conftest import TINY, Client, _wait_ready, make_config, serve_live, threads_like_workers, tokens, trace_request
from .tiny_models import tiny_gpt2

RAY = dict(engine="ray", replica_cpus=1.0, replica_memory_bytes=1024 * 2**20)
NORMAL = "h = model.transformer.h[1].output.save()\nlogits = model.lm_head.output.save()"
# About a second of work in a job.
LOOP = 15_000_000
BUSY = f"total = 0\nfor i in range({LOOP}):\n    total += i\nh = model.transformer.h[1].output.save()"


def models(http: httpx.Client, headers: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in http.get("/models", headers=headers or {}).json()["models"]}


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"{what} did not happen within {timeout} s")


def expected(source: str, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    with threads_like_workers():
        result = run_request(tiny_gpt2(), trace_request(source, inputs))
    assert result.error is None, result.error
    return result.saved


def busy_expected(inputs: torch.Tensor) -> dict[str, Any]:
    """What BUSY saves, without running its loop here: the block output, the loop's sum and last index."""
    return {"h": expected(NORMAL, inputs)["h"], "total": LOOP * (LOOP - 1) // 2, "i": LOOP - 1}


def assert_equal_saved(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name in want:
        if isinstance(want[name], torch.Tensor):
            assert torch.equal(got[name], want[name]), name
        else:
            assert got[name] == want[name], name


@pytest.mark.slow
def test_two_smollm2_replicas_serve_50_concurrent_jobs_from_5_clients_bit_identical_to_local(tmp_path, ray_instance):
    keys = tmp_path / "keys.txt"
    users = [create_api_key(keys, f"user{i}") for i in range(5)]
    config = make_config(tmp_path / "data", keys, models=parse_model_specs("smollm2"), max_job_memory_bytes=2 * 2**30,
                         model_replicas=(("smollm2", 2),), **{**RAY, "replica_memory_bytes": 3 * 2**30})
    prompts = [f"Fact {i}: the capital of {country} is" for i, country in
               enumerate(["France", "Italy", "Spain", "Japan", "Peru", "Chile", "Kenya", "Egypt", "Nepal", "Laos"])]
    source = "h = model.model.layers[7].output[0, -1].save()\nlogits = model.lm_head.output[0, -1].save()"

    def request(i: int) -> TraceRequest:
        return TraceRequest("smollm2", source, {"kind": "trace", "inputs": [prompts[i % len(prompts)]]})

    results: dict[tuple[int, int], Any] = {}
    errors: list[BaseException] = []
    with serve_live(config, users[0], ready_timeout=240.0) as first:
        base = str(first.http.base_url)
        info = models(first.http, first.headers)["smollm2"]
        assert [r["engine"] for r in info["replicas"]] == ["ray", "ray"]
        assert len({r["actor_pid"] for r in info["replicas"]}) == 2

        def user(u: int) -> None:
            try:
                with httpx.Client(base_url=base, timeout=120) as http:
                    client = Client(http, users[u])
                    ids = [client.submit(request(u * 10 + j)) for j in range(10)]
                    for j, job_id in enumerate(ids):
                        status = client.wait(job_id, timeout=240)
                        assert status["status"] == "completed", status.get("error")
                        results[u, j] = client.result(job_id)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=user, args=(u,)) for u in range(5)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        assert not errors, errors
        served = models(first.http, first.headers)["smollm2"]["replicas"]
    assert len(results) == 50
    assert sum(r["jobs_done"] for r in served) == 50
    assert all(r["jobs_done"] > 0 for r in served), served  # both replicas took jobs
    local_model = LanguageModel("smollm2")
    with threads_like_workers():
        local = [run_request(local_model, request(i)) for i in range(len(prompts))]
    for (u, j), result in results.items():
        assert result.error is None, result.error
        assert_equal_saved(result.saved, local[(u * 10 + j) % len(prompts)].saved)


def test_a_killed_replica_is_replaced_and_its_job_runs_again_once_or_fails_saying_why(tmp_path, ray_instance):
    config = make_config(tmp_path, None, max_job_seconds=60.0, **RAY)
    with TestClient(create_app(config), raise_server_exceptions=False) as http:
        client = Client(http, "unused")
        _wait_ready(http, {}, timeout=180)

        def kill_when_running(job_id: str, killed: int | None = None) -> int:
            """SIGKILL the replica's actor a moment into its run of the job (which takes about a second)."""
            replica = wait_for(lambda: next((r for r in models(http)["tiny"]["replicas"]
                                             if r["state"] == "busy" and r["job"] == job_id
                                             and r["actor_pid"] not in (None, killed)), None), 120,
                               "the job running on a replica")
            time.sleep(0.3)
            pid = replica["actor_pid"]
            os.kill(pid, signal.SIGKILL)
            return pid

        # Killed once: the job goes back to the front of the queue and runs on the new actor.
        job_id = client.submit(trace_request(BUSY, tokens(5), timeout=60))
        first_pid = kill_when_running(job_id)
        status = client.wait(job_id, timeout=120)
        assert status["status"] == "completed", status
        assert_equal_saved(client.result(job_id).saved, busy_expected(tokens(5)))
        requeued = [e for e in client.events(job_id) if e.get("requeued")]
        assert len(requeued) == 1 and "ended" in requeued[0]["reason"], client.events(job_id)
        replica = models(http)["tiny"]["replicas"][0]
        assert replica["restarts"] == 1 and replica["actor_pid"] not in (None, first_pid)

        # Killed on both runs: it fails, naming what happened; nothing stays running.
        job_id = client.submit(trace_request(BUSY, tokens(6), timeout=60))
        kill_when_running(job_id, kill_when_running(job_id))
        status = client.wait(job_id, timeout=120)
        assert status["status"] == "error", status
        assert status["error"]["type"] == "WorkerDied"
        assert "had already been run again once" in status["error"]["message"]

        # The next jobs succeed on the replaced replica.
        wait_for(lambda: models(http)["tiny"]["replicas"][0]["state"] == "ready", 120, "a new actor")
        for seed in (7, 8):
            assert_equal_saved(client.run(trace_request(NORMAL, tokens(seed))).saved, expected(NORMAL, tokens(seed)))
        assert models(http)["tiny"]["running"] == 0


def test_a_replica_that_stops_answering_is_replaced_and_its_job_runs_again(tmp_path, ray_instance, monkeypatch):
    """SIGSTOP freezes the actor mid-job; past the job's time limit, the cancel grace and the engine's
    answer grace it is killed (its loader and job processes with it) and the job runs again."""
    from nnsight_jupyter.remote.server import ray_engine

    monkeypatch.setattr(ray_engine, "_ANSWER_GRACE_S", 1.0)
    config = make_config(tmp_path, None, max_job_seconds=60.0, **RAY)
    with TestClient(create_app(config), raise_server_exceptions=False) as http:
        client = Client(http, "unused")
        _wait_ready(http, {}, timeout=180)
        job_id = client.submit(trace_request(BUSY, tokens(4), timeout=5))
        replica = wait_for(lambda: next((r for r in models(http)["tiny"]["replicas"]
                                         if r["state"] == "busy" and r["job"] == job_id), None), 60, "the job running")
        time.sleep(0.3)
        os.kill(replica["actor_pid"], signal.SIGSTOP)
        try:
            status = client.wait(job_id, timeout=120)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(replica["actor_pid"], signal.SIGCONT)
        assert status["status"] == "completed", status
        assert_equal_saved(client.result(job_id).saved, busy_expected(tokens(4)))
        requeued = [e for e in client.events(job_id) if e.get("requeued")]
        assert len(requeued) == 1 and "stopped answering" in requeued[0]["reason"], requeued
        for pid in (replica["actor_pid"], replica["pid"]):  # the actor and the loader it started
            wait_for(lambda pid=pid: not Path(f"/proc/{pid}").exists() or "Z" in _state(pid), 30, f"{pid} ending")


def _state(pid: int) -> str:
    """A process's state letter from /proc (Z: ended, waiting for its parent to collect it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return "Z"


def test_a_long_queue_adds_a_replica_which_stops_when_idle(tmp_path, ray_instance):
    config = make_config(tmp_path, None, max_job_seconds=60.0, max_replicas=2, scale_up_wait_s=0.5,
                         idle_replica_s=2.0, **RAY)
    with TestClient(create_app(config), raise_server_exceptions=False) as http:
        client = Client(http, "unused")
        _wait_ready(http, {}, timeout=180)
        assert len(models(http)["tiny"]["replicas"]) == 1
        ids = [client.submit(trace_request(BUSY, tokens(i), timeout=60)) for i in range(12)]
        added = wait_for(lambda: [r for r in models(http)["tiny"]["replicas"] if r["extra"]], 60, "a replica added")
        assert len(added) == 1 and added[0]["replica"] == "tiny#1"
        pid = wait_for(lambda: next((r["actor_pid"] for r in models(http)["tiny"]["replicas"] if r["extra"]), None),
                       60, "the added replica loading")
        assert all(client.wait(job_id, timeout=180)["status"] == "completed" for job_id in ids)
        workers = [[e["worker"] for e in client.events(job_id) if e["type"] == "running"] for job_id in ids]
        assert all(len(w) == 1 for w in workers), workers
        assert {w[0] for w in workers} == {"tiny#0", "tiny#1"}, workers  # both replicas took jobs
        for i, job_id in enumerate(ids):
            assert_equal_saved(client.result(job_id).saved, busy_expected(tokens(i)))
        wait_for(lambda: len(models(http)["tiny"]["replicas"]) == 1, 30, "the idle replica stopping")
        wait_for(lambda: not Path(f"/proc/{pid}").exists(), 30, "the idle replica's actor ending")
        assert_equal_saved(client.run(trace_request(NORMAL, tokens(3))).saved, expected(NORMAL, tokens(3)))


def test_models_unload_when_unused_or_past_the_memory_budget_and_reload_on_demand(tmp_path, ray_instance):
    """Two models, a budget of one replica: a job for the other model unloads the idle one; a job
    for an unloaded model shows ``loading``; a model left unused for ``--unload-after`` unloads."""
    config = make_config(tmp_path, None, models=parse_model_specs(f"{TINY},{TINY.replace('tiny=', 'other=')}"),
                         memory_budget_bytes=RAY["replica_memory_bytes"], unload_after_s=4.0, **RAY)

    def states() -> dict[str, str]:
        return {name: m["state"] for name, m in models(http).items()}

    def run_seen(model: str, seed: int) -> list[str]:
        job_id = client.submit(trace_request(NORMAL, tokens(seed), model=model))
        seen = []
        while True:
            status = client.status(job_id)["status"]
            if not seen or seen[-1] != status:
                seen.append(status)
            if status in ("completed", "error", "cancelled"):
                break
            time.sleep(0.02)
        assert seen[-1] == "completed", seen
        assert_equal_saved(client.result(job_id).saved, expected(NORMAL, tokens(seed)))
        return seen

    with TestClient(create_app(config), raise_server_exceptions=False) as http:
        client = Client(http, "unused")
        wait_for(lambda: states() == {"tiny": "ready", "other": "unloaded"}, 180, "tiny loading within the budget")
        tiny_pid = models(http)["tiny"]["replicas"][0]["actor_pid"]
        assert "loading" not in run_seen("tiny", 1)

        assert "loading" in run_seen("other", 2)  # tiny made room for it
        assert states() == {"tiny": "unloaded", "other": "ready"}
        wait_for(lambda: not Path(f"/proc/{tiny_pid}").exists(), 30, "tiny's actor ending")

        assert "loading" in run_seen("tiny", 3)
        assert states() == {"tiny": "ready", "other": "unloaded"}
        wait_for(lambda: states() == {"tiny": "unloaded", "other": "unloaded"}, 30, "tiny unloading when unused")
        assert "loading" in run_seen("tiny", 4)


def test_serve_joins_a_cluster_started_with_ray_start(tmp_path):
    """`serve --engine ray --ray-address HOST:PORT` on a cluster whose head `ray start` runs (as on a real
    cluster's head machine): the replica is an actor there, and results equal a local run."""
    import subprocess
    import sys

    from .conftest import free_port

    port = free_port()
    ray_cli = str(Path(sys.executable).with_name("ray"))
    # As docs/ray.md starts a cluster: Ray's token authentication on, one token on every machine (here in
    # Ray's environment variable instead of ~/.ray/auth_token, which the test leaves alone).
    import secrets

    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    head = subprocess.Popen([ray_cli, "start", "--head", f"--port={port}", "--num-cpus=2", "--disable-usage-stats",
                             "--include-dashboard=false", "--block"],
                            stdout=(tmp_path / "ray.log").open("wb"), stderr=subprocess.STDOUT,
                            env=env)
    keys = tmp_path / "keys.txt"
    key = create_api_key(keys, "alice")
    server = None
    try:
        ray_log = tmp_path / "ray.log"
        wait_for(lambda: "will now block forever" in ray_log.read_text(errors="replace") or head.poll() is not None,
                 180, "ray start")
        assert head.poll() is None, ray_log.read_text()[-2000:]
        import re

        node_ip = re.search(r"Local node IP: (\S+)", ray_log.read_text()).group(1)  # where Ray's head listens
        http_port = free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "nnsight_jupyter.remote.serve", "--models", TINY, "--port", str(http_port),
             "--data-dir", str(tmp_path / "data"), "--api-key-file", str(keys), "--engine", "ray",
             "--ray-address", f"{node_ip}:{port}", "--replica-memory-mb", "1024", "--max-job-memory-mb", "768",
             "--threads", "1", "--log-level", "warning"],
            cwd=Path(__file__).resolve().parents[3], stdout=subprocess.DEVNULL,
            stderr=(tmp_path / "server.log").open("wb"),
            env={**env, "PYTHONPATH": str(Path(__file__).resolve().parents[3])})
        with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=30) as http:
            client = Client(http, key)

            def ready() -> bool:
                assert server.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
                try:
                    return models(http, client.headers)["tiny"]["state"] == "ready"
                except httpx.HTTPError:
                    return False

            wait_for(ready, 180, "the server joining the cluster", interval=0.3)
            replica = models(http, client.headers)["tiny"]["replicas"][0]
            assert replica["engine"] == "ray"
            # The actor is a worker process of the cluster `ray start` runs, not of the server.
            assert Path(f"/proc/{replica['actor_pid']}").exists()
            assert _parent_chain_has(replica["actor_pid"], head.pid)
            assert not _parent_chain_has(replica["actor_pid"], server.pid)
            for seed in (1, 2):
                assert_equal_saved(client.run(trace_request(NORMAL, tokens(seed))).saved,
                                   expected(NORMAL, tokens(seed)))
    finally:
        for process in (server, head):
            if process is not None and process.poll() is None:
                process.terminate()
                try:
                    process.wait(60)
                except subprocess.TimeoutExpired:
                    process.kill()


def _parent_chain_has(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, IndexError, ValueError):
            return False
    return False
