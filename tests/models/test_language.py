"""LanguageModel on tiny random models: input forms, padding, loading, and the shared module names.

Every expected value comes from the plain Hugging Face model (a forward call, or a torch forward
hook), run on each prompt alone, never from LanguageModel itself.
"""

from __future__ import annotations

import pytest
import torch
import transformers as T

from nnsight_jupyter import save
from nnsight_jupyter.errors import InvokeError, ModulePathError, TraceError
from nnsight_jupyter.models.architectures import ARCHITECTURES, ArchitectureError, ArchitectureNames
from nnsight_jupyter.models.language import LanguageModel

from ..numerics import assert_rounding_close, transformer_depth_width
from .conftest import build_tiny

PROMPTS = ["Hello world", "The quick brown fox jumps over the lazy", "A", "One two three four"]
NATIVE = {
    "gpt2": ("transformer.h", "transformer.wte", "transformer.ln_f", "lm_head", "attn", "mlp"),
    "llama": ("model.layers", "model.embed_tokens", "model.norm", "lm_head", "self_attn", "mlp"),
    "gemma3": ("model.layers", "model.embed_tokens", "model.norm", "lm_head", "self_attn", "mlp"),
}


def native_layers(hf, family):
    return hf.transformer.h if family == "gpt2" else hf.model.layers


def reference(hf, family, ids, **kwargs):
    """Logits and every layer's output for one unpadded prompt, from the plain model and forward hooks."""
    layers = native_layers(hf, family)
    seen: dict[int, torch.Tensor] = {}
    handles = [layer.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, o.detach().clone()))
               for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            logits = hf(torch.as_tensor(ids).reshape(1, -1), **kwargs).logits
    finally:
        for h in handles:
            h.remove()
    return logits, [seen[i] for i in range(len(layers))]


# ----- padding: a mixed-length batch computes what each prompt computes alone ------------------------
def test_invokes_of_different_lengths_match_single_runs(tiny_hf, gpt2_tokenizer):
    family, hf = tiny_hf
    model = LanguageModel(hf, tokenizer=gpt2_tokenizer)
    with model.trace() as tracer:
        logits = save([])
        hidden = save([])
        for prompt in PROMPTS:
            with tracer.invoke(prompt):
                hidden.append([layer.output.clone() for layer in model.layers])
                logits.append(model.output.logits)
    lengths = [len(gpt2_tokenizer(p).input_ids) for p in PROMPTS]
    assert len(set(lengths)) == len(PROMPTS), "the prompts must differ in length for this test to mean anything"
    width = max(lengths)
    # A padded batch against each prompt alone: other shapes, so equal up to float32 rounding.
    depth, reduction = transformer_depth_width(hf.config)
    for prompt, n, got_logits, got_hidden in zip(PROMPTS, lengths, logits, hidden):
        want_logits, want_hidden = reference(hf, family, gpt2_tokenizer(prompt).input_ids)
        assert got_logits.shape[:2] == (1, width)
        assert_rounding_close(got_logits[:, -n:], want_logits, depth=depth, width=reduction)
        for got, want in zip(got_hidden, want_hidden):
            assert_rounding_close(got[:, -n:], want, depth=depth, width=reduction)


def test_list_of_prompts_is_one_invoke_with_a_row_each(tiny_hf, gpt2_tokenizer):
    family, hf = tiny_hf
    model = LanguageModel(hf, tokenizer=gpt2_tokenizer)
    with model.trace(PROMPTS):
        mid = model.layers[1].output.save()
        logits = model.output.logits.save()
    assert logits.shape[0] == len(PROMPTS)
    # A padded batch against each prompt alone: other shapes, so equal up to float32 rounding.
    depth, reduction = transformer_depth_width(hf.config)
    for row, prompt in enumerate(PROMPTS):
        ids = gpt2_tokenizer(prompt).input_ids
        want_logits, want_hidden = reference(hf, family, ids)
        n = len(ids)
        assert_rounding_close(logits[row:row + 1, -n:], want_logits, depth=depth, width=reduction)
        assert_rounding_close(mid[row:row + 1, -n:], want_hidden[1], depth=depth, width=reduction)


def test_padding_is_on_the_left_with_mask_and_positions(gpt2_tokenizer):
    hf = build_tiny("gpt2")
    model = LanguageModel(hf, tokenizer=gpt2_tokenizer)
    with model.trace() as tracer:
        with tracer.invoke("A"):
            short = save(model.inputs)
        with tracer.invoke("The quick brown fox"):
            pass
    kwargs = short[1]
    n_long = len(gpt2_tokenizer("The quick brown fox").input_ids)
    assert kwargs["attention_mask"].tolist() == [[0] * (n_long - 1) + [1]]
    assert kwargs["position_ids"].tolist() == [[0] * n_long]
    assert kwargs["input_ids"][0, -1].item() == gpt2_tokenizer("A").input_ids[0]
    assert kwargs["input_ids"][0, 0].item() == gpt2_tokenizer.eos_token_id


