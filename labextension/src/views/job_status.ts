/**
 * JobStatus: the live state of one remote job (queue position, elapsed time, last printed lines).
 * State from `nnsight_jupyter/widgets/job_status.py`; redrawn on every change.
 */

import { h } from "./core/dom";
import { DataSource } from "./source";

const COLOURS: Record<string, string> = {
  submitted: "#6b7280", queued: "#b45309", loading: "#2563eb", running: "#2563eb",
  completed: "#15803d", error: "#b91c1c", cancelled: "#6b7280",
};

const FIELDS = ["state", "position", "elapsed", "lines", "line_count", "message", "job_id", "model"];

export function describeJob(position: number | null, elapsed: number): string {
  const parts: string[] = [];
  if (position !== null && position !== undefined) parts.push(`position ${position} in the queue`);
  if (elapsed) parts.push(`${elapsed.toFixed(1)} s`);
  return parts.join(", ");
}

export function renderJobStatus(el: HTMLElement, source: DataSource): () => void {
  const root = h("div", { class: "nnsj-view nnsj-job", "data-view": "job_status" });
  el.append(root);
  const draw = () => {
    const state = source.get<string>("state");
    root.style.setProperty("--nnsj-job-colour", COLOURS[state] ?? COLOURS.submitted);
    root.dataset.state = state;
    root.replaceChildren(
      h("span", { class: "nnsj-job-state", text: state }), " job ",
      h("code", { text: source.get<string>("job_id") }));
    const model = source.get<string>("model");
    if (model) root.append(" on ", h("code", { text: model }));
    const details = describeJob(source.get<number | null>("position"), source.get<number>("elapsed"));
    if (details) root.append(`, ${details}`);
    const message = source.get<string>("message");
    if (message) root.append(h("div", { class: "nnsj-job-message", text: message }));
    const lines = source.get<string[]>("lines") ?? [];
    if (lines.length) {
      const hidden = source.get<number>("line_count") - lines.length;
      root.append(h("pre", { text: (hidden > 0 ? `(${hidden} earlier lines)\n` : "") + lines.join("\n") }));
    }
  };
  const stops = FIELDS.map((name) => source.on(name, draw));
  draw();
  return () => {
    stops.forEach((stop) => stop());
    root.remove();
  };
}
