"""Independent references for the analyses: plain Hugging Face forwards with `register_forward_hook`.

Nothing here touches the engine or `nnsight_jupyter.analysis`: a patched run is one plain
forward of the corrupted prompt with a hook that writes the clean value into one cell, exactly
as one would write it by hand.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch

from tests.numerics import rounding_bound, transformer_depth_width

VOCAB = 512


def hook_value(module: torch.nn.Module, kind: str, model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Row 0 of a module's output (or first input) in a plain forward of `ids`."""
    seen: list[torch.Tensor] = []
    if kind == "output":
        handle = module.register_forward_hook(
            lambda m, args, out: seen.append((out[0] if isinstance(out, tuple) else out)[0].detach().clone()))
    else:
        handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0][0].detach().clone()))
    try:
        with torch.no_grad():
            model(ids.unsqueeze(0))
    finally:
        handle.remove()
    return seen[0]


def patched_logits(module: torch.nn.Module, kind: str, model: torch.nn.Module, ids: torch.Tensor,
                   edit: Callable[[torch.Tensor], None]) -> torch.Tensor:
    """The final position's logits of a plain forward of `ids` with `edit` applied to the module's value."""
    def change(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        edit(tensor[0])
        return tensor

    if kind == "output":
        handle = module.register_forward_hook(
            lambda m, args, out: (change(out[0]), *out[1:]) if isinstance(out, tuple) else change(out))
    else:
        handle = module.register_forward_pre_hook(lambda m, args: (change(args[0]), *args[1:]))
    try:
        with torch.no_grad():
            return model(ids.unsqueeze(0)).logits[0, -1]
    finally:
        handle.remove()


class Reference:
    """Metric values of plain runs, and how far a batched computation of them may be off (`atol`)."""

    def __init__(self, values: torch.Tensor, logits: list[torch.Tensor], config: Any) -> None:
        self.values = values
        stacked = torch.stack(logits).double()
        scale = float((stacked.abs() + stacked.pow(2).mean(-1, keepdim=True).sqrt()).max())
        # Each logit of a run computed as one row of a batch is within rounding_bound x (|logit| +
        # rms of its logits) of the same run computed alone (tests/numerics.py). A difference of two
        # logits is within twice that; so is a probability, whose change is at most the largest
        # change of a log-probability, itself at most twice the largest change of a logit.
        self.atol = 2 * rounding_bound(*transformer_depth_width(config)) * scale


def naive_sweep(model: torch.nn.Module, module_of: Callable[[int], torch.nn.Module], kind: str,
                clean: torch.Tensor, corrupted: torch.Tensor, cells: list[tuple[int, Any, Any]],
                metric: Callable[[torch.Tensor], torch.Tensor]) -> Reference:
    """One plain forward per cell `(layer, position or None, column slice or None)`; the metric of each."""
    values, logits = [], []
    clean_values: dict[int, torch.Tensor] = {}
    for layer, position, columns in cells:
        module = module_of(layer)
        if layer not in clean_values:
            clean_values[layer] = hook_value(module, kind, model, clean)
        where = (slice(None) if position is None else position, slice(None) if columns is None else columns)
        source = clean_values[layer][where]

        def edit(tensor: torch.Tensor, where: Any = where, source: torch.Tensor = source) -> None:
            tensor[where] = source

        logits.append(patched_logits(module, kind, model, corrupted, edit))
        values.append(metric(logits[-1].unsqueeze(0))[0])
    return Reference(torch.stack(values), logits, model.config)


def build_tiny(kind: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random causal LM: 3 layers, 32 wide, 4 query heads (2 key/value heads for Llama and Gemma).

    A 512-token vocabulary keeps the unembedding, which dominates a tiny model's forward with
    GPT-2's 50257 tokens, from dominating the test time; the weights are scaled up from the
    default initialisation so that patching one cell moves the logits visibly.
    """
    import transformers as T

    common = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0)
    if kind == "gpt2":
        config = T.GPT2Config(n_layer=3, n_embd=32, n_head=4, n_positions=64, **common)
    elif kind == "llama":
        config = T.LlamaConfig(num_hidden_layers=3, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                               num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, **common)
    else:
        config = T.Gemma3TextConfig(num_hidden_layers=3, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=8, max_position_embeddings=64, sliding_window=4,
                                    pad_token_id=0, **common)
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return model


@pytest.fixture(scope="module", params=["gpt2", "llama", "gemma3"])
def tiny(request):
    """(family, plain HF model), see `build_tiny`."""
    return request.param, build_tiny(request.param)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: on two shared cores, OpenMP threads spin-wait for a descheduled peer."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    from nnsight_jupyter import LanguageModel

    return LanguageModel(str(smollm2_dir), dispatch=True)
