"""Activation patching sweeps: the clean run's activation patched into the corrupted run, cell by cell.

    result = patching_sweep(model, "The Eiffel Tower is in", "The Colosseum is in",
                            token_prob(" Paris"), over=("layer", "position"))
    result.values              # [layer, position]: P(" Paris") with that one cell patched
    result.normalized()        # 0 = the corrupted run, 1 = the clean run

A cell is one (layer, position, head) choice along the axes in `over`; an axis left out is
patched whole (every position, every head). Sites: `resid` (a decoder layer's output, the
residual stream after it), `resid_pre` (its input), `attn` and `mlp` (those modules' outputs)
and `head` (one query head's slice of the attention output projection's input; see `layout.py`
for why that is right under grouped-query attention).

How it runs. One pass over [clean, corrupted] records the clean activations at every chosen
layer and both baselines. Then cells go through the model many at a time: one pass per chunk,
one batch row per cell. A chunk's cells are neighbours in layer order, and until its first
patched layer every row would compute the same thing (the unpatched corrupted prompt), so the
pass starts with ONE row and widens it to one row per cell at the input of that layer: a chunk
whose first patched layer is l runs layers 0 to l-1 once instead of once per cell. This needs no
more of the model than that batch rows do not interact, which holds for every causal LM; the
tests compare every cell with plain `register_forward_hook` runs, one per cell.

Chunk size: as many rows as `memory_budget` allows by an estimate of one row's peak activations
(`_bytes_per_row`), capped at about `TOKENS_PER_PASS` tokens a pass. The cap is measured, on
CPU only: a 240-cell SmolLM2 sweep of 8-token prompts took 5.7 s of CPU time with 64 tokens a
pass, 4.5 with 128, 3.9 with 256, 4.2 with 512, 4.5 with 1024 and 5.6 in one pass of 1920
(`benchmarks/sweep.py --chunks`, one thread): smaller passes multiply small, slow matrix
products, larger ones start earlier in the model. On an accelerator larger passes are likely faster; `batch_size=`
sets the size directly.

While it runs: a tqdm bar; `on_update(result, cells)` after every chunk with the result being
filled (cells not computed yet are NaN) so a view can redraw; Ctrl-C stops it between or inside
chunks and returns what was computed (`result.interrupted`, `result.computed`). The model is left
as it was in every case, as after any trace.

`remote=True` runs the whole sweep as one job on the server (see `remote.py`).
"""

from __future__ import annotations

import itertools
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..tracing.source import compile_source
from ..tracing.tracer import run_block
from .layout import Layout, layout_of
from .metrics import Metric, describe, evaluate
from .tables import diverging, grid_table, number
from .tokens import decode_each, prompt_ids

__all__ = ["PatchingResult", "patching_sweep"]

SITES = ("resid", "resid_pre", "attn", "mlp", "head")
AXES = ("layer", "position", "head")
TOKENS_PER_PASS = 256
DEFAULT_MEMORY_BUDGET = 2**30

_BASELINE = compile_source(
    "for reader in readers:\n"
    "    reader.take(reader.envoy.output if reader.kind == 'output' else reader.envoy.input)\n"
    "logits = last_logits(root.output).save()\n",
    "<patching sweep: baselines>",
)
_CHUNK = compile_source(
    "for patch in patches:\n"
    "    if patch.kind == 'output':\n"
    "        patch.envoy.output = patch(patch.envoy.output)\n"
    "    else:\n"
    "        patch.envoy.input = patch(patch.envoy.input)\n"
    "logits = last_logits(root.output).save()\n",
    "<patching sweep: chunk>",
)


