"""`remote=` traces through the httpx client against a real server on 127.0.0.1.

Each run is compared bit for bit with the same trace run locally on an identical model.
"""

from __future__ import annotations

import pytest
import torch

import nnsight_jupyter
from nnsight_jupyter.errors import NotSavedError, OutOfOrderError, RemoteTimeout, SandboxViolation
from nnsight_jupyter.remote.client import RemoteClient, RemoteServerError

from ..identical import assert_identical
from .conftest import threads_like_workers, tokens
from .tiny_models import tiny_gpt2


@pytest.fixture(scope="module")
def client(engine_server):
    return RemoteClient(str(engine_server.http.base_url), engine_server.key, show_status=False)


@pytest.fixture(scope="module")
def model():
    m = tiny_gpt2()
    object.__setattr__(m, "remote_id", "tiny")
    return m


X = tokens(1, batch=2)
Y = tokens(2)


def _both(run, client):
    with threads_like_workers():
        local = run(False)
    return local, run(client)


def test_save_patch_and_derived_values(model, client):
    layer = model.transformer.h[0]

    def run(remote):
        with model.trace(X, remote=remote):
            layer.output[:, -1] = 0
            h = model.transformer.h[1].output.save()
            mean = h.mean(-1).save()
            out = model.output.save()
        return {"h": h, "mean": mean, "logits": out.logits}

    local, remote = _both(run, client)
    assert_identical(local, remote)


def test_invokes_with_sharing(model, client):
    def run(remote):
        with model.trace(remote=remote) as tracer:
            with tracer.invoke(X):
                donor = model.transformer.h[0].output[:, -1]
            with tracer.invoke(Y):
                model.transformer.h[0].output[:, -1] = donor[:1]
                b = model.lm_head.output.save()
        return {"b": b}

    local, remote = _both(run, client)
    assert_identical(local, remote)


def test_generation_steps_gradients_and_cache(model, client):
    def gen(remote):
        with model.generate(Y, max_new_tokens=3, do_sample=False, pad_token_id=0, remote=remote) as tracer:
            steps = nnsight_jupyter.save([])
            for step in tracer.all():
                model.transformer.h[1].output[:] *= 1.5
                steps.append(model.lm_head.output)
            ids = tracer.result.save()
        return {"steps": steps, "ids": ids}

    def grad(remote):
        with model.trace(X, remote=remote) as tracer:
            cache = tracer.cache(modules=[model.transformer.h[0]])
            h = model.transformer.h[1].output
            h.retain_grad()
            model.output.logits.logsumexp(-1).sum().backward()
            g = h.grad.save()
        model._model.zero_grad(set_to_none=True)
        return {"g": g, "cached": cache["transformer.h.0"].output}

    for run in (gen, grad):
        local, remote = _both(run, client)
        assert_identical(local, remote)


def test_prints_errors_and_unsaved_names(model, client, capsys):
    with model.trace(X, remote=client):
        h = model.transformer.h[0].output
        print("rows", h.shape[0])
    assert "rows 2" in capsys.readouterr().out
    with pytest.raises(NotSavedError):
        h.sum()
    with pytest.raises(OutOfOrderError) as info:
        with model.trace(X, remote=client):
            late = model.transformer.h[1].output
            early = model.transformer.h[0].output  # asked too late
    assert "asked too late" in "\n".join(info.value.__notes__)


def test_non_blocking_job_handle(model, client):
    with model.trace(X, remote=client, blocking=False) as tracer:
        h = model.transformer.h[1].output.save()
    job_id = tracer.job.job_id
    values = client.job(job_id).values()
    with threads_like_workers(), model.trace(X):
        expected = model.transformer.h[1].output.save()
    assert_identical(values["h"], expected)


def test_timeout_cancels_the_job(model, client):
    with pytest.raises(RemoteTimeout, match="time limit of 0.5 s|was cancelled"):
        with model.trace(X, remote=client, timeout=0.5):
            total = 0
            for i in range(10**9):
                total += i
    handle = client.submit(_last_request(model))
    handle.cancel()
    with pytest.raises(RemoteServerError, match="cancelled"):
        client.result(handle.job_id)


