"""The extension's commands and version check in a real JupyterLab, against the model they act on.

One notebook holds a random two-layer GPT-2 (`gpt`). "Show a model's module tree", from the
toolbar and from the command palette, must open that model's tree in the sidebar with every
module's path, name, class and parameter count as `named_modules()` has them. "Insert a patching
sweep", with `gpt` chosen in its dialog, must insert a cell that runs as inserted and draws a
PatchingHeatmap whose every cell and both baselines match plain forwards patched by a
`register_forward_hook`. A second notebook's kernel reports another package version than the
extension's: the sidebar must say so and how to fix it, and say nothing while they agree.
"""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import pytest
import torch

from .conftest import GPT2_SETUP, ROOT, NotebookPage, build_gpt2, run_active_cell, screenshot

pytestmark = pytest.mark.slow

SIDEBAR = "#nnsight-jupyter-sidebar"
CLEAN, CORRUPTED = "The Eiffel Tower is in the city of", "The Colosseum is in the city of"
BUILD = ROOT / "nnsight_jupyter" / "labextension" / "package.json"


@pytest.fixture(scope="module")
def notebook(open_notebook):
    return open_notebook("commands.ipynb", ["%load_ext nnsight_jupyter\n" + GPT2_SETUP])


def tree_rows(view) -> dict[str, dict[str, str]]:
    """Every row the tree can show, by module path, read by scrolling its virtual list to the end."""
    return view.evaluate("""async (root) => {
        const list = root.querySelector('.nnsj-vlist');
        const frame = () => new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)));
        const rows = {};
        for (let top = 0; ; top += Math.max(1, list.clientHeight - 24)) {
            list.scrollTop = top;
            list.dispatchEvent(new Event('scroll'));
            await frame();
            for (const row of list.querySelectorAll('.nnsj-vlist-row')) {
                rows[row.dataset.path] = {
                    label: row.querySelector('.nnsj-label').textContent,
                    cls: row.querySelector('.nnsj-class').textContent,
                    params: row.querySelector('[data-field="params"]').title,
                    folded: row.dataset.folded,
                };
            }
            if (top + list.clientHeight >= list.scrollHeight) break;
        }
        list.scrollTop = 0;
        return rows;
    }""")


def check_tree(page, model, name: str = "gpt") -> None:
    view = page.locator(f"{SIDEBAR} .nnsj-sb-tree[data-model='{name}'] .nnsj-view[data-view='module_tree']")
    view.wait_for(timeout=30_000)
    assert view.is_visible()
    # "**" matches every path, so the search shows every module, runs of layers unfolded.
    view.locator(".nnsj-search").fill("**")
    page.wait_for_function("(root) => root.dataset.matches", arg=view.element_handle())
    rows = tree_rows(view)
    modules = dict(model.named_modules())
    assert set(rows) == set(modules)
    for path, module in modules.items():
        row = rows[path]
        assert row["cls"] == type(module).__name__, path
        assert int(row["params"].replace(",", "")) == sum(p.numel() for p in module.parameters()), path
        if path:
            assert row["label"] == path.rsplit(".", 1)[-1], path
        assert row["folded"] == "", path
    view.locator(".nnsj-search").fill("")
    if len(model.transformer.h) < 2:
        return
    # Without the search the identical blocks fold into one row, as the view does for layers.
    folded = view.locator(".nnsj-vlist-row[data-path='transformer.h']")
    assert folded.locator(".nnsj-class").inner_text() == f"{len(model.transformer.h)} × GPT2Block"
    assert folded.locator('[data-field="params"]').get_attribute("title") == \
        f"{sum(p.numel() for p in model.transformer.h.parameters()):,}"


def hide_sidebar(page) -> None:
    page.evaluate("() => window.jupyterapp.shell.activateById('filebrowser')")
    page.locator(SIDEBAR).wait_for(state="hidden")


