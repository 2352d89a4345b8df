"""The one walker for nested values, checked against values built by hand."""

from __future__ import annotations

from collections import OrderedDict, namedtuple

import torch

from nnsight_jupyter.tracing.nested import TRUNCATED, leaves, map_structure

Pair = namedtuple("Pair", "a b")


def test_containers_keep_their_types_and_leaves_are_mapped():
    from transformers.modeling_outputs import CausalLMOutputWithPast

    t = torch.arange(3.0)
    value = {"p": Pair(t, [t, (t, 1)]), "o": OrderedDict(x=t), "m": CausalLMOutputWithPast(logits=t), "s": {2}}
    out = map_structure(value, lambda v: v * 2 if isinstance(v, torch.Tensor) else v)
    assert type(out["p"]) is Pair and type(out["o"]) is OrderedDict and type(out["m"]) is CausalLMOutputWithPast
    assert torch.equal(out["p"].a, t * 2) and torch.equal(out["p"].b[1][0], t * 2) and out["p"].b[1][1] == 1
    assert torch.equal(out["o"]["x"], t * 2) and torch.equal(out["m"].logits, t * 2) and out["s"] == {2}
    plain = map_structure(value, lambda v: 0, plain=True)
    assert plain == {"p": (0, [0, (0, 0)]), "o": {"x": 0}, "m": {"logits": 0}, "s": {0}}


def test_a_key_value_cache_is_a_leaf():
    from transformers import DynamicCache

    cache = DynamicCache()
    seen = list(leaves((cache, [torch.ones(1)])))
    assert seen[0] is cache and len(seen) == 2


def test_the_wire_view_treats_subclasses_as_leaves():
    pair = Pair(1, 2)
    assert list(leaves([pair, (3, {4})], exact=True)) == [pair, 3, 4]
    assert map_structure([pair, {"k": 5}], lambda v: "x", exact=True) == ["x", {"k": "x"}]


def test_depth_limit_and_skip():
    deep = [[[[torch.ones(1)]]]]
    assert list(leaves(deep, max_depth=3)) == [TRUNCATED]
    assert len([v for v in leaves(deep, max_depth=4) if isinstance(v, torch.Tensor)]) == 1
    inner = [torch.ones(1)]
    assert list(leaves([inner, 7], skip=lambda v: v is inner)) == [7]
    looped: list = []
    looped.append(looped)
    assert list(leaves(looped, max_depth=50)) == [TRUNCATED]
