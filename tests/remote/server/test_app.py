"""The endpoints, in-process through Starlette's TestClient against the real app and workers."""

from __future__ import annotations

import threading
import time

import msgpack
import torch
from starlette.testclient import TestClient

from nnsight_jupyter import _version
from nnsight_jupyter.remote.execute import run_request
from nnsight_jupyter.remote.protocol import PROTOCOL_VERSION, decode_result, encode_request
from nnsight_jupyter.remote.server.app import create_app
from nnsight_jupyter.remote.server.config import parse_model_specs

from .conftest import MSGPACK, Client, FakeClock, make_config, tokens, trace_request
from .tiny_models import tiny_gpt2

BUSY = "while True:\n    pass"


def test_health_needs_no_key_and_names_versions(server: Client):
    response = server.http.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "protocol_version": PROTOCOL_VERSION,
                               "package_version": _version.__version__}


def test_models_lists_state_and_sandbox(server: Client):
    models = server.http.get("/models", headers=server.headers).json()["models"]
    assert [m["name"] for m in models] == ["tiny"]
    tiny = models[0]
    assert tiny["state"] == "ready" and tiny["reason"] is None
    replica = tiny["replicas"][0]
    assert replica["pid"] and "audit hook" in replica["sandbox"]["active"]


def test_trace_matches_a_local_run(server: Client):
    source = ("h = model.transformer.h[0].output\nh[:, -1] = 0\nout = model.lm_head.output.save()\n"
              "n = h.norm().item()\nprint('norm', round(n, 3))\n")
    request = trace_request(source, tokens(5, batch=2))
    job_id = server.submit(request)
    status = server.wait(job_id)
    assert status["status"] == "completed" and status["error"] is None
    assert status["started_at"] and status["finished_at"] and status["result"]["bytes"] > 0
    remote = server.result(job_id)
    local = run_request(tiny_gpt2(), request)
    assert remote.error is None
    assert torch.equal(remote.saved["out"], local.saved["out"])
    assert remote.saved["n"] == local.saved["n"]
    assert remote.logs == local.logs == [f"norm {round(local.saved['n'], 3)}"]


def test_events_stream_lifecycle_and_resume(server: Client):
    job_id = server.submit(trace_request("print('one')\nprint('two')\nx = model.output.logits.save()"))
    server.wait(job_id)
    events = server.events(job_id)
    types = [e["type"] for e in events]
    assert types[0] == "queued" and types[-1] == "completed"
    assert "running" in types and [e["line"] for e in events if e["type"] == "log"] == ["one", "two"]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert server.events(job_id, after=2) == events[2:]
    assert server.events(job_id, headers={"Last-Event-ID": str(len(events) - 1)}) == events[-1:]
    assert server.events(job_id, after=len(events)) == []


def test_events_stream_live_while_the_job_runs(server: Client):
    job_id = server.submit(trace_request("for i in range(3):\n    print(i)\nx = 1", tokens(2)))
    seen = []
    with server.http.stream("GET", f"/jobs/{job_id}/events", headers=server.headers) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("event: "):
                seen.append(line[7:])
    assert seen[-1] == "completed" and seen.count("log") == 3


def test_user_error_comes_back_with_the_users_traceback(server: Client):
    job_id = server.submit(trace_request("x = 1\ny = [1][x + 5]"))
    status = server.wait(job_id)
    assert status["status"] == "error" and status["error"]["type"] == "IndexError"
    result = server.result(job_id)
    assert result.error.type_name == "IndexError"
    assert 'line 2' in result.error.traceback and "y = [1][x + 5]" in result.error.traceback
    final = server.events(job_id)[-1]
    assert final["type"] == "error" and "line 2" in final["error"]["traceback"]


def test_printed_output_is_capped(server: Client):
    job_id = server.submit(trace_request("for i in range(5000):\n    print('x' * 50)"))
    assert server.wait(job_id)["status"] == "completed"
    logs = server.result(job_id).logs
    assert 200 < len(logs) < 400
    assert "output truncated" in logs[-1] and "--max-log-kb" in logs[-1] and "lines dropped" in logs[-1]


def test_unknown_model_lists_the_served_ones(server: Client):
    body = encode_request(trace_request("pass", model="gpt-17"))
    response = server.http.post("/jobs", content=body, headers={**server.headers, **MSGPACK})
    assert response.status_code == 404
    assert response.json()["error"] == "unknown model" and response.json()["models"] == ["tiny"]
    assert "'gpt-17'" in response.json()["detail"]


def test_malformed_body_is_400_with_the_protocol_message(server: Client):
    response = server.http.post("/jobs", content=b"\x93\x01\x02", headers={**server.headers, **MSGPACK})
    assert response.status_code == 400
    assert response.json()["error"] == "malformed request"
    assert "nnsight-jupyter message" in response.json()["detail"]