def test_jupyterlab_serves_this_checkouts_extension(notebook):
    """What the other tests check is this checkout's build (`npm run build`), not an older install."""
    built = json.loads(BUILD.read_text())["jupyterlab"]["_build"]["load"]
    served = notebook.page.evaluate("""() => JSON.parse(document.getElementById('jupyter-config-data').textContent)
        .federated_extensions.filter(e => e.name === 'nnsight-jupyter').map(e => e.load)""")
    assert served == [built], (
        f"JupyterLab serves nnsight-jupyter {served}, this checkout's build is {built}: reinstall the package "
        "(bash scripts/setup.sh) or put the build first on JUPYTER_PATH")


def test_show_module_tree_from_the_toolbar_and_the_palette(notebook):
    model, _ = build_gpt2()
    page = notebook.page
    hide_sidebar(page)
    page.locator(".jp-NotebookPanel-toolbar [data-jp-item-name='nnsight-show-tree']").click()
    page.locator(SIDEBAR).wait_for(state="visible")
    check_tree(page, model)
    screenshot(page.locator(SIDEBAR), "sidebar_module_tree")

    # Close the tree and the sidebar; the palette's command opens both again.
    page.locator(f"{SIDEBAR} .nnsj-sb-model[data-model='gpt']").click()
    page.locator(f"{SIDEBAR} .nnsj-sb-tree[data-model='gpt']").wait_for(state="hidden")
    hide_sidebar(page)
    page.evaluate("() => window.jupyterapp.commands.execute('apputils:activate-command-palette')")
    palette = page.locator("#command-palette")
    palette.locator("input").fill("Show a model's module tree")
    item = palette.locator(".lm-CommandPalette-item", has_text="Show a model's module tree")
    item.wait_for()
    item.click()
    page.locator(SIDEBAR).wait_for(state="visible")
    check_tree(page, model)


@pytest.fixture(scope="module")
def sweep_reference():
    """logit(" Paris") - logit(" Rome") of the corrupted run with one block output cell patched from the clean run."""
    model, tokenizer = build_gpt2()
    clean = tokenizer(CLEAN, return_tensors="pt").input_ids
    corrupted = tokenizer(CORRUPTED, return_tensors="pt").input_ids
    assert clean.shape == corrupted.shape
    paris, rome = tokenizer.encode(" Paris")[0], tokenizer.encode(" Rome")[0]

    def diff(logits):
        return float(logits[0, -1, paris] - logits[0, -1, rome])

    blocks = model.transformer.h
    with torch.no_grad():
        saved = []
        handles = [b.register_forward_hook(lambda m, a, out: saved.append(out[0].clone())) for b in blocks]
        clean_value = diff(model(clean).logits)
        for handle in handles:
            handle.remove()
        corrupted_value = diff(model(corrupted).logits)
        values = torch.zeros(len(blocks), clean.shape[1])
        for layer, block in enumerate(blocks):
            for position in range(clean.shape[1]):
                def patch(m, a, out, layer=layer, position=position):
                    out = out.clone()
                    out[0, position] = saved[layer][position]
                    return out
                handle = block.register_forward_hook(patch)
                values[layer, position] = diff(model(corrupted).logits)
                handle.remove()
    return {"values": values, "clean": clean_value, "corrupted": corrupted_value}


