"""The remote backends: a trace sent as a request, run elsewhere, and its values brought back.

They implement the engine's backend interface (`nnsight_jupyter.tracing.backend`): a
`RemoteBackend` turns the `TraceCall` into a `TraceRequest` (`capture.py`), hands it to a runner,
and turns the `TraceResult` back into the names a local run would have bound. Runners:

- the configured server, or a local daemon started on demand (`remote=True`; see `client.py`
  and `daemon.py`);
- `LocalSimulation` (`remote="local"`): encodes the request, decodes it, runs it with the
  server's own `run_request` on this process's model, and sends the result through the codec
  again: every step of a remote run except the network, so notebooks and tests can check that
  remote and local runs agree without a server;
- any object with `run(request, timeout=...)` (and `submit(request)` for `blocking=False`),
  such as a `RemoteClient` for a particular server.
"""

from __future__ import annotations

from typing import Any, Protocol

from ..settings import CONFIG
from ..tracing.backend import TraceCall
from ..tracing.record import record_summary
from .capture import apply_result, build_request
from .protocol import TraceRequest, TraceResult, decode_request, decode_result, encode_request, encode_result

__all__ = ["LocalSimulation", "RemoteBackend", "Runner", "remote_backend"]


class Runner(Protocol):
    """Anything that runs a trace request to completion and returns its result."""

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


class RemoteBackend:
    """The engine backend for `remote=`: `runner` is a `Runner`, "local", or None for the configured server."""

    def __init__(self, runner: Any = None) -> None:
        self.runner = runner

    def _runner(self, call: TraceCall, model_id: str) -> Any:
        if self.runner == "local":
            return LocalSimulation(call.model)
        if self.runner is not None:
            return self.runner
        from .client import default_backend

        return default_backend(model_id)

    def execute(self, call: TraceCall) -> dict[str, Any]:
        """Send the trace, wait for its result, and return the names it bound."""
        options = call.options
        timeout = options.get("timeout")
        if timeout is None:
            timeout = CONFIG.timeout
        request = build_request(call, timeout=timeout)
        runner = self._runner(call, request.model_id)
        if not options.get("blocking", True):
            if not hasattr(runner, "submit"):
                raise TypeError("blocking=False needs a server backend; this one only runs requests to completion.")
            call.tracer.job = runner.submit(request)
            return {}
        result = runner.run(request, timeout=timeout)
        bound = apply_result(result, call.model)
        if result.trace is not None:
            record_summary(call.model, result.trace, bound)
        return bound


def remote_backend(choice: Any) -> RemoteBackend:
    """The backend for `remote=choice`: True (the configured server), "local", or a `Runner`."""
    if choice is True:
        return RemoteBackend()
    if choice == "local" or hasattr(choice, "run"):
        return RemoteBackend(choice)
    raise TypeError(
        f'remote= takes True (the configured server), "local" (an in-process simulation), or an object '
        f"with run(request, timeout=...) such as a RemoteClient; got {choice!r}."
    )
