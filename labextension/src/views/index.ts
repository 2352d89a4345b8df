/** Every view by the name its Python class sends (`_view`), and the styles they share. */

import { renderAttention } from "./attention";
import { renderJobStatus } from "./job_status";
import { renderLogitLens } from "./logit_lens";
import { renderModuleTree } from "./module_tree";
import { renderPatchingHeatmap } from "./patching_heatmap";
import { renderSavedValues } from "./saved_values";
import { View } from "./source";
import { renderTensorView } from "./tensor_view";
import css from "./styles.css";

export const VIEWS: Record<string, View> = {
  tensor: renderTensorView,
  module_tree: renderModuleTree,
  saved_values: renderSavedValues,
  job_status: renderJobStatus,
  patching_heatmap: renderPatchingHeatmap,
  logit_lens: renderLogitLens,
  attention: renderAttention,
};

const STYLE_ID = "nnsight-jupyter-views-css";

/** Put the views' stylesheet into the page once (a later bundle version replaces it). */
export function ensureStyles(doc: Document): void {
  const existing = doc.getElementById(STYLE_ID);
  if (existing) {
    if (existing.textContent !== css) existing.textContent = css;
    return;
  }
  const style = doc.createElement("style");
  style.id = STYLE_ID;
  style.textContent = css;
  doc.head.append(style);
}

export type { DataSource, Reply, View } from "./source";
export { StateSource } from "./source";
