"""ModuleTree: folding, access paths, parameter counts, scan shapes, trace badges and the static tree."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from nnsight_jupyter import LanguageModel, NNsight
from nnsight_jupyter.widgets import ModuleTree
from nnsight_jupyter.widgets.module_tree import TreeData


def llama(layers: int = 30) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=layers, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100, max_position_embeddings=64, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def test_rows_follow_named_modules_with_counts_dtypes_and_folds():
    hf = llama()
    data = TreeData(LanguageModel(hf))
    modules = list(hf.named_modules())
    assert data.paths == [p for p, _ in modules]
    for i, (path, module) in enumerate(modules):
        assert data.params[i] == sum(p.numel() for p in module.parameters()), path
        assert data.classes[data.class_ids[i]] == type(module).__name__
        parent = path.rsplit(".", 1)[0] if "." in path else ""
        assert data.paths[data.parents[i]] == parent if i else data.parents[i] == -1
    assert data.params[0] == sum(p.numel() for p in hf.parameters())  # the tied embedding counts once
    layers = [i for i, p in enumerate(data.paths) if p.startswith("model.layers.") and p.count(".") == 2]
    assert len(layers) == 30 and set(data.folds[layers]) == {layers[0]}
    assert (data.folds[[i for i in range(data.count) if i not in layers]] == -1).all()
    assert data.dtypes == ["float32"] and data.devices == ["cpu"]
    assert "layers.0–29: 30 × LlamaDecoderLayer" in data.text()


def test_layers_that_differ_do_not_fold():
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 8), nn.ReLU(), nn.ReLU())
    data = TreeData(NNsight(net))
    assert data.folds.tolist() == [-1, 1, 1, -1, 4, 4]


def test_access_paths_use_the_shared_names():
    data = TreeData(LanguageModel(llama(3)))
    access = dict(zip(data.paths, data.access))
    assert access[""] == "model"
    assert access["model.layers"] == "model.layers"
    assert access["model.layers.2.self_attn"] == "model.layers[2].attn"
    assert access["model.layers.2.self_attn.q_proj"] == "model.layers[2].attn.q_proj"
    assert access["model.embed_tokens"] == "model.embed" and access["model.norm"] == "model.final_norm"
    plain = TreeData(llama(3))  # a plain module has no shared names
    assert dict(zip(plain.paths, plain.access))["model.layers.2.self_attn"] == "model.model.layers[2].self_attn"


def test_a_sample_input_adds_every_modules_shapes():
    hf = llama(3)
    model = LanguageModel(hf)
    ids = torch.randint(0, 100, (1, 7))
    seen = {}
    handles = [m.register_forward_hook(lambda m, a, out, p=p: seen.setdefault(p, out))
               for p, m in hf.named_modules() if p]
    with torch.no_grad():
        hf(ids)
    for h in handles:
        h.remove()
    tree = ModuleTree(model, ids)
    out = dict(zip(TreeData(model).paths, tree.shapes_out))
    for path in ["model.layers.1", "model.layers.1.mlp", "model.norm", "lm_head"]:
        assert out[path] == f"[{', '.join(map(str, seen[path].shape))}]"


@pytest.mark.parametrize("remote", [False, "local"])  # "local": through the codec and the server's run_request
def test_modules_read_in_the_last_trace_carry_a_badge(remote):
    model = LanguageModel(llama(4))
    object.__setattr__(model, "remote_id", "llama-4")  # the name a server would load it by
    ids = torch.randint(0, 100, (1, 5))
    with torch.no_grad(), model.trace(ids, remote=remote):
        mlp = model.layers[1].mlp.output.save()           # the value itself
        last = model.layers[2].output[0, -1].save()        # a view of it
        norm = model.layers[3].output.norm().save()        # computed from it: read, not saved
    tree = ModuleTree(model)
    marks = {TreeData(model).paths[i]: kind for i, kind in zip(tree.marked, tree.mark_kinds)}
    assert marks == {"model.layers.1.mlp": "saved", "model.layers.2": "saved", "model.layers.3": "read"}
    assert "3 marked</span>" in tree._repr_mimebundle_()[0]["text/html"]  # inside the folded layers


def test_ten_thousand_modules_travel_as_flat_buffers():
    blocks = [nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 4 + i % 2), nn.Tanh()))
              for i in range(2000)]
    net = nn.Sequential(*blocks)
    tree = ModuleTree(net)
    assert len(tree.names) == 12001
    parents = np.frombuffer(tree.parents, dtype=np.int32)
    assert parents[1] == 0 and parents[2] == 1 and parents[-1] == 12001 - 3
    assert set(np.frombuffer(tree.folds, dtype=np.int32)[[1 + 6 * k for k in range(2000)]]) == {-1}  # alternating widths
    page = tree._repr_mimebundle_()[0]["text/html"]
    assert "more modules" in page and len(page) < 200_000


def test_a_submodule_shows_its_own_subtree_with_full_access_paths():
    model = LanguageModel(llama(3))
    tree = ModuleTree(model.layers[1])
    assert tree.root_name == "model.layers[1]" and tree.root_path == "model.layers.1"
    assert tree.names[:3] == ["", "self_attn", "q_proj"]
    assert tree.access["1"] == "model.layers[1].attn"