@dataclass
class PatchingResult:
    """The metric at every cell of a patching sweep, with labelled axes and both baselines.

    `values` has one dimension per name in `dims`, indexed by `coords[dim]` (layer numbers,
    positions, head numbers); `labels()` gives the text for an axis. `top_ids` / `top_probs` hold
    each patched run's most likely next tokens (`[*values.shape, k]`), `token_text` the text of
    every id the result names.
    """

    values: torch.Tensor
    dims: tuple[str, ...]
    coords: dict[str, list[int]]
    site: str
    metric: str
    clean_baseline: float
    corrupted_baseline: float
    clean_ids: list[int]
    corrupted_ids: list[int]
    top_ids: torch.Tensor
    top_probs: torch.Tensor
    baseline_top_ids: torch.Tensor
    """`[2, k]`: the clean run's (row 0) and the corrupted run's (row 1) top tokens."""
    baseline_top_probs: torch.Tensor
    computed: torch.Tensor
    interrupted: bool = False
    token_text: dict[int, str] = field(default_factory=dict)

    # ----- reading ---------------------------------------------------------------------------------
    @property
    def clean_tokens(self) -> list[str]:
        return [self.token_text.get(i, str(i)) for i in self.clean_ids]

    @property
    def corrupted_tokens(self) -> list[str]:
        return [self.token_text.get(i, str(i)) for i in self.corrupted_ids]

    def labels(self, dim: str) -> list[str]:
        """Text labels of one axis: layer and head numbers, or each position's token(s)."""
        if dim == "position":
            out = []
            for p in self.coords["position"]:
                a, b = self.clean_tokens[p], self.corrupted_tokens[p]
                out.append(f"{p} {a!r}" if a == b else f"{p} {a!r}/{b!r}")
            return out
        return [str(i) for i in self.coords[dim]]

    def normalized(self) -> torch.Tensor:
        """`values` rescaled so that the corrupted baseline is 0 and the clean one is 1."""
        span = self.clean_baseline - self.corrupted_baseline
        if span == 0:
            raise ValueError("The clean and corrupted baselines are equal, so there is nothing to normalise by.")
        return (self.values - self.corrupted_baseline) / span

    def index(self, layer: int, position: int | None = None, head: int | None = None) -> tuple[int, ...]:
        """The index into `values` of one cell, given by model layer number, position and head."""
        given = {"layer": layer, "position": position, "head": head}
        out = []
        for dim in self.dims:
            value = given[dim]
            if value is None:
                raise ValueError(f"Name the cell's {dim}: this sweep's axes are {self.dims}.")
            if dim == "position" and value < 0:
                value += len(self.clean_ids)
            if value not in self.coords[dim]:
                raise ValueError(f"{dim} {given[dim]} is not in this sweep ({dim}s {self.coords[dim]}).")
            out.append(self.coords[dim].index(value))
        return tuple(out)

    def value(self, layer: int, position: int | None = None, head: int | None = None) -> float:
        """The metric at one cell (NaN if it was not computed)."""
        return float(self.values[self.index(layer, position, head)])

    def top_tokens(self, layer: int, position: int | None = None, head: int | None = None) -> list[tuple[str, float]]:
        """The most likely next tokens of the run patched at one cell, with their probabilities."""
        where = self.index(layer, position, head)
        ids = self.top_ids[where].tolist()
        probs = self.top_probs[where].tolist()
        return [(self.token_text.get(i, str(i)), p) for i, p in zip(ids, probs)]

    # ----- display ---------------------------------------------------------------------------------
    def __repr__(self) -> str:
        shape = " x ".join(f"{d} ({len(self.coords[d])})" for d in self.dims)
        done = int(self.computed.sum())
        lines = [
            f"PatchingResult: {self.site} patched over {shape}; metric {self.metric}",
            f"  baselines: clean {self.clean_baseline:.4g}, corrupted {self.corrupted_baseline:.4g}; "
            f"{done}/{self.computed.numel()} cells computed" + (" (interrupted)" if self.interrupted else ""),
        ]
        if done:
            effect = (self.values - self.corrupted_baseline).abs().nan_to_num(-1.0)
            flat = int(effect.reshape(-1).argmax())
            index = list(torch.unravel_index(torch.tensor(flat), self.values.shape))
            where = ", ".join(f"{d} {self.labels(d)[int(i)]}" for d, i in zip(self.dims, index))
            lines.append(f"  largest change: {where}: {float(self.values[tuple(index)]):.4g}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        values = self.values
        dims = list(self.dims)
        title = f"{self.site} patching: {self.metric}"
        if values.dim() == 3:
            effect = (values - self.corrupted_baseline).abs().nan_to_num(-1.0)
            pick = effect.argmax(-1, keepdim=True)
            values = values.gather(-1, pick).squeeze(-1)
            title += f" (per {dims[0]} and {dims[1]}, the {dims[2]} with the largest change)"
            dims = dims[:2]
        if values.dim() == 1:
            values = values.unsqueeze(0)
            rows, cols = [""], self.labels(dims[0])
        else:
            rows, cols = self.labels(dims[0]), self.labels(dims[1])
        finite = values[torch.isfinite(values)]
        span = float((finite - self.corrupted_baseline).abs().max()) if finite.numel() else 0.0
        cells = [
            [(number(float(v)), diverging(float(v), self.corrupted_baseline, span)) for v in row]
            for row in values.tolist()
        ]
        note = (
            f"clean {self.clean_baseline:.4g} · corrupted {self.corrupted_baseline:.4g} (white) · "
            f"{int(self.computed.sum())}/{self.computed.numel()} cells" + (" · interrupted" if self.interrupted else "")
        )
        return grid_table(rows, cols, cells, corner=" \\ ".join(dims), title=title, note=note)

    # ----- across the wire -------------------------------------------------------------------------
    def to_wire(self) -> dict[str, Any]:
        return {
            "values": self.values,
            "dims": list(self.dims),
            "coords": {k: list(v) for k, v in self.coords.items()},
            "site": self.site,
            "metric": self.metric,
            "clean_baseline": self.clean_baseline,
            "corrupted_baseline": self.corrupted_baseline,
            "clean_ids": list(self.clean_ids),
            "corrupted_ids": list(self.corrupted_ids),
            "top_ids": self.top_ids,
            "top_probs": self.top_probs,
            "baseline_top_ids": self.baseline_top_ids,
            "baseline_top_probs": self.baseline_top_probs,
            "computed": self.computed,
            "interrupted": self.interrupted,
        }

    @classmethod
    def from_wire(cls, data: dict[str, Any], model: Any) -> PatchingResult:
        fields = dict(data)
        fields["dims"] = tuple(fields["dims"])
        result = cls(**fields)
        result.token_text = _token_text(model, result)
        return result


# ----- the sweep -----------------------------------------------------------------------------------


def patching_sweep(
    model: Any,
    clean: Any,
    corrupted: Any,
    metric: Callable[[torch.Tensor], Any],
    *,
    over: Sequence[str] = ("layer", "position"),
    site: str = "resid",
    layers: Any = None,
    positions: Any = None,
    heads: Any = None,
    memory_budget: int | str = DEFAULT_MEMORY_BUDGET,
    batch_size: int | None = None,
    top_k: int = 5,
    progress: bool = True,
    on_update: Callable[[PatchingResult, list[tuple[int, ...]]], None] | None = None,
    remote: Any = False,
    timeout: float | None = None,
) -> PatchingResult:
    """Patch the clean run's activation into the corrupted run at every cell; return the metric per cell.

    Args:
        model: a `LanguageModel` or `NNsight(hf_model)` of a family in the architecture table.
        clean, corrupted: the two prompts (text or token ids), of the same length in tokens.
        metric: `[runs, vocab]` final-position logits -> `[runs]` values; `logit_diff(...)` and
            `token_prob(...)` are ready-made (see `metrics.py`).
        over: the axes of the grid, in the order `values` has them: any of "layer", "position",
            "head" ("head" only with site="head"); an axis left out is patched whole.
        site: "resid", "resid_pre", "attn", "mlp" or "head".
        layers, positions, heads: restrict an axis (indices; negative positions count from the end).
        memory_budget: bytes (or "512MiB", "2GB") one pass may use for activations; sets the chunk size.
        batch_size: cells per forward pass, instead of the memory budget.
        top_k: how many of each patched run's most likely tokens to keep.
        progress: show a tqdm progress bar.
        on_update: called as `on_update(result, cells)` after each chunk, `cells` the indices into
            `result.values` that were just filled (remotely: once, when the result arrives).
        remote: run the sweep on the server as one job (`True`, `"local"`, or a backend), like a trace;
            the bar follows the server's chunks.
        timeout: seconds the remote job may take.
    """
    over = _check_over(over, site)
    top_k = _positive_int(top_k, "top_k")
    if remote:
        from .remote import run_patching_sweep

        return run_patching_sweep(
            model,
            clean,
            corrupted,
            metric,
            over=over,
            site=site,
            layers=layers,
            positions=positions,
            heads=heads,
            memory_budget=memory_budget,
            batch_size=batch_size,
            top_k=top_k,
            progress=progress,
            on_update=on_update,
            remote=remote,
            timeout=timeout,
        )
    if not callable(metric):
        raise TypeError(
            f"metric must be a function of the logits (or logit_diff(...) / token_prob(...)), not "
            f"{type(metric).__name__}."
        )
    layout = layout_of(model)
    clean_ids = prompt_ids(model, clean, "clean prompt")
    corrupted_ids = prompt_ids(model, corrupted, "corrupted prompt")
    if clean_ids.numel() != corrupted_ids.numel():
        raise ValueError(
            f"The clean prompt is {clean_ids.numel()} tokens and the corrupted one {corrupted_ids.numel()}; patching "
            f"copies activations position by position, so they must be the same length. Tokens: "
            f"{decode_each(model, clean_ids.tolist())} vs {decode_each(model, corrupted_ids.tolist())}."
        )
    bound = metric.bind(model) if isinstance(metric, Metric) else metric
    n_tokens = clean_ids.numel()
    coords = {"layer": layout.check_layers(layers)}
    if "position" in over:
        coords["position"] = _positions(positions, n_tokens)
    if site == "head":
        coords["head"] = layout.check_heads(heads)
    grid = _Grid(over, coords)
    rows = batch_size if batch_size is not None else _rows_per_pass(layout, n_tokens, _bytes(memory_budget))
    rows = _positive_int(rows, "batch_size")
    sweep = _Sweep(layout, site, grid, clean_ids, corrupted_ids, bound)
    result = sweep.baselines(top_k)
    result.metric = describe(metric, model)
    result.token_text = _token_text(model, result)
    bar = _progress_bar(progress, grid.size)
    try:
        for chunk in _chunks(grid.cells, rows):
            indices = sweep.run_chunk(chunk, result, top_k)
            bar.update(len(chunk))
            if on_update is not None:
                result.token_text = _token_text(model, result)
                on_update(result, indices)
    except KeyboardInterrupt:
        result.interrupted = True
        done = int(result.computed.sum())
        print(f"patching_sweep interrupted: {done} of {grid.size} cells computed; the others are NaN.", file=sys.stderr)
    finally:
        bar.close()
    result.token_text = _token_text(model, result)
    return result


@dataclass
class _Grid:
    """The cells of a sweep: every combination of the chosen coordinates, in forward (layer) order."""

    dims: tuple[str, ...]
    coords: dict[str, list[int]]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(len(self.coords[d]) for d in self.dims)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def cells(self) -> list[_Cell]:
        """Layer-major, whatever the order of `dims`, so that a chunk spans few layers."""
        axes = [a for a in AXES if a in self.coords]
        position = {d: i for i, d in enumerate(self.dims)}
        out = []
        for combo in itertools.product(*(enumerate(self.coords[a]) for a in axes)):
            named = dict(zip(axes, combo))
            index = [0] * len(self.dims)
            for a, (i, _) in named.items():
                if a in position:
                    index[position[a]] = i
            out.append(
                _Cell(
                    named["layer"][1],
                    named["position"][1] if "position" in self.dims else None,
                    named["head"][1] if "head" in self.dims else None,
                    tuple(index),
                )
            )
        return out


@dataclass(frozen=True)
class _Cell:
    layer: int
    position: int | None
    head: int | None
    index: tuple[int, ...]


class _Reader:
    """Keeps the clean row of one site's value in the baseline pass."""

    def __init__(self, envoy: Any, kind: str, store: dict[int, torch.Tensor], layer: int) -> None:
        self.envoy, self.kind, self.store, self.layer = envoy, kind, store, layer

    def take(self, value: Any) -> None:
        tensor = value[0] if isinstance(value, tuple) else value
        self.store[self.layer] = tensor[0].detach().clone()


class _Patch:
    """One site's edit in a chunk's pass: widen to one row per cell, then write clean values into some rows."""

    def __init__(
        self,
        envoy: Any,
        kind: str,
        *,
        width: int | None = None,
        rows: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        clean: torch.Tensor | None = None,
    ) -> None:
        self.envoy, self.kind = envoy, kind
        self.width, self.rows, self.mask, self.clean = width, rows, mask, clean

    def __call__(self, value: Any) -> Any:
        tensor = value[0] if isinstance(value, tuple) else value
        if self.width is not None:
            if tensor.shape[0] != 1:
                raise RuntimeError(f"expected one row before widening, got shape {tuple(tensor.shape)}")
            tensor = tensor.expand(self.width, *tensor.shape[1:]).contiguous()
        if self.rows is not None:
            clean = self.clean.to(tensor.dtype)
            tensor[self.rows] = torch.where(self.mask, clean, tensor[self.rows])
        if isinstance(value, tuple):
            return (tensor, *value[1:])
        return tensor


class _Sweep:
    def __init__(
        self,
        layout: Layout,
        site: str,
        grid: _Grid,
        clean_ids: torch.Tensor,
        corrupted_ids: torch.Tensor,
        metric: Callable[[torch.Tensor], Any],
    ) -> None:
        self.layout, self.site, self.grid, self.metric = layout, site, grid, metric
        self.clean_ids, self.corrupted_ids = clean_ids, corrupted_ids
        self.clean: dict[int, torch.Tensor] = {}
        self.kwargs: dict[str, Any] = {}
        if layout.accepts("use_cache"):
            self.kwargs["use_cache"] = False
        if layout.accepts("logits_to_keep"):
            self.kwargs["logits_to_keep"] = 1

    def site_of(self, layer: int) -> tuple[Any, str]:
        lay = self.layout
        if self.site == "resid":
            return lay.layer(layer), "output"
        if self.site == "resid_pre":
            return lay.layer(layer), "input"
        if self.site == "attn":
            return lay.attn(layer), "output"
        if self.site == "mlp":
            return lay.mlp(layer), "output"
        return lay.head_projection(layer), "input"

    def _run(self, body: Any, ids: torch.Tensor, ns: dict[str, Any]) -> torch.Tensor:
        model = self.layout.model
        tracer = model.trace(ids.to(self.layout.device), **self.kwargs)
        ns.update(root=model, last_logits=_last_logits)
        with torch.no_grad():
            return run_block(tracer, body, ns, module_level=False)["logits"]

    def baselines(self, top_k: int) -> PatchingResult:
        readers = []
        for layer in self.grid.coords["layer"]:
            envoy, kind = self.site_of(layer)
            readers.append(_Reader(envoy, kind, self.clean, layer))
        ids = torch.stack([self.clean_ids, self.corrupted_ids])
        logits = self._run(_BASELINE, ids, {"readers": readers})
        baselines = evaluate(self.metric, logits).cpu()
        top = _top(logits, top_k)
        shape = self.grid.shape
        k = top[0].shape[-1]
        return PatchingResult(
            values=torch.full(shape, math.nan),
            dims=self.grid.dims,
            coords=self.grid.coords,
            site=self.site,
            metric="",
            clean_baseline=float(baselines[0]),
            corrupted_baseline=float(baselines[1]),
            clean_ids=self.clean_ids.tolist(),
            corrupted_ids=self.corrupted_ids.tolist(),
            top_ids=torch.zeros(*shape, k, dtype=torch.long),
            top_probs=torch.full((*shape, k), math.nan),
            baseline_top_ids=top[0],
            baseline_top_probs=top[1],
            computed=torch.zeros(shape, dtype=torch.bool),
        )

    def run_chunk(self, chunk: list[_Cell], result: PatchingResult, top_k: int) -> list[tuple[int, ...]]:
        first = chunk[0].layer
        patches = []
        start, start_kind = self.layout.layer(first), "input"
        by_layer: dict[int, list[int]] = {}
        for row, cell in enumerate(chunk):
            by_layer.setdefault(cell.layer, []).append(row)
        widened = False
        for layer, rows in by_layer.items():
            envoy, kind = self.site_of(layer)
            clean = self.clean[layer]
            mask = torch.zeros(len(rows), *clean.shape, dtype=torch.bool)
            index = torch.tensor(rows, device=clean.device)
            head_width = clean.shape[-1] // self.layout.n_heads if self.site == "head" else None
            for j, row in enumerate(rows):
                cell = chunk[row]
                where: list[Any] = [slice(None), slice(None)]
                if cell.position is not None:
                    where[0] = cell.position
                if cell.head is not None:
                    where[1] = slice(cell.head * head_width, (cell.head + 1) * head_width)
                mask[j][tuple(where)] = True
            mask = mask.to(clean.device)
            if not widened and envoy is start and kind == start_kind:
                patches.append(_Patch(envoy, kind, width=len(chunk), rows=index, mask=mask, clean=clean))
            else:
                if not widened:
                    patches.append(_Patch(start, start_kind, width=len(chunk)))
                patches.append(_Patch(envoy, kind, rows=index, mask=mask, clean=clean))
            widened = True
        logits = self._run(_CHUNK, self.corrupted_ids.unsqueeze(0), {"patches": patches})
        values = evaluate(self.metric, logits).cpu()
        top_ids, top_probs = _top(logits, result.top_ids.shape[-1])
        indices = []
        for row, cell in enumerate(chunk):
            result.values[cell.index] = values[row]
            result.top_ids[cell.index] = top_ids[row]
            result.top_probs[cell.index] = top_probs[row]
            result.computed[cell.index] = True
            indices.append(cell.index)
        return indices


def _last_logits(output: Any) -> torch.Tensor:
    logits = getattr(output, "logits", None)
    if logits is None:
        logits = output[0] if isinstance(output, (tuple, list)) else output
    return logits[:, -1].float()


def _top(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    top = logits.softmax(-1).topk(min(k, logits.shape[-1]), dim=-1)
    return top.indices.cpu(), top.values.cpu()


def _chunks(cells: list[_Cell], rows: int) -> list[list[_Cell]]:
    return [cells[i : i + rows] for i in range(0, len(cells), rows)]


def _rows_per_pass(layout: Layout, n_tokens: int, budget: int) -> int:
    fit = budget // _bytes_per_row(layout, n_tokens)
    if fit < 1:
        raise ValueError(
            f"memory_budget={budget} bytes is less than one patched run of this prompt needs (about "
            f"{_bytes_per_row(layout, n_tokens)} bytes); raise it or pass batch_size=1."
        )
    return int(max(1, min(fit, math.ceil(TOKENS_PER_PASS / n_tokens))))


def _bytes_per_row(layout: Layout, n_tokens: int) -> int:
    """Estimated peak activation bytes of one row of a pass: one layer's intermediates, and the logits.

    Inside a layer: the residual and its normed copy, queries/keys/values and the attention
    output (about 6 x hidden), the MLP's up/gate/activation (3 x intermediate), and the attention
    scores and probabilities (2 x heads x n x n). Logits: the final position only when the model
    takes `logits_to_keep`, else every position, and their softmax.
    """
    config = layout.config
    hidden = _config_int(config, ("hidden_size", "n_embd", "d_model"), 1024)
    inter = _config_int(config, ("intermediate_size", "n_inner", "ffn_dim"), 4 * hidden)
    vocab = _config_int(config, ("vocab_size",), 50_000)
    heads = layout.n_heads
    per_token = 8 * hidden + 3 * inter
    logits = 2 * vocab * (1 if layout.accepts("logits_to_keep") else n_tokens)
    item = next((p.element_size() for p in layout.module.parameters()), 4)
    return int(item * (n_tokens * per_token + 2 * heads * n_tokens * n_tokens + logits))


def _config_int(config: Any, names: Sequence[str], default: int) -> int:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return default


_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def _bytes(value: int | str) -> int:
    if isinstance(value, bool):
        raise TypeError("memory_budget takes bytes (an int) or text such as '512MiB'.")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError("memory_budget must be positive.")
        return value
    if isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        number_part = text.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = text[len(number_part) :] or "b"
        try:
            amount = float(number_part)
        except ValueError:
            amount = -1.0
        if unit in _UNITS and amount > 0:
            return int(amount * _UNITS[unit])
    raise ValueError(f"memory_budget={value!r}: give bytes (an int) or text such as '512MiB' or '2GB'.")


def _check_over(over: Any, site: str) -> tuple[str, ...]:
    if site not in SITES:
        raise ValueError(f"site={site!r} is not one of {', '.join(SITES)}.")
    if isinstance(over, str):
        over = (over,)
    over = tuple(over)
    unknown = [a for a in over if a not in AXES]
    if unknown or not over:
        raise ValueError(
            f"over={over!r}: choose axes among {', '.join(AXES)} (each at most once), e.g. over=('layer', 'position')."
        )
    if len(set(over)) != len(over):
        raise ValueError(f"over={over!r} names an axis twice.")
    if "layer" not in over:
        raise ValueError(
            f"over={over!r} has no 'layer' axis; a sweep patches one layer per cell, so include it "
            "(restrict it with layers=[...])."
        )
    if "head" in over and site != "head":
        raise ValueError(f"over has 'head' but site={site!r}; heads are patched with site='head'.")
    if site == "head" and "head" not in over:
        raise ValueError(
            "site='head' patches one head per cell: add 'head' to over (or patch the whole attention "
            "output with site='attn')."
        )
    return over


def _positions(positions: Any, n_tokens: int) -> list[int]:
    from .layout import _indices

    return _indices(positions, n_tokens, "positions", "position")


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, not {value!r}.")
    return value


def _token_text(model: Any, result: PatchingResult) -> dict[int, str]:
    ids = set(result.clean_ids) | set(result.corrupted_ids)
    ids.update(result.baseline_top_ids.reshape(-1).tolist())
    ids.update(result.top_ids[result.computed].reshape(-1).tolist())
    missing = sorted(i for i in ids if i not in result.token_text)
    known = dict(result.token_text)
    known.update(zip(missing, decode_each(model, missing)))
    return known


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(show: bool, total: int) -> Any:
    if not show:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="patching sweep", unit="cell")
