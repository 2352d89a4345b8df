"""ModuleTree: a model's modules as a collapsible, searchable tree.

    show(model)                         # or ModuleTree(model)
    show(model, "The capital of")       # with every module's input and output shapes (model.scan)
    %nnsight tree MODEL

Each row is one module: its class, parameter count, dtype and device. Runs of identical numbered
siblings (the 30 decoder layers of a Llama) fold into one row, "layers.0–29: 30 × LlamaDecoderLayer",
that expands on click. Clicking a module copies its access path (`model.layers[3].mlp`, using the
architecture-agnostic names where the model has them) and shows a ready `.output.save()` line.
Modules whose values the model's latest trace read carry a badge ("saved" when the saved value
is that module's value or a view of it).

The tree travels as flat arrays (parent indices, class ids, parameter counts) in binary buffers;
the front-end only puts the visible rows in the DOM, so a 10,000-module model stays quick.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import traitlets

from ..tracing.envoy import Envoy, display_path, first_argument
from . import static
from .view import View

FALLBACK_ROWS = 400


def _shape_text(value: Any, limit: int = 80) -> str:
    from ..tracing.scan import TensorInfo

    def text(v: Any) -> str:
        if isinstance(v, TensorInfo):
            return f"[{', '.join(map(str, v.shape))}]"
        if isinstance(v, (tuple, list)):
            return "(" + ", ".join(text(x) for x in v) + ")"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k}: {text(x)}" for k, x in v.items() if x is not None) + "}"
        return "" if v is None else str(v)

    out = text(value)
    return out if len(out) <= limit else out[: limit - 1] + "…"


class TreeData:
    """The flat arrays a ModuleTree shows, built from a module (and its envoy for aliases and traces)."""

    def __init__(self, model: Envoy | torch.nn.Module, *, scan: Any = None) -> None:
        if isinstance(model, Envoy):
            root_envoy: Envoy | None = model._root
            module: torch.nn.Module = model._module
            prefix = model._path
        else:
            root_envoy, module, prefix = None, model, ""
        entries = list(module.named_modules())
        self.count = len(entries)
        self.root_path = prefix
        index_of = {path: i for i, (path, _) in enumerate(entries)}
        self.paths = [f"{prefix}.{p}" if prefix and p else (prefix or p) for p, _ in entries]
        self.names = [p.rsplit(".", 1)[-1] if p else "" for p, _ in entries]
        self.parents = np.full(self.count, -1, dtype=np.int32)
        for i, (path, _) in enumerate(entries[1:], start=1):
            self.parents[i] = index_of[path.rsplit(".", 1)[0] if "." in path else ""]
        class_names = [type(m).__name__ for _, m in entries]
        self.classes = sorted(set(class_names))
        lookup = {c: k for k, c in enumerate(self.classes)}
        self.class_ids = np.array([lookup[c] for c in class_names], dtype=np.int32)
        self._parameters(entries)
        self._kinds(entries)
        self._folds(entries)
        self.access = self._access(root_envoy)
        self.root_name = self.access[0]
        self.shapes_in: list[str] | None = None
        self.shapes_out: list[str] | None = None
        if scan is not None:
            self.shapes_in = [""] * self.count
            self.shapes_out = [""] * self.count
            for i, path in enumerate(self.paths):
                if path in scan._entries:
                    entry = scan._entries[path]
                    self.shapes_in[i] = _shape_text(first_argument(*entry.inputs))
                    self.shapes_out[i] = _shape_text(entry.output)
        self.marks: dict[int, str] = {}
        from ..tracing.record import last_trace

        record = last_trace(root_envoy) if root_envoy is not None else None
        if record is not None:
            for path, kind in record.module_marks().items():
                if path in self._index_by_path():
                    self.marks[self._index_by_path()[path]] = kind

    def _index_by_path(self) -> dict[str, int]:
        if not hasattr(self, "_by_path"):
            self._by_path = {p: i for i, p in enumerate(self.paths)}
        return self._by_path

    @staticmethod
    def _own(m: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
        """A module's own parameters and buffers (read from its dicts: 10x faster than named_parameters)."""
        return [(n, t) for d in (m._parameters, m._buffers) for n, t in d.items() if t is not None]

    def _parameters(self, entries: list[tuple[str, torch.nn.Module]]) -> None:
        """Parameters in each module and below (a parameter shared by two modules counts once per subtree)."""
        own = np.zeros(self.count, dtype=np.float64)
        seen: set[int] = set()
        shared = False
        for i, (_, m) in enumerate(entries):
            for p in m._parameters.values():
                if p is None:
                    continue
                own[i] += p.numel()
                shared = shared or id(p) in seen
                seen.add(id(p))
        if shared:
            self.params = np.array([float(sum(p.numel() for p in m.parameters())) for _, m in entries])
            return
        total = own.copy()
        for i in range(self.count - 1, 0, -1):
            total[self.parents[i]] += total[i]
        self.params = total

    def _kinds(self, entries: list[tuple[str, torch.nn.Module]]) -> None:
        """dtype and device of each module's own tensors, else of everything below it ("mixed" when they differ)."""
        names: dict[Any, str] = {}

        def name(x: Any) -> str:
            if x not in names:
                names[x] = str(x).replace("torch.", "")
            return names[x]

        mixed = "mixed"
        dtype_of: list[str] = [""] * self.count
        device_of: list[str] = [""] * self.count

        def merge(a: str, b: str) -> str:
            return b if not a else a if not b or a == b else mixed

        for i, (_, m) in enumerate(entries):
            for _, t in self._own(m):
                dtype_of[i] = merge(dtype_of[i], name(t.dtype))
                device_of[i] = merge(device_of[i], name(t.device))
        for i in range(self.count - 1, 0, -1):
            p = self.parents[i]
            dtype_of[p] = merge(dtype_of[p], dtype_of[i])
            device_of[p] = merge(device_of[p], device_of[i])
        self.dtypes = sorted({d for d in dtype_of if d})
        self.devices = sorted({d for d in device_of if d})
        dtype_index = {d: k for k, d in enumerate(self.dtypes)}
        device_index = {d: k for k, d in enumerate(self.devices)}
        self.dtype_ids = np.array([dtype_index.get(d, -1) for d in dtype_of], dtype=np.int32)
        self.device_ids = np.array([device_index.get(d, -1) for d in device_of], dtype=np.int32)

    def _folds(self, entries: list[tuple[str, torch.nn.Module]]) -> None:
        """Runs of consecutive numbered siblings with the same structure: `folds[i]` is the run's first module."""
        signature = [0] * self.count
        children: list[list[int]] = [[] for _ in range(self.count)]
        for i in range(1, self.count):
            children[self.parents[i]].append(i)
        for i in range(self.count - 1, -1, -1):
            m = entries[i][1]
            own = tuple((n, tuple(t.shape), t.dtype) for n, t in self._own(m))
            signature[i] = hash((type(m), own, tuple((self.names[c], signature[c]) for c in children[i])))
        self.folds = np.full(self.count, -1, dtype=np.int32)
        digit = [n.isdigit() for n in self.names]
        for kids in children:
            k = 0
            while k < len(kids):
                j = k
                while (
                    digit[kids[k]]
                    and j + 1 < len(kids)
                    and digit[kids[j + 1]]
                    and signature[kids[j + 1]] == signature[kids[k]]
                ):
                    j += 1
                if j > k:
                    self.folds[kids[k : j + 1]] = kids[k]
                k = j + 1

    def _access(self, root: Envoy | None) -> list[str]:
        """The shortest way to write each module in a trace, using the envoys' aliases."""
        aliased: dict[str, tuple[str, str]] = {}
        for env in root.modules() if root is not None else ():
            for alias, rel in env._aliases.items():
                target = f"{env._path}.{rel}" if env._path else rel
                aliased.setdefault(target, (env._path, alias))
        memo: dict[str, str] = {"": "model"}

        def access(path: str) -> str:
            if path in memo:
                return memo[path]
            if path in aliased:
                owner, alias = aliased[path]
                out = f"{access(owner)}.{alias}"
            else:
                parent, _, name = path.rpartition(".")
                out = f"{access(parent)}[{name}]" if name.isdigit() else f"{access(parent)}.{name}"
            memo[path] = out
            return out

        for path in sorted(set(aliased) | {""}, key=lambda p: p.count(".")):
            access(path)
        return [access(p) for p in self.paths]

    def access_overrides(self) -> dict[str, str]:
        """Access paths the front-end cannot compose from the parent's (aliases, and the root)."""
        out = {"0": self.access[0]}
        for i in range(1, self.count):
            parent = self.access[self.parents[i]]
            name = self.names[i]
            composed = f"{parent}[{name}]" if name.isdigit() else f"{parent}.{name}"
            if self.access[i] != composed:
                out[str(i)] = self.access[i]
        return out

    def state(self) -> dict[str, Any]:
        marked = sorted(self.marks)
        return {
            "root_name": self.root_name,
            "root_path": self.root_path,
            "names": self.names,
            "parents": self.parents.tobytes(),
            "classes": self.classes,
            "class_ids": self.class_ids.tobytes(),
            "params": self.params.tobytes(),
            "dtypes": self.dtypes,
            "dtype_ids": self.dtype_ids.tobytes(),
            "devices": self.devices,
            "device_ids": self.device_ids.tobytes(),
            "folds": self.folds.tobytes(),
            "access": self.access_overrides(),
            "shapes_in": self.shapes_in,
            "shapes_out": self.shapes_out,
            "marked": marked,
            "mark_kinds": [self.marks[i] for i in marked],
        }

    # ----- fallbacks -------------------------------------------------------------------------------
    def rows(self, limit: int) -> tuple[list[tuple[int, int, str, str, int, str]], int]:
        """(depth, node, label, class, params, badge) for the folded tree, depth first, at most `limit` rows.

        A folded run shows its first member's subtree; its badge counts the marked modules in the run.
        """
        children: list[list[int]] = [[] for _ in range(self.count)]
        for i in range(1, self.count):
            children[self.parents[i]].append(i)
        marked_below: dict[int, int] = {}
        for node in self.marks:
            a = node
            while a > 0:
                marked_below[a] = marked_below.get(a, 0) + 1
                a = int(self.parents[a])
        out: list[tuple[int, int, str, str, int, str]] = []
        hidden = 0
        # (node, depth) or (run of sibling nodes, depth) for a folded run under a parent with other children
        stack: list[tuple[Any, int]] = [(0, 0)]
        while stack:
            item, depth = stack.pop()
            if len(out) >= limit:
                hidden += len(item) if isinstance(item, list) else 1
                continue
            if isinstance(item, list):
                first, last = item[0], item[-1]
                inside = sum(marked_below.get(k, 0) for k in item)
                out.append(
                    (
                        depth,
                        first,
                        f"{self.names[first]}–{self.names[last]}",
                        f"{len(item)} × {self.classes[self.class_ids[first]]}",
                        int(sum(self.params[k] for k in item)),
                        f"{inside} marked" if inside else "",
                    )
                )
                if children[first]:  # the first member stands for all (a leaf needs no second row)
                    stack.append((first, depth + 1))
                    hidden += len(item) - 1
                else:
                    hidden += len(item)
                continue
            node = item
            kids = children[node]
            if len(kids) > 1 and all(self.folds[k] == kids[0] for k in kids):
                label = f"{self.names[node] or self.root_name}.{self.names[kids[0]]}–{self.names[kids[-1]]}"
                inside = sum(marked_below.get(k, 0) for k in kids)
                out.append(
                    (
                        depth,
                        node,
                        label,
                        f"{len(kids)} × {self.classes[self.class_ids[kids[0]]]}",
                        int(self.params[node]),
                        f"{inside} marked" if inside else self.marks.get(node, ""),
                    )
                )
                if children[kids[0]]:
                    stack.append((kids[0], depth + 1))
                    hidden += len(kids) - 1
                else:
                    hidden += len(kids)
                continue
            out.append(
                (
                    depth,
                    node,
                    self.names[node] or self.root_name,
                    self.classes[self.class_ids[node]],
                    int(self.params[node]),
                    self.marks.get(node, ""),
                )
            )
            groups: list[Any] = []
            for k in kids:
                if (
                    self.folds[k] >= 0
                    and groups
                    and isinstance(groups[-1], list)
                    and self.folds[groups[-1][0]] == self.folds[k]
                ):
                    groups[-1].append(k)
                elif self.folds[k] == k:
                    groups.append([k])
                else:
                    groups.append(k)
            stack.extend((g, depth + 1) for g in reversed(groups))
        return out, hidden

    def text(self, limit: int = 60) -> str:
        rows, hidden = self.rows(limit)
        lines = [
            f"{'  ' * d}{label}: {cls} ({static.count(p)} params){' [' + b + ']' if b else ''}"
            for d, _, label, cls, p, b in rows
        ]
        if hidden:
            lines.append(f"... {hidden} more modules")
        return "\n".join(lines)

    def html(self) -> str:
        rows, hidden = self.rows(FALLBACK_ROWS)
        esc = static.esc
        out = [
            f'<div class="nnsj-static nnsj-static-tree" style="{static.STYLE}">',
            f"<div style='{static.MUTED}'>{self.count:,} modules, {int(self.params[0]):,} parameters</div>",
            f"<div style='{static.MONO} font-size: 12px;'>",
        ]
        for depth, node, label, cls, params, mark in rows:
            badge = ""
            if mark:
                badge = (
                    " <span style='font-size: 10px; padding: 0 4px; border-radius: 6px; color: #fff; "
                    f"background: #2e7d32;'>{esc(mark)}</span>"
                )
            out.append(
                f"<div style='padding-left: {depth * 14}px; white-space: nowrap;' title='{esc(self.access[node])}'>"
                f"{esc(label)} <span style='{static.MUTED}'>{esc(cls)} · {static.count(params)}"
                f"</span>{badge}</div>"
            )
        if hidden:
            out.append(f"<div style='{static.MUTED}'>… {hidden:,} more modules (expand them in the live view)</div>")
        out.append("</div></div>")
        return "".join(out)


