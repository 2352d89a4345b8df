"""Tab completion in `%%trace` cells, in the order a real JupyterLab draws it.

One notebook holds a random two-layer GPT-2 (`gpt`). In a `%%trace gpt` cell's body, the menu
must list a module's children in the order `named_modules()` gives them (the forward's, not the
alphabet's), names that start with what was typed before names that only contain it; on the
header's model argument, the registry's names in the registry's order before the notebook's
models. The order must hold where JupyterLab alone re-sorts the menu alphabetically: typed on with
the menu open, and after it fills in a prefix every item shares. Each order is computed here from
the model and the registry, and compared with the items the completer drew, top to bottom.
"""

from __future__ import annotations

import pytest

from .conftest import GPT2_SETUP, NotebookPage, build_gpt2, screenshot

pytestmark = pytest.mark.slow

ENVOY_MEMBERS = ("output", "input", "inputs", "next", "call", "source")


@pytest.fixture(scope="module")
def notebook(open_notebook):
    return open_notebook("completion.ipynb", ["%load_ext nnsight_jupyter\n" + GPT2_SETUP])


def drawn_completions(page, source: str) -> list[str]:
    """Put `source` in a new last cell, cursor at its end, press Tab; the completer's items as drawn."""
    page.evaluate("""(source) => {
        const panel = window.jupyterapp.shell.currentWidget;
        panel.content.activeCellIndex = panel.content.widgets.length - 1;
        window.jupyterapp.commands.execute('notebook:insert-cell-below').then(() => {
            const cell = panel.content.activeCell;
            cell.model.sharedModel.setSource(source);
            panel.content.mode = 'edit';
            cell.editor.focus();
            cell.editor.setCursorPosition(cell.editor.getPositionAt(source.length));
            window.__nnsjReady = source;
        });
    }""", source)
    page.wait_for_function("(source) => window.__nnsjReady === source && window.jupyterapp.shell.currentWidget"
                           ".content.activeCell.model.sharedModel.getSource() === source", arg=source)
    page.keyboard.press("Tab")
    completer = page.locator(".jp-Completer")
    completer.wait_for(timeout=30_000)
    items = completer.locator(".jp-Completer-item")
    # The items in the order they are drawn on screen, top to bottom.
    offered = items.evaluate_all("""(items) => items
        .map((i) => [i.getBoundingClientRect().top, i.dataset.value])
        .sort((a, b) => a[0] - b[0]).map((pair) => pair[1])""")
    return offered


def close_completer(page) -> None:
    page.keyboard.press("Escape")
    page.locator(".jp-Completer").wait_for(state="hidden")


def test_body_completions_follow_the_forward_order(notebook):
    model, _ = build_gpt2()
    page = notebook.page
    top = [name for name, _ in model.transformer.named_modules() if name and "." not in name]
    assert top != sorted(top)
    offered = drawn_completions(page, '%%trace gpt "Hello"\nh = model.transformer.')
    assert offered[: len(top)] == top, offered
    close_completer(page)

    block = [name for name, _ in model.transformer.h[0].named_modules() if name and "." not in name]
    assert block != sorted(block)
    offered = drawn_completions(page, '%%trace gpt "Hello"\nh = model.transformer.h[0].')
    assert offered[: len(block)] == block, offered
    # The rest are the envoy's members and the block's own attributes, nothing it does not have.
    assert all(hasattr(model.transformer.h[0], n) or n in ENVOY_MEMBERS for n in offered)
    screenshot(page.locator(".jp-Completer"), "sidebar_completion_forward_order")
    close_completer(page)


def test_exact_prefix_matches_come_before_other_matches(notebook):
    model, _ = build_gpt2()
    page = notebook.page
    mlp = model.transformer.h[0].mlp
    children = [name for name, _ in mlp.named_modules() if name and "." not in name]
    offered = drawn_completions(page, '%%trace gpt "Hello"\nh = model.transformer.h[0].mlp.c')
    starting = [n for n in offered if n.startswith("c")]
    assert offered[: len(starting)] == starting, offered
    assert starting[:2] == [n for n in children if n.startswith("c")], offered  # c_fc, c_proj: the children
    rest = offered[len(starting):]
    assert rest and all("c" in n.lower() for n in rest), offered
    # The first name that only contains "c" is the child module that does (`act`), before any attribute.
    assert rest[0] == next(n for n in children if not n.startswith("c") and "c" in n), offered
    close_completer(page)


