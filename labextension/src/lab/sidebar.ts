/**
 * The nnsight sidebar: the active notebook kernel's models (with their module trees), the values
 * their latest traces saved, and its remote jobs. Everything shown comes from `KernelLink`'s
 * snapshots and pushes; the module tree and TensorView are the notebook views from `../views`, fed
 * from the sidebar's comm instead of a widget model. The servers' health and the jobs' status are
 * pushed by the kernel every `CONFIG.sidebar_poll` seconds while the sidebar is open, so the sidebar
 * keeps no timer of its own.
 */

import { MainAreaWidget } from "@jupyterlab/apputils";
import { NotebookPanel } from "@jupyterlab/notebook";
import { Widget } from "@lumino/widgets";
import { h } from "../views/core/dom";
import { ensureStyles } from "../views/index";
import { renderModuleTree } from "../views/module_tree";
import { putBuffers, StateSource } from "../views/source";
import { renderTensorView } from "../views/tensor_view";
import { KernelLink, LinkState } from "./kernel_link";
import {
  Answer, canCancel, compact, healthLabel, JobEntry, jobLabel, pathWithRoot, Pushed, RemoteHost, rootForCell,
  saveLine, Snapshot, versionMismatch,
} from "./protocol";

/** A job's row in the sidebar, its status text and its cancel button (while it can be cancelled). */
interface JobRow {
  row: HTMLElement;
  status: HTMLElement;
  cancel: HTMLButtonElement | null;
}

export const SIDEBAR_ID = "nnsight-jupyter-sidebar";

/** The state and buffers of a view sent in an answer, put back together. */
export function viewState(answer: Answer): Record<string, unknown> {
  return putBuffers(
    answer.content.state as Record<string, unknown>,
    answer.content.buffer_paths as (string | number)[][],
    answer.buffers);
}

export class Sidebar extends Widget {
  private status = h("div", { class: "nnsj-sb-status" });
  private warning = h("div", { class: "nnsj-sb-warning" });
  private body = h("div", { class: "nnsj-sb-body" });
  private modelsEl = h("div", { class: "nnsj-sb-models" });
  private savedEl = h("div", { class: "nnsj-sb-saved" });
  private jobsEl = h("div", { class: "nnsj-sb-jobs" });
  private jobRows = new Map<string, JobRow>();
  /** Kept across redraws, as the job rows are, so that a pushed redraw cannot swallow a click on it. */
  private checkButton = h("button", { class: "jp-mod-styled nnsj-sb-check", text: "check again" });
  private remoteEl = h("div", { class: "nnsj-sb-remote" });
  /** Each server's latest health and when it came, by host; `hostsKey`: the server list it was asked for. */
  private health = new Map<string, RemoteHost>();
  private healthAt = new Map<string, number>();
  private hostsKey: string | null = null;
  private lastSnapshot: Snapshot | null = null;
  private selection = h("div", { class: "nnsj-sb-selection" });
  private trees = new Map<string, { el: HTMLElement; cleanup: () => void }>();
  private openModel: string | null = null;

  constructor(
    private link: KernelLink,
    private extensionVersion: string,
    private openInMain: (widget: MainAreaWidget) => void,
  ) {
    super();
    this.id = SIDEBAR_ID;
    this.addClass("nnsj-sidebar");
    this.title.caption = "nnsight";
    ensureStyles(document);
    this.node.append(
      h("div", { class: "nnsj-sb-title", text: "nnsight" }), this.status, this.warning, this.body);
    this.body.append(
      h("h3", { text: "Models" }), this.modelsEl, this.selection,
      h("h3", { text: "Saved values" }), this.savedEl,
      h("h3", { text: "Remote backend" }), this.remoteEl,
      h("h3", { text: "Remote jobs" }), this.jobsEl);
    this.node.addEventListener("nnsj-module-select", (event) => this.onSelect(event as CustomEvent));
    link.stateChanged.connect(this.onState, this);
    link.pushed.connect(this.onPushed, this);
    this.checkButton.addEventListener("click", () => this.checkHealth());
    this.show_(link.state);
  }

  protected onAfterShow(): void {
    this.link.setActive(true);
  }

  protected onAfterHide(): void {
    this.link.setActive(false);
  }

