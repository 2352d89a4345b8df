"""Fixtures for the server tests: a real app with a tiny model, in-process or on 127.0.0.1.

- ``server``: one app for the session, driven through Starlette's ``TestClient`` (an
  ``httpx.Client`` calling the app in-process), with an API key, small limits and a clock the
  tests can move forward.
- ``live_server``: the same kind of app under uvicorn in a thread on 127.0.0.1, for the escape
  corpus and the concurrency test, which talk to it over real sockets with ``httpx``.

Workers start with ``forkserver``; the fork server itself starts once per test session (a few
seconds, for importing torch), after which a new worker is ready in about a second.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import uvicorn
from starlette.testclient import TestClient

from nnsight_jupyter.remote.protocol import TraceRequest, TraceResult, decode_result, encode_request
from nnsight_jupyter.remote.server.app import create_app
from nnsight_jupyter.remote.server.auth import create_api_key
from nnsight_jupyter.remote.server.config import ServerConfig, parse_model_specs

TINY = "tiny=tests.remote.server.tiny_models:tiny_gpt2"
MSGPACK = {"content-type": "application/x-msgpack"}
# Torch threads per test worker: the two cores are shared with the test process itself.
WORKER_THREADS = 1


@contextlib.contextmanager
def threads_like_workers() -> Iterator[None]:
    """Run a local reference with the test workers' torch thread count.

    Matrix kernels split their work, and with it the order of their sums, by thread count: the
    same generation step computed with one thread and with two differs in the last bit. A local
    run compared bit for bit with a worker's must use the worker's count.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(WORKER_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class FakeClock:
    """``time.time`` plus an offset the test can advance."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def make_config(data_dir: Path, key_file: Path | None, **overrides: Any) -> ServerConfig:
    settings: dict[str, Any] = dict(
        models=parse_model_specs(TINY),
        data_dir=data_dir,
        api_key_file=key_file,
        auth=key_file is not None,
        max_request_bytes=2 * 2**20,
        max_result_bytes=4 * 2**20,
        max_job_seconds=30.0,
        max_job_memory_bytes=768 * 2**20,
        max_log_bytes=16 * 1024,
        cancel_grace_s=1.0,
        worker_threads=WORKER_THREADS,
        sweep_interval_s=0.5,
    )
    settings.update(overrides)
    return ServerConfig(**settings)


def tokens(seed: int, length: int = 6, batch: int = 1) -> torch.Tensor:
    return torch.randint(1, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def trace_request(source: str, inputs: Any = None, *, model: str = "tiny", **options: Any) -> TraceRequest:
    opts: dict[str, Any] = {"kind": "trace", "inputs": [tokens(0) if inputs is None else inputs]}
    opts.update(options)
    return TraceRequest(model_id=model, source=source, options=opts)


@dataclass
class Client:
    """A thin test client over any ``httpx.Client`` (TestClient or a real socket)."""

    http: httpx.Client
    key: str
    headers: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        self.headers = {"Authorization": f"Bearer {self.key}"}

    def submit(self, request: TraceRequest, **kwargs: Any) -> str:
        response = self.http.post("/jobs", content=encode_request(request), headers={**self.headers, **MSGPACK},
                                  **kwargs)
        assert response.status_code == 202, response.text
        return response.json()["job_id"]

    def status(self, job_id: str) -> dict[str, Any]:
        response = self.http.get(f"/jobs/{job_id}", headers=self.headers)
        assert response.status_code == 200, response.text
        return response.json()

    def wait(self, job_id: str, timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            status = self.status(job_id)
            if status["status"] in ("completed", "error", "cancelled"):
                return status
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {status['status']} after {timeout} s")
            time.sleep(0.02)

    def result(self, job_id: str) -> TraceResult:
        response = self.http.get(f"/jobs/{job_id}/result", headers=self.headers)
        assert response.status_code == 200, response.text
        return decode_result(response.content)

    def run(self, request: TraceRequest, timeout: float = 60.0) -> TraceResult:
        job_id = self.submit(request)
        self.wait(job_id, timeout)
        return self.result(job_id)

    def events(self, job_id: str, after: int | None = None, headers: dict[str, str] | None = None) -> list[dict]:
        import json

        params = {} if after is None else {"after": after}
        response = self.http.get(f"/jobs/{job_id}/events", params=params, headers={**self.headers, **(headers or {})})
        assert response.status_code == 200, response.text
        out = []
        for block in response.text.split("\n\n"):
            data = [line[6:] for line in block.splitlines() if line.startswith("data: ")]
            if data:
                out.append(json.loads(data[0]))
        return out


@pytest.fixture(scope="session")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """A key file with two keys; returns ``(path, alice's key, bob's key)``."""
    path = tmp_path_factory.mktemp("keys") / "keys.txt"
    return path, create_api_key(path, "alice"), create_api_key(path, "bob")


@pytest.fixture(scope="session")
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, key_file: tuple[Path, str, str],
           clock: FakeClock) -> Iterator[Client]:
    """The session's in-process server, as alice."""
    config = make_config(tmp_path_factory.mktemp("server"), key_file[0], clock=clock)
    app = create_app(config)
    with TestClient(app, raise_server_exceptions=False) as http:
        client = Client(http, key_file[1])
        _wait_ready(http, client.headers)
        yield client


def _wait_ready(http: httpx.Client, headers: dict[str, str], timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        models = http.get("/models", headers=headers).json()["models"]
        if all(m["state"] == "ready" for m in models):
            return
        if any(m["state"] == "failed" for m in models):
            raise AssertionError(f"a model failed to load: {models}")
        time.sleep(0.1)
    raise AssertionError("the server's models did not become ready")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_live(config: ServerConfig, key: str, ready_timeout: float = 90.0) -> Iterator[Client]:
    """``config``'s app under uvicorn on 127.0.0.1 (in a thread of this process), as ``key``."""
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(create_app(config), host="127.0.0.1", port=port, log_level="warning",
                                       timeout_graceful_shutdown=2))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise AssertionError("uvicorn did not start")
        time.sleep(0.05)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            client = Client(http, key)
            _wait_ready(http, client.headers, ready_timeout)
            yield client
    finally:
        uv.should_exit = True
        thread.join(timeout=15)


@pytest.fixture(scope="session")
def live_server(tmp_path_factory: pytest.TempPathFactory, key_file: tuple[Path, str, str]) -> Iterator[Client]:
    """The app under uvicorn on 127.0.0.1 (in a thread of this process), as alice."""
    config = make_config(tmp_path_factory.mktemp("live"), key_file[0], max_job_seconds=20.0)
    with serve_live(config, key_file[1]) as client:
        yield client


# Logical CPUs of the tests' Ray instance: Ray places a replica only where its `replica_cpus` fit, and
# the tests run several replicas at once on a two-core machine (each mostly waiting for its jobs).
RAY_TEST_CPUS = 8


@pytest.fixture(scope="session")
def ray_instance() -> Iterator[None]:
    """One local Ray instance for the session's Ray-engine servers (each engine joins it, none stops it)."""
    import os

    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=RAY_TEST_CPUS, include_dashboard=False, configure_logging=False,
             log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def ray_live_server(tmp_path_factory: pytest.TempPathFactory, key_file: tuple[Path, str, str],
                    ray_instance: None) -> Iterator[Client]:
    """``live_server`` with ``--engine ray``: its one replica is a Ray actor, as alice."""
    config = make_config(tmp_path_factory.mktemp("live-ray"), key_file[0], max_job_seconds=20.0, engine="ray",
                         replica_cpus=1.0, replica_memory_bytes=1024 * 2**20)
    with serve_live(config, key_file[1], ready_timeout=180.0) as client:
        yield client


# The engines `engine_server` runs a module against; CI's second pass (portable kernels, numerics
# only) sets NNSIGHT_JUPYTER_TEST_ENGINES=local, since where a job runs changes none of its numbers.
ENGINES = os.environ.get("NNSIGHT_JUPYTER_TEST_ENGINES", "local,ray").split(",")


@pytest.fixture(scope="module", params=ENGINES)
def engine_server(request: pytest.FixtureRequest) -> Client:
    """The live server of each engine in turn: a test module using it runs once per engine."""
    return request.getfixturevalue("live_server" if request.param == "local" else "ray_live_server")
