/**
 * A completer model that keeps the kernel's order of `%%trace` completions when JupyterLab would
 * re-sort them (see `trace_completion.ts`), and the provider that hands it to JupyterLab.
 *
 * JupyterLab takes the completer model from its highest-ranked completion provider, so the
 * provider ranks above the kernel's (550) and never answers itself (`isApplicable` is false): the
 * kernel's and the document's providers still supply every item. Outside `%%trace` cells the
 * model returns JupyterLab's own order untouched. A provider ranked higher still (or a user's
 * setting) takes the model back, and `%%trace` menus then sort as JupyterLab sorts.
 */

import { CompleterModel, CompletionHandler, ICompletionContext, ICompletionProvider } from "@jupyterlab/completer";
import { isTraceCell, traceCompletionOrder } from "./trace_completion";

const key = (item: CompletionHandler.ICompletionItem) => item.insertText ?? item.label;

export class TraceCompleterModel extends CompleterModel {
  private kernelOrder = new Map<string, number>();

  setCompletionItems(items: CompletionHandler.ICompletionItems): void {
    const order = new Map<string, number>();
    items.forEach((item, index) => {
      if (!order.has(key(item))) order.set(key(item), index);
    });
    this.kernelOrder = order;
    super.setCompletionItems(items);
  }

  completionItems(): CompletionHandler.ICompletionItems {
    if (this.processedItemsCache) return this.processedItemsCache;
    const items = super.completionItems();
    if (!this.query || !isTraceCell(this.original?.text)) return items;
    const ranked = traceCompletionOrder(items, this.query, key,
                                        (item) => this.kernelOrder.get(key(item)) ?? Infinity);
    this.processedItemsCache = ranked;
    return ranked;
  }
}

export class TraceCompletionOrder implements ICompletionProvider {
  readonly identifier = "nnsight-jupyter:trace-completion-order";
  readonly rank = 1000;

  async isApplicable(): Promise<boolean> {
    return false;
  }

  async fetch(): Promise<CompletionHandler.ICompletionItemsReply> {
    return { start: 0, end: 0, items: [] };
  }

  async modelFactory(_context: ICompletionContext): Promise<TraceCompleterModel> {
    return new TraceCompleterModel();
  }
}
