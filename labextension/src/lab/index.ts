/**
 * The JupyterLab extension: the nnsight sidebar, the notebook commands and toolbar buttons, and
 * the `%%trace` header highlighting. Bundled by `build.mjs` into `lib/index.js`, which
 * `jupyter-builder` turns into the prebuilt extension shipped in the wheel.
 */

import { ILabShell, ILayoutRestorer, JupyterFrontEnd, JupyterFrontEndPlugin } from "@jupyterlab/application";
import { ICommandPalette, InputDialog, MainAreaWidget } from "@jupyterlab/apputils";
import { EditorExtensionRegistry, IEditorExtensionRegistry } from "@jupyterlab/codemirror";
import { ICompletionProvider, ICompletionProviderManager } from "@jupyterlab/completer";
import { INotebookTracker, NotebookActions, NotebookPanel } from "@jupyterlab/notebook";
import { LabIcon } from "@jupyterlab/ui-components";
import pkg from "../../package.json";
import { TraceCompletionOrder } from "./completer";
import { KernelLink } from "./kernel_link";
import { viewRendererFactory } from "./mime";
import { ModelEntry, sweepTemplate, traceCell } from "./protocol";
import { Sidebar, SIDEBAR_ID } from "./sidebar";
import { traceHighlight } from "./trace_syntax";

const PLUGIN_ID = "nnsight-jupyter:plugin";

export const CommandIDs = {
  insertTrace: "nnsight:insert-trace-cell",
  insertSweep: "nnsight:insert-patching-sweep",
  showTree: "nnsight:show-module-tree",
  openSidebar: "nnsight:open-sidebar",
};

const icon = new LabIcon({
  name: "nnsight-jupyter:icon",
  svgstr:
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24"><g class="jp-icon3" fill="#616161">' +
    '<circle cx="5" cy="6" r="2.2"/><circle cx="5" cy="18" r="2.2"/><circle cx="12" cy="12" r="2.2"/>' +
    '<circle cx="19" cy="6" r="2.2"/><circle cx="19" cy="18" r="2.2"/>' +
    '<path d="M6.6 7.2l3.8 3.6M6.6 16.8l3.8-3.6M13.6 10.8l3.8-3.6M13.6 13.2l3.8 3.6"' +
    ' stroke="#616161" stroke-width="1.2"/></g></svg>',
});

