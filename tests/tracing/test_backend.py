"""The engine's backend interface, and envoys that stand on their own."""

from __future__ import annotations

import torch

from nnsight_jupyter import NNsight
from nnsight_jupyter.tracing import Envoy
from nnsight_jupyter.tracing.backend import LOCAL, TraceCall


def _net() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))


class Recording:
    """A backend that runs the body locally and keeps what it was handed."""

    def __init__(self) -> None:
        self.calls: list[TraceCall] = []

    def execute(self, call: TraceCall) -> dict:
        self.calls.append(call)
        return LOCAL.execute(call)


def test_a_backend_receives_the_block_inputs_and_options_and_its_names_are_bound():
    net = _net()
    model = NNsight(net)
    x = torch.randn(3, 4)
    backend = Recording()
    with model.trace(x, remote=backend, timeout=5) as tracer:
        hidden = model[0].output.save()
    [call] = backend.calls
    assert call.model is model and call.tracer is tracer and call.args == (x,) and call.kwargs == {}
    assert call.options == {"blocking": True, "timeout": 5} and not call.generate
    assert call.block.as_name == "tracer" and "hidden = model[0].output.save()" in call.block.remote_source()[0]
    assert torch.equal(hidden, net[0](x))


def test_a_plain_envoy_navigates_mounts_and_calls_without_nnsight():
    net = _net()
    envoy = Envoy(net)
    assert envoy.path == "" and envoy[0]._module is net[0] and envoy[2].path == "2"
    envoy.extra = torch.nn.Linear(2, 2)
    assert "extra" in envoy and envoy.extra._module is net.extra and envoy.extra.path == "extra"
    x = torch.randn(1, 4)
    assert torch.equal(envoy[0](x), net[0](x))
    assert envoy.resolve("2") is envoy[2]


def test_remote_runs_take_the_configured_time_limit_when_the_trace_gives_none():
    from nnsight_jupyter.remote import CONFIG, LocalSimulation

    net = _net()
    model = NNsight(net, remote_id="net")
    x = torch.randn(2, 4)
    seen = []

    class Runner(LocalSimulation):
        def run(self, request, *, timeout=None):
            seen.append((timeout, request.options.get("timeout")))
            return super().run(request, timeout=timeout)

    runner = Runner(model)
    previous = CONFIG.timeout
    CONFIG.timeout = 7.0
    try:
        with model.trace(x, remote=runner):
            first = model[0].output.save()
        with model.trace(x, remote=runner, timeout=3):
            second = model[0].output.save()
    finally:
        CONFIG.timeout = previous
    assert seen == [(7.0, 7.0), (3, 3.0)]
    assert torch.equal(first, net[0](x)) and torch.equal(second, net[0](x))
