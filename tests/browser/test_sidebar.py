"""The JupyterLab extension in a real JupyterLab: the sidebar follows the notebook's kernel.

One notebook traces the bundled SmolLM2 with `%%trace`; the sidebar must list that model (its
class, module and parameter counts, checked against the Llama architecture built here on the meta
device from the same config), the values the trace saved (shapes from the tokenizer here), insert
module paths at the cursor, open a saved tensor, and find the kernel again after a restart and
after a switch to another kernel.
"""

from __future__ import annotations

import time

import pytest

from .conftest import NotebookPage, screenshot

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"
TRACE = (f'%%trace smollm2 "{PROMPT}"\n'
         "hidden = model.model.layers[2].output.save()\nlogits = model.lm_head.output[0, -1].save()")
SIDEBAR = "#nnsight-jupyter-sidebar"


def reference():
    """SmolLM2's architecture and the prompt's token count, from plain transformers (no weights loaded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from nnsight_jupyter.models.bundled import prepare_smollm2

    folder = prepare_smollm2(progress=False)
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    tokens = AutoTokenizer.from_pretrained(folder)(PROMPT)["input_ids"]
    return model, len(tokens)


def state(page) -> str:
    return page.locator(SIDEBAR).get_attribute("data-state")


def wait_state(page, wanted: str, timeout_s: float) -> float:
    """Seconds until the sidebar reached `wanted` (fails after `timeout_s`)."""
    started = time.monotonic()
    page.wait_for_function(
        f"() => document.querySelector('{SIDEBAR}').dataset.state === '{wanted}'", timeout=timeout_s * 1000,
        polling=50)
    return time.monotonic() - started


def test_sidebar_follows_the_kernel(lab, browser):
    model, n_tokens = reference()
    lab.write_notebook("sidebar.ipynb", ["%load_ext nnsight_jupyter", TRACE, '%%trace smollm2 "Paris"\nx = '])
    nb = NotebookPage(lab, browser, "sidebar.ipynb").open()
    page = nb.page
    with nb.checked():
        page.evaluate("() => { window.__nb = window.jupyterapp.shell.currentWidget; }")
        assert page.evaluate("() => window.jupyterapp.commands.hasCommand('nnsight:insert-trace-cell')")
        toolbar = page.locator(".jp-NotebookPanel-toolbar [data-jp-item-name='nnsight-insert-trace']")
        assert toolbar.count() == 1

        page.evaluate("() => window.jupyterapp.shell.activateById('nnsight-jupyter-sidebar')")
        # Not loaded yet: the sidebar says so and offers to load it.
        wait_state(page, "not-loaded", 10)
        assert "has not loaded nnsight_jupyter" in page.locator(SIDEBAR).inner_text()

        # Run the first two cells (the third is where paths get inserted).
        page.evaluate("""() => {
            const panel = window.jupyterapp.shell.currentWidget;
            panel.content.activeCellIndex = 0;
            window.jupyterapp.commands.execute('notebook:run-cell-and-select-next');
            window.jupyterapp.commands.execute('notebook:run-cell-and-select-next');
        }""")
        wait_state(page, "connected", 240)
        row = page.locator(f"{SIDEBAR} .nnsj-sb-model[data-model='smollm2']")
        row.wait_for(timeout=240_000)
        text = row.inner_text()
        modules = sum(1 for _ in model.modules())
        params = sum(p.numel() for p in model.parameters())
        assert type(model).__name__ in text
        assert f"{modules} modules" in text
        assert f"{params / 1e6:.1f}M params" in text

        # Saved values: names, shapes and dtypes of what the trace saved.
        hidden = page.locator(f"{SIDEBAR} .nnsj-sb-value[data-name='hidden']")
        hidden.wait_for(timeout=30_000)
        assert f"[1, {n_tokens}, {model.config.hidden_size}]" in hidden.inner_text()
        assert "float32" in hidden.inner_text()
        logits = page.locator(f"{SIDEBAR} .nnsj-sb-value[data-name='logits']")
        assert f"[{model.config.vocab_size}]" in logits.inner_text()

        # The module tree; clicking a module inserts its path at the cursor of the active cell.
        page.evaluate("""() => {
            const panel = window.jupyterapp.shell.currentWidget;
            panel.content.activeCellIndex = 2;
            const editor = panel.content.activeCell.editor;
            editor.setCursorPosition(editor.getPositionAt(panel.content.activeCell.model.sharedModel.getSource().length));
        }""")
        row.click()
        module = page.locator(f"{SIDEBAR} .nnsj-sb-tree .nnsj-tree-row[title='model.lm_head']")
        module.wait_for(timeout=30_000)
        module.click()
        page.locator(f"{SIDEBAR} .nnsj-sb-selection [data-field='path']").wait_for()
        assert page.locator(f"{SIDEBAR} .nnsj-sb-selection [data-field='path']").inner_text() == "model.lm_head"
        page.locator(f"{SIDEBAR} .nnsj-sb-insert-line").click()
        source = page.evaluate(
            "() => window.jupyterapp.shell.currentWidget.content.widgets[2].model.sharedModel.getSource()")
        expected = '%%trace smollm2 "Paris"\nx = model.lm_head\nlm_head = model.lm_head.output.save()'
        assert source == expected, source
        # The header of a %%trace cell is highlighted.
        assert page.locator(".jp-Notebook .cm-nnsight-trace-header").count() == 2
        assert page.locator(".jp-Notebook .cm-nnsight-trace-model").first.inner_text() == "smollm2"
        screenshot(page.locator(SIDEBAR), "sidebar", readme=True)

        # A saved value opens its TensorView in the main area.
        hidden.click()
        view = page.locator(".nnsj-sb-tensor").last
        view.locator("canvas").first.wait_for(timeout=30_000)
        assert "hidden" in view.inner_text()
        assert str(model.config.hidden_size) in view.inner_text()

        # Restart: the sidebar notices within 2 s that the new kernel has not loaded the extension,
        # and its button loads it.
        page.evaluate("() => window.jupyterapp.shell.activateById('nnsight-jupyter-sidebar')")
        page.evaluate("() => { window.__restart = window.__nb.sessionContext.session.kernel.restart(); }")
        page.evaluate("() => window.__restart")
        assert wait_state(page, "not-loaded", 2) < 2
        started = time.monotonic()
        page.locator(f"{SIDEBAR} .nnsj-sb-load").click()
        wait_state(page, "connected", 10)
        page.locator(f"{SIDEBAR} .nnsj-sb-models", has_text="No model in this kernel yet").wait_for(timeout=10_000)
        assert time.monotonic() - started < 10

        # Switch to another kernel: the sidebar follows it.
        old = page.evaluate("() => window.__nb.sessionContext.session.kernel.id")
        page.evaluate("() => { window.__switch = window.__nb.sessionContext.changeKernel({name: 'python3'}); }")
        page.evaluate("() => window.__switch.then(() => undefined)")
        new = page.evaluate("() => window.__nb.sessionContext.session.kernel.id")
        assert new != old
        assert wait_state(page, "not-loaded", 2) < 2
        page.evaluate("""() => window.__nb.sessionContext.session.kernel
            .requestExecute({code: '%load_ext nnsight_jupyter'}).done.then(() => undefined)""")
        assert wait_state(page, "connected", 2) < 2
