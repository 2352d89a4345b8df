/**
 * ModuleTree: a model's modules as a collapsible, searchable, virtualised tree.
 *
 * State (from `nnsight_jupyter/widgets/module_tree.py`), one entry per module in `named_modules()`
 * order: `names` and `parents` (int32), `class_ids` into `classes`, `params` (float64, parameters
 * in the module and below), `dtype_ids` / `device_ids` into `dtypes` / `devices`, `folds` (int32:
 * the first module of the run of identical siblings a module belongs to, or -1), `access` (the
 * access expression of the modules that have an alias: `model.layers` for `model.model.layers`),
 * `shapes_in` / `shapes_out` from a scan (or null) and `marked` (modules read in the last trace).
 *
 * Only visible rows exist in the DOM (`VirtualList`), so a 10,000-module model costs what its
 * visible 20 rows cost.
 */

import { asDataView, typed } from "./core/binary";
import { h } from "./core/dom";
import { formatCount, formatInt } from "./core/format";
import { matcher } from "./core/path_match";
import { VirtualList } from "./core/virtual_list";
import { DataSource } from "./source";

interface Row {
  node: number;
  depth: number;
  /** Set for a folded run: how many siblings it stands for, and the last one. */
  fold?: { size: number; last: number };
}

const ROW_HEIGHT = 24;

