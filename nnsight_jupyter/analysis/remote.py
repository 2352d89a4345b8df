"""An analysis with `remote=True`: one job on the server, run by the same function as locally.

Why a named analysis and not one trace body. A trace is one forward pass, and a patching sweep
is many (one per chunk, sized to memory); sending one trace per chunk would make it many jobs,
each queued, loaded and checked on its own. So the request names the analysis instead
(`kind: "analysis"`, `analysis: "patching_sweep"`) and carries its arguments as data; the worker
calls this package's own `patching_sweep` (or `logit_lens`, `attention_patterns`) on its model,
which runs its passes through the same engine (`run_block`) as a local call. Same function, same
chunking, so the same numbers, by construction; the tests compare them against the live test
server anyway.

What the sandbox still guarantees. Only the analyses listed in `ANALYSES` can be named, and
their arguments are plain data (token ids, indices, numbers), decoded by the codec like any
trace's variables. The one piece of user code, a metric written as a function, travels as source
and is compiled by the worker exactly like a function sent with a trace: checked by the source
check, given the sandbox's builtins and importer, and seeing only the names it reads, which are
sent with it (`_environment`). The ready-made metrics (`logit_diff`, `token_prob`) travel as data
and run no user code at all. The worker's process lockdown, time and memory limits and the
after-job model check apply to the job as to any other; an analysis leaves the model as it
found it (`attention_patterns` puts the attention mode back before returning).

What comes back is only the result: the sweep's grid, or for the logit lens the top-k tokens and
the target's probability and rank per layer and position, never full vocabularies. Token ids
are turned into text on the client, with its tokenizer.

Progress. The worker prints one line per chunk (`ANALYSIS_PROGRESS` ...); the client turns them
into its tqdm bar instead of printing them. Ctrl-C (or the timeout) cancels the job, as for a
remote trace; cells computed on the server are not kept then.
"""

from __future__ import annotations

import ast
import builtins
import types
from collections.abc import Callable
from typing import Any

import torch

from ..errors import NNsightError
from ..tracing.envoy import Envoy

__all__ = ["ANALYSES", "run_named"]

ANALYSIS_PROGRESS = "[nnsight-jupyter analysis]"
"""Prefix of the progress lines a worker prints while an analysis runs."""


# ----- server side ---------------------------------------------------------------------------------


