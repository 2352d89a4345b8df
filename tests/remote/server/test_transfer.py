"""How a large result travels: worker pipe payloads, the result store, and in-place decoding."""

from __future__ import annotations

import mmap
import multiprocessing
import os
import socket
import subprocess
import sys
import threading

import pytest
import torch
from starlette.testclient import TestClient

from nnsight_jupyter.remote.client import RemoteClient, RemoteConnectionError
from nnsight_jupyter.remote.codec.arrays import ADOPT_MIN_BYTES
from nnsight_jupyter.remote.codec.memory import BUFFER_ALIGNMENT, aligned_buffer
from nnsight_jupyter.remote.protocol import (
    TraceResult,
    buffer_section_offset,
    decode_result,
    encode_result,
    encode_result_parts,
)
from nnsight_jupyter.remote.server.app import create_app
from nnsight_jupyter.remote.server.channel import BrokenChannel, Channel
from nnsight_jupyter.remote.server.store import ResultStore

from .conftest import make_config
from .tiny_models import tiny_gpt2


def _pair(max_bytes: int = 1 << 30) -> tuple[Channel, Channel]:
    a, b = multiprocessing.Pipe(duplex=True)
    return Channel(a, max_bytes=max_bytes), Channel(b, max_bytes=max_bytes)


def _sent_in_thread(channel: Channel, *args, **kwargs) -> threading.Thread:
    thread = threading.Thread(target=channel.send, args=args, kwargs=kwargs, daemon=True)
    thread.start()
    return thread


# ----- the worker pipe ------------------------------------------------------------------------------
def test_payload_arrives_whole_and_later_messages_stay_in_step():
    sender, receiver = _pair()
    big = torch.arange(3_000_000, dtype=torch.float32)  # 12 MB: many pipe buffers' worth
    parts = [b"head", memoryview(big.numpy()), b"tail"]
    thread = _sent_in_thread(sender, {"ev": "done", "job_id": "j1"}, payload=("result", parts))
    message = receiver.recv()
    thread.join()
    assert message["ev"] == "done" and message["job_id"] == "j1"
    assert "payload" not in message and "payload_field" not in message
    assert isinstance(message["result"], mmap.mmap)  # large: fresh huge-page memory, not a zero-filled bytearray
    assert bytes(message["result"]) == b"head" + big.numpy().tobytes() + b"tail"
    sender.send({"ev": "log", "line": "after"})
    assert receiver.recv() == {"ev": "log", "line": "after"}


def test_a_small_payload_is_a_bytearray():
    sender, receiver = _pair()
    sender.send({"ev": "done"}, payload=("result", [b"abc", memoryview(b"def")]))
    assert receiver.recv() == {"ev": "done", "result": bytearray(b"abcdef")}


def test_an_empty_payload_is_an_empty_buffer():
    sender, receiver = _pair()
    sender.send({"ev": "done"}, payload=("result", []))
    assert receiver.recv() == {"ev": "done", "result": bytearray()}


@pytest.mark.parametrize("header", [
    {"ev": "done", "payload": 1 << 40, "payload_field": "result"},  # over the channel's limit
    {"ev": "done", "payload": -1, "payload_field": "result"},
    {"ev": "done", "payload": "12", "payload_field": "result"},
    {"ev": "done", "payload": 12},  # no field name
    {"ev": "done", "payload": 12, "payload_field": 7},
])
def test_a_bad_payload_header_breaks_the_channel(header):
    sender, receiver = _pair(max_bytes=1 << 20)
    sender.send(header)  # a hostile worker can write any map
    with pytest.raises(BrokenChannel, match="payload header"):
        receiver.recv()


def test_a_worker_that_dies_mid_payload_breaks_the_channel():
    sender, receiver = _pair()
    sender.send({"ev": "done", "payload": 1000, "payload_field": "result"})
    sender.connection.send_bytes(b"x" * 10)  # 14 of the announced 1000 bytes
    sender.close()
    with pytest.raises(BrokenChannel, match="middle of a payload"):
        receiver.recv()