  /** The kernel's watcher saw a server's health or a job's status change (also while a cell runs). */
  private onPushed(_link: KernelLink, pushed: Pushed): void {
    const snapshot = this.lastSnapshot;
    if (!snapshot || this.link.state.kind !== "connected") return;
    if (pushed.event === "health") {
      this.setHealth(pushed.hosts);
      // The pushed list is the newer one; it was checked just now, so it is not asked for again.
      this.lastSnapshot = { ...snapshot, remote: pushed.hosts.map(({ host, source }) => ({ host, source })) };
      this.hostsKey = JSON.stringify(pushed.hosts.map((r) => r.host));
      this.drawRemote(this.lastSnapshot);
    } else {
      this.lastSnapshot = { ...snapshot, jobs: pushed.jobs };
      this.drawJobs(this.lastSnapshot);
    }
  }

  private setHealth(hosts: RemoteHost[]): void {
    const now = Date.now();
    for (const entry of hosts) {
      this.health.set(entry.host, entry);
      this.healthAt.set(entry.host, now);
    }
  }

  private onState(_link: KernelLink, state: LinkState): void {
    this.show_(state);
  }

  private show_(state: LinkState): void {
    this.node.dataset.state = state.kind;
    this.warning.replaceChildren();
    this.body.hidden = state.kind !== "connected";
    switch (state.kind) {
      case "no-notebook":
        this.status.replaceChildren("Open a notebook to see its models.");
        return this.clear();
      case "no-kernel":
        this.status.replaceChildren(`${state.notebook}: no kernel.`);
        return this.clear();
      case "connecting":
        this.status.replaceChildren(`${state.notebook}: connecting to the kernel…`);
        return;
      case "not-loaded": {
        const button = h("button", { class: "jp-mod-styled jp-mod-accept nnsj-sb-load", text: "Load nnsight_jupyter" });
        button.addEventListener("click", () => {
          button.disabled = true;
          this.link.loadExtension().catch((error: Error) => {
            button.disabled = false;
            this.warning.replaceChildren(`Could not load it: ${error.message}`);
          });
        });
        this.status.replaceChildren(
          h("div", { text: `${state.notebook}: this kernel has not loaded nnsight_jupyter.` }), button);
        return this.clear();
      }
      case "connected":
        this.status.replaceChildren(`${state.notebook}: connected`);
        if (state.snapshot) this.draw(state.snapshot);
        return;
    }
  }

  private clear(): void {
    this.trees.forEach((t) => t.cleanup());
    this.trees.clear();
    this.openModel = null;
    this.health.clear();
    this.healthAt.clear();
    this.hostsKey = null;
    this.lastSnapshot = null;
    this.remoteEl.replaceChildren();
    this.modelsEl.replaceChildren();
    this.savedEl.replaceChildren();
    this.jobsEl.replaceChildren();
    this.jobRows.clear();
    this.selection.replaceChildren();
  }

  private draw(snapshot: Snapshot): void {
    // The extension's check, else the kernel's (a kernel newer than this extension may know more).
    const mismatch = versionMismatch(snapshot.version, this.extensionVersion, snapshot.protocol) ?? snapshot.mismatch;
    if (mismatch) this.warning.replaceChildren(h("div", { class: "nnsj-sb-mismatch", text: mismatch }));
    this.drawModels(snapshot);
    this.drawSaved(snapshot);
    this.drawRemote(snapshot);
    this.drawJobs(snapshot);
  }

  /** The servers from the snapshot, with their health; a changed server list is checked at once. */
  private drawRemote(snapshot: Snapshot): void {
    this.lastSnapshot = snapshot;
    const hosts = snapshot.remote ?? [];
    const key = JSON.stringify(hosts.map((r) => r.host));
    if (key !== this.hostsKey) {
      this.hostsKey = key;
      if (hosts.length) this.checkHealth();
    }
    if (!hosts.length) {
      this.remoteEl.replaceChildren(h("div", {
        class: "nnsj-muted",
        text: "No server set: remote traces start a local one when first used (%nnsight config host=URL sets one).",
      }));
      return;
    }
    this.remoteEl.replaceChildren(...hosts.map((entry) => {
      const known = { ...entry, ...(this.health.get(entry.host) ?? {}) };
      return h("div", { class: "nnsj-sb-host", "data-host": entry.host, "data-health": known.status ?? "checking" },
        h("code", { text: entry.host }), " ",
        h("span", { class: "nnsj-muted", text: `(${entry.source})` }), " ",
        h("span", { class: "nnsj-sb-health", text: healthLabel(known) }));
    }), this.checkButton);
  }