def test_server_errors_arrive_as_their_own_classes(model, client):
    with pytest.raises(SandboxViolation, match="open\\(\\) is not available") as info:
        with model.trace(X, remote=client):
            open("/etc/hostname")
    assert "Remote traceback" in "\n".join(info.value.__notes__)
    with pytest.raises(RemoteTimeout, match="time limit of 0.5 s") as timed_out:
        client.submit(_last_request(model, timeout=0.5)).values()
    assert isinstance(timed_out.value, TimeoutError)


def _last_request(model, **options):
    from nnsight_jupyter.remote.protocol import TraceRequest

    return TraceRequest("tiny", "total = 0\nfor i in range(10**9):\n    total += i\n",
                        {"kind": "trace", "inputs": [X], **options}, {})


def test_trace_magic_remote(model, client, engine_server):
    from IPython.core.interactiveshell import InteractiveShell

    from nnsight_jupyter.remote.config import CONFIG

    shell = InteractiveShell.instance()
    shell.run_cell("%load_ext nnsight_jupyter").raise_error()
    shell.user_ns.update(net=model, x=X)
    CONFIG.host, CONFIG.api_key = str(engine_server.http.base_url), engine_server.key
    try:
        shell.run_cell("%%trace net x --remote\nh = model.transformer.h[1].output.save()\n").raise_error()
    finally:
        CONFIG.host = CONFIG.api_key = None
    with threads_like_workers(), model.trace(X):
        expected = model.transformer.h[1].output.save()
    assert_identical(shell.user_ns["h"], expected)


