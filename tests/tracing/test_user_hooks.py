"""Traces on modules that carry the user's own torch hooks, registered before or during the trace."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook

from nnsight_jupyter import NNsight

from .conftest import assert_same_state, engine_state


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))


def _x() -> torch.Tensor:
    return torch.randn(3, 4, generator=torch.Generator().manual_seed(1))


def test_values_are_read_between_a_forward_pre_hook_and_a_forward_hook():
    net, x = _net(), _x()
    received = []
    pre = net[0].register_forward_pre_hook(lambda m, args: (args[0] * 2,))
    post = net[0].register_forward_hook(lambda m, args, out: received.append(out.clone()) or out + 1)
    try:
        with torch.no_grad():
            expected_in = x * 2
            expected_mid = torch.nn.functional.linear(expected_in, net[0].weight, net[0].bias)
            model = NNsight(net)
            with model.trace(x):
                seen_in = model[0].input.save()
                mid = model[0].output.clone().save()
                model[0].output[:] = 0  # the user's hook gets the edited value, adds 1
                out = model.output.save()
    finally:
        pre.remove()
        post.remove()
    assert torch.equal(seen_in, expected_in) and torch.equal(mid, expected_mid)
    assert torch.equal(received[0], torch.zeros(3, 4))
    with torch.no_grad():
        assert torch.equal(out, net[2](net[1](torch.ones(3, 4))))


def test_a_hook_registered_inside_the_trace_runs_and_the_trace_still_sees_its_values():
    net, x = _net(), _x()
    before = engine_state(net)
    with torch.no_grad():
        plain_mid = net[2](net[1](net[0](x)))
        model = NNsight(net)
        with model.trace(x):
            handle = net[2].register_forward_hook(lambda m, args, out: out + 100)
            first = model[0].output.save()
            mid = model[2].output.save()
            out = model.output.save()
    handle.remove()
    assert torch.equal(first, net[0](x)) and torch.equal(mid, plain_mid)
    assert torch.equal(out, plain_mid + 100)
    assert_same_state(before, engine_state(net))


def test_global_module_hooks_run_for_every_call_and_the_values_are_right():
    net, x = _net(), _x()
    calls = []
    handle = register_module_forward_hook(lambda m, args, out: calls.append(type(m).__name__))
    try:
        with torch.no_grad():
            net(x)
            plain_calls = list(calls)
            calls.clear()
            model = NNsight(net)
            with model.trace(x):
                relu = model[1].output.save()
                out = model.output.save()
    finally:
        handle.remove()
    assert calls == plain_calls == ["Linear", "ReLU", "Linear", "Sequential"]
    with torch.no_grad():
        assert torch.equal(relu, net[1](net[0](x))) and torch.equal(out, net(x))


def test_a_module_called_again_with_hooks_keeps_its_call_count():
    torch.manual_seed(0)
    layer = nn.Linear(3, 3)

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = layer

        def forward(self, x):
            return self.layer(self.layer(x))

    net = Twice()
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(2))
    model = NNsight(net)
    with torch.no_grad():
        once = layer(x)
        with model.trace(x):
            first = model.layer.output.save()
            handle = layer.register_forward_hook(lambda m, args, out: out * 0)  # from the second call on
            second = model.layer.next().output.save()
            out = model.output.save()
    handle.remove()
    with torch.no_grad():
        assert torch.equal(first, once) and torch.equal(second, layer(once))
    assert torch.equal(out, torch.zeros(2, 3))
    assert not {"forward", "_call_impl"} & (net.__dict__.keys() | layer.__dict__.keys())
