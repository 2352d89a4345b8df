"""NNsight: wrap any `torch.nn.Module` so its internals can be read and edited in a trace.

    model = NNsight(net)
    with model.trace(x):
        hidden = model.encoder.layers[2].output.save()

Wrapping changes nothing in the module: module wrappers exist only while a trace runs. Subclasses
(`LanguageModel`) change how inputs are prepared and batched (`_prepare_input`, `_batch_inputs`)
and how the model is run (`_run_forward`, `_run_generate`); the engine is the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InvokeError, TraceError
from ..tracing.backend import Backend
from ..tracing.batching import Rows, batch_size_of, rows_for
from ..tracing.envoy import Envoy
from ..tracing.renaming import apply_renames, check_envoys
from ..tracing.source import compile_source
from ..tracing.tracer import Tracer, run_block


@dataclass
class PreparedInput:
    """One invoke's input, ready to be batched: positional and keyword arguments of the model call."""

    args: tuple
    kwargs: dict
    size: int | None


class NNsight(Envoy):
    """Wrap any PyTorch module; `model.trace(...)` then runs code beside its forward pass."""

    def __init__(
        self,
        module: torch.nn.Module,
        *,
        remote_id: str | None = None,
        rename: dict[Any, str] | None = None,
        envoys: Any = None,
    ) -> None:
        if not isinstance(module, torch.nn.Module):
            raise TypeError(
                f"NNsight wraps a torch.nn.Module, not {type(module).__name__}. "
                "For a Hugging Face model id or folder use LanguageModel(...)."
            )
        object.__setattr__(self, "_model", module)
        object.__setattr__(self, "remote_id", remote_id)
        object.__setattr__(self, "_envoy_classes", check_envoys(envoys))
        Envoy.__init__(self, module)
        if rename:
            object.__setattr__(self, "_renames", dict(rename))
            apply_renames(self, self._renames)

    def _refresh(self) -> None:
        object.__setattr__(self, "_module", self._model)
        super()._refresh()

    # ----- public entry points ------------------------------------------------------------------
    def trace(self, *inputs: Any, **kwargs: Any) -> Tracer:
        """Run the model once on `inputs`, with the indented block running beside the forward pass.

            with model.trace(x) as tracer:
                model.layers[0].output[:] = 0
                logits = model.output.save()

        With no inputs, add them with `with tracer.invoke(input):` blocks; they are batched into one pass.
        `remote=True` runs the block on the configured server instead (same code, same values);
        `blocking=False` returns at once with `tracer.job`, `timeout=` bounds a remote run in seconds.
        """
        if not kwargs:
            return Tracer(self, inputs, kwargs)
        backend, options = _backend_options(kwargs)
        return Tracer(self, inputs, kwargs, backend=backend, options=options)

    def generate(self, *inputs: Any, **kwargs: Any) -> Tracer:
        """Like `trace`, but runs the wrapped module's `.generate(...)`; `tracer.all()` loops over steps."""
        if not hasattr(self._model, "generate"):
            raise TraceError(f"{type(self._model).__name__} has no .generate() method; use model.trace(...).")
        backend, options = _backend_options(kwargs)
        gen_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in _GENERATE_OPTIONS}
        return Tracer(self, inputs, kwargs, generate=True, generate_kwargs=gen_kwargs, backend=backend, options=options)

    def edit(self, *, inplace: bool = False) -> Any:
        """Keep the block's interventions for every later trace: `with model.edit() as edited: ...`.

        Without `inplace` the block applies to the returned model (the same module, a new wrapper);
        with `inplace=True` to this one. `clear_edits()` drops them.
        """
        from ..tracing.edits import EditTracer

        return EditTracer(self, inplace=inplace)

    def clear_edits(self) -> None:
        """Drop every `model.edit()` block this model runs in its traces."""
        object.__setattr__(self, "_edits", ())

    def _copy_with_edits(self) -> NNsight:
        """A new wrapper of the same module with this one's edits (for a non-inplace edit)."""
        copy = object.__new__(type(self))
        copy.__dict__.update(self.__dict__)
        object.__setattr__(copy, "_root", copy)
        object.__setattr__(copy, "_interleaver", None)
        object.__setattr__(copy, "_sessions", ())
        copy._refresh()
        return copy

    def session(self, **kwargs: Any) -> Any:
        """Several traces that share values without `.save()`: `with model.session(): with model.trace(...): ...`.

        `remote=True` sends the whole block as one remote job.
        """
        from ..tracing.session import Session

        backend, options = _backend_options(kwargs)
        if kwargs:
            raise TypeError(f"model.session() takes remote=, blocking= and timeout=, not {', '.join(kwargs)}.")
        return Session(self, backend=backend, options=options)

    def run_with_cache(
        self, *inputs: Any, modules: list[Any] | None = None, include_inputs: bool = False, **kwargs: Any
    ) -> tuple[Any, Any]:
        """Run once and return `(output, cache)`, the cache holding every (or each chosen) module's output."""
        tracer = Tracer(self, inputs, kwargs)
        ns = {"tracer": tracer, "modules": modules, "include_inputs": include_inputs}
        bound = run_block(tracer, _RUN_WITH_CACHE, ns, module_level=False)
        return bound["output"], bound["cache"]

    def to(self, *args: Any, **kwargs: Any) -> NNsight:
        """Move or cast the wrapped module (as `torch.nn.Module.to`); returns this wrapper, so calls chain."""
        self._model.to(*args, **kwargs)
        return self

    def scan(self, *inputs: Any, **kwargs: Any):
        """Shapes and dtypes of every module's inputs and outputs, computed with fake tensors (no real compute).

        `model.scan(x)["layers.0"].output` reads the table; `with model.scan(x):` runs a block beside
        the fake run, as a trace does.
        """
        from ..tracing.scan import Scan

        return Scan(self, inputs, kwargs)

    # ----- how inputs become one model call ------------------------------------------------------
    def _prepare_input(self, *args: Any, **kwargs: Any) -> PreparedInput:
        return PreparedInput(args, kwargs, None)

    def _batch_inputs(self, prepared: list[PreparedInput | None]) -> tuple[tuple, dict, list[Rows | None]]:
        real = [p for p in prepared if p is not None]
        if len(real) == 1:
            return real[0].args, real[0].kwargs, [None] * len(prepared)
        for p in real:
            if p.size is None:
                p.size = batch_size_of((p.args, p.kwargs))
            if p.size is None:
                raise InvokeError(
                    "To batch several invokes, each input needs a tensor whose first dimension is the batch."
                )
        first = real[0]
        if any(len(p.args) != len(first.args) or set(p.kwargs) != set(first.kwargs) for p in real):
            raise InvokeError("Every invoke must call the model with the same arguments (same count and keywords).")
        args = tuple(_concat([p.args[i] for p in real], f"argument {i}") for i in range(len(first.args)))
        kwargs = {k: _concat([p.kwargs[k] for p in real], f"keyword {k!r}") for k in first.kwargs}
        return args, kwargs, rows_for([p.size if p is not None else None for p in prepared])

    def _run_forward(self, args: tuple, kwargs: dict) -> Any:
        return self._model(*args, **kwargs)

    def _run_generate(self, args: tuple, kwargs: dict, generate_kwargs: dict) -> Any:
        return self._model.generate(*args, **kwargs, **generate_kwargs)


