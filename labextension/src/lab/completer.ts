/**
 * A completer model that keeps the kernel's order of `%%trace` completions when JupyterLab would
 * re-sort them (see `trace_completion.ts`), and the provider that hands it to JupyterLab.
 *
 * JupyterLab takes the completer model and renderer from its highest-ranked completion provider,
 * whether or not that provider has a model of its own (its debugger's provider ranks 1000 and has
 * none). So this provider ranks above them all and never answers itself (`isApplicable` is false):
 * the kernel's and the document's providers still supply every item. Where another provider
 * brings a completer of its own (jupyterlab-lsp's, also ranked 1000), this one hands JupyterLab
 * that provider's model and renderer, so such a completer serves every cell as it would without
 * this extension, and `%%trace` menus sort as it sorts. Otherwise the model is
 * `TraceCompleterModel`, which outside `%%trace` cells returns JupyterLab's own order untouched.
 */

import {
  Completer,
  CompleterModel,
  CompletionHandler,
  ICompletionContext,
  ICompletionProvider,
} from "@jupyterlab/completer";
import { completionHandOver, isTraceCell, traceCompletionOrder } from "./trace_completion";

const key = (item: CompletionHandler.ICompletionItem) => item.insertText ?? item.label;

/** Above JupyterLab's providers, its debugger's (1000) included, and jupyterlab-lsp's (1000). */
export const TRACE_ORDER_RANK = 1001;

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
  readonly rank = TRACE_ORDER_RANK;

  /** `providers`: every registered completion provider (this one among them), asked when needed. */
  constructor(private readonly providers: () => Iterable<ICompletionProvider> = () => []) {}

  private handOver(): ICompletionProvider | undefined {
    return completionHandOver(this.providers(), this.identifier);
  }

  get renderer(): Completer.IRenderer | null | undefined {
    return this.handOver()?.renderer;
  }

  async isApplicable(): Promise<boolean> {
    return false;
  }

  async fetch(): Promise<CompletionHandler.ICompletionItemsReply> {
    return { start: 0, end: 0, items: [] };
  }

  async modelFactory(context: ICompletionContext): Promise<Completer.IModel> {
    const other = this.handOver();
    if (other?.modelFactory) return other.modelFactory(context);
    return new TraceCompleterModel();
  }
}
