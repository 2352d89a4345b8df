"""`nnsight-jupyter` command line: `demo` runs the main job on the bundled model."""

from __future__ import annotations

import argparse
import sys
import time


def demo(prompt: str, layer: int) -> int:
    """Load the bundled SmolLM2, read every layer and patch one, printing what it finds."""
    import torch

    from .models.language import LanguageModel

    started = time.perf_counter()
    model = LanguageModel("smollm2", dispatch=True)
    tokenizer = model.tokenizer
    print(f"Loaded SmolLM2-135M-Instruct in {time.perf_counter() - started:.1f} s")
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    n_layers = len(model.layers)

    with torch.no_grad(), model.trace(ids):
        norms = [model.layers[i].output[0, -1].norm().save() for i in range(n_layers)]
        logits = model.lm_head.output[0, -1].save()

    probs = torch.softmax(logits, dim=-1)
    top = torch.topk(probs, 5)
    print(f"\nPrompt: {prompt!r}")
    print("Top next tokens:")
    for p, i in zip(top.values, top.indices):
        print(f"  {tokenizer.decode([int(i)])!r:<14} {float(p):.3f}")
    print("\nResidual-stream norm at the last position, per layer:")
    peak = max(float(n) for n in norms)
    for i, n in enumerate(norms):
        bar = "#" * max(1, int(30 * float(n) / peak))
        print(f"  layer {i:2d} {float(n):8.1f} {bar}")

    target = int(top.indices[0])
    with torch.no_grad(), model.trace(ids):
        model.layers[layer].mlp.output[:, -1] = 0
        patched = torch.softmax(model.lm_head.output[0, -1], dim=-1)[target].save()  # type: ignore[attr-defined]
    print(
        f"\nZeroing layer {layer}'s MLP output at the last position moves "
        f"P({tokenizer.decode([target])!r}) from {float(probs[target]):.3f} to {float(patched):.3f}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nnsight-jupyter", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run_demo = sub.add_parser("demo", help="trace the bundled SmolLM2: top tokens, layer norms, one ablation")
    run_demo.add_argument("prompt", nargs="?", default="The capital of France is")
    run_demo.add_argument("--layer", type=int, default=15, help="layer whose MLP output is zeroed (default 15)")
    sub.add_parser("serve", help="run the remote backend server (nnsight-jupyter serve --help)", add_help=False)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        from .remote.serve import main as serve_main

        return serve_main(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "demo":
        return demo(args.prompt, args.layer)
    return 2


if __name__ == "__main__":
    sys.exit(main())
