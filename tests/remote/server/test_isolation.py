"""Jobs of the bundled SmolLM2 on a live server cannot reach each other: not one user's data from
another user's job, not one job's settings from the next job, not one user's queue position from
another user's pile of jobs."""

from __future__ import annotations

import ast
import os
import random
import secrets
import site
import socket
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import uvicorn

from nnsight_jupyter.remote.protocol import TraceRequest
from nnsight_jupyter.remote.server.app import create_app
from nnsight_jupyter.remote.server.config import parse_model_specs

from .conftest import Client, _wait_ready, free_port, make_config

pytestmark = pytest.mark.slow


SECRET_NAME = "NNSJ_ISOLATION_TEST_VALUE"
SECRET_VALUE = "server-only-" + secrets.token_hex(8)


class Server:
    def __init__(self, app: Any, alice: Client, bob: Client) -> None:
        self.app, self.alice, self.bob = app, alice, bob

    def job_processes(self) -> dict[str, int]:
        """The pid of each user's job process (by user name)."""
        replica = self.app.state.service.pool.replicas["smollm2"][0]
        return {owner: process.pid for owner, process in replica.users.items()}


@pytest.fixture(scope="module")
def smollm2_server(tmp_path_factory: pytest.TempPathFactory, key_file: tuple[Path, str, str]) -> Iterator[Server]:
    os.environ[SECRET_NAME] = SECRET_VALUE  # an environment value the workers inherit
    config = make_config(tmp_path_factory.mktemp("isolation"), key_file[0], models=parse_model_specs("smollm2"),
                         max_job_memory_bytes=2 * 2**30, max_result_bytes=96 * 2**20, user_workers=2)
    app = create_app(config)
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                       timeout_graceful_shutdown=2))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
        alice, bob = Client(http, key_file[1]), Client(http, key_file[2])
        _wait_ready(http, alice.headers, timeout=180)
        yield Server(app, alice, bob)
    uv.should_exit = True
    thread.join(timeout=15)
    os.environ.pop(SECRET_NAME, None)


def request(source: str, prompt: Any = "The capital of France is") -> TraceRequest:
    return TraceRequest("smollm2", source, {"kind": "trace", "inputs": [prompt]})


def _process_memory_count(pid: int, needle: bytes) -> int:
    """How often ``needle`` occurs in the readable memory of process ``pid`` (read as root)."""
    count = 0
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as memory:
        for line in maps:
            span, perms = line.split()[:2]
            if "r" not in perms or line.rstrip().endswith(("[vvar]", "[vsyscall]")):
                continue
            low, high = (int(x, 16) for x in span.split("-"))
            position = low
            while position < high:
                size = min(high - position, 64 * 2**20)
                try:
                    memory.seek(position)
                    data = memory.read(size)
                except OSError:
                    break
                count += data.count(needle)
                position += size
    return count


def test_a_users_marker_never_reaches_another_user(smollm2_server: Server) -> None:
    marker = ("nnsj-marker-" + secrets.token_hex(16)).encode()
    planted = smollm2_server.alice.run(request(
        f"secret = {marker.decode()!r}\n"
        "import torch\n"
        "kept = torch.frombuffer(bytearray(secret.encode() * 256), dtype=torch.uint8).clone()\n"
        "h = model.model.layers[0].output\n"
        "copy = kept.save()\n"
    ))
    assert planted.error is None, planted.error
    # Every read a job can make of memory it did not write: fresh allocations of every size hand
    # back freed memory, and the stride and offset doors (refused here, see test_escapes.py).
    reads = smollm2_server.bob.run(request(
        "import torch, numpy as np\n"
        "chunks = []\n"
        "for n in (64, 1024, 4096, 65536, 2 ** 20, 2 ** 23):\n"
        "    chunks.append(torch.empty(n, dtype=torch.uint8).clone())\n"
        "    chunks.append(torch.from_numpy(np.empty(n, dtype=np.uint8).copy()))\n"
        "    chunks.append(torch.empty(n // 4, dtype=torch.float32).view(torch.uint8).clone())\n"
        "logits = model.lm_head.output\n"
        "chunks.append(torch.empty(2 ** 24, dtype=torch.uint8).clone())\n"
        "leak = torch.cat(chunks).save()\n"
        "refused = []\n"
        "for attempt in (lambda: np.lib.stride_tricks.as_strided(np.zeros(8), (2 ** 24,), (8,)),\n"
        "                lambda: np.ndarray((2 ** 19,), np.uint8, buffer=bytes(8), offset=-2 ** 19)):\n"
        "    try:\n"
        "        attempt()\n"
        "    except Exception as error:\n"
        "        refused.append('made a view that reads' in str(error))\n"
        "print(refused)\n"
    ))
    assert reads.error is None, reads.error
    assert reads.logs == ["[True, True]"]
    assert marker not in reads.saved["leak"].numpy().tobytes()
    processes = smollm2_server.job_processes()
    assert len(processes) == 2 and len(set(processes.values())) == 2, processes
    alice_pid, bob_pid = processes["alice"], processes["bob"]
    assert _process_memory_count(alice_pid, marker) > 0  # the search finds the marker where it is
    assert _process_memory_count(bob_pid, marker) == 0


