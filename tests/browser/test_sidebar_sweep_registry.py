"""The patching-sweep command for a model known only by its registry alias, in a real JupyterLab.

A kernel with no model loaded: the toolbar's "Insert a patching sweep" offers the registry's names,
and with `smollm2` chosen inserts a cell that loads the bundled SmolLM2 itself. Run in the page as
inserted, the cell must draw a PatchingHeatmap with one row per swept layer and one column per
token, both baselines and every cell of three layers equal (to float32 rounding) to plain
forwards of the same weights loaded with plain transformers and patched by `register_forward_hook`.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch

from ..numerics import rounding_bound, transformer_depth_width
from .conftest import ARTIFACTS, NotebookPage, run_active_cell, screenshot

pytestmark = pytest.mark.slow

CLEAN, CORRUPTED = "The Eiffel Tower is in the city of", "The Colosseum is in the city of"
CHECKED_LAYERS = (0, 13, 29)


@pytest.fixture(scope="module")
def reference():
    """The sweep's numbers from plain transformers: baselines, and every position of CHECKED_LAYERS patched."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nnsight_jupyter.models.bundled import prepare_smollm2

    folder = prepare_smollm2(progress=False)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    clean = tokenizer(CLEAN, return_tensors="pt").input_ids
    corrupted = tokenizer(CORRUPTED, return_tensors="pt").input_ids
    assert clean.shape == corrupted.shape
    paris, rome = (tokenizer.encode(t, add_special_tokens=False) for t in (" Paris", " Rome"))
    assert len(paris) == len(rome) == 1
    layers = model.model.layers

    def diff(logits):
        return float(logits[0, -1, paris[0]] - logits[0, -1, rome[0]])

    with torch.no_grad():
        saved = []
        handles = [layer.register_forward_hook(lambda m, a, out: saved.append(out.clone())) for layer in layers]
        clean_logits = model(clean).logits
        for handle in handles:
            handle.remove()
        corrupted_logits = model(corrupted).logits
        cells = {}
        for index in CHECKED_LAYERS:
            for position in range(clean.shape[1]):
                def patch(m, a, out, index=index, position=position):
                    out = out.clone()
                    out[0, position] = saved[index][0, position]
                    return out
                handle = layers[index].register_forward_hook(patch)
                cells[index, position] = diff(model(corrupted).logits)
                handle.remove()
    depth, width = transformer_depth_width(model.config)
    # A logit difference is two logits of the final row, each within rounding of its own magnitude plus the row's
    # RMS (tests/numerics.py explains the bound).
    last = corrupted_logits[0, -1]
    scale = float(last[paris[0]].abs() + last[rome[0]].abs() + 2 * last.pow(2).mean().sqrt())
    return {"clean": diff(clean_logits), "corrupted": diff(corrupted_logits), "cells": cells,
            "layers": len(layers), "tokens": clean.shape[1], "tolerance": rounding_bound(depth, width) * scale}


def test_the_sweep_template_for_a_registry_alias_runs_and_matches_plain_patching(lab, browser, reference, tmp_path):
    from nnsight_jupyter.models.registry import available

    registry = [m.name for m in available()]
    lab.write_notebook("sweep_registry.ipynb", ["%load_ext nnsight_jupyter"])
    nb = NotebookPage(lab, browser, "sweep_registry.ipynb").open()
    page = nb.page
    try:
        nb.run_all()
        page.locator(".jp-NotebookPanel-toolbar [data-jp-item-name='nnsight-insert-sweep']").click()
        dialog = page.locator(".jp-Dialog")
        dialog.wait_for()
        # No model in the kernel: the dialog offers the registry's names, in its order.
        options = dialog.locator("datalist option, select option").evaluate_all("(os) => os.map((o) => o.value)")
        assert options == registry and "smollm2" in options, options
        dialog.locator(".jp-Dialog-body input, .jp-Dialog-body select").first.fill("smollm2")
        dialog.locator(".jp-mod-accept").click()
        page.wait_for_function("() => window.jupyterapp.shell.currentWidget.content.widgets.length === 2")
        source = page.evaluate(
            "() => window.jupyterapp.shell.currentWidget.content.activeCell.model.sharedModel.getSource()")
        assert 'model = LanguageModel("smollm2")' in source and "live_sweep(model, clean, corrupted" in source, source

        started = time.monotonic()
        run_active_cell(page)
        view = nb.output(1).locator('.nnsj-view[data-view="patching_heatmap"]')
        view.wait_for(timeout=60_000)
        n_cells = reference["layers"] * reference["tokens"]
        page.wait_for_function("([root, n]) => root.dataset.done === n && root.dataset.running !== 'true'",
                               arg=[view.element_handle(), str(n_cells)], timeout=120_000)
        seconds = time.monotonic() - started
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / "sweep_registry_measurements.json").write_text(json.dumps({"run_to_drawn_s": round(seconds, 1)}))
        print(f"\nthe inserted smollm2 sweep cell ran and drew its {n_cells} cells in {seconds:.1f} s")
        tolerance = reference["tolerance"]
        # The drawn baselines carry the view's rounding (a few significant digits) on top of float32's.
        for field in ("clean", "corrupted"):
            drawn = float(view.locator(f'[data-field="{field}"]').inner_text())
            assert drawn == pytest.approx(reference[field], rel=1e-4, abs=tolerance), field
        with page.expect_download() as download:
            view.locator('button[data-export="svg"]').click()
        path = tmp_path / download.value.suggested_filename
        download.value.save_as(path)
        drawn_cells = {(int(r), int(c)): float(v) for r, c, v in
                       re.findall(r'data-row="(\d+)" data-col="(\d+)" data-value="([^"]+)"', Path(path).read_text())}
        # One row per layer, one column per token: every cell drawn, none twice.
        assert sorted(drawn_cells) == [(r, c) for r in range(reference["layers"]) for c in range(reference["tokens"])]
        for (layer, position), expected in reference["cells"].items():
            assert abs(drawn_cells[layer, position] - expected) <= tolerance, (layer, position, expected)
        worst = max(abs(drawn_cells[key] - value) for key, value in reference["cells"].items())
        print(f"largest difference from plain hooks {worst:.2e} (bound {tolerance:.2e})")
        errors = page.evaluate("""() => window.jupyterapp.shell.currentWidget.content.widgets[1].model.outputs
            .toJSON().filter(o => o.output_type === 'error').map(o => o.ename + ': ' + o.evalue)""")
        assert not errors, errors
        screenshot(view, "sidebar_sweep_registry_smollm2")
    finally:
        nb.close()
        lab.shutdown_kernels()