def _sweep_on_server(model: Any, arguments: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    from .metrics import Metric
    from .patching import patching_sweep

    metric = arguments.pop("metric")
    if isinstance(metric, dict):
        metric = Metric.from_wire(metric)
    total = [0]

    def report(result: Any, cells: list) -> None:
        total[0] += len(cells)
        log(f"{ANALYSIS_PROGRESS} patching_sweep {total[0]}/{result.computed.numel()}")

    result = patching_sweep(
        model, arguments.pop("clean"), arguments.pop("corrupted"), metric, progress=False, on_update=report, **arguments
    )
    return result.to_wire()


def _lens_on_server(model: Any, arguments: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    from .logit_lens import logit_lens

    return logit_lens(model, arguments.pop("prompt"), **arguments).to_wire()


def _attention_on_server(model: Any, arguments: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    from .attention import attention_patterns

    return attention_patterns(model, arguments.pop("prompt"), **arguments).to_wire()


ANALYSES: dict[str, tuple[Callable[..., dict[str, Any]], frozenset[str]]] = {
    "patching_sweep": (
        _sweep_on_server,
        frozenset(
            {
                "clean",
                "corrupted",
                "metric",
                "over",
                "site",
                "layers",
                "positions",
                "heads",
                "memory_budget",
                "batch_size",
                "top_k",
            }
        ),
    ),
    "logit_lens": (_lens_on_server, frozenset({"prompt", "top_k", "target", "layers"})),
    "attention_patterns": (_attention_on_server, frozenset({"prompt", "layers"})),
}
"""The analyses a server runs by name, with the arguments each accepts."""


def run_named(model: Any, name: Any, arguments: Any, log: Callable[[str], None]) -> dict[str, Any]:
    """Run the analysis `name` on the server's `model`; its result as plain values for the wire."""
    entry = ANALYSES.get(name) if isinstance(name, str) else None
    if entry is None:
        raise ValueError(
            f"This server has no analysis named {name!r}; it runs {', '.join(sorted(ANALYSES))}. "
            "Client and server may be different versions of nnsight-jupyter."
        )
    function, accepted = entry
    if not isinstance(arguments, dict) or not all(isinstance(k, str) for k in arguments):
        raise TypeError("An analysis request's arguments must be a dict of names to values.")
    unknown = sorted(set(arguments) - accepted)
    if unknown:
        raise TypeError(f"{name} does not take {', '.join(unknown)}.")
    return function(model, dict(arguments), log)


# ----- client side ---------------------------------------------------------------------------------


def run_patching_sweep(
    model: Any,
    clean: Any,
    corrupted: Any,
    metric: Any,
    *,
    progress: bool,
    on_update: Callable[..., None] | None,
    remote: Any,
    timeout: float | None,
    **options: Any,
) -> Any:
    from .metrics import Metric
    from .patching import PatchingResult, _bytes, _progress_bar
    from .tokens import prompt_ids

    environment: dict[str, Any] = {}
    if isinstance(metric, Metric):
        metric = metric.bind(model).to_wire()
    elif isinstance(metric, types.FunctionType):
        environment = _environment(metric, model)
    else:
        raise TypeError(
            "A remote sweep's metric must be logit_diff(...), token_prob(...) or a function defined with "
            f"def or lambda (it travels as source), not {type(metric).__name__}."
        )
    options["memory_budget"] = _bytes(options["memory_budget"])
    arguments = {
        "clean": prompt_ids(model, clean, "clean prompt"),
        "corrupted": prompt_ids(model, corrupted, "corrupted prompt"),
        "metric": metric,
        **{k: _plain(v) for k, v in options.items()},
    }
    bar: Any = None
    shown = 0

    def on_progress(line: str) -> None:
        nonlocal bar, shown
        done, _, total = line.rpartition(" ")[2].partition("/")
        if bar is None:
            bar = _progress_bar(progress, int(total))
        bar.update(int(done) - shown)
        shown = int(done)

    try:
        data = _run(
            model, "patching_sweep", arguments, environment, remote=remote, timeout=timeout, on_progress=on_progress
        )
    finally:
        if bar is not None:
            bar.close()
    result = PatchingResult.from_wire(data, model)
    if isinstance(metric, dict):
        from .metrics import describe

        result.metric = describe(Metric.from_wire(metric), model)
    if on_update is not None:
        on_update(result, [tuple(int(i) for i in index) for index in result.computed.nonzero().tolist()])
    return result


def run_logit_lens(model: Any, prompt: Any, *, remote: Any, timeout: float | None, **options: Any) -> Any:
    from .logit_lens import LogitLensResult
    from .tokens import prompt_ids, token_id

    if options.get("target") is not None:
        options["target"] = token_id(model, options["target"], "target")
    arguments = {"prompt": prompt_ids(model, prompt), **{k: _plain(v) for k, v in options.items()}}
    return LogitLensResult.from_wire(_run(model, "logit_lens", arguments, {}, remote=remote, timeout=timeout), model)


def run_attention_patterns(model: Any, prompt: Any, *, remote: Any, timeout: float | None, **options: Any) -> Any:
    from .attention import AttentionPatterns
    from .tokens import prompt_ids

    arguments = {"prompt": prompt_ids(model, prompt), **{k: _plain(v) for k, v in options.items()}}
    data = _run(model, "attention_patterns", arguments, {}, remote=remote, timeout=timeout)
    return AttentionPatterns.from_wire(data, model)


def _run(
    model: Any,
    name: str,
    arguments: dict[str, Any],
    environment: dict[str, Any],
    *,
    remote: Any,
    timeout: float | None,
    on_progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    from ..remote.capture import apply_result
    from ..remote.protocol import TraceRequest
    from ..remote.values import to_wire

    model_id = getattr(model, "remote_id", None)
    if not model_id:
        raise NNsightError(
            "This model has no name a server could load it by. Remote analyses need a model loaded by name, "
            'e.g. LanguageModel("smollm2"), or NNsight(module, remote_id="name-the-server-uses").'
        )
    modules = {k: v for k, v in environment.items() if isinstance(v, str) and k.startswith("module:")}
    variables = {"arguments": arguments}
    options: dict[str, Any] = {"kind": "analysis", "analysis": name, "filename": f"<{name}>", "modules": {}}
    for key, value in environment.items():
        if key in modules:
            options["modules"][key[len("module:") :]] = value
        elif value is model:
            options.setdefault("model_names", []).append(key)
        else:
            variables[key] = value
    if timeout is not None:
        options["timeout"] = float(timeout)
    request = TraceRequest(
        model_id=str(model_id), source="", options=options, variables=to_wire(variables, name="arguments", root=model)
    )
    result = _submit(model, request, remote, timeout, on_progress or (lambda line: None))
    result.logs = [line for line in result.logs if not line.startswith(ANALYSIS_PROGRESS)]
    return apply_result(result, model)["result"]


def _submit(model: Any, request: Any, remote: Any, timeout: float | None, on_progress: Callable[[str], None]) -> Any:
    """Run the request on the backend `remote=` names, turning progress lines into `on_progress` calls."""
    from ..remote.backends import LocalSimulation
    from ..remote.client import RemoteClient, _inline_result, _StatusDisplay, default_backend

    if remote == "local":
        backend: Any = LocalSimulation(model)
    elif hasattr(remote, "run"):
        backend = remote
    else:
        backend = default_backend(request.model_id)
    if not isinstance(backend, RemoteClient):
        return backend.run(request, timeout=timeout)
    handle = backend.submit(request)
    display = _StatusDisplay(handle.job_id, request.model_id) if backend.show_status else None
    printed: list[str] = []

    def on_event(event: dict[str, Any]) -> None:
        if event.get("type") == "log":
            line = str(event.get("line", ""))
            if line.startswith(ANALYSIS_PROGRESS):
                on_progress(line)
            else:
                printed.append(line)
                print(line)
        elif display is not None:
            display.update(event)

    try:
        final = backend.follow(handle.job_id, timeout=timeout, on_event=on_event)
    finally:
        if display is not None:
            display.close()
    if final.get("type") == "cancelled":
        from ..errors import RemoteServerError

        raise RemoteServerError(409, "job cancelled", final.get("reason") or f"job {handle.job_id} was cancelled")
    result = _inline_result(final) or backend.result(handle.job_id)
    shown = [line for line in result.logs if not line.startswith(ANALYSIS_PROGRESS)]
    if shown[: len(printed)] == printed:
        result.logs = shown[len(printed) :]
    return result


def _environment(function: types.FunctionType, model: Any) -> dict[str, Any]:
    """The values of the names a metric function reads from its module or closure, to send with it.

    Modules (torch, math) travel as names the server imports through its sandbox (keys
    "module:<name>"); the model as a reference to the server's model; anything else as data,
    refused here with the name when it cannot travel.
    """
    from ..remote.codec.functions import function_to_wire
    from ..remote.codec.wire import Unsupported

    try:
        source = function_to_wire(function).source
    except Unsupported as exc:
        raise TypeError(f"The metric cannot be sent to the server: {exc}") from None
    tree = ast.parse(source.strip() if source.startswith("lambda") else source)
    names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)}
    closure = dict(zip(function.__code__.co_freevars, (c.cell_contents for c in function.__closure__ or ())))
    out: dict[str, Any] = {}
    for name in sorted(names):
        if name in closure:
            value = closure[name]
        elif name in function.__globals__:
            value = function.__globals__[name]
        else:
            continue  # a builtin, or a name the function binds itself
        if name in builtins.__dict__ and value is builtins.__dict__[name]:
            continue
        if name == "arguments":
            raise ValueError(
                "A remote metric cannot read a global named `arguments` (the request uses that name); rename it."
            )
        if isinstance(value, types.ModuleType):
            out[f"module:{name}"] = value.__name__
        elif value is model or isinstance(value, Envoy):
            out[name] = value
        else:
            out[name] = _plain(value)
    return out


def _plain(value: Any) -> Any:
    """Tuples and ranges as lists, so every argument is a value the codec sends as it is."""
    if isinstance(value, range):
        return list(value)
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    return value