PROBE = """
state = {
    "grad": torch.is_grad_enabled(),
    "autocast": torch.is_autocast_enabled("cpu"),
    "autocast dtype": str(torch.get_autocast_dtype("cpu")),
    "autocast cache": torch.is_autocast_cache_enabled(),
    "anomaly": torch.is_anomaly_enabled(),
    "deterministic": torch.are_deterministic_algorithms_enabled(),
    "default dtype": str(torch.get_default_dtype()),
    "threads": torch.get_num_threads(),
    "flash sdp": torch.backends.cuda.flash_sdp_enabled(),
    "math sdp": torch.backends.cuda.math_sdp_enabled(),
    "mem-efficient sdp": torch.backends.cuda.mem_efficient_sdp_enabled(),
    "cudnn": (torch.backends.cudnn.enabled, torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark),
    "mkldnn": torch.backends.mkldnn.enabled,
    "mha fastpath": torch.backends.mha.get_fastpath_enabled(),
    "autograd threads": torch.autograd.is_multithreading_enabled(),
    "matmul precision": torch.get_float32_matmul_precision(),
}
print(sorted(state.items()))
print([float(np.random.random()), random.random()])
"""

SETTERS = {
    "autocast on": "torch.set_autocast_enabled('cpu', True)",
    "autocast dtype": "torch.set_autocast_dtype('cpu', torch.float16)",
    "autocast nesting": "torch.autocast_increment_nesting()",
    "autocast cache off": "torch.set_autocast_cache_enabled(False)",
    "grad mode off": "torch.set_grad_enabled(False)",
    "anomaly detection": "torch.autograd.set_detect_anomaly(True)",
    "flash attention off": "torch.backends.cuda.enable_flash_sdp(False)",
    "math attention off": "torch.backends.cuda.enable_math_sdp(False)",
    # A context manager entered through its generator and never left (kept, so it is not closed).
    "attention backend left chosen": "cm = torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH)\n"
                                     "next(cm.gen)",
    "mkldnn flags left set": "cm = torch.backends.mkldnn.flags(enabled=False)\nnext(cm.gen)",
    "cudnn flags left set": "cm = torch.backends.cudnn.flags(enabled=False, benchmark=True, deterministic=True)\n"
                            "next(cm.gen)",
    "mha fastpath off": "torch.backends.mha.set_fastpath_enabled(False)",
    "autograd threads off": "torch.autograd.set_multithreading_enabled(False)",
    "torch seed": "torch.manual_seed(0)",
    "numpy seed": "np.random.seed(0)",
    "python seed": "random.seed(0)",
}


def test_settings_a_job_changes_are_put_back_before_the_next_job(smollm2_server: Server) -> None:
    """Job k changes setting k after its forward pass; job k + 1 starts as the first job did."""
    head = "import torch, numpy as np, random\n" + PROBE
    tail = "draws = torch.rand(4).save()\nlogits = model.lm_head.output[0, -1].save()\n"
    names = [None, *SETTERS]
    results = []
    for name in names:
        setter = "" if name is None else SETTERS[name] + "\n" + PROBE
        result = smollm2_server.alice.run(request(head + tail + setter))
        assert result.error is None, (name, result.error)
        results.append(result)
    first = results[0]
    seeded = [float(np.random.RandomState(0).random_sample()), random.Random(0).random()]
    changed = set()
    for name, job, following in zip(names[1:], results[1:], results[2:] + [None], strict=True):
        if job.logs[2] != first.logs[0]:
            changed.add(name)
        if following is None:
            following = smollm2_server.alice.run(request(head + tail))
        assert following.logs[0] == first.logs[0], name
        assert torch.equal(following.saved["logits"], first.saved["logits"]), name
        assert torch.equal(following.saved["draws"], first.saved["draws"]), name
        assert following.logs[1] != job.logs[1] and ast.literal_eval(following.logs[1]) != seeded, name
    # Every setting the probe can read was really changed by its job (the seeds act on draws).
    assert changed == set(SETTERS) - {"autocast nesting", "torch seed", "numpy seed", "python seed"}