# ----- the result store ------------------------------------------------------------------------------
def _received(store: ResultStore, data: bytes):
    """What a job process's channel does with a result: receive it into the store's memory for it."""
    buffer = store.receiver(len(data))
    memoryview(buffer)[:] = data
    return buffer


def test_a_large_result_is_in_its_file_once_put_and_a_small_one_is_handed_back(tmp_path):
    store = ResultStore(tmp_path, file_min_bytes=1000)
    large = os.urandom(5000)
    buffer = _received(store, large)
    assert isinstance(buffer, mmap.mmap) and [p.suffix for p in tmp_path.iterdir()] == [".part"]
    assert store.put("job1", buffer) is None  # the file holds it
    assert (tmp_path / "job1.msgpack").read_bytes() == large and not list(tmp_path.glob("*.part"))
    assert store.recent("job1") is buffer  # served from its mapping, no copy
    small = os.urandom(999)
    assert store.put("job2", _received(store, small)) == small  # for the job table
    assert not (tmp_path / "job2.msgpack").exists() and store.recent("job2") == small
    made = os.urandom(3000)  # a large result the server made itself, not received
    assert store.put("job3", made) is None and (tmp_path / "job3.msgpack").read_bytes() == made
    fresh = ResultStore(tmp_path, file_min_bytes=1000)  # as after a restart: nothing in memory
    assert fresh.recent("job1") is None and fresh.read("job1") == large and fresh.read("job2") is None


