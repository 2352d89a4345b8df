"""Where a trace body runs: the engine's backend interface, and the backend that runs it here.

When a `with model.trace(...)` block ends, the tracer hands its backend one `TraceCall`: the
compiled body, the namespace it reads, the model and its inputs, and the options the user passed
that the engine does not interpret (`timeout`, `blocking`). The backend returns the names the
body bound, as they should appear in the caller's namespace: saved values, and `NotSaved`
placeholders for names that held unsaved tensors. It may also set `call.tracer.job` (a handle to
fetch the values later) and return no names.

`LocalBackend` runs the body beside this process's forward pass. The remote backends (a server
over HTTP, or an in-process simulation of one) live in `nnsight_jupyter.remote.backends`; the
engine knows them only through this interface. Any object with an `execute(call)` method can be
passed as `model.trace(..., remote=backend)`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .envoy import Envoy
    from .source import Block
    from .tracer import Tracer

__all__ = ["LOCAL", "Backend", "LocalBackend", "TraceCall"]


class TraceCall:
    """One trace, as a backend receives it.

    Attributes:
        tracer: the `Tracer` of the `with` statement (backends use its public side only: `.job`).
        model: the traced model (an `NNsight`).
        block: the compiled body: `code`, `filename`, `as_name` and `remote_source()`.
        namespace: what the body's names refer to.
        module_level: `namespace` is the caller's module globals, which the body writes as it runs.
        args, kwargs: the inputs given to `model.trace(...)` / `model.generate(...)` (empty when the
            body adds them with `tracer.invoke`).
        generate: whether this is `model.generate(...)`; `generate_kwargs` holds its options.
        options: what the engine passes on without reading (`timeout`, `blocking`).
    """

    __slots__ = (
        "tracer",
        "model",
        "block",
        "namespace",
        "module_level",
        "args",
        "kwargs",
        "generate",
        "generate_kwargs",
        "options",
    )

    def __init__(
        self,
        tracer: Tracer,
        model: Envoy,
        block: Block,
        namespace: dict,
        *,
        module_level: bool,
        args: tuple,
        kwargs: dict,
        generate: bool,
        generate_kwargs: dict,
        options: dict,
    ) -> None:
        self.tracer = tracer
        self.model = model
        self.block = block
        self.namespace = namespace
        self.module_level = module_level
        self.args = args
        self.kwargs = kwargs
        self.generate = generate
        self.generate_kwargs = generate_kwargs
        self.options = options


class Backend(Protocol):
    """Anything that runs a trace body: returns the names it bound (see the module docstring)."""

    def execute(self, call: TraceCall) -> dict[str, Any]: ...


class LocalBackend:
    """Runs the body beside one forward pass of the model in this process."""

    def execute(self, call: TraceCall) -> dict[str, Any]:
        from .tracer import run_block

        return run_block(call.tracer, call.block, call.namespace, module_level=call.module_level)


LOCAL = LocalBackend()
