/**
 * The sidebar's side of its conversation with the kernel, and the text it puts into cells.
 *
 * Nothing here touches JupyterLab, so it is tested under node (`test/*.test.ts`). A request is
 * `{id, kind, ...}`; the kernel answers `{id, ok, ...}` with binary buffers, or `{id, ok: false,
 * error}`, and pushes `{event: "snapshot", ...}` after each cell while the sidebar is open
 * (`nnsight_jupyter/sidebar.py`).
 */

export const COMM_TARGET = "nnsight_jupyter.sidebar";
export const PROTOCOL = 1;

export interface ModelEntry {
  name: string;
  class: string;
  modules: number;
  params: number;
  /** Whether `name` is a notebook variable; otherwise only `%%trace` knows the model by it. */
  variable?: boolean;
}

export interface SavedEntry {
  name: string;
  model: string;
  shape: number[];
  dtype: string;
}

export interface JobEntry {
  job_id: string;
  model: string;
  host: string;
  status: string;
  position?: number | null;
  error?: string | null;
}

/** A server this kernel's remote traces use; `status` and the rest come from a `health` request. */
export interface RemoteHost {
  host: string;
  source: string;
  status?: string;
  package_version?: string | null;
  protocol_version?: number | null;
  error?: string | null;
}

export interface Snapshot {
  version: string;
  protocol: number;
  models: ModelEntry[];
  saved: SavedEntry[];
  jobs: JobEntry[];
  remote?: RemoteHost[];
  /** The kernel's own version check of this extension (null when they agree). */
  mismatch?: string | null;
}

/** Sent by the kernel's watcher thread when a server's health or a job's status changes. */
export type Pushed =
  | { event: "health"; hosts: RemoteHost[] }
  | { event: "jobs"; jobs: JobEntry[] };

export interface Answer {
  content: Record<string, any>;
  buffers: DataView[];
}

interface Waiting {
  resolve(answer: Answer): void;
  reject(error: Error): void;
  timer: ReturnType<typeof setTimeout>;
}

/** Requests waiting for their answers, by id; an answer for an unknown id is ignored. */
export class Pending {
  private waiting = new Map<string, Waiting>();
  private counter = 0;

  constructor(private timeoutMs = 60_000) {}

  /** A new id and the promise its answer settles. */
  add(): { id: string; answer: Promise<Answer> } {
    const id = `s${this.counter++}`;
    const answer = new Promise<Answer>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiting.delete(id);
        reject(new Error("No answer from the kernel: is it busy running a cell?"));
      }, this.timeoutMs);
      this.waiting.set(id, { resolve, reject, timer });
    });
    return { id, answer };
  }

  /** Settle the request `content.id` names; returns false when it is not one of ours. */
  settle(content: Record<string, any>, buffers: DataView[]): boolean {
    const id = typeof content?.id === "string" ? content.id : null;
    const waiting = id === null ? undefined : this.waiting.get(id);
    if (!waiting) return false;
    this.waiting.delete(id!);
    clearTimeout(waiting.timer);
    if (content.ok === false) waiting.reject(new Error(String(content.error ?? "the request failed in the kernel")));
    else waiting.resolve({ content, buffers });
    return true;
  }

  /** Fail every waiting request (the kernel went away). */
  failAll(reason: string): void {
    this.waiting.forEach((w) => {
      clearTimeout(w.timer);
      w.reject(new Error(reason));
    });
    this.waiting.clear();
  }

  get size(): number {
    return this.waiting.size;
  }
}

/** The model's name in a cell: `model` inside a `%%trace` cell's body, its notebook name elsewhere. */
export function rootForCell(cellText: string, modelName: string): string {
  return /^\s*%%trace\b/.test(cellText) ? "model" : modelName;
}

/** A module's access path (`smollm2.model.layers[0]`) with its first name replaced by `root`. */
export function pathWithRoot(path: string, root: string): string {
  const m = /^[A-Za-z_]\w*/.exec(path);
  return m ? root + path.slice(m[0].length) : path;
}

/** The variable name a save line binds for `path`: `model.layers[3].mlp` -> `layers_3_mlp`. */
export function saveName(path: string): string {
  const rest = path.replace(/^[A-Za-z_]\w*/, "");
  const name = rest
    .replace(/\[-(\d+)\]/g, "_m$1")
    .replace(/\[(\d+)\]/g, "_$1")
    .replace(/\[['"]([^'"]+)['"]\]/g, "_$1")
    .replace(/[^\w]+/g, "_")
    .replace(/^_+|_+$/g, "");
  if (!name) return "out";
  return /^\d/.test(name) ? `m_${name}` : name;
}