export function renderModuleTree(el: HTMLElement, source: DataSource): () => void {
  const names = source.get<string[]>("names");
  const n = names.length;
  const parents = typed(asDataView(source.get("parents")), "int32");
  const classes = source.get<string[]>("classes");
  const classIds = typed(asDataView(source.get("class_ids")), "int32");
  const params = typed(asDataView(source.get("params")), "float64");
  const dtypes = source.get<string[]>("dtypes");
  const dtypeIds = typed(asDataView(source.get("dtype_ids")), "int32");
  const devices = source.get<string[]>("devices");
  const deviceIds = typed(asDataView(source.get("device_ids")), "int32");
  const folds = typed(asDataView(source.get("folds")), "int32");
  const accessOverrides = source.get<Record<string, string>>("access");
  const shapesIn = source.get<string[] | null>("shapes_in");
  const shapesOut = source.get<string[] | null>("shapes_out");
  const markKinds = source.get<string[]>("mark_kinds");
  const marked = new Map(source.get<number[]>("marked").map((node, k) => [node, markKinds[k]]));
  const rootName = source.get<string>("root_name");
  const rootPath = source.get<string>("root_path") ?? "";

  const children: number[][] = Array.from({ length: n }, () => []);
  for (let i = 1; i < n; i++) children[parents[i]].push(i);
  const depthOf = new Int32Array(n);
  const paths: string[] = new Array(n);
  const access: string[] = new Array(n);
  paths[0] = rootPath;
  access[0] = accessOverrides["0"] ?? rootName;
  for (let i = 1; i < n; i++) {
    const p = parents[i];
    depthOf[i] = depthOf[p] + 1;
    paths[i] = paths[p] ? `${paths[p]}.${names[i]}` : names[i];
    access[i] = accessOverrides[String(i)] ??
      (/^\d+$/.test(names[i]) ? `${access[p]}[${names[i]}]` : `${access[p]}.${names[i]}`);
  }

  /** The children of `node` as rows: runs of identical siblings become one folded row. */
  const childRows = (node: number, depth: number): Row[] => {
    const out: Row[] = [];
    const kids = children[node];
    for (let k = 0; k < kids.length; k++) {
      const child = kids[k];
      if (folds[child] === child) {
        let j = k;
        while (j + 1 < kids.length && folds[kids[j + 1]] === child) j++;
        out.push({ node: child, depth, fold: { size: j - k + 1, last: kids[j] } });
        k = j;
      } else {
        out.push({ node: child, depth });
      }
    }
    return out;
  };
  /** A module whose children are one folded run shows as that run ("layers.0-29"). */
  const wholeFold = (node: number): Row["fold"] | undefined => {
    const kids = children[node];
    if (kids.length < 2 || folds[kids[0]] !== kids[0]) return undefined;
    if (!kids.every((k) => folds[k] === kids[0])) return undefined;
    return { size: kids.length, last: kids[kids.length - 1] };
  };

  const expanded = new Set<string>();
  const key = (row: Row) => (row.fold ? `f${row.node}` : `n${row.node}`);
  // Open by default: the root and the modules below it down to depth 1, never a folded run.
  const openByDefault = (node: number) => {
    if (depthOf[node] > 1 || wholeFold(node)) return;
    expanded.add(`n${node}`);
    if (!wholeFold(node)) childRows(node, 0).forEach((r) => !r.fold && openByDefault(r.node));
  };
  openByDefault(0);

  let rows: Row[] = [];
  let matches: Set<number> | null = null;
  const visibleInSearch = new Set<number>();

  const build = () => {
    rows = [];
    const walk = (node: number, depth: number) => {
      const whole = wholeFold(node);
      const row: Row = { node, depth, fold: undefined };
      rows.push(row);
      if (matches) {
        for (const child of children[node]) if (visibleInSearch.has(child)) walk(child, depth + 1);
        return;
      }
      if (!expanded.has(`n${node}`)) return;
      if (whole) {
        for (const child of children[node]) walk(child, depth + 1);
        return;
      }
      for (const r of childRows(node, depth + 1)) {
        if (r.fold) {
          rows.push(r);
          if (expanded.has(key(r))) {
            const kids = children[node];
            const from = kids.indexOf(r.node);
            const to = kids.indexOf(r.fold.last);
            for (let k = from; k <= to; k++) walk(kids[k], depth + 2);
          }
        } else {
          walk(r.node, depth + 1);
        }
      }
    };
    walk(0, 0);
  };

  const root = h("div", { class: "nnsj-view nnsj-tree", "data-view": "module_tree" });
  el.append(root);
  const search = h("input", {
    type: "search", class: "nnsj-search", placeholder: "search: mlp, layers.*.mlp, Linear",
    "aria-label": "search modules", spellcheck: "false",
  });
  const count = h("span", { class: "nnsj-muted nnsj-count" });
  const details = h("div", { class: "nnsj-details", "aria-live": "polite" },
    h("span", { class: "nnsj-muted", text: "click a module to copy its path and a line that saves its output" }));
  const totalParams = params[0];
  const summary = h("span", {
    class: "nnsj-muted", text: `${formatInt(n)} modules, ${formatCount(totalParams)} parameters`,
  });
  const note = source.get<string>("note");
  root.append(h("div", { class: "nnsj-toolbar" }, search, count, summary,
    note ? h("span", { class: "nnsj-note", text: note }) : null), details);
  const head = h("div", { class: "nnsj-tree-row nnsj-tree-head" + (shapesOut ? " nnsj-with-shapes" : "") },
    h("span", { text: "module" }), h("span", { text: "class" }), h("span", { class: "nnsj-num", text: "params" }),
    h("span", { text: "dtype" }), h("span", { text: "device" }),
    shapesOut ? h("span", { text: "input → output" }) : null);
  root.append(head);

  let selected = -1;
  const select = (node: number) => {
    selected = node;
    const path = access[node];
    const line = `out = ${path}.output.save()`;
    const copyLine = h("button", { class: "nnsj-button", text: "copy", title: "copy this line" });
    copyLine.addEventListener("click", () => copy(line, copyLine));
    details.replaceChildren(
      h("code", { class: "nnsj-access", "data-field": "access", text: path }),
      h("span", { class: "nnsj-muted nnsj-copied", text: " copied " }),
      h("code", { class: "nnsj-line", "data-field": "line", text: line }), " ", copyLine);
    copy(path, null);
    list.refresh();
    // A host (the JupyterLab sidebar) can act on the selection: insert the path into a cell.
    el.dispatchEvent(new CustomEvent("nnsj-module-select", { bubbles: true, detail: { path, line } }));
  };
  const copy = (text: string, button: HTMLElement | null) => {
    const done = () => {
      root.dataset.copied = text;
      if (button) button.textContent = "copied";
    };
    if (navigator.clipboard?.writeText) {
      navigator.clipboard.writeText(text).then(done, () => fallbackCopy(text) && done());
    } else if (fallbackCopy(text)) {
      done();
    }
  };

  const renderRow = (i: number, el: HTMLElement) => {
    const row = rows[i];
    const node = row.node;
    const whole = row.fold ? undefined : wholeFold(node);
    const fold = row.fold ?? (matches ? undefined : whole);
    const open = row.fold ? expanded.has(key(row)) : expanded.has(`n${node}`);
    const hasKids = row.fold !== undefined || children[node].length > 0;
    el.className = "nnsj-vlist-row nnsj-tree-row" + (shapesOut ? " nnsj-with-shapes" : "") +
      (node === selected && !row.fold ? " nnsj-selected" : "") + (matches?.has(node) ? " nnsj-match" : "");
    el.dataset.node = String(node);
    el.dataset.path = paths[node];
    const twisty = h("span", { class: "nnsj-twisty", text: hasKids && !matches ? (open ? "▾" : "▸") : "" });
    let label: string;
    let cls: string;
    let count = params[node];
    if (row.fold) {
      label = `${names[row.node]}–${names[row.fold.last]}`;
      cls = `${row.fold.size} × ${classes[classIds[node]]}`;
      count = 0;
      const kids = children[parents[node]];
      for (let k = kids.indexOf(node); k <= kids.indexOf(row.fold.last); k++) count += params[kids[k]];
    } else if (fold) {
      label = `${names[node] || rootName}.${names[children[node][0]]}–${names[fold.last]}`;
      cls = `${fold.size} × ${classes[classIds[children[node][0]]]}`;
    } else {
      label = names[node] || rootName;
      cls = classes[classIds[node]];
    }
    el.dataset.folded = fold ? String(fold.size) : "";
    const name = h("span", { class: "nnsj-tree-name" }, twisty, h("span", { class: "nnsj-label", text: label }));
    name.style.paddingLeft = `${row.depth * 14}px`;
    const kind = marked.get(node);
    if (kind && !row.fold) {
      name.append(h("span", {
        class: kind === "saved" ? "nnsj-badge" : "nnsj-badge nnsj-badge-soft", "data-badge": kind,
        title: kind === "saved" ? "saved in the last trace" : "read in the last trace", text: kind,
      }));
    }
    const range = row.fold ? [node, row.fold.last] : fold && !open ? [children[node][0], fold.last] : null;
    if (range) {
      const inside = Array.from(marked.keys()).filter((m) => isInside(m, range[0], range[1]));
      if (inside.length) {
        name.append(h("span", {
          class: "nnsj-badge nnsj-badge-soft", "data-badge": "inside",
          title: "modules inside were read or saved in the last trace", text: `${inside.length} marked`,
        }));
      }
    }
    const cells: (HTMLElement | null)[] = [
      name,
      h("span", { class: "nnsj-class", text: cls }),
      h("span", { class: "nnsj-num", "data-field": "params", text: formatCount(count), title: formatInt(count) }),
      h("span", { class: "nnsj-muted", text: dtypeIds[node] >= 0 ? dtypes[dtypeIds[node]] : "" }),
      h("span", { class: "nnsj-muted", text: deviceIds[node] >= 0 ? devices[deviceIds[node]] : "" }),
      shapesOut ? h("span", {
        class: "nnsj-shapes", "data-field": "shapes",
        text: shapeText(fold && !row.fold ? children[node][0] : node),
      }) : null,
    ];
    el.replaceChildren(...cells.filter((c): c is HTMLElement => c !== null));
    el.title = access[node];
    twisty.onclick = (event) => {
      event.stopPropagation();
      toggle(row);
    };
    // A run of layers opens on click; a module whose children are such a run (`layers`) also opens,
    // and is selected like any module.
    el.onclick = () => {
      if (!row.fold) select(node);
      if (row.fold || (whole && !matches)) toggle(row);
    };
    el.ondblclick = () => !row.fold && !whole && toggle(row);
  };

  const shapeText = (node: number): string =>
    shapesOut && shapesOut[node] ? `${shapesIn?.[node] ?? ""} → ${shapesOut[node]}` : "";

  const isInside = (m: number, first: number, last: number): boolean => {
    let a = m;
    while (a > 0) {
      const p = parents[a];
      if (p === parents[first] && a >= first && a <= last) return true;
      a = p;
    }
    return false;
  };

  const toggle = (row: Row) => {
    if (matches) return;
    const k = key(row);
    if (expanded.has(k)) expanded.delete(k);
    else expanded.add(k);
    build();
    list.setCount(rows.length);
  };

  build();
  const list = new VirtualList({ rowHeight: ROW_HEIGHT, height: 440, count: rows.length, render: renderRow });
  root.append(list.root);

  search.addEventListener("input", () => {
    const match = matcher(search.value);
    visibleInSearch.clear();
    if (!match) {
      matches = null;
      count.textContent = "";
      delete root.dataset.matches;
    } else {
      matches = new Set();
      for (let i = 0; i < n; i++) {
        if (match(paths[i], access[i], classes[classIds[i]])) {
          matches.add(i);
          for (let a = i; a > 0 && !visibleInSearch.has(a); a = parents[a]) visibleInSearch.add(a);
        }
      }
      count.textContent = `${formatInt(matches.size)} match${matches.size === 1 ? "" : "es"}`;
      root.dataset.matches = String(matches.size);
    }
    build();
    list.setCount(rows.length);
  });

  return () => root.remove();
}

function fallbackCopy(text: string): boolean {
  const area = document.createElement("textarea");
  area.value = text;
  area.style.position = "fixed";
  area.style.opacity = "0";
  document.body.append(area);
  area.select();
  let ok = false;
  try {
    ok = document.execCommand("copy");
  } catch {
    ok = false;
  }
  area.remove();
  return ok;
}
