/**
 * Where a view gets its data: a small interface every host implements.
 *
 * A view never talks to anywidget, ipywidgets or JupyterLab directly. It reads named state values
 * (JSON, or `DataView` for binary buffers), listens for changes, and asks its host for more data
 * (`request`) when the user moves a slider or scrolls. The anywidget adapter (`anywidget.ts`) maps
 * this onto a widget model and its custom messages; a mime renderer can map it onto a static bundle,
 * and `StateSource` holds a view's state locally (a tensor opened inside the saved-values table).
 */

export interface Reply {
  content: Record<string, unknown>;
  buffers: DataView[];
}

export interface DataSource {
  /** A state value: JSON data, or a `DataView` for a binary buffer. */
  get<T = unknown>(name: string): T;
  /** Call `callback` when `name` changes; returns a function that stops listening. */
  on(name: string, callback: () => void): () => void;
  /**
   * Ask the host for more data. Resolves with the reply's content and buffers, rejects with an
   * Error whose message says why (no kernel, a failed request on the Python side).
   */
  request(content: Record<string, unknown>, buffers?: ArrayBuffer[]): Promise<Reply>;
}

/** A view: draws into `el` from `source`; returns a function that detaches it. */
export type View = (el: HTMLElement, source: DataSource) => () => void;

/** A source whose state lives here, with requests passed to `ask` (a parent view's host). */
export class StateSource implements DataSource {
  private listeners = new Map<string, Set<() => void>>();

  constructor(
    private state: Record<string, unknown>,
    private ask: (content: Record<string, unknown>, buffers?: ArrayBuffer[]) => Promise<Reply>,
  ) {}

  get<T = unknown>(name: string): T {
    return this.state[name] as T;
  }

  set(name: string, value: unknown): void {
    this.state[name] = value;
    this.listeners.get(name)?.forEach((f) => f());
  }

  on(name: string, callback: () => void): () => void {
    let set = this.listeners.get(name);
    if (!set) this.listeners.set(name, (set = new Set()));
    set.add(callback);
    return () => set!.delete(callback);
  }

  request(content: Record<string, unknown>, buffers?: ArrayBuffer[]): Promise<Reply> {
    return this.ask(content, buffers);
  }
}

/**
 * A view's state as sent from Python with its buffers pulled out: `paths[i]` says where
 * `buffers[i]` goes (a list of keys), as ipywidgets does for widget state.
 */
export function putBuffers(
  state: Record<string, unknown>,
  paths: (string | number)[][],
  buffers: DataView[],
): Record<string, unknown> {
  paths.forEach((path, i) => {
    let node: any = state;
    for (const key of path.slice(0, -1)) node = node[key];
    node[path[path.length - 1]] = buffers[i];
  });
  return state;
}
