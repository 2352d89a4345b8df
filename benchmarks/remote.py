"""Remote execution over loopback against local execution, measured in the same run.

Starts the real server (`nnsight-jupyter serve` in its own process: uvicorn on 127.0.0.1, sandboxed
workers) with a tiny GPT-2, then:
1. latency: the same small trace locally and through the server; target: the remote median is at
   most 20 ms slower than the local median;
2. transfer: a remote trace that builds a 64 MiB tensor and saves it, against one that builds the
   same tensor and saves one element of it; the extra time carries the tensor from the worker to
   the notebook (encode, pipe, store, HTTP, decode); target: at least 300 MB/s;
3. codec: encode + decode of a 64 MiB tensor, measured before the server starts; target: at least
   1 GB/s (benchmarks/codec.py has the full table);
4. the bundled model (SmolLM2): a small trace locally and through two servers running at once,
   one with the per-job resets and checks (``globalstate.py``, ``integrity.py``) and one without
   them (``--no-job-checks``), called in turn each round, with where the remote time went, from
   each job's final event: HTTP and client (what the server did not spend), queue, hand-off to
   the job process and back, resets, the trace itself, checks, and encoding the result; in three
   sittings, each a fresh process; target: with the resets and checks, at most 10 ms over local
   in the median sitting.
5. the Ray engine (``serve --engine ray``): the small trace through a Ray-engine server against a
   single-machine server, both running at once and called in turn; target: at most 5 ms more per
   job. Then jobs per second through Ray-engine servers with 1 and 2 replicas: 5 clients submit
   40 jobs of about 0.1 s of work each at once.
Exits non-zero if a target is missed.

    .venv/bin/python benchmarks/remote.py [--rounds N] [--only bundled|ray]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import torch  # noqa: E402

from nnsight_jupyter.remote.client import RemoteClient  # noqa: E402
from nnsight_jupyter.remote.protocol import decode, encode  # noqa: E402
from nnsight_jupyter.remote.server.auth import create_api_key  # noqa: E402
from tests.remote.server.tiny_models import tiny_gpt2  # noqa: E402

SPEC = "tiny=tests.remote.server.tiny_models:tiny_gpt2"
BIG = 16 * 2**20  # float32 elements: 64 MiB


def start_server(folder: Path, spec: str = SPEC, extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str, str]:
    """`nnsight-jupyter serve` in its own process, as it runs for real (it shares no GIL with the client)."""
    keys = folder / "keys.txt"
    key = create_api_key(keys, "bench")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "nnsight_jupyter.remote.serve", "--models", spec, "--port", str(port),
               "--api-key-file", str(keys), "--data-dir", str(folder / "data"), "--max-result-mb", "512",
               "--max-job-memory-mb", "2048", "--threads", "1", "--log-level", "warning", *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    server = subprocess.Popen(command, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and server.poll() is None:
        try:
            models = httpx.get(f"{url}/models", headers={"Authorization": f"Bearer {key}"}, timeout=5).json()["models"]
            if all(m["state"] == "ready" for m in models):
                return server, url, key
        except (httpx.TransportError, KeyError, ValueError):
            pass
        time.sleep(0.2)
    server.terminate()
    raise SystemExit("the server did not become ready")


def tiny_model() -> tuple[Any, torch.Tensor]:
    """The tiny GPT-2 the servers serve as ``tiny``, and a small input for it."""
    model = tiny_gpt2()
    object.__setattr__(model, "remote_id", "tiny")
    return model, torch.randint(1, 97, (1, 8), generator=torch.Generator().manual_seed(0))


def small_trace(model: Any, x: torch.Tensor, remote: Any) -> float:
    """Seconds for a trace that saves one block's output, run locally (``remote=False``) or remotely."""
    start = time.perf_counter()
    with model.trace(x, remote=remote):
        model.transformer.h[1].output.save()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--only", choices=("bundled", "ray"), help="run only part 4 (bundled) or 5 (ray)")
    parser.add_argument("--bundled-sitting", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.bundled_sitting:
        bundled_sitting(args.rounds)
        return 0
    if args.only is not None:
        checks = bundled(args.rounds) if args.only == "bundled" else ray_engine(args.rounds)
        for ok, text in checks:
            print(("PASS  " if ok else "FAIL  ") + text)
        return 0 if all(ok for ok, _ in checks) else 1
    # The codec first, while no server runs and no result files are being written back to disk.
    t = torch.randn(BIG)
    codec = []
    for _ in range(2):  # warm-up, then the best of 7 as in benchmarks/codec.py
        decode(encode(t))
    for _ in range(7):
        start = time.perf_counter()
        decode(encode(t))
        codec.append(time.perf_counter() - start)
    del t

    with tempfile.TemporaryDirectory() as tmp:
        server, url, key = start_server(Path(tmp))
        client = RemoteClient(url, key, show_status=False)
        model, x = tiny_model()

        def small(remote):
            return small_trace(model, x, remote)

        def saving(whole, remote):
            # Both cases build the same 64 MiB tensor on the server; only one sends it back.
            start = time.perf_counter()
            with model.trace(x, remote=remote):
                big = torch.ones(BIG)
                kept = (big if whole else big[:1]).save()
                del big  # a second name for the same tensor would send it twice
            elapsed = time.perf_counter() - start
            assert kept.shape == ((BIG,) if whole else (1,))
            return elapsed

        for _ in range(3):
            small(False), small(client), saving(False, client), saving(True, client)
        local, remote, tiny_save, big_save = [], [], [], []
        for _ in range(args.rounds):
            local.append(small(False))
            remote.append(small(client))
        for _ in range(max(5, args.rounds // 3)):
            tiny_save.append(saving(False, client))
            big_save.append(saving(True, client))
        server.terminate()
        server.wait(30)

    ms = lambda v: statistics.median(v) * 1e3  # noqa: E731
    extra_ms = ms(remote) - ms(local)
    transfer = BIG * 4 / max(statistics.median(big_save) - statistics.median(tiny_save), 1e-9) / 1e6
    codec_rate = BIG * 4 / min(codec) / 1e9
    print(f"small trace: local {ms(local):.2f} ms, through the server {ms(remote):.2f} ms, extra {extra_ms:.2f} ms")
    print(f"saving a 64 MiB tensor: {ms(big_save):.1f} ms vs saving one element of it {ms(tiny_save):.1f} ms "
          f"-> {transfer:.0f} MB/s")
    print(f"codec encode+decode of 64 MiB: {codec_rate:.2f} GB/s")
    checks = [
        (extra_ms <= 20.0, f"remote small trace at most 20 ms slower than local: {extra_ms:.2f} ms"),
        (transfer >= 300.0, f"saved-tensor transfer at least 300 MB/s: {transfer:.0f} MB/s"),
        (codec_rate >= 1.0, f"codec at least 1 GB/s: {codec_rate:.2f} GB/s"),
    ]
    checks += bundled(args.rounds)
    checks += ray_engine(args.rounds)
    for ok, text in checks:
        print(("PASS  " if ok else "FAIL  ") + text)
    return 0 if all(ok for ok, _ in checks) else 1


PARTS = ("queue", "to_worker", "wait", "reset", "run", "check", "encode", "from_worker")


BUNDLED_SITTINGS = 3


def bundled(rounds: int) -> list[tuple[bool, str]]:
    """Part 4, in `BUNDLED_SITTINGS` sittings, each a fresh process with fresh servers; the target
    is checked on the median sitting.

    Why sittings: on this VM the same SmolLM2 forward pass takes from 98 to 115 ms depending on
    the process it runs in (measured in four fresh processes one after the other), so one
    sitting's local and job processes can differ by more than the whole overhead measured."""
    extras = []
    for sitting in range(BUNDLED_SITTINGS):
        print(f"SmolLM2 sitting {sitting + 1} of {BUNDLED_SITTINGS}:", flush=True)
        out = subprocess.run([sys.executable, __file__, "--bundled-sitting", "--rounds", str(rounds)],
                             stdout=subprocess.PIPE, text=True, check=True).stdout
        lines = out.strip().splitlines()
        print("\n".join(line for line in lines if not line.startswith("extra ")))
        extras.append(float(lines[-1].split()[1]))
    extra = statistics.median(extras)
    return [(extra <= 10.0, f"SmolLM2 small trace with the resets and checks at most 10 ms slower than local: "
                            f"{extra:.2f} ms (median of {BUNDLED_SITTINGS} sittings: "
                            f"{', '.join(f'{e:.2f}' for e in extras)})")]


def bundled_sitting(rounds: int) -> float:
    """One sitting of part 4: SmolLM2 locally and through two servers, with and without the per-job
    resets and checks; returns the extra milliseconds with them.

    Both servers run at once and each round calls local, with and without in turn (the order
    rotating), so a drift in the machine's speed during the run reaches all three alike."""
    from contextlib import ExitStack

    from nnsight_jupyter.models.language import LanguageModel

    torch.set_num_threads(1)  # as the servers' workers (--threads 1)
    model = LanguageModel("smollm2")
    prompt = "The capital of France is"

    def small(remote):
        start = time.perf_counter()
        with torch.no_grad(), model.trace(prompt, remote=remote):
            model.lm_head.output[0, -1].save()
        return time.perf_counter() - start

    ms = lambda v: statistics.median(v) * 1e3  # noqa: E731
    labels = {"with resets and checks": (), "without them": ("--no-job-checks",)}
    clients: dict[str, RemoteClient] = {}
    finals: dict[str, list[dict]] = {label: [] for label in labels}
    times: dict[str, list[float]] = {label: [] for label in ("local", *labels)}
    with ExitStack() as stack:
        for label, extra in labels.items():
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            server, url, key = start_server(folder, "smollm2", extra)
            stack.callback(server.wait, 30)
            stack.callback(server.terminate)
            client = RemoteClient(url, key, show_status=False)

            def recording(*a, _follow=client.follow, _finals=finals[label], **k):
                final = _follow(*a, **k)
                _finals.append(final)
                return final

            client.follow = recording
            clients[label] = client
        calls = {"local": False, **clients}
        for _ in range(3):
            for remote in calls.values():
                small(remote)
        for kept in finals.values():
            kept.clear()
        order = list(calls)
        for k in range(rounds):
            for label in order[k % 3 :] + order[: k % 3]:
                times[label].append(small(calls[label]))
    local_ms = ms(times["local"])
    rows = {}
    for label in labels:
        timings = [f.get("timings", {}) for f in finals[label]]
        parts = {name: ms([t.get(name, 0.0) for t in timings]) for name in PARTS}
        http = ms([r - sum(t.get(name, 0.0) for name in PARTS) for r, t in zip(times[label], timings, strict=True)])
        rows[label] = (ms(times[label]), parts, http)
    for label, (remote_ms, parts, http) in rows.items():
        print(f"SmolLM2 small trace {label}: local {local_ms:.2f} ms, remote {remote_ms:.2f} ms, "
              f"extra {remote_ms - local_ms:.2f} ms")
        print("  breakdown (medians, ms): HTTP and client {:.2f}, queue {:.2f}, hand-off {:.2f} + {:.2f}, "
              "waiting in the job process {:.2f}, resets {:.2f}, trace {:.2f}, checks {:.2f}, result encoding {:.2f}"
              .format(http, parts["queue"], parts["to_worker"], parts["from_worker"], parts["wait"], parts["reset"],
                      parts["run"], parts["check"], parts["encode"]))
    with_checks = rows["with resets and checks"]
    paired = ms([a - b for a, b in zip(times["with resets and checks"], times["without them"], strict=True)])
    print(f"per-job cost of the resets and checks: {with_checks[1]['reset'] + with_checks[1]['check']:.2f} ms "
          f"measured inside the job; {paired:+.2f} ms median difference per round against the server without "
          "them")
    extra = with_checks[0] - local_ms
    print(f"extra {extra:.3f}")
    return extra


def ray_engine(rounds: int) -> list[tuple[bool, str]]:
    """Part 5: the Ray engine's cost per job against the single-machine engine, and its throughput."""
    import threading

    model, x = tiny_model()

    def small(remote):
        return small_trace(model, x, remote)

    ms = lambda v: statistics.median(v) * 1e3  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        servers = [start_server(Path(tmp) / "local"), start_server(Path(tmp) / "ray", extra=("--engine", "ray"))]
        try:
            clients = [RemoteClient(url, key, show_status=False) for _, url, key in servers]
            for _ in range(3):
                small(clients[0]), small(clients[1])
            times: list[list[float]] = [[], []]
            for _ in range(max(rounds, 30)):
                for i in (0, 1):
                    times[i].append(small(clients[i]))
        finally:
            for server, _, _ in servers:
                server.terminate()
                server.wait(60)
    extra = ms(times[1]) - ms(times[0])
    print(f"small trace through the Ray engine {ms(times[1]):.2f} ms, through the single-machine engine "
          f"{ms(times[0]):.2f} ms: {extra:+.2f} ms per job")

    def busy(remote) -> None:
        with model.trace(x, remote=remote):
            total = 0
            for i in range(1200000):  # about 0.1 s of work on the server
                total += i
            model.transformer.h[1].output.save()

    rates = {}
    for replicas in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            server, url, key = start_server(Path(tmp), extra=("--engine", "ray", "--replicas", str(replicas)))
            try:
                users = [RemoteClient(url, key, show_status=False) for _ in range(5)]
                for _ in range(2 * replicas):
                    busy(users[0])

                def submit_all(user: RemoteClient) -> None:
                    for _ in range(8):
                        busy(user)

                start = time.perf_counter()
                threads = [threading.Thread(target=submit_all, args=(u,)) for u in users]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                rates[replicas] = 40 / (time.perf_counter() - start)
            finally:
                server.terminate()
                server.wait(60)
    print(f"Ray engine throughput, 5 clients x 8 jobs: {rates[1]:.1f} jobs/s with 1 replica, "
          f"{rates[2]:.1f} jobs/s with 2 ({rates[2] / rates[1]:.2f}x)")
    return [(extra <= 5.0, f"Ray engine at most 5 ms more per small trace than the single-machine engine: "
                           f"{extra:+.2f} ms")]


if __name__ == "__main__":
    sys.exit(main())