  /**
   * Ask the kernel for each server's health (it answers from a thread: no cell waits on a slow server).
   * A busy kernel answers after its cell; a request that times out meanwhile leaves alone what the
   * kernel pushed since it was sent.
   */
  private checkHealth(): void {
    if (this.link.state.kind !== "connected") return;
    const asked = Date.now();
    this.link.request({ kind: "health" }).then(
      (answer) => {
        this.setHealth(answer.content.hosts as RemoteHost[]);
        if (this.lastSnapshot) this.drawRemote(this.lastSnapshot);
      },
      (error: Error) => {
        if (this.lastSnapshot) {
          for (const entry of this.lastSnapshot.remote ?? []) {
            if ((this.healthAt.get(entry.host) ?? 0) > asked) continue;
            this.health.set(entry.host, { ...entry, status: "unknown", error: error.message });
          }
          this.drawRemote(this.lastSnapshot);
        }
      });
  }

  private drawModels(snapshot: Snapshot): void {
    const names = new Set(snapshot.models.map((m) => m.name));
    for (const [name, tree] of this.trees) {
      if (!names.has(name)) {
        tree.cleanup();
        this.trees.delete(name);
      }
    }
    if (this.openModel && !names.has(this.openModel)) this.openModel = null;
    if (!snapshot.models.length) {
      this.modelsEl.replaceChildren(
        h("div", { class: "nnsj-muted", text: "No model in this kernel yet: run a %%trace cell." }));
      return;
    }
    this.modelsEl.replaceChildren(...snapshot.models.map((m) => {
      const open = this.openModel === m.name;
      const row = h("div", { class: "nnsj-sb-model", "data-model": m.name, role: "button", tabindex: 0 },
        h("span", { class: "nnsj-twisty", text: open ? "▾" : "▸" }),
        h("b", { text: m.name }), " ",
        h("span", { class: "nnsj-muted",
          text: `${m.class} · ${compact(m.modules)} modules · ${compact(m.params)} params` }));
      row.addEventListener("click", () => this.toggleModel(m.name));
      const holder = h("div", { class: "nnsj-sb-tree", "data-model": m.name });
      holder.hidden = !open;
      const tree = this.trees.get(m.name);
      if (tree) holder.append(tree.el);
      return h("div", null, row, holder);
    }));
  }

  /** Open `name`'s module tree (closing another). */
  showTree(name: string): void {
    if (this.openModel !== name) this.toggleModel(name);
  }

  private toggleModel(name: string): void {
    this.openModel = this.openModel === name ? null : name;
    const snapshot = (this.link.state as any).snapshot as Snapshot | null;
    if (this.openModel && !this.trees.has(name)) {
      const el = h("div", { class: "nnsj-muted", text: "loading the module tree…" });
      this.trees.set(name, { el, cleanup: () => undefined });
      this.link.request({ kind: "tree", model: name }).then(
        (answer) => {
          const state = viewState(answer);
          const source = new StateSource(state, () => Promise.reject(new Error("the sidebar's tree asks nothing")));
          el.replaceChildren();
          el.className = "nnsj-sb-tree-view";
          this.trees.set(name, { el, cleanup: renderModuleTree(el, source) });
        },
        (error: Error) => {
          this.trees.delete(name);
          el.replaceChildren(h("div", { class: "nnsj-error", text: error.message }));
        });
    }
    if (snapshot) this.drawModels(snapshot);
  }

  /** A module was clicked in a tree: insert its path at the notebook's cursor, offer a save line. */
  private onSelect(event: CustomEvent): void {
    const holder = (event.target as HTMLElement).closest<HTMLElement>(".nnsj-sb-tree");
    const model = holder?.dataset.model;
    const panel = this.link.notebook;
    if (!model || !panel) return;
    const cell = panel.content.activeCell;
    const root = rootForCell(cell?.model.sharedModel.getSource() ?? "", model);
    const path = pathWithRoot(String(event.detail.path), root);
    insertAtCursor(panel, path);
    const line = saveLine(path);
    const button = h("button", { class: "jp-mod-styled nnsj-sb-insert-line", text: "insert save line" });
    button.addEventListener("click", () => insertLine(panel, line));
    this.selection.replaceChildren(
      h("div", null, "inserted ", h("code", { "data-field": "path", text: path })),
      h("div", null, h("code", { "data-field": "line", text: line }), " ", button));
  }

  private drawSaved(snapshot: Snapshot): void {
    if (!snapshot.saved.length) {
      this.savedEl.replaceChildren(h("div", { class: "nnsj-muted", text: "Nothing saved by a trace yet." }));
      return;
    }
    this.savedEl.replaceChildren(h("table", { class: "nnsj-sb-table" },
      h("tbody", null, ...snapshot.saved.map((s) => {
        const tr = h("tr", { class: "nnsj-sb-value", "data-name": s.name,
          title: `open ${s.name} (saved from ${s.model})` },
          h("td", null, h("code", { text: s.name })),
          h("td", { class: "nnsj-muted", text: `[${s.shape.join(", ")}]` }),
          h("td", { class: "nnsj-muted", text: s.dtype }));
        tr.addEventListener("click", () => this.openValue(s.name));
        return tr;
      }))));
  }

