"""`rename=` aliases and `envoys=` Envoy subclasses, checked against plain forward hooks on the same modules."""

from __future__ import annotations

import pytest
import torch

from nnsight_jupyter import NNsight
from nnsight_jupyter.tracing.envoy import Envoy


def _first(value):
    return (value[0] if isinstance(value, tuple) else value).detach()


def _hooked_outputs(module, x, paths):
    seen = {}

    def keep(path):
        def hook(mod, args, out):
            seen.setdefault(path, _first(out))  # returns None: the output is left as it is

        return hook

    handles = [module.get_submodule(p).register_forward_hook(keep(p)) for p in paths]
    try:
        with torch.no_grad():
            module(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def test_rename_adds_aliases_for_paths_names_globs_and_classes(gpt2):
    x = gpt2.make_input(2)
    attn_cls = type(gpt2.module.transformer.h[0].attn)
    model = NNsight(
        gpt2.module,
        rename={"transformer.h": "layers", "mlp": "ffn", "*.ln_f": "final_norm", attn_cls: "attention"},
    )
    expected = _hooked_outputs(
        gpt2.module, x, ["transformer.h.1", "transformer.h.0.mlp", "transformer.ln_f", "transformer.h.2.attn"]
    )
    with torch.no_grad(), model.trace(x):
        ffn = model.transformer.h[0].ffn.output.save()
        layer = model.layers[1].output.save()
        also = model.transformer.layers[2].attention.output.save()
        norm = model.final_norm.output.save()
    assert torch.equal(layer, expected["transformer.h.1"])
    assert torch.equal(ffn, expected["transformer.h.0.mlp"])
    assert torch.equal(norm, expected["transformer.ln_f"])
    assert torch.equal(_first(also), expected["transformer.h.2.attn"])
    assert model.layers is model.transformer.h and model.transformer.h[0].mlp is model.transformer.h[0].ffn


def test_rename_refuses_to_hide_a_name_and_unknown_keys(gpt2):
    with pytest.raises(ValueError, match="would hide an existing name"):
        NNsight(gpt2.module, rename={"transformer.h.0.mlp": "attn"})
    with pytest.raises(ValueError, match="matches no module"):
        NNsight(gpt2.module, rename={"decoder.blocks": "layers"})


class MLPEnvoy(Envoy):
    @property
    def hidden(self):
        """The MLP's hidden activation: the input of its output projection."""
        return self.c_proj.input


def test_envoys_choose_a_subclass_per_module_class_or_path(gpt2):
    x = gpt2.make_input(1)
    mlp_cls = type(gpt2.module.transformer.h[0].mlp)
    model = NNsight(gpt2.module, envoys={mlp_cls: MLPEnvoy})
    assert all(isinstance(layer.mlp, MLPEnvoy) for layer in model.transformer.h)
    assert not isinstance(model.transformer.h[0].attn, MLPEnvoy)
    seen = {}

    def keep_input(mod, args):
        seen.setdefault("in", args[0].detach())

    handle = gpt2.module.transformer.h[1].mlp.c_proj.register_forward_pre_hook(keep_input)
    with torch.no_grad():
        gpt2.module(x)
    handle.remove()
    with torch.no_grad(), model.trace(x):
        hidden = model.transformer.h[1].mlp.hidden.save()
    assert torch.equal(hidden, seen["in"])
    by_path = NNsight(gpt2.module, envoys={"model.transformer.h.0.mlp": MLPEnvoy})
    assert isinstance(by_path.transformer.h[0].mlp, MLPEnvoy)
    assert not isinstance(by_path.transformer.h[1].mlp, MLPEnvoy)
