"""Where a `remote=` trace goes: a server over HTTP, or an in-process simulation of one.

`remote="local"` encodes the request, decodes it, runs it with the server's own `run_request`
on this process's model, and sends the result through the codec again: every step of a remote run
except the network, so notebooks and tests can check that remote and local runs agree without a
server. `remote=True` uses the configured server (see `remote.config`); a backend object with a
`run(request, timeout=...)` method may also be passed directly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from .capture import apply_result, build_request
from .protocol import TraceRequest, TraceResult, decode_request, decode_result, encode_request, encode_result

if TYPE_CHECKING:
    from ..tracing.source import Block
    from ..tracing.tracer import Tracer


class Backend(Protocol):
    """Anything that can run a trace request and return its result."""

    def run(self, request: TraceRequest, *, timeout: float | None = None) -> TraceResult: ...


class LocalSimulation:
    """Runs requests on a local model through the full encode/decode path, without a network."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def run(self, request: TraceRequest, *, timeout: float | None = None) -> TraceResult:
        from .execute import run_request

        received = decode_request(encode_request(request))
        result = run_request(self.model, received)
        return decode_result(encode_result(result))


def backend_for(tracer: "Tracer", model_id: str | None = None) -> Backend:
    choice = tracer._remote
    if choice == "local":
        return LocalSimulation(tracer.model)
    if hasattr(choice, "run"):
        return choice
    from .client import default_backend

    return default_backend(model_id)


def run_remote(tracer: "Tracer", block: "Block", ns: dict[str, Any]) -> dict[str, Any]:
    """Send the trace, wait for its result, and return the names it bound."""
    request = build_request(tracer, block, ns)
    backend = backend_for(tracer, request.model_id)
    bound: dict[str, Any] = {block.as_name: tracer} if block.as_name else {}
    if not tracer._blocking:
        if not hasattr(backend, "submit"):
            raise TypeError("blocking=False needs a server backend; this one only runs requests to completion.")
        tracer.job = backend.submit(request)
        return bound
    result = backend.run(request, timeout=tracer._remote_timeout)
    bound.update(apply_result(result, tracer.model))
    return bound