/** The line that saves a module's output: `layers_3_mlp = model.layers[3].mlp.output.save()`. */
export function saveLine(path: string): string {
  return `${saveName(path)} = ${path}.output.save()`;
}

/** A Python string literal for `text` (double quotes, escaped). */
export function pyString(text: string): string {
  return JSON.stringify(text);
}

/** A new `%%trace` cell for a model known by name. */
export function traceCell(model: string, prompt: string): string {
  return `%%trace ${model} ${pyString(prompt)}\n` + "logits = model.output.logits[0, -1].save()\n";
}

/**
 * A patching sweep: the clean run's residual stream patched into the corrupted run, one layer and
 * position at a time, drawn as a PatchingHeatmap that fills in while it runs. `model` is used as
 * is when it is a notebook variable; a registry alias or Hugging Face id (all `%%trace` may know a
 * model by) is loaded under the name `model`.
 */
export function sweepTemplate(model: string, variable: boolean): string {
  const name = variable ? model : "model";
  return [
    "from nnsight_jupyter.analysis import logit_diff",
    "from nnsight_jupyter.widgets import live_sweep",
    ...(variable ? [] : ["from nnsight_jupyter import LanguageModel", "", `model = LanguageModel(${pyString(model)})`]),
    "",
    "# Both prompts must be the same number of tokens: cells are patched position by position.",
    'clean = "The Eiffel Tower is in the city of"',
    'corrupted = "The Colosseum is in the city of"',
    `sweep = live_sweep(${name}, clean, corrupted, logit_diff(" Paris", " Rome"), over=("layer", "position"))`,
    "",
  ].join("\n");
}

/** The line of a job in the sidebar: `queued (2nd in line)`, `failed: reason`. */
export function jobLabel(job: JobEntry): string {
  switch (job.status) {
    case "queued":
      return job.position == null ? "queued" : `queued (${ordinal(job.position + 1)} in line)`;
    case "error":
      return `failed: ${job.error ?? "no reason given"}`;
    case "unknown":
      return `unknown: ${job.error ?? "the server did not answer"}`;
    default:
      return job.status;
  }
}

/** A server's line in the sidebar: `ok (server 0.1.0)`, `unreachable: reason`, `checking…`. */
export function healthLabel(host: RemoteHost): string {
  switch (host.status) {
    case undefined:
      return "checking…";
    case "ok":
      return `ok (server ${host.package_version ?? "of unknown version"})`;
    default:
      return `${host.status}: ${host.error ?? "no reason given"}`;
  }
}

export function canCancel(job: JobEntry): boolean {
  return job.status === "queued" || job.status === "loading" || job.status === "running";
}

function ordinal(n: number): string {
  const tens = n % 100;
  if (tens >= 11 && tens <= 13) return `${n}th`;
  return `${n}${["th", "st", "nd", "rd"][n % 10] ?? "th"}`;
}

/**
 * What to tell the user when the kernel's package and this extension differ, or null when they
 * agree. Only the release (major.minor.patch) is compared; a local build suffix is not a mismatch.
 */
export function versionMismatch(kernel: string, extension: string, kernelProtocol: number): string | null {
  const release = (v: string) => (/^\d+\.\d+\.\d+/.exec(v) ?? [v])[0];
  if (kernelProtocol === PROTOCOL && release(kernel) === release(extension)) return null;
  return (
    `The kernel runs nnsight-jupyter ${kernel} but JupyterLab has the extension ${extension}. ` +
    "Install one version in both (pip install -U nnsight-jupyter in the kernel's and in JupyterLab's " +
    "environment), then restart the kernel and reload the page."
  );
}

/** Numbers in the sidebar: 1.2K, 3.4M, 1.1B. */
export function compact(n: number): string {
  const units: [number, string][] = [[1e9, "B"], [1e6, "M"], [1e3, "K"]];
  for (const [size, unit] of units) {
    if (Math.abs(n) >= size) return `${(n / size).toFixed(1).replace(/\.0$/, "")}${unit}`;
  }
  return String(n);
}