def test_pad_token_defaults_to_eos(gpt2_tokenizer_dir):
    tok = T.GPT2TokenizerFast.from_pretrained(str(gpt2_tokenizer_dir))
    assert tok.pad_token is None
    model = LanguageModel(build_tiny("gpt2"), tokenizer=tok)
    assert model.tokenizer.pad_token == tok.eos_token == "<|endoftext|>"


# ----- input forms -----------------------------------------------------------------------------
def test_every_input_form_gives_the_same_result(gpt2_tokenizer):
    hf = build_tiny("llama")
    model = LanguageModel(hf, tokenizer=gpt2_tokenizer)
    prompt = "The capital of France is"
    ids = gpt2_tokenizer(prompt).input_ids
    want, _ = reference(hf, "llama", ids)
    forms = {
        "str": prompt,
        "list[str]": [prompt],
        "list[int]": ids,
        "list[list[int]]": [ids],
        "1-D tensor": torch.tensor(ids),
        "2-D tensor": torch.tensor([ids]),
        "BatchEncoding": gpt2_tokenizer(prompt, return_tensors="pt"),
        "dict of lists": {"input_ids": [ids], "attention_mask": [[1] * len(ids)]},
    }
    for name, value in forms.items():
        with model.trace(value):
            logits = model.output.logits.save()
        torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5, msg=f"input form {name}")
    with model.trace(input_ids=torch.tensor([ids])):
        logits = model.output.logits.save()
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)


def test_right_padded_encoding_is_respected(gpt2_tokenizer):
    """A user's own padded batch keeps its mask: each row still matches its prompt alone."""
    hf = build_tiny("llama")
    model = LanguageModel(hf, tokenizer=gpt2_tokenizer)
    gpt2_tokenizer.padding_side = "right"
    try:
        enc = gpt2_tokenizer(["A", "The quick brown fox"], padding=True, return_tensors="pt")
    finally:
        gpt2_tokenizer.padding_side = "left"
    with model.trace(enc):
        logits = model.output.logits.save()
    want_short, _ = reference(hf, "llama", gpt2_tokenizer("A").input_ids)
    # A padded batch of 2 against the prompt alone: equal up to float32 rounding.
    depth, reduction = transformer_depth_width(hf.config)
    assert_rounding_close(logits[0:1, :1], want_short, depth=depth, width=reduction)


def test_extra_forward_keywords_reach_the_model(gpt2_tokenizer):
    hf = build_tiny("gpt2")
    model = LanguageModel(hf, tokenizer=gpt2_tokenizer)
    ids = torch.tensor([gpt2_tokenizer("Hello there world").input_ids])
    with model.trace(ids, labels=ids):
        loss = model.output.loss.save()
    with torch.no_grad():
        want = hf(ids, labels=ids).loss
    torch.testing.assert_close(loss, want)


def test_bad_inputs_say_what_is_wrong(gpt2_tokenizer):
    model = LanguageModel(build_tiny("gpt2"), tokenizer=gpt2_tokenizer)
    with pytest.raises(InvokeError, match="empty"):
        with model.trace([]):
            pass
    with pytest.raises(InvokeError, match="integers"):
        with model.trace(torch.rand(1, 3)):
            pass
    with pytest.raises(InvokeError, match="one input"):
        with model.trace("a", "b"):
            pass


def test_text_needs_a_tokenizer_but_ids_do_not():
    hf = build_tiny("gpt2")
    model = LanguageModel(hf)
    assert model.tokenizer is None
    with model.trace([1, 2, 3]):
        logits = model.output.logits.save()
    with torch.no_grad():
        torch.testing.assert_close(logits, hf(torch.tensor([[1, 2, 3]])).logits)
    with pytest.raises(TraceError, match="tokenizer"):
        with model.trace("hello"):
            pass


def test_loading_options_with_a_built_model_are_refused():
    with pytest.raises(TypeError, match="already built"):
        LanguageModel(build_tiny("gpt2"), dtype=torch.float64)


# ----- loading from a folder: lazy and eager --------------------------------------------------------
def test_lazy_loading_builds_the_tree_on_meta_and_loads_into_the_same_modules(tiny_folder, gpt2_tokenizer):
    model = LanguageModel(str(tiny_folder))
    assert not model.dispatched
    assert all(p.device.type == "meta" for p in model._model.parameters())
    assert "LlamaDecoderLayer" in repr(model)
    layer_module = model.layers[1]._module
    mlp_module = model.layers[1].mlp._module
    ids = gpt2_tokenizer("Lazy loading works", return_tensors="pt").input_ids
    with model.trace(ids):
        mid = model.layers[1].output.save()
        logits = model.output.logits.save()
    assert model.dispatched
    assert model.layers[1]._module is layer_module and model.layers[1].mlp._module is mlp_module
    assert not any(p.device.type == "meta" for p in model._model.parameters())
    assert not any(b.device.type == "meta" for b in model._model.buffers())
    assert model._model.lm_head.weight is model._model.model.embed_tokens.weight  # tying survives

    plain = T.AutoModelForCausalLM.from_pretrained(tiny_folder).eval()
    want_logits, want_hidden = reference(plain, "llama", ids)
    torch.testing.assert_close(logits, want_logits)
    torch.testing.assert_close(mid, want_hidden[1])


