/**
 * The sidebar's link to the active notebook's kernel: one comm, over the notebook's own connection.
 *
 * It follows the notebook tracker's current widget and that notebook's kernel (switches, restarts),
 * following jupyterlab-variableInspector's `kernelconnector.ts`. The comm is open only while the
 * sidebar is shown (`setActive`), so a hidden sidebar costs the kernel nothing. Without a comm it
 * asks the kernel, each time the kernel goes idle, whether the comm target exists
 * (`comm_info_request`, answered without running code), which is how it notices
 * `%load_ext nnsight_jupyter` and a restarted kernel within the next idle status. While the comm is
 * open the kernel also pushes its servers' health and its jobs' status from a thread, so those
 * keep changing while a cell runs (a busy kernel answers no request until the cell ends).
 */

import { INotebookTracker, NotebookPanel } from "@jupyterlab/notebook";
import { CommsOverSubshells, Kernel, KernelMessage } from "@jupyterlab/services";
import { ISignal, Signal } from "@lumino/signaling";
import { Answer, COMM_TARGET, ModelEntry, Pending, PROTOCOL, Pushed, Snapshot } from "./protocol";

/**
 * A comm to the kernel's sidebar target, its messages handled on the kernel's main shell.
 *
 * JupyterLab 4.4+ sends a comm target's messages through a kernel subshell of its own: the
 * kernel then runs the sidebar's handler on another thread, beside the cell on the main one, and
 * a subshell id JupyterLab keeps for a kernel can outlive the subshell (a restart or a new kernel
 * under the same id), so the kernel drops the message ("Unknown subshell_id") and a request such
 * as a cancel is silently lost. The sidebar needs no subshell: what must keep coming while a cell
 * runs, the kernel pushes from a thread of its own. Set before the comm's first await, this keeps
 * JupyterLab from asking the kernel for a subshell at all.
 */
function openComm(kernel: Kernel.IKernelConnection): Kernel.IComm {
  const comm = kernel.createComm(COMM_TARGET);
  comm.commsOverSubshells = CommsOverSubshells.Disabled;
  return comm;
}

export type LinkState =
  | { kind: "no-notebook" }
  | { kind: "no-kernel"; notebook: string }
  | { kind: "connecting"; notebook: string }
  | { kind: "not-loaded"; notebook: string }
  | { kind: "connected"; notebook: string; snapshot: Snapshot | null };

export class KernelLink {
  private _state: LinkState = { kind: "no-notebook" };
  private _stateChanged = new Signal<this, LinkState>(this);
  private _pushed = new Signal<this, Pushed>(this);
  private panel: NotebookPanel | null = null;
  private kernel: Kernel.IKernelConnection | null = null;
  private comm: Kernel.IComm | null = null;
  private pending = new Pending();
  private active = false;
  private probing = false;
  private ranCode = false;

  /** `version`: the extension's, sent when a comm opens so that the kernel can check it too. */
  constructor(private tracker: INotebookTracker, private version = "") {
    tracker.currentChanged.connect(() => this.follow(tracker.currentWidget), this);
  }

  get state(): LinkState {
    return this._state;
  }

  get stateChanged(): ISignal<this, LinkState> {
    return this._stateChanged;
  }

  /** What the kernel sends unasked between snapshots: servers' health and jobs' status, even mid-cell. */
  get pushed(): ISignal<this, Pushed> {
    return this._pushed;
  }

  get notebook(): NotebookPanel | null {
    return this.panel;
  }

  /** Open the link while the sidebar is shown; close it (and its comm) when hidden. */
  setActive(active: boolean): void {
    if (active === this.active) return;
    this.active = active;
    if (active) this.follow(this.tracker.currentWidget, true);
    else this.dropComm("the sidebar was closed");
  }

  /**
   * The link's state once it has settled: connected with a first snapshot, or a state that waits on
   * the user (no notebook, no kernel, extension not loaded). A command that opened the sidebar
   * waits here instead of reading the state it had a moment before (`connecting`, no models).
   */
  settled(timeoutMs = 10_000): Promise<LinkState> {
    const done = (s: LinkState) => s.kind !== "connecting" && (s.kind !== "connected" || s.snapshot !== null);
    if (done(this._state)) return Promise.resolve(this._state);
    return new Promise((resolve) => {
      const finish = () => {
        clearTimeout(timer);
        this._stateChanged.disconnect(onChange);
        resolve(this._state);
      };
      const onChange = (_link: this, s: LinkState) => done(s) && finish();
      const timer = setTimeout(finish, timeoutMs);
      this._stateChanged.connect(onChange);
    });
  }

