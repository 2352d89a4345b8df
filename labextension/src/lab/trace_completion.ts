/**
 * The order of the completion menu in `%%trace` cells. The kernel sends module paths in the order
 * the model's forward runs them and the header's models registry-first, and JupyterLab draws them
 * in that order; but once the menu has a query (typed on with the menu open, or a prefix every
 * item shares, which JupyterLab fills in itself) JupyterLab 4's model re-sorts by its match score,
 * ties alphabetically, and offers no `sortText` to keep another order. `traceCompletionOrder`
 * re-ranks what it kept: names starting with the query first, then the rest, each group in the
 * kernel's order. Pure, so it is tested under node; `completer.ts` applies it.
 */

/** `items` with those whose text starts with `query` first, each group by `rank` (then as given). */
export function traceCompletionOrder<T>(
  items: readonly T[],
  query: string,
  text: (item: T) => string,
  rank: (item: T) => number,
): T[] {
  return items
    .map((item, index) => ({ item, index, exact: text(item).startsWith(query) ? 0 : 1, rank: rank(item) }))
    .sort((a, b) => a.exact - b.exact || compare(a.rank, b.rank) || a.index - b.index)
    .map((entry) => entry.item);
}

function compare(a: number, b: number): number {
  return a === b ? 0 : a < b ? -1 : 1; // Infinity (not the kernel's) sorts last without NaN
}

/** Whether the cell's source is a `%%trace` cell (the header is its first line). */
export function isTraceCell(source: string | undefined | null): boolean {
  return /^\s*%%trace(?=\s|$)/.test(source ?? "");
}

/** What `completionHandOver` needs of a completion provider. */
export interface RankedProvider {
  readonly identifier: string;
  readonly rank?: number;
  modelFactory?: unknown;
}

/**
 * The provider whose completer model and renderer the `%%trace` order provider hands over to: the
 * highest-ranked other provider that brings a model of its own (jupyterlab-lsp's, say), or
 * undefined when none does (JupyterLab's kernel, document and debugger providers do not).
 */
export function completionHandOver<P extends RankedProvider>(providers: Iterable<P>, self: string): P | undefined {
  let best: P | undefined;
  for (const provider of providers) {
    if (provider.identifier === self || typeof provider.modelFactory !== "function") continue;
    const rank = provider.rank ?? 0;
    if (rank >= 0 && (best === undefined || rank > (best.rank ?? 0))) best = provider;
  }
  return best;
}
