"""The README's main job: `nnsight-jupyter demo` on the bundled model."""

from __future__ import annotations

import torch

from nnsight_jupyter.cli import main


def test_demo_prints_paris_and_a_patch_effect(capsys, smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert main(["demo", "--layer", "20"]) == 0
    out = capsys.readouterr().out
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    with torch.no_grad():
        logits = hf(**tok("The capital of France is", return_tensors="pt")).logits[0, -1]
    top = tok.decode([int(logits.argmax())])
    assert top == " Paris"
    first_row = out.split("Top next tokens:")[1].splitlines()[1]
    assert repr(top) in first_row
    assert f"{float(torch.softmax(logits, -1).max()):.3f}" in first_row
    assert "layer 29" in out and "Zeroing layer 20's MLP output" in out