def test_hooks_registered_before_loading_keep_working(tiny_folder):
    model = LanguageModel(str(tiny_folder))
    calls = []
    handle = model.layers[0]._module.register_forward_hook(lambda *a: calls.append(1))
    with model.trace([1, 2, 3]):
        model.output.save()
    handle.remove()
    assert calls == [1]


def test_dispatch_true_loads_at_once_with_dtype_and_eager_attention(tiny_folder, gpt2_tokenizer):
    model = LanguageModel(str(tiny_folder), dispatch=True, dtype=torch.float64, attn_implementation="eager")
    assert model.dispatched
    assert all(p.dtype == torch.float64 for p in model._model.parameters())
    ids = gpt2_tokenizer("Attention weights are visible", return_tensors="pt").input_ids
    with model.trace(ids):
        attn_out, weights = model.layers[0].attn.output
        weights = weights.save()
    plain = T.AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float64, attn_implementation="eager")
    with torch.no_grad():
        want = plain(ids, output_attentions=True).attentions[0]
    assert weights.shape == (1, 4, ids.shape[1], ids.shape[1])
    torch.testing.assert_close(weights, want)


def test_a_folder_loads_its_own_tokenizer(tiny_folder, gpt2_tokenizer):
    model = LanguageModel(str(tiny_folder))
    assert model.tokenizer("Hello world").input_ids == gpt2_tokenizer("Hello world").input_ids
    assert model.tokenizer.padding_side == "left"


# ----- architecture-agnostic names ----------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])
def test_shared_names_reach_the_native_modules(family):
    hf = build_tiny(family)
    model = LanguageModel(hf)
    layers, embed, norm, head, attn, mlp = NATIVE[family]
    assert model.layers._module is hf.get_submodule(layers)
    assert model.embed._module is hf.get_submodule(embed)
    assert model.final_norm._module is hf.get_submodule(norm)
    assert model.lm_head._module is hf.get_submodule(head)
    for i, layer in enumerate(model.layers):
        assert layer._module is hf.get_submodule(f"{layers}.{i}")
        assert layer.attn._module is hf.get_submodule(f"{layers}.{i}.{attn}")
        assert layer.mlp._module is hf.get_submodule(f"{layers}.{i}.{mlp}")
    assert model.resolve(layers)[1].path == model.layers[1].path


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])
def test_values_read_through_either_name_are_equal(family):
    hf = build_tiny(family)
    model = LanguageModel(hf)
    layers, embed, norm, head, attn, mlp = NATIVE[family]
    ids = torch.tensor([[5, 17, 300, 42, 9]])
    with model.trace(ids):
        e_alias = model.embed.output.save()
        e_native = model.resolve(embed).output.save()
        m_alias = model.layers[1].mlp.output.save()
        m_native = model.resolve(f"{layers}.1.{mlp}").output.save()
        h_alias = model.layers[2].output.save()
        h_native = model.resolve(f"{layers}.2").output.save()
        n_alias = model.final_norm.output.save()
        n_native = model.resolve(norm).output.save()
    seen = {}
    watched = (("embed", embed), ("mlp", f"{layers}.1.{mlp}"), ("layer", f"{layers}.2"), ("norm", norm))
    hooks = [hf.get_submodule(path).register_forward_hook(lambda m, a, o, k=key: seen.__setitem__(k, o.clone()))
             for key, path in watched]
    with torch.no_grad():
        hf(ids)
    for h in hooks:
        h.remove()
    for a, n, key in ((e_alias, e_native, "embed"), (m_alias, m_native, "mlp"), (h_alias, h_native, "layer"),
                      (n_alias, n_native, "norm")):
        assert a is n or torch.equal(a, n)
        torch.testing.assert_close(a, seen[key])


def test_editing_through_the_alias_edits_the_model():
    hf = build_tiny("gemma3")
    model = LanguageModel(hf)
    ids = torch.tensor([[3, 4, 5]])
    with model.trace(ids):
        model.layers[0].mlp.output[:] = 0
        logits = model.output.logits.save()
    handle = hf.model.layers[0].mlp.register_forward_hook(lambda m, a, o: torch.zeros_like(o))
    with torch.no_grad():
        want = hf(ids).logits
    handle.remove()
    torch.testing.assert_close(logits, want)


