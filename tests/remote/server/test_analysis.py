"""Analyses with `remote=`: one job on the live test server, the same numbers as a local call.

The server's worker runs the tiny GPT-2 under the full sandbox (source checks, builtins,
process lockdown, after-job model check); the client holds an identical model. The server runs
the same function with the same chunks, so the same shapes: with the workers' torch thread
count, the local call must give the same bits.
"""

from __future__ import annotations

import pytest
import torch

from nnsight_jupyter.analysis import attention_patterns, logit_diff, logit_lens, patching_sweep
from nnsight_jupyter.analysis.logit_lens import LogitLensResult
from nnsight_jupyter.analysis.remote import _run
from nnsight_jupyter.errors import SandboxViolation
from nnsight_jupyter.remote.client import RemoteClient

from .conftest import threads_like_workers
from .tiny_models import VOCAB, tiny_gpt2

CLEAN = torch.tensor([3, 5, 8, 13, 21, 34])
CORRUPTED = torch.tensor([3, 6, 8, 14, 21, 30])
OFFSET = torch.arange(VOCAB) / VOCAB  # a module-level tensor a metric reads: travels with it


def same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and torch.equal(a, b), (a, b)


@pytest.fixture(scope="module")
def client(live_server):
    return RemoteClient(str(live_server.http.base_url), live_server.key, show_status=False)


@pytest.fixture(scope="module")
def model():
    m = tiny_gpt2()
    object.__setattr__(m, "remote_id", "tiny")
    return m


@pytest.fixture
def submissions(client, monkeypatch):
    jobs = []
    submit = client.submit

    def counted(request):
        jobs.append(request)
        return submit(request)

    monkeypatch.setattr(client, "submit", counted)
    return jobs


def test_sweep_is_one_job_with_the_local_numbers(model, client, submissions, capsys):
    weight = 0.5

    def metric(logits):
        return (logits + OFFSET)[:, 7] - weight * torch.log_softmax(logits, -1)[:, 9]

    for chosen in (logit_diff(7, 9), metric):
        with threads_like_workers():
            local = patching_sweep(model, CLEAN, CORRUPTED, chosen, batch_size=3, progress=False)
        remote = patching_sweep(model, CLEAN, CORRUPTED, chosen, batch_size=3, progress=True, remote=client)
        same(remote.values, local.values)
        assert remote.computed.all() and remote.dims == local.dims and remote.coords == local.coords
        assert (remote.clean_baseline, remote.corrupted_baseline) == (local.clean_baseline, local.corrupted_baseline)
        assert torch.equal(remote.top_ids, local.top_ids) and remote.metric == local.metric
        out = capsys.readouterr()
        assert "[nnsight-jupyter analysis]" not in out.out + out.err  # progress drives the bar, not print
        assert "patching sweep" in out.err and "12/12" in out.err
    assert len(submissions) == 2  # one job per sweep, not one per cell or per chunk (4 chunks each)
    assert submissions[0].options["kind"] == "analysis"


def test_head_sweep_and_updates(model, client, submissions):
    updates = []
    with threads_like_workers():
        local = patching_sweep(model, CLEAN, CORRUPTED, logit_diff(7, 9), site="head", over=("layer", "head"),
                               progress=False)
    remote = patching_sweep(model, CLEAN, CORRUPTED, logit_diff(7, 9), site="head", over=("layer", "head"),
                            progress=False, remote=client, on_update=lambda r, cells: updates.append(len(cells)))
    same(remote.values, local.values)
    assert updates == [8] and len(submissions) == 1


def test_logit_lens_sends_only_the_top_k(model, client, monkeypatch):
    received = []
    from_wire = LogitLensResult.from_wire.__func__

    def spy(cls, data, m):
        received.append(data)
        return from_wire(cls, data, m)

    monkeypatch.setattr(LogitLensResult, "from_wire", classmethod(spy))
    with threads_like_workers():
        local = logit_lens(model, CLEAN, top_k=3, target=7)
    remote = logit_lens(model, CLEAN, top_k=3, target=7, remote=client)
    same(remote.top_probs, local.top_probs)
    same(remote.target_probs, local.target_probs)
    assert torch.equal(remote.target_ranks, local.target_ranks) and remote.layers == local.layers
    tensors = [v for v in received[0].values() if isinstance(v, torch.Tensor)]
    assert tensors and all(VOCAB not in t.shape for t in tensors)
    assert max(t.numel() for t in tensors) == 2 * 6 * 3  # layers x positions x top_k


def test_attention_patterns_and_the_server_model_is_left_as_it_was(model, client):
    with threads_like_workers():
        local = attention_patterns(model, CLEAN)
    remote = attention_patterns(model, CLEAN, remote=client)
    same(remote.patterns, local.patterns)
    # The worker checks its model after every job: switching attention modes and back passed that
    # check (else the call above would have raised ModelModifiedError), and a trace still agrees.
    with model.trace(CLEAN.unsqueeze(0), remote=client):
        out = model.output.logits.save()
    with threads_like_workers(), model.trace(CLEAN.unsqueeze(0)):
        expected = model.output.logits.save()
    same(out, expected)


def test_user_metrics_meet_the_sandbox(model, client):
    def reads_a_file(logits):
        return logits[:, 0] + len(open("/etc/passwd").read())

    with pytest.raises(SandboxViolation, match=r"open\(\) is not available in remote traces"):
        patching_sweep(model, CLEAN, CORRUPTED, reads_a_file, over="layer", progress=False, remote=client)

    def walks_classes(logits):
        return logits.__class__.__mro__[0]

    with pytest.raises(SandboxViolation, match="__class__"):
        patching_sweep(model, CLEAN, CORRUPTED, walks_classes, over="layer", progress=False, remote=client)
    with pytest.raises(ValueError, match="no analysis named 'export_weights'"):
        _run(model, "export_weights", {}, {}, remote=client, timeout=30)
    with pytest.raises(TypeError, match="def or lambda"):
        patching_sweep(model, CLEAN, CORRUPTED, torch.nn.Identity(), over="layer", progress=False, remote=client)


def view_state(view):
    """A view's first message: its JSON state and its binary buffers, as bytes."""
    from ipywidgets.widgets.widget import _remove_buffers

    state, paths, buffers = _remove_buffers(view.get_state())
    for ref in ("_bundle", "layout"):  # references to other widget models, new ones per view
        state.pop(ref)
    return state, paths, [bytes(memoryview(b).cast("B")) for b in buffers]


def test_views_of_remote_results_equal_those_of_local_ones(model, client):
    from nnsight_jupyter.widgets import AttentionView, LogitLensView, PatchingHeatmap

    with threads_like_workers():
        local = [patching_sweep(model, CLEAN, CORRUPTED, logit_diff(7, 9), progress=False),
                 logit_lens(model, CLEAN, top_k=3, target=7), attention_patterns(model, CLEAN)]
    remote = [patching_sweep(model, CLEAN, CORRUPTED, logit_diff(7, 9), progress=False, remote=client),
              logit_lens(model, CLEAN, top_k=3, target=7, remote=client),
              attention_patterns(model, CLEAN, remote=client)]
    for kind, a, b in zip((PatchingHeatmap, LogitLensView, AttentionView), local, remote):
        here, there = view_state(kind(a)), view_state(kind(b))
        differ = {k for k in here[0] if here[0][k] != there[0].get(k)}
        assert here[2] and not differ and here[1:] == there[1:], (kind.__name__, differ)