def _backend_options(kwargs: dict) -> tuple[Backend | None, dict[str, Any]]:
    """The backend `remote=` asks for (None: this process) and the options it is given.

    `remote=True` is the configured server (or a local daemon), `remote="local"` the in-process
    simulation of one, and an object may be an engine backend (it has `execute`) or anything that
    runs trace requests (`run(request, timeout=...)`, such as a `RemoteClient`).
    """
    remote = kwargs.pop("remote", False)
    options = {"blocking": bool(kwargs.pop("blocking", True)), "timeout": kwargs.pop("timeout", None)}
    if remote is False or remote is None:
        return None, options
    if hasattr(remote, "execute"):
        return remote, options
    from ..remote.backends import remote_backend

    return remote_backend(remote), options


def _concat(values: list[Any], what: str) -> Any:
    head = values[0]
    if isinstance(head, torch.Tensor):
        try:
            return torch.cat(values, dim=0)
        except RuntimeError as exc:
            shapes = ", ".join(str(tuple(v.shape)) for v in values)
            raise InvokeError(
                f"Cannot batch {what} of the invokes (shapes {shapes}): all dimensions but the first must match."
            ) from exc
    if any(v != head for v in values[1:]):
        raise InvokeError(f"Invokes pass different values for {what}; only tensors can differ between invokes.")
    return head


_GENERATE_OPTIONS = {
    "max_new_tokens",
    "min_new_tokens",
    "max_length",
    "min_length",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "num_beams",
    "repetition_penalty",
    "eos_token_id",
    "pad_token_id",
    "stopping_criteria",
    "logits_processor",
    "generation_config",
    "streamer",
    "use_cache",
    "num_return_sequences",
}

_RUN_WITH_CACHE = compile_source(
    "cache = tracer.cache(modules, include_inputs=include_inputs)\noutput = tracer.result.save()\n",
    "<run_with_cache>",
)
