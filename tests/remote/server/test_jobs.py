"""The persistent queue: order, positions, states, events, the restart policy and expiry."""

from __future__ import annotations

import pytest

from nnsight_jupyter.remote.server.jobs import JobStore
from nnsight_jupyter.remote.server.store import ResultStore


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path, clock) -> JobStore:
    woken: list[str] = []
    jobs = JobStore(tmp_path / "jobs.sqlite3", clock=clock, position_updates=3, on_event=woken.append)
    jobs.woken = woken  # type: ignore[attr-defined]
    yield jobs
    jobs.close()


def submit(store: JobStore, model: str = "m", n: int = 1) -> list[str]:
    return [store.submit(model=model, owner="alice", request=b"req", timeout_s=10)[0].id for _ in range(n)]


def test_fifo_per_model_with_positions(store: JobStore):
    a = submit(store, "m", 3)
    b = submit(store, "other", 2)
    assert [store.position(store.get(j)) for j in a] == [1, 2, 3]
    assert [store.position(store.get(j)) for j in b] == [1, 2]
    claimed = store.claim("m", ready=True, worker="w")
    assert claimed.id == a[0] and claimed.status == "running" and claimed.attempts == 1
    assert store.position(store.get(a[1])) == 1 and store.position(store.get(a[0])) is None
    assert store.claim("other", ready=True, worker="w").id == b[0]


def test_position_events_are_bounded(store: JobStore):
    ids = submit(store, "m", 6)
    store.claim("m", ready=True, worker="w")
    updated = [j for j in ids[1:] if store.events_after(j, 1)]
    assert updated == ids[1:4]
    assert store.events_after(ids[3], 1)[0].data == {"position": 3}


def test_loading_then_running_then_completed(store: JobStore, clock: Clock):
    (job_id,) = submit(store)
    assert store.claim("m", ready=False, worker="w").status == "loading"
    assert store.get(job_id).started is None
    clock.now += 2
    assert store.mark_running(job_id, worker="w")
    assert store.get(job_id).started == clock.now
    assert store.finish(job_id, "completed", result_bytes=10, ttl_s=60)
    assert not store.finish(job_id, "error", error=("X", "y", ""))
    job = store.get(job_id)
    assert job.status == "completed" and job.expires == clock.now + 60 and job.final
    assert store.request_body(job_id) is None
    assert [e.type for e in store.events_after(job_id, 0)] == ["queued", "loading", "running", "completed"]
    assert store.events_after(job_id, 0)[-1].data["result_bytes"] == 10
    assert job_id in store.woken


def test_cancel_only_while_queued(store: JobStore):
    a, b, c = submit(store, "m", 3)
    store.claim("m", ready=True, worker="w")
    assert not store.cancel_if_queued(a, "no")
    assert store.cancel_if_queued(b, "by test")
    assert store.get(b).status == "cancelled"
    assert store.events_after(b, 0)[-1].data == {"reason": "by test"}
    assert store.position(store.get(c)) == 1
    assert store.events_after(c, 0)[-1].data == {"position": 1}


def test_restart_requeues_once_then_fails(tmp_path, clock: Clock):
    path = tmp_path / "jobs.sqlite3"
    store = JobStore(path, clock=clock)
    running, loading, queued, gone = submit(store, "m", 3) + submit(store, "dropped")
    store.claim("m", ready=True, worker="w")
    store.claim("m", ready=False, worker="w")
    store.close()

    store = JobStore(path, clock=clock)
    report = dict(store.recover(served=["m"]))
    assert report == {running: "requeued", loading: "requeued", queued: "still queued",
                      gone: "failed: model no longer served"}
    assert [store.position(store.get(j)) for j in (running, loading, queued)] == [1, 2, 3]
    assert store.events_after(running, 0)[-1].data["requeued"] is True
    assert store.get(gone).error_type == "ModelUnavailable"
    assert store.claim("m", ready=True, worker="w").id == running
    store.close()

    store = JobStore(path, clock=clock)
    report = dict(store.recover(served=["m"]))
    assert report[running] == "failed: interrupted twice"
    job = store.get(running)
    assert job.status == "error" and job.error_type == "ServerRestarted" and "twice" in job.error_message
    store.close()


def test_expiry(store: JobStore, clock: Clock):
    a, b = submit(store, "m", 2)
    for job_id in (a, b):
        store.claim("m", ready=True, worker="w")
        store.add_events(job_id, [("log", {"line": "hi"})])
        store.finish(job_id, "completed", result_bytes=1, result=job_id.encode(), ttl_s=100 if job_id == a else 500)
    assert store.stored_result(a) == a.encode() and store.stored_result(b) == b.encode()
    clock.now += 200
    assert store.due_for_expiry(clock.now) == [a]
    store.mark_expired(a)
    assert store.due_for_expiry(clock.now) == []
    assert store.get(a).expired and "log" not in [e.type for e in store.events_after(a, 0)]
    assert store.get(a).describe(position=None, now=clock.now)["result"]["expired"] is True
    assert store.get(b).describe(position=None, now=clock.now)["result"]["expired"] is False
    assert store.stored_result(a) is None and store.stored_result(b) == b.encode()  # expired: its bytes go too


def test_describe(store: JobStore, clock: Clock):
    (job_id,) = submit(store)
    body = store.get(job_id).describe(position=1, now=clock.now)
    assert body["status"] == "queued" and body["position"] == 1 and body["created_at"].endswith("+00:00")
    assert body["error"] is None and body["result"] is None


def test_result_store(tmp_path):
    results = ResultStore(tmp_path / "results")
    (tmp_path / "results" / "x.part").write_bytes(b"partial")
    results = ResultStore(tmp_path / "results")
    assert not (tmp_path / "results" / "x.part").exists()
    data = bytes(range(256)) * 4096  # 1 MiB: kept in a file
    assert results.put("abc", data) is None
    assert results.read("abc") == data and results.ids() == ["abc"]
    handle = results.open("abc")
    results.delete("abc")
    assert handle.read() == data
    handle.close()
    assert results.open("abc") is None and results.read("abc") is None
    with pytest.raises(ValueError):
        results.put("../escape", b"x")


def test_the_queue_limit_holds_under_concurrent_submissions(store: JobStore):
    import threading

    from nnsight_jupyter.remote.server.jobs import QueueFull

    submit(store, "other", 3)  # another model's queue does not count
    accepted, refused = [], []
    start = threading.Barrier(16)

    def one() -> None:
        start.wait()
        try:
            accepted.append(store.submit(model="m", owner="o", request=b"r", timeout_s=1.0, max_queued=5)[0].id)
        except QueueFull as full:
            refused.append(full.queued)

    threads = [threading.Thread(target=one) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(accepted) == 5 and refused == [5] * 11
    assert sorted(store.queued_ids("m")) == sorted(accepted)