_SMALL = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
              vocab_size=64, head_dim=8, ffn_dim=64, word_embed_proj_dim=32, rotary_dim=4, num_local_experts=2,
              attention_types=[[["global", "local"], 1]], pad_token_id=0, bos_token_id=1, eos_token_id=2)


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_every_table_entry_fits_its_family(model_type):
    config = T.AutoConfig.for_model(model_type, **_SMALL)
    with torch.device("meta"):
        hf = T.AutoModelForCausalLM.from_config(config)
    model = LanguageModel(hf)
    names = ARCHITECTURES[model_type]
    assert model.architecture == names
    assert model.layers._module is hf.get_submodule(names.layers)
    assert len(model.layers) == 2
    assert model.lm_head._module is hf.get_output_embeddings()
    assert model.embed._module is hf.get_input_embeddings()
    if names.mlp is not None:
        assert model.layers[1].mlp._module is hf.get_submodule(f"{names.layers}.1.{names.mlp}")
    assert model.layers[1].attn._module is hf.get_submodule(f"{names.layers}.1.{names.attn}")


def test_a_table_path_that_does_not_exist_fails_at_load(monkeypatch):
    wrong = ArchitectureNames("model.layers", "model.embed_tokens", "model.final_norm", "lm_head", "self_attn", "mlp")
    monkeypatch.setitem(ARCHITECTURES, "llama", wrong)
    with pytest.raises(ArchitectureError, match=r"model\.final_norm.*register_architecture"):
        LanguageModel(build_tiny("llama"))


def test_unknown_family_keeps_native_paths_and_explains_missing_names():
    config = T.BloomConfig(n_layer=2, hidden_size=32, n_head=4, vocab_size=64)
    hf = T.AutoModelForCausalLM.from_config(config).eval()
    model = LanguageModel(hf)
    assert model.architecture is None
    with pytest.raises(ModulePathError, match="register_architecture"):
        model.layers
    with model.trace([1, 2, 3]):
        out = model.transformer.h[0].output
        h = (out[0] if isinstance(out, tuple) else out).save()
    assert h.shape == (1, 3, 32)


def test_shared_names_survive_a_module_swap():
    hf = build_tiny("llama")
    model = LanguageModel(hf)
    model.model.norm = torch.nn.Identity()
    assert isinstance(model.final_norm._module, torch.nn.Identity)
    assert model.layers[0].attn._module is hf.model.layers[0].self_attn


def test_loading_into_a_new_tree_keeps_the_shared_names(tiny_folder, gpt2_tokenizer, monkeypatch):
    """When the loaded model cannot be moved into the skeleton (accelerate hooks), the tree is swapped."""
    from nnsight_jupyter.models import language

    monkeypatch.setattr(language, "_adopt", lambda skeleton, real: False)
    model = LanguageModel(str(tiny_folder))
    skeleton = model._model
    ids = gpt2_tokenizer("Swapped after loading", return_tensors="pt").input_ids
    with model.trace(ids):
        mid = model.layers[1].mlp.output.save()
        logits = model.output.logits.save()
    assert model._model is not skeleton
    assert model.layers[1].mlp._module is model._model.model.layers[1].mlp
    plain = T.AutoModelForCausalLM.from_pretrained(tiny_folder).eval()
    seen = {}
    handle = plain.model.layers[1].mlp.register_forward_hook(lambda m, a, o: seen.__setitem__("mlp", o.clone()))
    with torch.no_grad():
        want = plain(ids).logits
    handle.remove()
    torch.testing.assert_close(logits, want)
    torch.testing.assert_close(mid, seen["mlp"])


def test_parameters_read_in_the_trace_body_are_the_loaded_ones(tiny_folder):
    model = LanguageModel(str(tiny_folder))
    with model.trace([1, 2, 3]):
        weight = model.lm_head.weight
        hidden = model.final_norm.output
        logits = (hidden @ weight.T).save()
        want = model.output.logits.save()
    torch.testing.assert_close(logits, want)


def test_loaded_weights_sit_on_64_byte_boundaries_with_their_values_and_ties(tiny_folder):
    """Weights read from a file are copied off unaligned offsets, so a single-row product rounds as on a server."""
    plain = T.AutoModelForCausalLM.from_pretrained(str(tiny_folder)).eval()
    assert any(p.data_ptr() % 64 for p in plain.parameters()), "the file's weights are already aligned"
    model = LanguageModel(str(tiny_folder), dispatch=True)
    loaded = dict(model._model.named_parameters())
    assert all(p.data_ptr() % 64 == 0 for p in loaded.values())
    for name, p in plain.named_parameters():
        assert torch.equal(loaded[name], p), name
    assert model._model.lm_head.weight is model._model.model.embed_tokens.weight
