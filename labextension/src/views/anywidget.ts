/**
 * The anywidget adapter: a widget model as a `DataSource`, and the `render` anywidget calls.
 *
 * This is the only module that knows about anywidget. State values come from `model.get`; a
 * request is a custom message `{id, ...}` answered by the kernel with `{id, ok, ...}` and its
 * buffers (quak's request-by-id pattern), so a slider asks for exactly one slice and stale replies
 * are told apart. The bundle is loaded by the small loader in each widget's `_esm` (see
 * `nnsight_jupyter/widgets/bundle.py`), which calls `render` below.
 */

import type { AnyModel, RenderProps } from "@anywidget/types";
import { asDataView } from "./core/binary";
import { ensureStyles, VIEWS } from "./index";
import { DataSource, Reply } from "./source";

const TIMEOUT_MS = 60_000;
let counter = 0;

interface Pending {
  resolve(reply: Reply): void;
  reject(error: Error): void;
  timer: ReturnType<typeof setTimeout>;
}

type Model = AnyModel<Record<string, any>>;

export function widgetSource(model: Model): DataSource & { dispose(): void } {
  const prefix = `${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 8)}-`;
  const pending = new Map<string, Pending>();
  const onMessage = (content: any, buffers?: unknown[]) => {
    const id = content && typeof content.id === "string" ? content.id : null;
    if (!id || !pending.has(id)) return;
    const waiting = pending.get(id)!;
    pending.delete(id);
    clearTimeout(waiting.timer);
    if (content.ok === false) {
      waiting.reject(new Error(String(content.error ?? "the request failed in the kernel")));
    } else {
      waiting.resolve({ content, buffers: (buffers ?? []).map(asDataView) });
    }
  };
  model.on("msg:custom", onMessage);
  return {
    get: (name: string) => model.get(name),
    on: (name: string, callback: () => void) => {
      model.on(`change:${name}`, callback);
      return () => model.off(`change:${name}`, callback);
    },
    request: (content: Record<string, unknown>, buffers?: ArrayBuffer[]) =>
      new Promise<Reply>((resolve, reject) => {
        const id = prefix + counter++;
        const timer = setTimeout(() => {
          pending.delete(id);
          reject(new Error("No reply from the kernel: run the cell again to reconnect this view."));
        }, TIMEOUT_MS);
        pending.set(id, { resolve, reject, timer });
        try {
          model.send({ ...content, id }, undefined, buffers);
        } catch (error) {
          pending.delete(id);
          clearTimeout(timer);
          reject(new Error(`This view is not connected to a kernel (${error}); run the cell again.`));
        }
      }),
    dispose: () => {
      model.off("msg:custom", onMessage);
      pending.forEach((p) => clearTimeout(p.timer));
      pending.clear();
    },
  };
}

export function render({ model, el }: RenderProps<Record<string, any>>): () => void {
  ensureStyles(el.ownerDocument);
  const name = String(model.get("_view"));
  const view = VIEWS[name];
  if (!view) {
    el.textContent = `nnsight-jupyter: no view called ${name} in this bundle; restart the kernel after upgrading.`;
    return () => undefined;
  }
  // Keys typed into a view (a slice index, a search) are the view's, not notebook shortcuts.
  el.dataset.lmSuppressShortcuts = "true";
  const source = widgetSource(model);
  const cleanup = view(el, source);
  return () => {
    cleanup();
    source.dispose();
  };
}

export { VIEWS };
export default { render };