def test_ctrl_c_while_waiting_cancels_the_servers_job(model, client):
    import signal
    import threading
    import time

    handle = client.submit(_last_request(model))
    # A process started in the background by a non-interactive shell inherits SIGINT ignored, and
    # Python then never raises KeyboardInterrupt; a notebook kernel always handles it.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(1.0, lambda: signal.pthread_kill(threading.main_thread().ident, signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            final = client.follow(handle.job_id, timeout=30)
            pytest.fail(f"the job ended before Ctrl-C: {final}")
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    deadline = time.monotonic() + 15
    while client.status(handle.job_id)["status"] not in ("cancelled", "error", "completed"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert client.status(handle.job_id)["status"] == "cancelled"


@pytest.mark.parametrize("dropped", ["submission", "events"])
def test_a_dropped_event_stream_is_resumed(model, client, monkeypatch, dropped):
    """The stream drops after its first event, either the one the submitting request answers with
    (a remote trace) or one asked for by job id (`follow`): the client resumes after the events it
    has, and the values equal a local run's."""
    from contextlib import contextmanager

    import httpx

    real_stream = client.http.stream
    calls = []

    @contextmanager
    def flaky_stream(method, url, **kwargs):
        with real_stream(method, url, **kwargs) as response:
            if url.endswith("/events") or (method == "POST" and url == "/jobs"):
                calls.append((method, dict(kwargs.get("params") or {})))
                if len(calls) == 1:
                    lines = response.iter_lines

                    def dropping():
                        for line in lines():
                            yield line
                            if line == "":
                                raise httpx.ReadError("connection dropped after the first event")

                    response.iter_lines = dropping
            yield response

    if dropped == "submission":
        monkeypatch.setattr(client.http, "stream", flaky_stream)
        with model.trace(X, remote=client):
            h = model.transformer.h[1].output.save()
        assert calls[0] == ("POST", {})
    else:
        from nnsight_jupyter.remote.protocol import TraceRequest

        handle = client.submit(
            TraceRequest("tiny", "h = model.transformer.h[1].output.save()\n", {"kind": "trace", "inputs": [X]}, {})
        )
        monkeypatch.setattr(client.http, "stream", flaky_stream)
        handle.wait(timeout=60)
        monkeypatch.setattr(client.http, "stream", real_stream)
        h = handle.values()["h"]
        assert calls[0] == ("GET", {"after": 0})
    with threads_like_workers(), model.trace(X):
        expected = model.transformer.h[1].output.save()
    resumed = calls[1]
    assert len(calls) >= 2 and resumed[0] == "GET" and resumed[1]["after"] >= 1
    assert_identical(h, expected)


def test_a_small_trace_is_one_request_on_one_connection(model, client, monkeypatch):
    """A remote trace whose result rides in the final event sends one request, the submission,
    and three such traces in a row use one connection."""
    import socket

    requests, connections = [], []
    client.http.event_hooks["request"].append(lambda request: requests.append((request.method, request.url.path)))
    real_connect = socket.create_connection
    monkeypatch.setattr(
        socket, "create_connection", lambda *a, **k: connections.append(a[0]) or real_connect(*a, **k)
    )
    try:
        client.health()  # a connection to start from, kept alive
        connections.clear()
        requests.clear()
        for _ in range(3):
            with model.trace(X, remote=client):
                h = model.transformer.h[1].output.save()
    finally:
        client.http.event_hooks["request"].pop()
    with threads_like_workers(), model.trace(X):
        expected = model.transformer.h[1].output.save()
    assert_identical(h, expected)
    assert requests == [("POST", "/jobs")] * 3
    assert connections == []


def _counting_downloads(client, monkeypatch):
    downloads = []
    real = client._download
    monkeypatch.setattr(client, "_download", lambda job_id: downloads.append(job_id) or real(job_id))
    return downloads


def test_a_small_result_rides_in_the_final_event(model, client, monkeypatch):
    from nnsight_jupyter.remote.server.events import INLINE_RESULT_BYTES

    import base64

    downloads = _counting_downloads(client, monkeypatch)
    from nnsight_jupyter.remote import submitted

    finals, handles = [], []
    real_follow, real_record = client.follow, submitted.record
    monkeypatch.setattr(client, "follow", lambda *a, **k: finals.append(real_follow(*a, **k)) or finals[-1])
    monkeypatch.setattr(submitted, "record", lambda handle: handles.append(handle) or real_record(handle))
    with model.trace(X, remote=client):
        h = model.transformer.h[1].output.save()
    with threads_like_workers(), model.trace(X):
        expected = model.transformer.h[1].output.save()
    assert_identical(h, expected)
    assert downloads == [], "a small result was downloaded again"
    [final], [handle] = finals, handles
    assert isinstance(final.get("result"), str) and len(final["result"]) <= INLINE_RESULT_BYTES * 4 // 3 + 4
    assert base64.b64decode(final["result"]) == bytes(client._download(handle.job_id)), \
        "the inlined result differs from what the result endpoint serves"


def test_a_large_result_is_downloaded_and_callbacks_never_see_result_bytes(model, client, monkeypatch):
    from nnsight_jupyter.remote.protocol import TraceRequest

    downloads = _counting_downloads(client, monkeypatch)
    with model.trace(X, remote=client):
        big = model.transformer.h[1].output.repeat(1, 1, 300).save()  # 2 x 4 x 9600 floats: 300 KB
    with threads_like_workers(), model.trace(X):
        expected = model.transformer.h[1].output.repeat(1, 1, 300).save()
    assert_identical(big, expected)
    assert len(downloads) == 1
    handle = client.submit(TraceRequest("tiny", "y = 3", {"kind": "trace", "inputs": [X]}, {}))
    events = []
    final = client.follow(handle.job_id, on_event=events.append)
    assert final["type"] == "completed" and "result" in final
    assert events and all("result" not in event for event in events)
    assert client.result(handle.job_id).saved["y"] == 3


def test_source_operations_in_generation_steps(model, client):
    src = model.transformer.h[1].attn.source  # travels by path

    def gen(remote):
        with model.generate(Y, max_new_tokens=3, do_sample=False, pad_token_id=0, remote=remote) as tracer:
            heads = nnsight_jupyter.save([])
            logits = nnsight_jupyter.save([])
            for step in tracer.all():
                proj = src.self_c_proj_0
                heads.append(proj.input.clone())
                if step == 1:
                    proj.output = proj.output * 2
                logits.append(model.lm_head.output)
            ids = tracer.result.save()
        return {"heads": heads, "logits": logits, "ids": ids}

    local, remote = _both(gen, client)
    assert_identical(local, remote)
    assert [h.shape[1] for h in local["heads"]] == [Y.shape[1], 1, 1]  # one entry per step, with the cache


@pytest.mark.parametrize("grad", [False, True])
def test_the_trace_runs_in_the_callers_grad_mode(model, client, grad):
    """`with torch.no_grad():` around a remote trace builds no autograd graph on the server either."""
    plain = []
    hook = model._model.transformer.h[1].register_forward_hook(lambda m, a, o: plain.append(o.requires_grad))
    try:
        with torch.set_grad_enabled(grad):
            model._model(X)
    finally:
        hook.remove()
    with torch.set_grad_enabled(grad):
        with model.trace(X, remote=client):
            flags = nnsight_jupyter.save([])
            flags.append(model.transformer.h[1].output.requires_grad)
    assert flags == plain == [grad]