def test_the_header_offers_registry_models_first(notebook):
    from nnsight_jupyter.models.registry import available

    registry = [m.name for m in available()]
    assert len(registry) >= 2
    page = notebook.page
    offered = drawn_completions(page, "%%trace ")
    # The kernel's: the registry's names in its order, then the notebook's model (alphabetically `gpt` would
    # come first); after them JupyterLab's own provider adds the words of the cell.
    kernel = registry + ["gpt"]
    assert offered[: len(kernel)] == kernel, offered
    assert kernel != sorted(kernel)
    assert set(offered[len(kernel):]) <= {"%%", "trace"}, offered
    screenshot(page.locator(".jp-Completer"), "sidebar_completion_header")
    page.keyboard.press("Enter")
    page.wait_for_function("(text) => window.jupyterapp.shell.currentWidget.content.activeCell.model.sharedModel"
                           ".getSource() === text", arg=f"%%trace {registry[0]}", timeout=30_000)


def test_the_order_holds_when_jupyterlab_filters_the_menu(notebook):
    """JupyterLab re-sorts a menu that has a query (ties alphabetically); in `%%trace` cells the order stays."""
    from nnsight_jupyter.models.registry import available

    model, _ = build_gpt2()
    page = notebook.page
    top = [name for name, _ in model.transformer.named_modules() if name and "." not in name]
    starting = [n for n in top if n.startswith("w")]
    assert len(starting) == 2 and starting != sorted(starting)  # wte, wpe
    drawn_completions(page, '%%trace gpt "Hello"\nh = model.transformer.')
    page.keyboard.type("w")  # typed on with the menu open: JupyterLab filters and scores by "w"
    page.wait_for_function("() => document.querySelectorAll('.jp-Completer-item').length > 0 && "
                           "[...document.querySelectorAll('.jp-Completer-item')].every("
                           "(i) => i.dataset.value.toLowerCase().includes('w'))", timeout=30_000)
    items = page.locator(".jp-Completer .jp-Completer-item")
    offered = items.evaluate_all("""(items) => items.map((i) => [i.getBoundingClientRect().top, i.dataset.value])
        .sort((a, b) => a[0] - b[0]).map((pair) => pair[1])""")
    # The children first, in forward order (JupyterLab alone puts `wpe` first), then the other names starting
    # with "w", then those that only contain it.
    assert offered[:2] == starting, offered
    exact = [n for n in offered if n.startswith("w")]
    assert offered[: len(exact)] == exact and len(offered) > len(exact), offered
    close_completer(page)

    # `%%trace g`: every item starts with "gpt", which JupyterLab fills in and then scores a tie.
    registry = [m.name for m in available()]
    offered = drawn_completions(page, "%%trace g")
    kernel = [n for n in registry if n.startswith("g")] + ["gpt"]
    assert offered[: len(kernel)] == kernel and kernel != sorted(kernel), offered
    screenshot(page.locator(".jp-Completer"), "sidebar_completion_header_prefix")
    close_completer(page)


def test_a_completer_another_extension_brings_is_kept(lab, browser):
    """An extension whose completion provider brings its own completer model (jupyterlab-lsp's does, at
    rank 1000) keeps it: the `%%trace` order provider, ranked above, hands JupyterLab that model instead of
    its own. The stand-in model here draws JupyterLab's order reversed, so the module's children, which the
    kernel sends first, come last and backwards; the `%%trace` model would put them first, in forward order."""
    model, _ = build_gpt2()
    top = [name for name, _ in model.transformer.named_modules() if name and "." not in name]
    lab.write_notebook("completion_other.ipynb", ["%load_ext nnsight_jupyter\n" + GPT2_SETUP])
    nb = NotebookPage(lab, browser, "completion_other.ipynb").open()
    with nb.checked():
        nb.run_all()
        page = nb.page
        page.evaluate("""() => {
            const manager = window.jupyterapp.pluginRegistry._plugins
                .get('@jupyterlab/completer-extension:manager').service;
            const ours = manager.getProviders().get('nnsight-jupyter:trace-completion-order');
            return ours.modelFactory({}).then((model) => {
                const Base = Object.getPrototypeOf(Object.getPrototypeOf(model)).constructor;  // CompleterModel
                class Reversed extends Base {
                    completionItems() { return [...super.completionItems()].reverse(); }
                }
                manager.registerProvider({
                    identifier: 'test:own-model', rank: 1000,
                    isApplicable: async () => false,
                    fetch: async () => ({start: 0, end: 0, items: []}),
                    modelFactory: async () => new Reversed(),
                });
            });
        }""")
        offered = drawn_completions(page, '%%trace gpt "Hello"\nh = model.transformer.')
        assert offered[-len(top):] == top[::-1], offered
        assert offered[: len(top)] != top, offered
        close_completer(page)
