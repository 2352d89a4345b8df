"""End to end over real sockets: uvicorn on 127.0.0.1, many concurrent clients, hostile bytes."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import torch

from nnsight_jupyter.remote.execute import run_request
from nnsight_jupyter.remote.protocol import decode_result, encode_request

from .conftest import MSGPACK, Client, tokens, trace_request
from .tiny_models import tiny_gpt2

CLIENTS = 20
JOBS_PER_CLIENT = 10
SOURCE = (
    "h = model.transformer.h[0].output\n"
    "h[:, -1] = h[:, -1] * scale\n"
    "logits = model.lm_head.output.save()\n"
    "top = logits[0, -1].argmax().item()\n"
)


def _request(i: int):
    request = trace_request(SOURCE, tokens(1000 + i, length=4 + i % 5))
    request.variables["scale"] = 1.0 + (i % 7) / 10
    return request


def _wait_with_events(http: httpx.Client, headers: dict[str, str], job_id: str) -> str:
    """Follow the event stream until its final event, resuming after dropped connections."""
    last = 0
    while True:
        with http.stream("GET", f"/jobs/{job_id}/events", params={"after": last}, headers=headers) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: "):
                    event = json.loads(line[6:])
                    assert event["seq"] == last + 1
                    last = event["seq"]
                    if event["type"] in ("completed", "error", "cancelled"):
                        return event["type"]


def test_200_jobs_from_20_concurrent_clients(live_server: Client):
    base_url = str(live_server.http.base_url)
    results: dict[int, bytes] = {}
    failures: list[str] = []

    def client(number: int) -> None:
        with httpx.Client(base_url=base_url, timeout=120) as http:
            for j in range(JOBS_PER_CLIENT):
                i = number * JOBS_PER_CLIENT + j
                try:
                    response = http.post("/jobs", content=encode_request(_request(i)),
                                         headers={**live_server.headers, **MSGPACK})
                    assert response.status_code == 202, response.text
                    job_id = response.json()["job_id"]
                    assert _wait_with_events(http, live_server.headers, job_id) == "completed"
                    fetched = http.get(f"/jobs/{job_id}/result", headers=live_server.headers)
                    assert fetched.status_code == 200
                    results[i] = fetched.content
                except Exception as exc:
                    failures.append(f"job {i}: {exc!r}")

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=170)
    elapsed = time.monotonic() - started
    assert not failures, failures[:5]
    assert len(results) == CLIENTS * JOBS_PER_CLIENT

    model = tiny_gpt2()
    for i, data in results.items():
        remote = decode_result(data)
        local = run_request(model, _request(i))
        assert remote.error is None and local.error is None
        assert torch.allclose(remote.saved["logits"], local.saved["logits"], atol=1e-5), i
        assert remote.saved["top"] == local.saved["top"]
    print(f"{len(results)} jobs from {CLIENTS} clients in {elapsed:.1f} s")


def test_event_stream_resumes_after_a_dropped_connection(live_server: Client):
    job_id = live_server.submit(trace_request("for i in range(5):\n    print(i)\nx = 1"))
    live_server.wait(job_id)
    with live_server.http.stream("GET", f"/jobs/{job_id}/events", headers=live_server.headers) as response:
        lines = response.iter_lines()
        first = [next(lines) for _ in range(3)]
    assert first[0] == "id: 1"
    rest = live_server.events(job_id, after=1)
    assert rest[0]["seq"] == 2 and rest[-1]["type"] == "completed"
    assert [e["line"] for e in rest if e["type"] == "log"] == ["0", "1", "2", "3", "4"]


def test_hostile_bytes_on_the_socket_do_not_hurt_the_server(live_server: Client):
    host, port = live_server.http.base_url.host, live_server.http.base_url.port
    for payload in (b"\x00\xff" * 100, b"GET / HTTP/9.9\r\n\r\n", b"POST /jobs HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
                    b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X: " + b"a" * 100_000 + b"\r\n\r\n",
                    b"POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc"):
        with socket.create_connection((host, port), timeout=5) as conn:
            conn.sendall(payload)
            conn.shutdown(socket.SHUT_WR)
            try:
                answer = conn.recv(200)
            except OSError:
                answer = b""
            assert not answer.startswith(b"HTTP/1.1 5"), answer
    assert live_server.http.get("/health").status_code == 200
    assert live_server.run(trace_request("x = 5")).saved["x"] == 5