def test_a_received_file_survives_its_process_being_killed(tmp_path):
    """The bytes written into the shared mapping are the file's, with no write or flush after them."""
    code = (
        "import os, signal, sys\n"
        "from nnsight_jupyter.remote.server.store import ResultStore\n"
        "store = ResultStore(sys.argv[1], file_min_bytes=1000)\n"
        "buffer = store.receiver(3 << 20)\n"
        "memoryview(buffer)[:] = bytes(range(256)) * (3 << 12)\n"
        "store.put('job1', buffer)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], timeout=120, capture_output=True)
    assert done.returncode == -9, done.stderr.decode()[-2000:]
    assert (tmp_path / "job1.msgpack").read_bytes() == bytes(range(256)) * (3 << 12)


def test_a_discarded_or_broken_receipt_leaves_no_file(tmp_path):
    store = ResultStore(tmp_path, file_min_bytes=1000)
    store.discard(_received(store, b"x" * 2000))
    assert not list(tmp_path.iterdir())
    sender, receiver = _pair()
    receiver.receiver = store.receiver
    sender.send({"ev": "done", "payload": 5000, "payload_field": "result"})
    sender.connection.send_bytes(b"x" * 10)
    sender.close()
    with pytest.raises(BrokenChannel, match="middle of a payload"):
        receiver.recv()
    assert not list(tmp_path.iterdir())
    (tmp_path / "left-by-a-crash.part").write_bytes(b"partial")
    ResultStore(tmp_path)
    assert not list(tmp_path.iterdir()), "a start did not remove a crashed server's partial result"


def test_a_payload_arrives_in_the_channels_receiver(tmp_path):
    store = ResultStore(tmp_path, file_min_bytes=1000)
    sender, receiver = _pair()
    receiver.receiver = store.receiver
    data = os.urandom(300_000)
    thread = threading.Thread(target=sender.send, args=({"ev": "done"},), kwargs={"payload": ("result", [data])})
    thread.start()
    message = receiver.recv()
    thread.join()
    assert bytes(message["result"]) == data and [p.suffix for p in tmp_path.iterdir()] == [".part"]


def test_memory_holds_only_the_latest_results_and_the_rest_come_from_disk(tmp_path):
    store = ResultStore(tmp_path, memory_bytes=250, file_min_bytes=100)  # 100-byte results go to files
    for i in range(4):
        store.put(f"job{i}", bytes([i]) * 100)
    assert store.recent("job0") is None and store.recent("job1") is None
    assert store.recent("job2") == bytes([2]) * 100 and store.recent("job3") == bytes([3]) * 100
    assert [store.read(f"job{i}") for i in range(4)] == [bytes([i]) * 100 for i in range(4)]


# ----- decoding in place -----------------------------------------------------------------------------
def _aligned_copy(data: bytes) -> memoryview:
    """What the client does with a download: the buffer section on an alignment boundary."""
    view = aligned_buffer(len(data), buffer_section_offset(data))
    view[:] = data
    return view


def _inside(tensor: torch.Tensor, view: memoryview) -> bool:
    import ctypes

    start = ctypes.addressof(ctypes.c_char.from_buffer(view))
    return start <= tensor.data_ptr() < start + view.nbytes


def test_parts_join_to_the_encoded_result():
    result = TraceResult(saved={"a": torch.randn(1000), "b": torch.arange(7, dtype=torch.int8), "c": "x"})
    assert b"".join(bytes(p) for p in encode_result_parts(result)) == encode_result(result)


def test_adopted_decoding_uses_the_buffer_for_large_tensors_only():
    big = torch.randn(ADOPT_MIN_BYTES // 4 + 5)
    odd = torch.arange(3, dtype=torch.int8)  # would misalign what follows without padding
    big2 = torch.randn(ADOPT_MIN_BYTES // 8 + 3, dtype=torch.float64)
    small = torch.randn(10)
    data = encode_result(TraceResult(saved={"big": big, "odd": odd, "big2": big2, "small": small}))
    view = _aligned_copy(data)
    saved = decode_result(view, adopt=True).saved
    for name, original in {"big": big, "odd": odd, "big2": big2, "small": small}.items():
        assert torch.equal(saved[name], original) and saved[name].dtype == original.dtype
    assert _inside(saved["big"], view) and _inside(saved["big2"], view)
    assert not _inside(saved["small"], view) and not _inside(saved["odd"], view)
    assert saved["big"].data_ptr() % BUFFER_ALIGNMENT == 0 and saved["big2"].data_ptr() % BUFFER_ALIGNMENT == 0
    saved["big"][0] = 123.0  # writable, and independent of the other tensors
    assert saved["big2"][0] == big2[0]


def test_without_adopt_or_with_read_only_bytes_every_tensor_is_a_copy():
    big = torch.randn(ADOPT_MIN_BYTES // 4 + 5)
    data = encode_result(TraceResult(saved={"big": big}))
    view = _aligned_copy(data)
    copied = decode_result(view).saved["big"]
    assert torch.equal(copied, big) and not _inside(copied, view)
    from_bytes = decode_result(data, adopt=True).saved["big"]  # bytes cannot be shared writable
    assert torch.equal(from_bytes, big)
    from_bytes[0] = 1.0


def test_the_client_downloads_into_aligned_memory_that_large_tensors_keep(live_server):
    client = RemoteClient(str(live_server.http.base_url), live_server.key, show_status=False)
    model = tiny_gpt2()
    object.__setattr__(model, "remote_id", "tiny")
    x = torch.randint(1, 97, (1, 4))
    with model.trace(x, remote=client):
        big = torch.arange(600_000, dtype=torch.float32).save()
        out = model.lm_head.output.save()
    with model.trace(x):
        expected = model.lm_head.output.save()
    assert torch.equal(big, torch.arange(600_000, dtype=torch.float32)) and torch.equal(out, expected)
    assert big.data_ptr() % BUFFER_ALIGNMENT == 0
    big += 1  # the kept download is ordinary writable memory
    assert big[0] == 1


def test_two_names_for_one_saved_tensor_arrive_as_one_tensor_as_they_would_locally():
    model = tiny_gpt2()
    object.__setattr__(model, "remote_id", "tiny")
    x = torch.randint(1, 97, (1, 4))
    runs = {}
    for remote in (False, "local"):
        with model.trace(x, remote=remote):
            a = model.lm_head.output.save()
            b = a
        runs[remote] = (a, b)
    local, remote = runs[False], runs["local"]
    assert local[0] is local[1] and remote[0] is remote[1]
    assert torch.equal(remote[0], local[0])


def test_a_large_download_arrives_whole_and_the_client_carries_on(live_server):
    client = RemoteClient(str(live_server.http.base_url), live_server.key, show_status=False)
    model = tiny_gpt2()
    object.__setattr__(model, "remote_id", "tiny")
    x = torch.randint(1, 97, (1, 4))
    for n in (400_000, 700_000):  # the second run reuses the client's connection
        with model.trace(x, remote=client):
            big = (torch.arange(n, dtype=torch.float32) * 0.5).save()
        assert torch.equal(big, torch.arange(n, dtype=torch.float32) * 0.5)
        assert big.data_ptr() % BUFFER_ALIGNMENT == 0
    assert client.health()["status"] == "ok"


def _transport_client(body: bytes, *, chunk: int, announce: int | None = None) -> tuple[RemoteClient, list]:
    """A client whose every request is answered by httpx's MockTransport with `body`, streamed in chunks."""
    import httpx

    requests = []

    class Chunks(httpx.SyncByteStream):
        def __iter__(self):
            for start in range(0, len(body), chunk):
                yield body[start:start + chunk]

    def answer(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        headers = {"content-type": "application/x-msgpack"}
        if announce is not None:
            headers["content-length"] = str(announce)
        return httpx.Response(200, headers=headers, stream=Chunks())

    http = httpx.Client(base_url="http://server.test", transport=httpx.MockTransport(answer))
    return RemoteClient("http://server.test", "key", http=http, show_status=False), requests


@pytest.mark.parametrize("chunk", [1000, 65536, 1 << 22])
def test_the_download_goes_through_httpx_and_large_tensors_keep_its_memory(chunk):
    big = torch.randn(ADOPT_MIN_BYTES // 4 + 1000)
    small = torch.arange(10)
    body = encode_result(TraceResult(saved={"big": big, "small": small}, logs=["done"]))
    client, requests = _transport_client(body, chunk=chunk, announce=len(body))
    result = client.result("j1")
    assert [str(r.url) for r in requests] == ["http://server.test/jobs/j1/result"]
    assert requests[0].headers["authorization"] == "Bearer key"
    assert torch.equal(result.saved["big"], big) and torch.equal(result.saved["small"], small)
    assert result.logs == ["done"]
    assert result.saved["big"].data_ptr() % BUFFER_ALIGNMENT == 0
    unannounced, _ = _transport_client(body, chunk=chunk, announce=None)
    assert torch.equal(unannounced.result("j1").saved["big"], big)


def test_a_download_longer_than_announced_is_refused():
    body = encode_result(TraceResult(saved={"x": torch.randn(1000)}))
    client, _ = _transport_client(body, chunk=4096, announce=len(body) - 10)
    with pytest.raises(RemoteConnectionError, match="more than the announced"):
        client.result("j1")


def _one_shot_http_server(head: bytes, body: bytes) -> str:
    """A server that answers one request with `head` + `body` and hangs up."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(4096)
            conn.sendall(head + body)
        listener.close()

    threading.Thread(target=serve, daemon=True).start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}"


def test_a_download_cut_short_says_how_far_it_got_and_how_to_fetch_it_again():
    body = encode_result(TraceResult(saved={"big": torch.randn(300_000)}))
    cut = body[: len(body) // 2]
    head = (f"HTTP/1.1 200 OK\r\nContent-Type: application/x-msgpack\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    client = RemoteClient(_one_shot_http_server(head, cut), "k", show_status=False)
    with pytest.raises(RemoteConnectionError, match=rf"stopped after {len(cut)} of {len(body)} bytes.*job\('j1'\)"):
        client._download("j1")


def test_a_large_tensor_sent_with_the_trace_arrives_whole(tmp_path):
    config = make_config(tmp_path, None, max_request_bytes=32 * 2**20)
    with TestClient(create_app(config)) as http:
        client = RemoteClient("http://testserver", None, http=http, show_status=False)
        model = tiny_gpt2()
        object.__setattr__(model, "remote_id", "tiny")
        x = torch.randint(1, 97, (1, 4))
        sent = torch.randn(3_000_000)  # 12 MB: decoded by the sandboxed worker into memory of its own
        with model.trace(x, remote=client):
            total = sent.double().sum().save()
            first = sent[:5].save()
    assert torch.equal(first, sent[:5]) and torch.allclose(total, sent.double().sum())