  private openValue(name: string): void {
    const content = new Widget();
    content.addClass("nnsj-sb-tensor");
    const widget = new MainAreaWidget({ content });
    widget.id = `nnsight-tensor-${name}-${Date.now()}`;
    widget.title.label = name;
    widget.title.closable = true;
    content.node.textContent = "loading…";
    this.openInMain(widget);
    this.link.request({ kind: "open", name }).then(
      (answer) => {
        const source = new StateSource(viewState(answer), (c, buffers) =>
          this.link.request({ ...c, target: name }).then((a) => {
            void buffers;
            return { content: a.content, buffers: a.buffers };
          }));
        content.node.replaceChildren();
        const cleanup = renderTensorView(content.node, source);
        widget.disposed.connect(cleanup);
      },
      (error: Error) => content.node.replaceChildren(h("div", { class: "nnsj-error", text: error.message })));
  }

  /**
   * One row per job, kept across redraws and updated in place: the kernel pushes job changes every
   * few seconds, and a row replaced between a press and a release of the mouse would swallow the click
   * on its cancel button.
   */
  private drawJobs(snapshot: Snapshot): void {
    this.lastSnapshot = snapshot;
    const listed = new Set(snapshot.jobs.map((job) => job.job_id));
    for (const id of [...this.jobRows.keys()]) if (!listed.has(id)) this.jobRows.delete(id);
    if (!snapshot.jobs.length) {
      this.jobsEl.replaceChildren(h("div", { class: "nnsj-muted", text: "No remote job from this kernel." }));
      return;
    }
    const rows = snapshot.jobs.map((job) => {
      let entry = this.jobRows.get(job.job_id);
      if (!entry) {
        const status = h("span", { class: "nnsj-sb-job-status" });
        const row = h("div", { class: "nnsj-sb-job", "data-job": job.job_id },
          h("code", { text: job.job_id.slice(0, 8) }), " ",
          h("span", { class: "nnsj-muted", text: job.model }), " ", status, " ");
        entry = { row, status, cancel: null };
        this.jobRows.set(job.job_id, entry);
      }
      this.showJob(entry, job);
      return entry.row;
    });
    const children = Array.from(this.jobsEl.children);
    const moved = rows.length !== children.length || rows.some((row, i) => row !== children[i]);
    if (moved) this.jobsEl.replaceChildren(...rows);
  }

  private showJob(entry: JobRow, job: JobEntry): void {
    entry.row.dataset.status = job.status;
    entry.status.textContent = jobLabel(job);
    if (!canCancel(job)) {
      entry.cancel?.remove();
      entry.cancel = null;
      return;
    }
    if (entry.cancel) return;
    const button = h("button", { class: "jp-mod-styled nnsj-sb-cancel", text: "cancel" });
    button.addEventListener("click", () => {
      button.disabled = true;
      this.link.request({ kind: "cancel", job: job.job_id }).then(
        (answer) => this.showJob(entry, answer.content.job as JobEntry),
        (error: Error) => {
          button.disabled = false;
          entry.row.append(h("div", { class: "nnsj-error", text: error.message }));
        });
    });
    entry.cancel = button;
    entry.row.append(button);
  }

  dispose(): void {
    this.clear();
    this.link.stateChanged.disconnect(this.onState, this);
    this.link.pushed.disconnect(this.onPushed, this);
    super.dispose();
  }
}

/** Put `line` on a line of its own after the cursor's line in the notebook's active cell. */
export function insertLine(panel: NotebookPanel, line: string): void {
  const editor = panel.content.activeCell?.editor;
  if (!editor) return;
  const { line: row } = editor.getCursorPosition();
  const current = editor.getLine(row) ?? "";
  editor.setCursorPosition({ line: row, column: current.length });
  editor.replaceSelection?.(current.trim() ? `\n${line}` : line);
  editor.focus();
}

/** Put `text` at the cursor of the notebook's active cell (replacing the selection). */
export function insertAtCursor(panel: NotebookPanel, text: string): void {
  const editor = panel.content.activeCell?.editor;
  if (!editor) return;
  editor.replaceSelection?.(text);
  editor.focus();
}