def test_the_inserted_patching_sweep_runs_and_matches_plain_patching(notebook, sweep_reference, tmp_path):
    page = notebook.page
    before = page.evaluate("() => window.jupyterapp.shell.currentWidget.content.widgets.length")
    page.evaluate("() => { window.jupyterapp.shell.currentWidget.content.activeCellIndex = 0; }")
    page.locator(".jp-NotebookPanel-toolbar [data-jp-item-name='nnsight-insert-sweep']").click()
    dialog = page.locator(".jp-Dialog")
    dialog.wait_for()
    # The dialog offers the kernel's model first, then the registry's.
    options = dialog.locator("datalist option, select option").evaluate_all("(os) => os.map((o) => o.value)")
    assert options[0] == "gpt" and "smollm2" in options, options
    dialog.locator(".jp-Dialog-body input, .jp-Dialog-body select").first.fill("gpt")
    dialog.locator(".jp-mod-accept").click()
    page.wait_for_function(f"() => window.jupyterapp.shell.currentWidget.content.widgets.length === {before + 1}")
    source = page.evaluate(
        "() => window.jupyterapp.shell.currentWidget.content.activeCell.model.sharedModel.getSource()")
    assert "live_sweep(gpt, clean, corrupted" in source, source
    assert "LanguageModel(" not in source  # the notebook's own model, not a second copy
    run_active_cell(page)

    cell = page.evaluate("() => window.jupyterapp.shell.currentWidget.content.activeCellIndex")
    view = notebook.output(cell).locator('.nnsj-view[data-view="patching_heatmap"]')
    view.wait_for(timeout=60_000)
    values = sweep_reference["values"]
    page.wait_for_function("([root, n]) => root.dataset.done === n && root.dataset.running !== 'true'",
                           arg=[view.element_handle(), str(values.numel())], timeout=60_000)
    assert view.locator(".nnsj-hm-rows .nnsj-hm-label").count() == values.shape[0]
    assert view.locator(".nnsj-hm-cols .nnsj-hm-label").count() == values.shape[1]
    clean = float(view.locator('[data-field="clean"]').inner_text())
    corrupted = float(view.locator('[data-field="corrupted"]').inner_text())
    assert clean == pytest.approx(sweep_reference["clean"], rel=1e-4, abs=1e-5)
    assert corrupted == pytest.approx(sweep_reference["corrupted"], rel=1e-4, abs=1e-5)
    # Every cell's number, as the SVG export writes it.
    with page.expect_download() as download:
        view.locator('button[data-export="svg"]').click()
    path = tmp_path / download.value.suggested_filename
    download.value.save_as(path)
    cells = re.findall(r'data-row="(\d+)" data-col="(\d+)" data-value="([^"]+)"', Path(path).read_text())
    assert len(cells) == values.numel()
    for row, col, value in cells:
        assert float(value) == pytest.approx(float(values[int(row), int(col)]), rel=1e-4, abs=1e-5), (row, col)
    screenshot(view, "sidebar_sweep_template")


def mismatch(page):
    return page.locator(f"{SIDEBAR} .nnsj-sb-mismatch")


def open_sidebar_connected(page) -> None:
    page.evaluate("() => window.jupyterapp.shell.activateById('nnsight-jupyter-sidebar')")
    page.wait_for_function(f"() => document.querySelector('{SIDEBAR}').dataset.state === 'connected'",
                           timeout=30_000)
    # The first snapshot has been drawn once the models section says something.
    page.locator(f"{SIDEBAR} .nnsj-sb-models > *").first.wait_for(timeout=30_000)


def test_the_sidebar_says_when_kernel_and_extension_versions_differ(lab, browser):
    extension = json.loads((ROOT / "labextension" / "package.json").read_text())["version"]
    lab.write_notebook("versions.ipynb", ["%load_ext nnsight_jupyter\nimport nnsight_jupyter\n"
                                          "print(nnsight_jupyter.__version__)"])
    nb = NotebookPage(lab, browser, "versions.ipynb").open()
    page = nb.page
    try:
        nb.run_all()
        kernel_version = page.evaluate("""() => window.jupyterapp.shell.currentWidget.content.widgets[0].model
            .outputs.toJSON()[0].text.trim()""")
        assert kernel_version == extension  # the packages agree here, as installed
        open_sidebar_connected(page)
        assert mismatch(page).count() == 0
        # The extension told the kernel its version when it opened the comm (the kernel checks it too).
        opened_with = kernel_output(page, "import json, nnsight_jupyter.sidebar as _s\n"
                                          "print(json.dumps([s.extension for s in _s._sessions]))")
        assert json.loads(opened_with) == [{"protocol": 1, "version": extension}]
        assert page.locator(f"{SIDEBAR} .nnsj-sb-warning").inner_text().strip() == ""

        # Another version in the kernel, set while the sidebar is closed (so before it connects again).
        hide_sidebar(page)
        page.evaluate("""() => window.jupyterapp.shell.currentWidget.sessionContext.session.kernel
            .requestExecute({code: 'import nnsight_jupyter.sidebar\\nnnsight_jupyter.sidebar.__version__ = "9.8.7"'})
            .done.then(() => undefined)""")
        open_sidebar_connected(page)
        mismatch(page).wait_for(timeout=10_000)
        text = mismatch(page).inner_text()
        assert "9.8.7" in text and extension in text, text
        assert "pip install -U nnsight-jupyter" in text and "restart the kernel" in text, text
        screenshot(page.locator(SIDEBAR), "sidebar_version_mismatch")
        # The sidebar still works beside the warning.
        assert page.locator(f"{SIDEBAR} .nnsj-sb-models", has_text="No model in this kernel yet").count() == 1

        # Put back, the next cell's snapshot clears the warning.
        page.evaluate("""() => window.jupyterapp.shell.currentWidget.sessionContext.session.kernel
            .requestExecute({code: 'nnsight_jupyter.sidebar.__version__ = nnsight_jupyter.__version__'})
            .done.then(() => undefined)""")
        mismatch(page).wait_for(state="detached", timeout=10_000)
        errors = [line for line in nb.console if "pageerror" in line]
        assert not errors, errors
    finally:
        # Only this notebook's kernel: the module's notebook keeps its own for the tests after this one.
        kernel_id = page.evaluate("() => window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.id")
        nb.close()
        urllib.request.urlopen(urllib.request.Request(f"{lab.url}/api/kernels/{kernel_id}", method="DELETE"),
                               timeout=10).close()  # noqa: S310 - the test's own server