class ModuleTree(View):
    """A model's (or one module's) tree: `ModuleTree(model)`, `ModuleTree(model, sample_input)`.

    With a sample input, every module's input and output shapes come from `model.scan(...)`
    (fake tensors, no compute).
    """

    _view = traitlets.Unicode("module_tree").tag(sync=True)
    root_name = traitlets.Unicode("model").tag(sync=True)
    root_path = traitlets.Unicode("").tag(sync=True)
    names = traitlets.List(traitlets.Unicode()).tag(sync=True)
    parents = traitlets.Bytes(b"").tag(sync=True)
    classes = traitlets.List(traitlets.Unicode()).tag(sync=True)
    class_ids = traitlets.Bytes(b"").tag(sync=True)
    params = traitlets.Bytes(b"").tag(sync=True)
    dtypes = traitlets.List(traitlets.Unicode()).tag(sync=True)
    dtype_ids = traitlets.Bytes(b"").tag(sync=True)
    devices = traitlets.List(traitlets.Unicode()).tag(sync=True)
    device_ids = traitlets.Bytes(b"").tag(sync=True)
    folds = traitlets.Bytes(b"").tag(sync=True)
    access = traitlets.Dict().tag(sync=True)
    shapes_in = traitlets.List(traitlets.Unicode(), allow_none=True, default_value=None).tag(sync=True)
    shapes_out = traitlets.List(traitlets.Unicode(), allow_none=True, default_value=None).tag(sync=True)
    marked = traitlets.List(traitlets.Int()).tag(sync=True)
    mark_kinds = traitlets.List(traitlets.Unicode()).tag(sync=True)
    note = traitlets.Unicode("").tag(sync=True)

    def __init__(self, model: Any, *inputs: Any, **kwargs: Any) -> None:
        root = model._root if isinstance(model, Envoy) else None
        note = (
            "weights not loaded yet (device meta): they load on the first trace, or now with model.dispatch()"
            if root is not None and getattr(root, "dispatched", True) is False and not (inputs or kwargs)
            else ""
        )
        if inputs or kwargs:
            envoy = as_envoy(model)
            self._data = TreeData(envoy, scan=envoy._root.scan(*inputs, **kwargs).shapes)
        elif isinstance(model, (Envoy, torch.nn.Module)):
            self._data = TreeData(model)
        else:
            as_envoy(model)
        super().__init__(note=note, **self._data.state())

    def _html(self) -> str:
        return self._data.html()

    def _text(self) -> str:
        return self._data.text()


def as_envoy(model: Any) -> Envoy:
    """An NNsight model or one of its envoys as is; a plain torch module wrapped in NNsight."""
    if isinstance(model, Envoy):
        return model
    if isinstance(model, torch.nn.Module):
        from ..models.base import NNsight

        return NNsight(model)
    raise TypeError(
        f"ModuleTree shows a model (NNsight, LanguageModel, torch.nn.Module) or a module of one "
        f"(model.layers[0]), not {type(model).__name__}."
    )


__all__ = ["ModuleTree", "TreeData", "as_envoy", "display_path"]