/** Add a code cell below the active one holding `source`, and select it. */
function insertCell(panel: NotebookPanel, source: string): void {
  const notebook = panel.content;
  NotebookActions.insertBelow(notebook);
  const cell = notebook.activeCell;
  if (cell) {
    cell.model.sharedModel.setSource(source);
    notebook.mode = "edit";
    cell.editor?.setCursorPosition(cell.editor.getPositionAt(source.length) ?? { line: 0, column: 0 });
  }
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: PLUGIN_ID,
  description: "nnsight sidebar, commands and %%trace highlighting",
  autoStart: true,
  requires: [INotebookTracker],
  optional: [ICommandPalette, ILayoutRestorer, IEditorExtensionRegistry, ILabShell, ICompletionProviderManager],
  activate: (
    app: JupyterFrontEnd,
    tracker: INotebookTracker,
    palette: ICommandPalette | null,
    restorer: ILayoutRestorer | null,
    editors: IEditorExtensionRegistry | null,
    labShell: ILabShell | null,
    completions: ICompletionProviderManager | null,
  ) => {
    // The views' MIME type, preferred over the widget (rank -10) in each notebook: saved outputs
    // draw without a kernel, live ones switch to the widget when it appears.
    tracker.widgetAdded.connect((_tracker, panel) => {
      const rendermime = panel.content.rendermime;
      rendermime.addFactory(viewRendererFactory(rendermime), -20);
    });

    const link = new KernelLink(tracker, pkg.version);
    const sidebar = new Sidebar(link, pkg.version, (widget: MainAreaWidget) => {
      app.shell.add(widget, "main", { mode: "split-right" });
      app.shell.activateById(widget.id);
    });
    sidebar.title.icon = icon;
    app.shell.add(sidebar, "left", { rank: 600 });
    restorer?.add(sidebar, SIDEBAR_ID);
    void labShell;

    const current = () => tracker.currentWidget;

    /** Ask for a model: the kernel's first, then the registry's; a free text box when none is known. */
    const chooseModel = async (title: string): Promise<{ name: string; entry?: ModelEntry } | null> => {
      const { loaded, registry } = await link.models();
      const names = [...new Set([...loaded.map((m) => m.name), ...registry])];
      const result = names.length
        ? await InputDialog.getItem({ title, items: names, editable: true })
        : await InputDialog.getText({ title: `${title} (a registry name or Hugging Face id)`, text: "smollm2" });
      if (!result.button.accept || !result.value) return null;
      return { name: result.value, entry: loaded.find((m) => m.name === result.value) };
    };

    app.commands.addCommand(CommandIDs.insertTrace, {
      label: "Insert a %%trace cell",
      caption: "Insert a %%trace cell for a model from the registry",
      icon,
      isEnabled: () => current() !== null,
      execute: async (args) => {
        const panel = current();
        if (!panel) return;
        let model = typeof args.model === "string" ? args.model : null;
        if (!model) {
          model = (await chooseModel("Model for the %%trace cell"))?.name ?? null;
          if (!model) return;
        }
        const prompt = typeof args.prompt === "string" ? args.prompt : "The capital of France is";
        insertCell(panel, traceCell(model, prompt));
      },
    });

    app.commands.addCommand(CommandIDs.insertSweep, {
      label: "Insert a patching sweep",
      caption: "Insert a cell that patches each layer and position from a clean run into a corrupted one",
      isEnabled: () => current() !== null,
      execute: async (args) => {
        const panel = current();
        if (!panel) return;
        let model = typeof args.model === "string" ? args.model : null;
        let variable = args.variable === true;
        if (!model) {
          const chosen = await chooseModel("Model for the patching sweep");
          if (!chosen) return;
          model = chosen.name;
          variable = chosen.entry?.variable === true;
        }
        insertCell(panel, sweepTemplate(model, variable));
      },
    });

    app.commands.addCommand(CommandIDs.showTree, {
      label: "Show a model's module tree",
      caption: "Open the nnsight sidebar with a model's module tree",
      execute: async (args) => {
        app.shell.activateById(SIDEBAR_ID);
        // Opening the sidebar opens its link: wait for the kernel's models before choosing one.
        const state = await link.settled();
        if (state.kind !== "connected" || !state.snapshot) return; // the sidebar says why
        let model = typeof args.model === "string" ? args.model : null;
        const names = state.snapshot.models.map((m) => m.name);
        if (!model && names.length === 1) model = names[0];
        if (!model && names.length > 1) {
          const result = await InputDialog.getItem({ title: "Module tree of", items: names });
          if (!result.button.accept || !result.value) return;
          model = result.value;
        }
        if (model) sidebar.showTree(model);
      },
    });

    app.commands.addCommand(CommandIDs.openSidebar, {
      label: "Open the nnsight sidebar",
      execute: () => app.shell.activateById(SIDEBAR_ID),
    });

    for (const command of [
      CommandIDs.insertTrace, CommandIDs.insertSweep, CommandIDs.showTree, CommandIDs.openSidebar,
    ]) {
      palette?.addItem({ command, category: "nnsight" });
    }

    // Keeps the kernel's order of %%trace completions where JupyterLab would sort them alphabetically.
    // `getProviders` is on JupyterLab's manager, not on its interface: without it nothing is handed over.
    const registered = completions as unknown as { getProviders?: () => Map<string, ICompletionProvider> } | null;
    completions?.registerProvider(new TraceCompletionOrder(() => registered?.getProviders?.().values() ?? []));

    editors?.addExtension({
      name: "nnsight-jupyter:trace-highlight",
      factory: () => EditorExtensionRegistry.createImmutableExtension(traceHighlight),
    });
  },
};

export default [plugin];