def test_tab_completes_module_paths_in_a_trace_cell_body(notebook):
    model, _ = build_gpt2()
    children = [name for name, _ in model.transformer.h[0].named_children()]
    page = notebook.page
    page.evaluate("""() => {
        const panel = window.jupyterapp.shell.currentWidget;
        panel.content.activeCellIndex = panel.content.widgets.length - 1;
        window.jupyterapp.commands.execute('notebook:insert-cell-below');
    }""")
    page.wait_for_function("() => window.jupyterapp.shell.currentWidget.content.activeCell.model.sharedModel"
                           ".getSource() === ''")
    page.evaluate("""() => {
        const panel = window.jupyterapp.shell.currentWidget;
        const cell = panel.content.activeCell;
        cell.model.sharedModel.setSource('%%trace gpt "Hello"\\nh = model.transformer.h[0].');
        panel.content.mode = 'edit';
        cell.editor.focus();
        cell.editor.setCursorPosition(cell.editor.getPositionAt(cell.model.sharedModel.getSource().length));
    }""")
    page.keyboard.press("Tab")
    completer = page.locator(".jp-Completer")
    completer.wait_for(timeout=30_000)
    offered = completer.locator(".jp-Completer-item").evaluate_all(
        "(items) => items.map((i) => i.dataset.value)")
    # Every submodule of the block is offered, and nothing the block does not have (JupyterLab lists
    # them alphabetically among the module's attributes and the envoy's output/input/...).
    assert set(children) <= set(offered), offered
    block = model.transformer.h[0]
    assert all(hasattr(block, name) or name in ("output", "input", "inputs", "next", "call", "source")
               for name in offered)
    page.keyboard.press("Escape")
    completer.wait_for(state="hidden")
    page.evaluate("""() => {
        const panel = window.jupyterapp.shell.currentWidget;
        const cell = panel.content.activeCell;
        cell.model.sharedModel.setSource(cell.model.sharedModel.getSource() + 'ml');
        panel.content.mode = 'edit';
        cell.editor.focus();
        cell.editor.setCursorPosition(cell.editor.getPositionAt(cell.model.sharedModel.getSource().length));
    }""")
    page.keyboard.press("Tab")
    completer.wait_for(timeout=30_000)
    assert completer.locator(".jp-Completer-item").evaluate_all("(items) => items.map((i) => i.dataset.value)") \
        == ["mlp"]
    page.keyboard.press("Enter")
    page.wait_for_function("() => window.jupyterapp.shell.currentWidget.content.activeCell.model.sharedModel"
                           ".getSource() === '%%trace gpt \"Hello\"\\nh = model.transformer.h[0].mlp'",
                           timeout=30_000)


