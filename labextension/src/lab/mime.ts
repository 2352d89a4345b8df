/**
 * A renderer for the views' own MIME type, so a saved notebook shows its views with no kernel.
 *
 * Each view's output carries `application/vnd.nnsight-jupyter.view+json`: the view's first state
 * (what the widget would get when displayed) with its binary buffers in base64. This renderer draws
 * the view from it with the views' code in this extension. An output that also holds a widget
 * (`application/vnd.jupyter.widget-view+json`) renders the widget first, so a live view keeps
 * asking its kernel for slices; only when no live view has appeared after a moment (the notebook
 * was reopened and its widgets' models are gone) is the saved state drawn instead. Where this extension is
 * missing, the widget (anywidget) renders as before, and the static HTML where no widget can run.
 */

import { IRenderMime } from "@jupyterlab/rendermime-interfaces";
import { Panel, Widget } from "@lumino/widgets";
import { ensureStyles, VIEWS } from "../views/index";
import { putBuffers, StateSource } from "../views/source";

export const VIEW_MIME = "application/vnd.nnsight-jupyter.view+json";
export const WIDGET_MIME = "application/vnd.jupyter.widget-view+json";
/** How long a live widget may take to show its view before the saved state is drawn instead. */
export const SAVED_AFTER_MS = 1500;

export interface SavedView {
  view: string;
  state: Record<string, unknown>;
  buffer_paths: (string | number)[][];
  buffers: string[];
}

/** base64 -> DataView (the form the views read binary state in). */
export function fromBase64(text: string): DataView {
  const raw = atob(text);
  const bytes = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
  return new DataView(bytes.buffer);
}

/** The view's state with its buffers put back, from the saved output. */
export function savedState(data: SavedView): Record<string, unknown> {
  const state = JSON.parse(JSON.stringify(data.state ?? {}));
  return putBuffers(state, data.buffer_paths ?? [], (data.buffers ?? []).map(fromBase64));
}

/** Something that can render the widget MIME type (the notebook's rendermime). */
export interface WidgetRenderers {
  getFactory(mimeType: string): IRenderMime.IRendererFactory | undefined;
  createRenderer(mimeType: string): IRenderMime.IRenderer;
}

export class ViewRenderer extends Panel implements IRenderMime.IRenderer {
  private saved = new Widget();
  private cleanup: (() => void) | null = null;
  private observer: MutationObserver | null = null;
  private live: Widget | null = null;
  private timer: ReturnType<typeof setTimeout> | null = null;

  constructor(private renderers: WidgetRenderers | null) {
    super();
    this.addClass("nnsj-mime");
    this.addWidget(this.saved);
  }

  /**
   * Called again when the output is updated in place (`display(..., display_id=...)` then
   * `handle.update(...)`): the earlier live widget is disposed first, so the output holds one view.
   */
  async renderModel(model: IRenderMime.IMimeModel): Promise<void> {
    this.dropLive();
    if (model.data[WIDGET_MIME] && this.renderers?.getFactory(WIDGET_MIME)) this.tryLive(model);
    else this.drawSaved(model);
  }

  /** Draw the view from the state saved in the output; its requests say the kernel is missing. */
  private drawSaved(model: IRenderMime.IMimeModel): void {
    const data = model.data[VIEW_MIME] as unknown as SavedView;
    this.cleanup?.();
    this.cleanup = null;
    ensureStyles(document);
    const view = VIEWS[data?.view];
    this.saved.node.dataset.source = "saved";
    if (!view) {
      this.saved.node.textContent = `nnsight-jupyter: no view called ${data?.view} in this extension; upgrade it.`;
      return;
    }
    const source = new StateSource(savedState(data), () =>
      Promise.reject(new Error("This view was saved without its kernel: run the cell again to explore it.")));
    this.saved.node.replaceChildren();
    this.saved.node.dataset.lmSuppressShortcuts = "true";
    this.cleanup = view(this.saved.node, source);
  }

  /**
   * Render the live widget, hidden until its view exists. A widget whose model is gone (a reopened
   * notebook) stays at "Loading widget..." for good, so when no view has appeared after
   * `SAVED_AFTER_MS` the saved state is drawn; a live view that appears later replaces it.
   */
  private tryLive(model: IRenderMime.IMimeModel): void {
    const live = this.renderers!.createRenderer(WIDGET_MIME) as unknown as Widget & IRenderMime.IRenderer;
    live.hide();
    this.live = live;
    this.addWidget(live);
    this.timer = setTimeout(() => {
      this.timer = null;
      if (!this.isDisposed && !live.node.querySelector(".nnsj-view")) this.drawSaved(model);
    }, SAVED_AFTER_MS);
    const check = () => {
      if (this.live !== live || !live.node.querySelector(".nnsj-view")) return;
      if (this.timer !== null) clearTimeout(this.timer);
      this.timer = null;
      this.observer?.disconnect();
      this.observer = null;
      this.cleanup?.();
      this.cleanup = null;
      this.saved.node.replaceChildren();
      delete this.saved.node.dataset.source;
      live.show();
    };
    this.observer = new MutationObserver(check);
    this.observer.observe(live.node, { childList: true, subtree: true });
    void live.renderModel(model).then(check, () => undefined);
  }

  /** Forget the live widget of an earlier `renderModel`, with its observer and timer. */
  private dropLive(): void {
    if (this.timer !== null) clearTimeout(this.timer);
    this.timer = null;
    this.observer?.disconnect();
    this.observer = null;
    this.live?.dispose();
    this.live = null;
  }

  dispose(): void {
    if (this.timer !== null) clearTimeout(this.timer);
    this.observer?.disconnect();
    this.cleanup?.();
    super.dispose();
  }
}

/** The factory, for one notebook's rendermime (it renders that notebook's widgets). */
export function viewRendererFactory(widgets: WidgetRenderers | null): IRenderMime.IRendererFactory {
  return {
    safe: true,
    mimeTypes: [VIEW_MIME],
    defaultRank: -20,
    createRenderer: () => new ViewRenderer(widgets),
  };
}