def test_version_mismatch_names_both_versions(server: Client):
    body = msgpack.packb([PROTOCOL_VERSION + 1, "9.9.9", "request", 1]) + msgpack.packb({})
    response = server.http.post("/jobs", content=body, headers={**server.headers, **MSGPACK})
    assert response.status_code == 409
    data = response.json()
    assert data["error"] == "protocol version mismatch"
    assert data["client_protocol"] == PROTOCOL_VERSION + 1 and data["server_protocol"] == PROTOCOL_VERSION
    assert "9.9.9" in data["detail"] and _version.__version__ in data["detail"]


def test_too_large_body_is_413_naming_the_limit(server: Client):
    body = encode_request(trace_request("pass", torch.zeros(2**20)))
    response = server.http.post("/jobs", content=body, headers={**server.headers, **MSGPACK})
    assert response.status_code == 413
    assert response.json()["limit"] == 2 * 2**20 and "--max-request-mb" in response.json()["detail"]

    def chunks():
        for _ in range(3):
            yield b"\0" * 2**20

    response = server.http.post("/jobs", content=chunks(), headers={**server.headers, **MSGPACK})
    assert response.status_code == 413


def test_wrong_content_type_is_415(server: Client):
    response = server.http.post("/jobs", json={"source": "pass"}, headers=server.headers)
    assert response.status_code == 415 and "application/x-msgpack" in response.json()["detail"]


def test_bad_timeout_option_is_400(server: Client):
    body = encode_request(trace_request("pass", timeout=-3))
    response = server.http.post("/jobs", content=body, headers={**server.headers, **MSGPACK})
    assert response.status_code == 400 and "timeout" in response.json()["detail"]


def test_client_timeout_lowers_the_limit(server: Client):
    job_id = server.submit(trace_request(BUSY, timeout=0.5))
    status = server.wait(job_id)
    assert status["timeout_s"] == 0.5 and status["error"]["type"] == "TimeoutError"
    assert "0.5 s" in status["error"]["message"] and "--max-job-seconds" in status["error"]["message"]


def test_unknown_and_foreign_jobs_are_404(server: Client, key_file):
    job_id = server.submit(trace_request("x = 1"))
    server.wait(job_id)
    bob = {"Authorization": f"Bearer {key_file[2]}"}
    for path in (f"/jobs/{job_id}", f"/jobs/{job_id}/result", f"/jobs/{job_id}/events"):
        assert server.http.get(path, headers=bob).status_code == 404
    assert server.http.post(f"/jobs/{job_id}/cancel", headers=bob).status_code == 404
    for path in ("/jobs/nope", "/jobs/%00%ff", "/jobs/" + "a" * 300):
        response = server.http.get(path, headers=server.headers)
        assert response.status_code == 404 and response.json()["error"] == "unknown job"


def test_unknown_path_and_method_are_json(server: Client):
    response = server.http.get("/nope", headers=server.headers)
    assert response.status_code == 404 and response.json()["error"] == "not found"
    response = server.http.put("/jobs", headers=server.headers)
    assert response.status_code == 405 and response.json()["error"] == "method not allowed"


def _wait_for(server: Client, job_id: str, state: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while server.status(job_id)["status"] != state:
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} never became {state}")
        time.sleep(0.02)


def test_cancel_queued_and_running_jobs(server: Client):
    running = server.submit(trace_request(BUSY, timeout=20))
    queued = server.submit(trace_request("x = 1"))
    _wait_for(server, running, "running")
    status = server.status(queued)
    assert status["status"] == "queued" and status["position"] == 1
    response = server.http.post(f"/jobs/{queued}/cancel", headers=server.headers)
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    assert server.events(queued)[-1]["type"] == "cancelled"
    result = server.http.get(f"/jobs/{queued}/result", headers=server.headers)
    assert result.status_code == 409 and result.json()["error"] == "job cancelled"

    started = time.monotonic()
    response = server.http.delete(f"/jobs/{running}", headers=server.headers)
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    assert time.monotonic() - started < 5
    assert server.events(running)[-1]["type"] == "cancelled"
    again = server.http.post(f"/jobs/{running}/cancel", headers=server.headers)
    assert again.status_code == 409 and again.json()["error"] == "job already finished"
    assert server.run(trace_request("y = 2")).saved["y"] == 2


