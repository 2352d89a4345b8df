"""The record a trace leaves on its model for the notebook views: inputs, reads, saves; nothing kept alive."""

from __future__ import annotations

import gc
import weakref

import torch

from nnsight_jupyter import NNsight
from nnsight_jupyter.tracing.record import last_trace, trace_saving


def make_net() -> NNsight:
    torch.manual_seed(0)
    return NNsight(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)))


def test_the_record_names_what_the_trace_read_and_saved():
    net = make_net()
    x = torch.randn(3, 4)
    with net.trace(x) as tracer:
        first = net[0].output.save()
        row = net[1].output[0].save()
        total = net[2].output.sum().save()
    record = last_trace(net)
    assert record.holds(first) and record.holds(row) and not record.holds(first.clone())
    assert trace_saving(row) == (net, record)
    assert record.module_marks() == {"0": "saved", "1": "saved", "2": "read"}
    assert record.input_ids is None  # a plain module's input has no tokens
    assert set(tracer.saved) == {"first", "row", "total"}


def test_the_record_holds_only_weak_references():
    net = make_net()

    def run():
        with net.trace(torch.randn(2, 4)):
            h = net[0].output.save()
        return weakref.ref(h)

    ref = run()
    gc.collect()
    assert ref() is None and last_trace(net).saved_tensors() == []


def test_a_failed_trace_keeps_the_previous_record():
    net = make_net()
    with net.trace(torch.randn(2, 4)):
        h = net[0].output.save()
    before = last_trace(net)
    try:
        with net.trace(torch.randn(2, 4)):
            net[2].output.save()
            raise RuntimeError("stop")
    except RuntimeError:
        pass
    assert last_trace(net) is before and before.holds(h)