def test_a_user_with_many_queued_jobs_makes_another_wait_for_at_most_one(smollm2_server: Server) -> None:
    alice, bob = smollm2_server.alice, smollm2_server.bob
    many = [alice.submit(request("logits = model.lm_head.output[0, -1].save()", [[504]])) for _ in range(50)]
    submitted = time.time()
    one = bob.submit(request("logits = model.lm_head.output[0, -1].save()", [[504]]))
    bob_status = bob.wait(one, timeout=120)
    assert bob_status["status"] == "completed", bob_status
    bob_started = datetime.fromisoformat(bob_status["started_at"]).timestamp()
    for job_id in many:
        alice.http.delete(f"/jobs/{job_id}", headers=alice.headers)
    statuses = [alice.status(job_id) for job_id in many]
    ahead = [s for s in statuses if s["started_at"] is not None
             and submitted <= datetime.fromisoformat(s["started_at"]).timestamp() < bob_started]
    assert len(ahead) <= 1, [s["started_at"] for s in statuses if s["started_at"]]
    assert sum(s["status"] == "cancelled" for s in statuses) >= 45


MODEL_CHANGES = {
    "a non-persistent buffer written through .data": ("model.model.rotary_emb.inv_freq.data.mul_(2)",
                                                      "buffer model.rotary_emb.inv_freq"),
    "a module attribute": ("model.model.layers[0].self_attn.scaling = 0.5", "module"),
    "a module's layer index": ("model.model.layers[1].self_attn.layer_idx = 0", "module"),
    "the training flag": ("model.model.layers[0].mlp.train()", "train and eval mode"),
    "a forward hook": ("model.model.layers[0].mlp.register_forward_hook(print)", "hooks"),
    "a configuration field": ("model.config.rms_norm_eps = 0.5", "config"),
    "a token added to the tokenizer": ("n = model.tokenizer.add_tokens(['zqxjv'])", "tokenizer"),
    "the tokenizer's padding": ("model.tokenizer.backend_tokenizer.enable_padding(length=64)", "tokenizer"),
    "the tokenizer's padding side": ("model.tokenizer.padding_side = 'right'", "tokenizer"),
}
LOGITS_PROBE = request("logits = model.lm_head.output[0].save()", "The zqxjv capital of France is")


@pytest.fixture(scope="module")
def fresh_probe() -> torch.Tensor:
    """The probe's logits from a freshly loaded local model, with the workers' thread count."""
    from nnsight_jupyter.models.language import LanguageModel
    from nnsight_jupyter.remote.execute import run_request

    from .conftest import threads_like_workers

    with threads_like_workers():
        result = run_request(LanguageModel("smollm2"), LOGITS_PROBE)
    assert result.error is None, result.error
    return result.saved["logits"]


@pytest.mark.parametrize("change", MODEL_CHANGES, ids=list(MODEL_CHANGES))
def test_a_job_that_changes_the_model_leaves_the_next_job_unchanged(
    smollm2_server: Server, fresh_probe: torch.Tensor, change: str
) -> None:
    source, words = MODEL_CHANGES[change]
    before = smollm2_server.alice.run(LOGITS_PROBE)
    assert before.error is None, before.error
    assert torch.equal(before.saved["logits"], fresh_probe)
    changed = smollm2_server.alice.run(request("h = model.model.layers[0].output\n" + source))
    assert changed.error is not None and changed.error.type_name == "ModelModifiedError", changed.error
    assert words in changed.error.message, changed.error.message
    # The next job of the user who made the change, and another user's, compute what a model
    # loaded afresh computes.
    for user in (smollm2_server.alice, smollm2_server.bob):
        after = user.run(LOGITS_PROBE)
        assert after.error is None, after.error
        assert torch.equal(after.saved["logits"], fresh_probe)


def test_no_server_paths_host_names_or_environment_values_reach_users(smollm2_server: Server) -> None:
    alice = smollm2_server.alice
    service = smollm2_server.app.state.service
    found = alice.run(request(
        "print(model.config.name_or_path)\nprint(model.tokenizer.name_or_path)\n"
        "h = model.model.layers[0].output\nmodel.tokenizer(12345)\n"
    ))
    assert found.error is not None
    listing = alice.http.get("/models", headers=alice.headers).text
    failed = alice.run(request("x = 1", prompt=None))
    seen = "\n".join([*found.logs, found.error.message, found.error.traceback, listing, str(failed.error)])
    server_strings = {sys.prefix, sys.base_prefix, os.getcwd(), os.path.expanduser("~"), str(service.config.data_dir),
                      SECRET_VALUE, *site.getsitepackages()}
    if len(socket.gethostname()) >= 4:  # a name as short as "vm" is no detail of this machine
        server_strings.add(socket.gethostname())
    for text in server_strings:
        assert text not in seen, text
    assert "<server path>" in found.logs[0]  # the model's folder was there to be taken out