def test_queue_positions_move_up(server: Client):
    blocker = server.submit(trace_request(BUSY, timeout=20))
    _wait_for(server, blocker, "running")
    waiting = [server.submit(trace_request("x = 1")) for _ in range(3)]
    assert [server.status(j)["position"] for j in waiting] == [1, 2, 3]
    server.http.post(f"/jobs/{waiting[0]}/cancel", headers=server.headers)
    assert [server.status(j)["position"] for j in waiting[1:]] == [1, 2]
    server.http.post(f"/jobs/{blocker}/cancel", headers=server.headers)
    for job_id in waiting[1:]:
        assert server.wait(job_id)["status"] == "completed"
    queued_events = [e for e in server.events(waiting[2]) if e["type"] == "queued"]
    assert [e["position"] for e in queued_events] == [3, 2, 1]


def test_result_before_the_end_is_409(server: Client):
    job_id = server.submit(trace_request(BUSY, timeout=20))
    response = server.http.get(f"/jobs/{job_id}/result", headers=server.headers)
    assert response.status_code == 409 and response.json()["error"] == "job not finished"
    server.http.post(f"/jobs/{job_id}/cancel", headers=server.headers)


def test_results_expire(server: Client, clock: FakeClock):
    job_id = server.submit(trace_request("x = 3"))
    server.wait(job_id)
    assert server.result(job_id).saved["x"] == 3
    clock.offset += 3600 + 1
    try:
        response = server.http.get(f"/jobs/{job_id}/result", headers=server.headers)
        assert response.status_code == 410
        assert response.json()["error"] == "result expired" and "--result-ttl" in response.json()["detail"]
        deadline = time.monotonic() + 10
        while not server.status(job_id)["result"]["expired"] or server.http.app.state.service.results.read(job_id):
            assert time.monotonic() < deadline, "the sweeper did not remove the result"
            time.sleep(0.1)
    finally:
        clock.offset -= 3600 + 1
    assert server.http.get(f"/jobs/{job_id}/result", headers=server.headers).status_code == 410


def test_result_is_decodable_bytes(server: Client):
    job_id = server.submit(trace_request("x = model.transformer.wte.output.save()"))
    server.wait(job_id)
    response = server.http.get(f"/jobs/{job_id}/result", headers=server.headers)
    assert response.headers["content-type"] == "application/x-msgpack"
    assert int(response.headers["content-length"]) == len(response.content)
    assert decode_result(response.content).saved["x"].shape == (1, 6, 32)


def test_model_that_fails_to_load(tmp_path):
    config = make_config(tmp_path, None, models=parse_model_specs("broken=tests.remote.server.tiny_models:broken"))
    with TestClient(create_app(config)) as http:
        deadline = time.monotonic() + 60
        while True:
            models = {m["name"]: m for m in http.get("/models").json()["models"]}
            if models["broken"]["state"] == "failed":
                break
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert "this test model never loads" in models["broken"]["reason"]
        response = http.post("/jobs", content=encode_request(trace_request("pass", model="broken")), headers=MSGPACK)
        assert response.status_code == 503 and "never loads" in response.json()["detail"]


def test_queue_limit_is_429(tmp_path):
    config = make_config(tmp_path, None, max_queued_jobs=1)
    with TestClient(create_app(config)) as http:
        client = Client(http, "unused")
        blocker = client.submit(trace_request(BUSY, timeout=20))
        deadline = time.monotonic() + 60
        while client.status(blocker)["status"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        client.submit(trace_request("x = 1"))
        response = http.post("/jobs", content=encode_request(trace_request("x = 1")), headers=MSGPACK)
        assert response.status_code == 429 and "--max-queued-jobs" in response.json()["detail"]
        assert response.headers["retry-after"] == "10"
        http.post(f"/jobs/{blocker}/cancel")


def test_concurrent_submissions_in_process(server: Client):
    results: dict[int, str] = {}

    def submit(i: int) -> None:
        results[i] = server.submit(trace_request(f"x = {i}"))

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, job_id in results.items():
        server.wait(job_id)
        assert server.result(job_id).saved["x"] == i


def test_replicas_run_jobs_side_by_side(tmp_path):
    config = make_config(tmp_path, None, replicas=2)
    with TestClient(create_app(config)) as http:
        client = Client(http, "unused")
        jobs = [client.submit(trace_request(BUSY, timeout=20)) for _ in range(2)]
        deadline = time.monotonic() + 60
        while [client.status(j)["status"] for j in jobs] != ["running", "running"]:
            assert time.monotonic() < deadline, [client.status(j) for j in jobs]
            time.sleep(0.05)
        replicas = http.get("/models").json()["models"][0]["replicas"]
        assert sorted(r["job"] for r in replicas) == sorted(jobs)
        for job_id in jobs:
            assert http.post(f"/jobs/{job_id}/cancel").json()["status"] == "cancelled"