  /** Ask the kernel something; resolves with its answer. */
  request(content: Record<string, unknown>): Promise<Answer> {
    if (!this.comm || this.comm.isDisposed) {
      return Promise.reject(new Error("The sidebar is not connected to a kernel."));
    }
    const { id, answer } = this.pending.add();
    this.comm.send({ ...content, id } as any);
    return answer;
  }

  /**
   * The kernel's models and the registry's names, for the commands that insert cells. With the
   * sidebar open they come over its comm; with it closed, over a comm opened for this question and
   * closed after it, so a closed sidebar still costs the kernel nothing between commands. Empty
   * lists when the kernel has not loaded the extension or does not answer.
   */
  async models(timeoutMs = 10_000): Promise<{ loaded: ModelEntry[]; registry: string[] }> {
    const names = (answer: Answer) => (answer.content.models as { name: string }[]).map((m) => m.name);
    if (this.comm && !this.comm.isDisposed) {
      const loaded = this._state.kind === "connected" ? this._state.snapshot?.models ?? [] : [];
      return { loaded, registry: await this.request({ kind: "registry" }).then(names, () => []) };
    }
    const kernel = this.panel?.sessionContext.session?.kernel;
    if (!kernel) return { loaded: [], registry: [] };
    const comm = openComm(kernel);
    const pending = new Pending(timeoutMs);
    let first: (snapshot: Snapshot | null) => void = () => undefined;
    const opened = new Promise<Snapshot | null>((resolve) => (first = resolve));
    const timer = setTimeout(() => first(null), timeoutMs);
    comm.onMsg = (msg) => {
      const data = msg.content.data as Record<string, any>;
      if (data?.event === "snapshot") first(data as unknown as Snapshot);
      else pending.settle(data, []);
    };
    comm.onClose = () => {
      first(null);
      pending.failAll("the kernel closed the connection");
    };
    try {
      comm.open({ protocol: PROTOCOL, version: this.version });
      const snapshot = await opened;
      if (!snapshot) return { loaded: [], registry: [] };
      const { id, answer } = pending.add();
      comm.send({ kind: "registry", id });
      return { loaded: snapshot.models, registry: await answer.then(names, () => []) };
    } finally {
      clearTimeout(timer);
      if (!comm.isDisposed) {
        try {
          comm.close();
        } catch {
          comm.dispose();
        }
      }
    }
  }

  /** Run `%load_ext nnsight_jupyter` in the notebook's kernel (silently, outside the history). */
  async loadExtension(): Promise<void> {
    const kernel = this.kernel;
    if (!kernel) throw new Error("This notebook has no kernel.");
    const future = kernel.requestExecute({ code: "%load_ext nnsight_jupyter", silent: false, store_history: false });
    const reply = await future.done;
    if (reply.content.status !== "ok") {
      const c = reply.content as KernelMessage.IReplyErrorContent;
      throw new Error(`${c.ename}: ${c.evalue}`);
    }
    await this.probe();
  }

  private follow(panel: NotebookPanel | null, force = false): void {
    if (panel !== this.panel) {
      if (this.panel) {
        this.panel.sessionContext.kernelChanged.disconnect(this.onKernelChanged, this);
        this.panel.disposed.disconnect(this.onPanelDisposed, this);
      }
      this.panel = panel;
      if (panel) {
        panel.sessionContext.kernelChanged.connect(this.onKernelChanged, this);
        panel.disposed.connect(this.onPanelDisposed, this);
      }
      force = true;
    }
    if (force) this.attach(panel?.sessionContext.session?.kernel ?? null);
  }

  private onPanelDisposed(): void {
    this.follow(this.tracker.currentWidget === this.panel ? null : this.tracker.currentWidget);
  }

  private onKernelChanged(): void {
    this.attach(this.panel?.sessionContext.session?.kernel ?? null);
  }

  private attach(kernel: Kernel.IKernelConnection | null): void {
    if (kernel !== this.kernel) {
      this.kernel?.statusChanged.disconnect(this.onStatus, this);
      this.kernel?.iopubMessage.disconnect(this.onIopub, this);
      this.kernel = kernel;
      kernel?.statusChanged.connect(this.onStatus, this);
      kernel?.iopubMessage.connect(this.onIopub, this);
    }
    this.dropComm("the notebook's kernel changed");
    if (!this.panel) return this.setState({ kind: "no-notebook" });
    const notebook = this.panel.context.path;
    if (!kernel) return this.setState({ kind: "no-kernel", notebook });
    if (!this.active) return;
    this.setState({ kind: "connecting", notebook });
    void this.probe();
  }

