"""Models of four architectures, and a plain-torch reference that records module values with hooks.

Every engine test compares what a trace sees with what `register_forward_hook` /
`register_forward_pre_hook` see on the same model and inputs: the reference never touches the
engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch
from torch import nn


class NestedMLP(nn.Module):
    """An MLP whose layers sit in a ModuleList of ModuleDicts, with a Sequential head."""

    def __init__(self, width: int = 16, depth: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(8, width)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"fc": nn.Linear(width, width), "act": nn.GELU(), "norm": nn.LayerNorm(width)})
            for _ in range(depth)
        )
        self.head = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = h + block["norm"](block["act"](block["fc"](h)))
        return self.head(h)


class SmallConvNet(nn.Module):
    """A non-transformer: convolutions, pooling and a GRU over the pooled sequence."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv1d(8, 8, 3, padding=1), nn.ReLU()
        )
        self.rnn = nn.GRU(8, 12, batch_first=True)
        self.classifier = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)  # [b, 8, t]
        seq, _ = self.rnn(f.transpose(1, 2))
        return self.classifier(seq[:, -1])


class LoopedBlock(nn.Module):
    """One block applied three times: a module that runs several times per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 6)
        self.block = nn.Linear(6, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for _ in range(3):
            h = torch.tanh(self.block(h))
        return self.out(h)


@dataclass
class Arch:
    """A model plus what tests need to know about it."""

    name: str
    module: nn.Module
    make_input: Callable[[int], Any]  # batch size -> input tensor
    early: str  # a module path early in the forward
    late: str  # a module path later in the forward
    final: str  # the last module whose output feeds the model output
    # For comparisons across batch shapes (tests/numerics.py): how many reductions the deepest
    # value passes through, and the longest of them (counted from the architecture below).
    depth: int = 1
    width: int = 1

    def get(self, path: str) -> nn.Module:
        return self.module.get_submodule(path)


def _tiny_gpt2() -> Arch:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=3, n_embd=32, n_head=4, vocab_size=97, n_positions=64, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).eval()
    gen = torch.Generator().manual_seed(1)
    # Per block: two LayerNorms, qkv, q.k, softmax, attn.v, proj, fc, proj (9); 3 blocks, ln_f, lm_head.
    return Arch("gpt2", model, lambda b: torch.randint(1, 97, (b, 7), generator=gen), "transformer.h.0",
                "transformer.h.2", "lm_head", depth=29, width=128)


def _mlp() -> Arch:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(2)
    # embed, 3 x (fc, norm), three head layers.
    return Arch("mlp", NestedMLP().eval(), lambda b: torch.randn(b, 8, generator=gen), "blocks.0.fc",
                "blocks.2.norm", "head.2", depth=10, width=16)


def _convnet() -> Arch:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(3)
    # two convolutions (3x3 and 8x3 terms), the GRU's 10 recurrent steps (8 + 12 terms), classifier.
    return Arch("convnet", SmallConvNet().eval(), lambda b: torch.randn(b, 3, 10, generator=gen), "features.0",
                "features.2", "classifier", depth=13, width=24)


_SMOLLM2: dict[str, Any] = {}


def _smollm2(folder) -> Arch:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if "model" not in _SMOLLM2:
        _SMOLLM2["model"] = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        _SMOLLM2["tok"] = AutoTokenizer.from_pretrained(folder)
    tok = _SMOLLM2["tok"]

    def make_input(b: int) -> torch.Tensor:
        ids = tok("The capital of France is", return_tensors="pt").input_ids
        return ids.repeat(b, 1)

    # Per block: two RMSNorms, q/k/v, q.k, softmax, attn.v, o, gate/up, down (9); 30 blocks, norm, lm_head.
    return Arch("smollm2", _SMOLLM2["model"], make_input, "model.layers.3", "model.layers.20", "lm_head",
                depth=272, width=1536)


ARCH_NAMES = ["gpt2", "smollm2", "mlp", "convnet"]


@pytest.fixture(params=ARCH_NAMES)
def arch(request: pytest.FixtureRequest) -> Arch:
    if request.param == "smollm2":
        return _smollm2(request.getfixturevalue("smollm2_dir"))
    return {"gpt2": _tiny_gpt2, "mlp": _mlp, "convnet": _convnet}[request.param]()


@pytest.fixture
def gpt2() -> Arch:
    return _tiny_gpt2()


@pytest.fixture
def looped() -> LoopedBlock:
    torch.manual_seed(0)
    return LoopedBlock().eval()


def first_tensor(value: Any) -> torch.Tensor:
    """The main tensor of a module output (a tensor, or the first element of a tuple)."""
    while not isinstance(value, torch.Tensor):
        if isinstance(value, dict):
            value = next(v for v in value.values() if isinstance(v, torch.Tensor))
        else:
            value = value[0]
    return value


def clone_tree(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, tuple):
        return tuple(clone_tree(v) for v in value)
    if isinstance(value, list):
        return [clone_tree(v) for v in value]
    if isinstance(value, dict):
        cloned = {k: clone_tree(v) for k, v in value.items()}
        return cloned if type(value) is dict else type(value)(**cloned)
    return value


def reference_run(module: nn.Module, x: Any, paths: list[str], *, edit: dict[str, Callable] | None = None,
                  edit_input: dict[str, Callable] | None = None) -> tuple[dict[str, list], dict[str, list], Any]:
    """Run `module(x)` with plain torch hooks; return (outputs, inputs, result) per path and call.

    `edit[path](output) -> new_output` and `edit_input[path](args) -> new_args` patch values the way
    a hook-based tool would.
    """
    outputs: dict[str, list] = {p: [] for p in paths}
    inputs: dict[str, list] = {p: [] for p in paths}
    handles = []
    for path in set(paths) | set(edit or {}) | set(edit_input or {}):
        sub = module.get_submodule(path)

        def pre(mod, args, kwargs, path=path):
            if edit_input and path in edit_input:
                args = edit_input[path](args)
            if path in inputs:
                inputs[path].append(clone_tree((args, kwargs)))
            return args, kwargs

        def post(mod, args, kwargs, out, path=path):
            if edit and path in edit:
                out = edit[path](out)
            if path in outputs:
                outputs[path].append(clone_tree(out))
            return out

        handles.append(sub.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(sub.register_forward_hook(post, with_kwargs=True))
    try:
        with torch.no_grad():
            result = module(x)
    finally:
        for h in handles:
            h.remove()
    return outputs, inputs, clone_tree(result)


def engine_state(module: nn.Module) -> dict[str, Any]:
    """Everything a trace could leave behind on a module tree."""
    state = {}
    for name, sub in module.named_modules():
        state[name] = (
            frozenset(sub.__dict__),  # an instance `forward` or `_call_impl` left behind shows here
            len(sub._forward_hooks),
            len(sub._forward_pre_hooks),
            len(sub._backward_hooks),
            sub.training,
        )
    for name, p in module.named_parameters():
        state["param:" + name] = (p.requires_grad, None if p.grad is None else p.grad.clone(), p.data.clone())
    state["grad_enabled"] = torch.is_grad_enabled()
    return state


def assert_same_state(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for key in before:
        a, b = before[key], after[key]
        if key.startswith("param:"):
            assert a[0] == b[0], key
            assert (a[1] is None) == (b[1] is None), f"{key}: gradient left behind"
            if a[1] is not None:
                assert torch.equal(a[1], b[1]), key
            assert torch.equal(a[2], b[2]), key
        else:
            assert a == b, f"{key}: {a} != {b}"