def kernel_output(page, code: str) -> str:
    """What `code` prints when run in the notebook's kernel (outside the notebook's cells)."""
    return page.evaluate("""async (code) => {
        const kernel = window.jupyterapp.shell.currentWidget.sessionContext.session.kernel;
        const future = kernel.requestExecute({code, store_history: false});
        let text = '';
        future.onIOPub = (msg) => {
            if (msg.header.msg_type === 'stream') text += msg.content.text;
            if (msg.header.msg_type === 'error') text += msg.content.ename + ': ' + msg.content.evalue;
        };
        await future.done;
        return text;
    }""", code)


def test_insert_a_trace_cell_with_the_sidebar_closed(lab, notebook):
    """The dialog still lists the kernel's and the registry's models; the kernel keeps no sidebar link after."""
    model, tokenizer = build_gpt2()
    prompt = "The capital of France is"
    with torch.no_grad():
        expected = model(tokenizer(prompt, return_tensors="pt").input_ids).logits[0, -1].topk(5)
    page = notebook.page
    hide_sidebar(page)
    page.evaluate("() => { const nb = window.jupyterapp.shell.currentWidget.content; "
                  "nb.activeCellIndex = nb.widgets.length - 1; }")
    before = page.evaluate("() => window.jupyterapp.shell.currentWidget.content.widgets.length")
    page.locator(".jp-NotebookPanel-toolbar [data-jp-item-name='nnsight-insert-trace']").click()
    dialog = page.locator(".jp-Dialog")
    dialog.wait_for()
    options = dialog.locator("datalist option, select option").evaluate_all("(os) => os.map((o) => o.value)")
    assert options[0] == "gpt" and "smollm2" in options, options
    dialog.locator(".jp-Dialog-body input, .jp-Dialog-body select").first.fill("gpt")
    dialog.locator(".jp-mod-accept").click()
    page.wait_for_function(f"() => window.jupyterapp.shell.currentWidget.content.widgets.length === {before + 1}")
    source = page.evaluate(
        "() => window.jupyterapp.shell.currentWidget.content.activeCell.model.sharedModel.getSource()")
    assert source.startswith(f'%%trace gpt "{prompt}"\n'), source
    run_active_cell(page)
    printed = kernel_output(page, "import json\ntop = logits.topk(5)\n"
                                  "print(json.dumps([top.indices.tolist(), top.values.tolist()]))")
    indices, values = json.loads(printed)
    assert indices == expected.indices.tolist()
    assert values == pytest.approx(expected.values.tolist(), rel=1e-5, abs=1e-5)

    # The comm opened for the dialog is closed again: nothing of the sidebar's runs after cells.
    assert kernel_output(page, "import nnsight_jupyter.sidebar as _s\nprint(len(_s._sessions))").strip() == "0"
    kernel_id = page.evaluate("() => window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.id")
    with urllib.request.urlopen(f"{lab.url}/api/kernels/{kernel_id}", timeout=10) as response:  # noqa: S310
        assert json.loads(response.read())["connections"] == 1  # the notebook's own, no second one


def test_with_two_models_the_tree_command_asks_which_and_draws_that_one(notebook):
    from transformers import GPT2Config, GPT2LMHeadModel

    page = notebook.page
    made = kernel_output(page, "small = LanguageModel(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, "
                               "n_positions=32)).eval(), tokenizer=tokenizer)\nprint('made')")
    assert made.strip() == "made", made
    small = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=32))
    hide_sidebar(page)
    page.locator(".jp-NotebookPanel-toolbar [data-jp-item-name='nnsight-show-tree']").click()
    dialog = page.locator(".jp-Dialog")
    dialog.wait_for(timeout=30_000)
    assert "Module tree of" in dialog.inner_text()
    options = dialog.locator("select option").evaluate_all("(os) => os.map((o) => o.value)")
    assert sorted(options) == ["gpt", "small"], options
    dialog.locator(".jp-Dialog-body select").select_option("small")
    dialog.locator(".jp-mod-accept").click()
    dialog.wait_for(state="detached")
    check_tree(page, small, "small")
    assert not page.locator(f"{SIDEBAR} .nnsj-sb-tree[data-model='gpt']").is_visible()
    screenshot(page.locator(SIDEBAR), "sidebar_tree_of_the_chosen_model")