  private onIopub(_kernel: Kernel.IKernelConnection, msg: KernelMessage.IIOPubMessage): void {
    if (msg.header.msg_type === "execute_input") this.ranCode = true;
  }

  private onStatus(kernel: Kernel.IKernelConnection, status: Kernel.Status): void {
    if (kernel !== this.kernel) return;
    if (status === "restarting" || status === "autorestarting" || status === "dead") {
      this.dropComm("the kernel restarted");
      this.ranCode = true;
      if (this.panel && this.active) this.setState({ kind: "connecting", notebook: this.panel.context.path });
      return;
    }
    // Without a comm, a cell that ran may have loaded the extension: ask again once it is idle.
    if (status === "idle" && this.active && !this.comm && this.ranCode) void this.probe();
  }

  /** Open the comm if the kernel has the target; otherwise say the extension is not loaded. */
  private async probe(): Promise<void> {
    const kernel = this.kernel;
    if (!kernel || !this.panel || !this.active || this.comm || this.probing) return;
    this.probing = true;
    this.ranCode = false;
    const notebook = this.panel.context.path;
    try {
      const loaded = await this.hasTarget(kernel);
      if (kernel !== this.kernel || !this.active || this.comm) return;
      if (!loaded) return this.setState({ kind: "not-loaded", notebook });
      this.openComm(kernel, notebook);
    } finally {
      this.probing = false;
    }
  }

  /**
   * Whether the kernel registered the comm target. `comm_info_request` lists open comms, not
   * targets, so this opens a comm and waits for the kernel's first message; a kernel without
   * the target closes it as soon as it reads the request (after the cell it is running).
   */
  private hasTarget(kernel: Kernel.IKernelConnection): Promise<boolean> {
    return new Promise<boolean>((resolve) => {
      const comm = openComm(kernel);
      let settled = false;
      const done = (ok: boolean) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        if (ok) {
          this.candidate = comm;
        } else if (!comm.isDisposed) {
          comm.dispose();
        }
        resolve(ok);
      };
      // A kernel busy with a long cell answers when the cell ends; one that never answers is gone.
      const timer = setTimeout(() => done(false), 120_000);
      comm.onMsg = (msg) => {
        this.firstMessage = msg;
        done(true);
      };
      comm.onClose = () => done(false);
      comm.open({ protocol: PROTOCOL, version: this.version });
    });
  }

  private candidate: Kernel.IComm | null = null;
  private firstMessage: KernelMessage.ICommMsgMsg | null = null;

  private openComm(kernel: Kernel.IKernelConnection, notebook: string): void {
    const comm = this.candidate;
    this.candidate = null;
    if (!comm || comm.isDisposed || kernel !== this.kernel) return;
    this.comm = comm;
    comm.onMsg = (msg) => this.onMessage(msg, notebook);
    comm.onClose = () => {
      if (this.comm !== comm) return;
      this.comm = null;
      this.pending.failAll("The kernel closed the sidebar's connection.");
      if (this.active && this.panel) {
        this.setState({ kind: "connecting", notebook });
        void this.probe();
      }
    };
    this.setState({ kind: "connected", notebook, snapshot: null });
    if (this.firstMessage) this.onMessage(this.firstMessage, notebook);
    this.firstMessage = null;
  }

  private onMessage(msg: KernelMessage.ICommMsgMsg, notebook: string): void {
    const data = msg.content.data as Record<string, any>;
    const buffers = (msg.buffers ?? []).map((b: any) =>
      b instanceof DataView ? b
        : ArrayBuffer.isView(b) ? new DataView(b.buffer, b.byteOffset, b.byteLength) : new DataView(b));
    if (data?.event === "snapshot") {
      const { event: _event, ...snapshot } = data;
      this.setState({ kind: "connected", notebook, snapshot: snapshot as Snapshot });
      return;
    }
    if (data?.event === "health" || data?.event === "jobs") {
      this._pushed.emit(data as Pushed);
      return;
    }
    this.pending.settle(data, buffers);
  }

  private dropComm(reason: string): void {
    const comm = this.comm;
    this.comm = null;
    this.pending.failAll(`The sidebar lost its kernel: ${reason}.`);
    if (comm && !comm.isDisposed) {
      try {
        comm.close();
      } catch {
        comm.dispose();
      }
    }
  }

  private setState(state: LinkState): void {
    this._state = state;
    this._stateChanged.emit(state);
  }

  dispose(): void {
    this.dropComm("the sidebar was disposed");
    Signal.clearData(this);
  }
}
