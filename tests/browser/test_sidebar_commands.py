"""The extension's commands in a real JupyterLab, against the model they act on.

One notebook holds a random two-layer GPT-2 (`gpt`). "Show a model's module tree", from the
toolbar and from the command palette, must open that model's tree in the sidebar with every
module's path, name, class and parameter count as `named_modules()` has them.
"""

from __future__ import annotations

import json

import pytest

from .conftest import GPT2_SETUP, ROOT, NotebookPage, build_gpt2, screenshot

pytestmark = pytest.mark.slow

SIDEBAR = "#nnsight-jupyter-sidebar"
BUILD = ROOT / "nnsight_jupyter" / "labextension" / "package.json"


@pytest.fixture(scope="module")
def notebook(lab, browser):
    lab.write_notebook("commands.ipynb", ["%load_ext nnsight_jupyter\n" + GPT2_SETUP])
    page = NotebookPage(lab, browser, "commands.ipynb").open()
    page.run_all()
    yield page
    page.close()
    lab.shutdown_kernels()


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


def check_tree(page, model) -> None:
    view = page.locator(f"{SIDEBAR} .nnsj-sb-tree[data-model='gpt'] .nnsj-view[data-view='module_tree']")
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
    # Without the search the two identical blocks fold into one row, as the view does for layers.
    folded = view.locator(".nnsj-vlist-row[data-path='transformer.h']")
    assert folded.locator(".nnsj-class").inner_text() == "2 × GPT2Block"
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
