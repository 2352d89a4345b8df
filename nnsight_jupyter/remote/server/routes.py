"""The HTTP endpoints: thin functions that check input, call the service, and answer.

==========================  ===============================================================
``GET /health``             status and versions; the only endpoint without a key
``GET /models``             served models, their state (loading/ready/failed + reason), replicas
``POST /jobs``              body: ``encode_request(...)`` bytes -> 202 ``{job_id, status, position}``;
                            with ``Accept: text/event-stream``, 202 and the job's event stream
                            (as ``GET /jobs/{id}/events``; the job in ``Location``)
``GET /jobs/{id}``          status JSON (position while queued, timestamps, error summary)
``GET /jobs/{id}/events``   server-sent events, resumable with ``?after=SEQ`` (see ``events.py``)
``GET /jobs/{id}/result``   ``encode_result(...)`` bytes (``application/x-msgpack``) once finished
``POST /jobs/{id}/cancel``  cancel a queued or running job (``DELETE /jobs/{id}`` does the same)
==========================  ===============================================================

Errors are JSON ``{"error", "detail"}`` (``responses.py``) with a fitting status: 400 malformed
body, 401/403 key, 404 unknown model or job, 409 protocol version mismatch or a job in the wrong
state, 410 expired result, 413 body too large, 415 wrong content type, 429 queue full, 503
model failed to load. Jobs are visible only to the key that submitted them; another key gets
404, as for a job that never existed.

Anything that blocks (decoding a large body, SQLite, files) runs in a thread.
"""

from __future__ import annotations

import asyncio
import mmap
from collections.abc import AsyncIterator
from typing import Any

from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..._version import __version__
from ...errors import ServerError, wire_name
from ..lifecycle import is_job_id
from ..protocol import (
    PROTOCOL_VERSION,
    ProtocolError,
    ProtocolVersionError,
    TraceErrorInfo,
    TraceResult,
    decode_request,
    encode_result,
)
from .auth import OWNER_SCOPE_KEY
from .config import describe_bytes
from .events import INLINE_RESULT_BYTES, KEEPALIVE, format_event
from .jobs import FINAL, Job, QueueFull, iso
from .responses import ApiError
from .service import Service
from .store import iter_file

__all__ = ["ROUTES"]

_BODY_TYPES = ("application/x-msgpack", "application/msgpack", "application/vnd.msgpack", "application/octet-stream")
KEEPALIVE_S = 10.0


def _service(request: Request) -> Service:
    return request.app.state.service


def _owner(request: Request) -> str:
    return request.scope.get(OWNER_SCOPE_KEY, "anonymous")


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok", "protocol_version": PROTOCOL_VERSION, "package_version": __version__})


async def list_models(request: Request) -> JSONResponse:
    service = _service(request)
    models = await run_in_threadpool(service.pool.describe)
    return JSONResponse({"models": service.redactor.value(models)})


# ----- submitting -----------------------------------------------------------------------------
async def submit(request: Request) -> Response:
    service = _service(request)
    config = service.config
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type and content_type not in _BODY_TYPES:
        raise ApiError(
            415,
            "unsupported content type",
            f"send the encode_request(...) bytes as application/x-msgpack, not {content_type[:100]!r}",
        )
    body = await _read_body(request, config.max_request_bytes)
    try:
        if len(body) <= INLINE_DECODE_BYTES:
            trace_request = decode_request(body, max_size=config.max_request_bytes)
        else:
            trace_request = await run_in_threadpool(decode_request, body, max_size=config.max_request_bytes)
    except ProtocolVersionError as exc:
        raise ApiError(
            409,
            "protocol version mismatch",
            str(exc),
            client_protocol=exc.remote_protocol,
            client_package=str(exc.remote_package)[:100],
            server_protocol=PROTOCOL_VERSION,
            server_package=__version__,
        ) from None
    except ProtocolError as exc:
        raise ApiError(400, "malformed request", str(exc)[:4000]) from None
    model = trace_request.model_id
    if config.model(model) is None:
        served = [m.name for m in config.models]
        raise ApiError(
            404,
            "unknown model",
            f"this server does not serve {model[:200]!r}; it serves {', '.join(served)}. Load the model "
            "under one of these names, or ask the operator to add it (serve --models).",
            models=served,
        )
    state, reason = service.pool.model_state(model)
    if state == "failed":
        raise ApiError(503, "model unavailable", f"model {model!r} failed to load on this server: {reason}")
    timeout = _timeout(trace_request.options.get("timeout"), config.max_job_seconds)
    owner = _owner(request)

    def queue() -> tuple[Job, int]:
        queued = service.jobs.submit(
            model=model, owner=owner, request=body, timeout_s=timeout, max_queued=config.max_queued_jobs
        )
        service.pool.wake(model)  # from this thread, as soon as the job is stored: no hop back to the loop first
        return queued

    try:
        job, position = await run_in_threadpool(queue)
    except QueueFull as full:
        raise ApiError(
            429,
            "queue full",
            f"model {model!r} already has {full.queued} queued jobs, this server's limit "
            "(--max-queued-jobs); wait for some to finish and submit again",
            headers={"Retry-After": "10"},
        ) from None
    location = {"Location": f"/jobs/{job.id}"}
    if "text/event-stream" in request.headers.get("accept", ""):
        # Submit and follow in one exchange: a small trace then costs one request, not two.
        return _event_response(service, job.id, 0, status_code=202, headers=location)
    return JSONResponse(
        {"job_id": job.id, "status": "queued", "position": position, "model": model, "timeout_s": timeout},
        status_code=202,
        headers=location,
    )


async def _read_body(request: Request, limit: int) -> bytes:
    too_large = (
        f"this server accepts requests up to {describe_bytes(limit)} (--max-request-mb); send fewer or "
        "smaller variables, or ask the operator to raise the limit"
    )
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise ApiError(400, "malformed request", f"Content-Length {declared[:40]!r} is not a number") from None
        if size > limit:
            raise ApiError(413, "request too large", f"the request is {size} bytes; " + too_large, limit=limit)
    chunks: list[bytes] = []
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise ApiError(
                    413, "request too large", f"the request is over {limit} bytes; " + too_large, limit=limit
                )
            chunks.append(chunk)
    except ClientDisconnect:
        raise ApiError(400, "incomplete request", "the connection closed before the whole body arrived") from None
    return b"".join(chunks)


def _timeout(value: Any, maximum: float) -> float:
    if value is None:
        return maximum
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value != value:
        raise ApiError(
            400,
            "malformed request",
            f"options['timeout'] must be a positive number of seconds, not {str(value)[:40]!r}",
        )
    return float(min(value, maximum))


# ----- reading jobs ------------------------------------------------------------------------------
async def _job(request: Request) -> Job:
    job_id = request.path_params["job_id"]
    unknown = ApiError(
        404,
        "unknown job",
        f"there is no job {job_id[:80]!r} for this API key (jobs are visible only to the key that submitted them)",
    )
    if not is_job_id(job_id):
        raise unknown
    job = await run_in_threadpool(_service(request).jobs.get, job_id)
    if job is None or job.owner != _owner(request):
        raise unknown
    return job


async def job_status(request: Request) -> JSONResponse:
    service = _service(request)
    job = await _job(request)
    position = await run_in_threadpool(service.jobs.position, job)
    return JSONResponse(job.describe(position=position, now=service.config.clock()))


async def job_events(request: Request) -> StreamingResponse:
    job = await _job(request)
    return _event_response(_service(request), job.id, _after(request))


def _event_response(
    service: Service, job_id: str, after: int, *, status_code: int = 200, headers: dict[str, str] | None = None
) -> StreamingResponse:
    """The job's events after number ``after`` as server-sent events, ending after the final one."""

    async def stream() -> AsyncIterator[bytes]:
        last = after
        with service.notifier.subscribe(job_id) as changed:
            while True:
                changed.clear()
                events = await run_in_threadpool(service.jobs.events_after, job_id, last)
                for event in events:
                    last = event.seq
                    if event.type in FINAL:
                        yield format_event(event, _inline_result(service, job_id, event.type))
                        return
                    yield format_event(event)
                if events:
                    continue
                current = await run_in_threadpool(service.jobs.get, job_id)
                if current is None or (current.final and current.last_event <= last):
                    return
                try:
                    await asyncio.wait_for(changed.wait(), timeout=KEEPALIVE_S)
                except asyncio.TimeoutError:
                    yield KEEPALIVE

    return StreamingResponse(
        stream(),
        status_code=status_code,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})},
    )


INLINE_DECODE_BYTES = 64 << 10
"""Request bodies up to this size are decoded on the event loop (a fraction of a millisecond);
larger ones in the thread pool, so a big upload does not hold up other requests."""


def _inline_result(service: Service, job_id: str, kind: str) -> bytes | bytearray | mmap.mmap | None:
    if kind not in ("completed", "error"):
        return None
    data = service.results.recent(job_id)
    return data if data is not None and len(data) <= INLINE_RESULT_BYTES else None


def _after(request: Request) -> int:
    raw = request.query_params.get("after")
    if raw is None:
        raw = request.headers.get("last-event-id")
    if raw is None or raw == "":
        return 0
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ApiError(
            400, "malformed request", f"after={raw[:40]!r}: pass the last event number seen (an integer >= 0)"
        )
    return value


async def job_result(request: Request) -> Response:
    service = _service(request)
    config = service.config
    job = await _job(request)
    if not job.final:
        raise ApiError(
            409,
            "job not finished",
            f"job {job.id} is {job.status}; its result exists once it completes. Wait with "
            f"GET /jobs/{job.id}/events, or poll GET /jobs/{job.id}.",
            status=job.status,
        )
    if job.status == "cancelled":
        raise ApiError(
            409,
            "job cancelled",
            f"job {job.id} was cancelled before it finished, so it has no result",
            status=job.status,
        )
    if job.result_bytes is None:
        data = encode_result(
            TraceResult(
                error=TraceErrorInfo(
                    job.error_type or wire_name(ServerError), job.error_message or "the job failed", ""
                )
            )
        )
        return Response(data, media_type="application/x-msgpack")
    gone = ApiError(
        410,
        "result expired",
        f"results are kept for {config.result_ttl_s:g} s after a job finishes (server setting "
        f"--result-ttl); job {job.id}'s result expired at {iso(job.expires)}. Run the trace again.",
    )
    if job.expired or (job.expires is not None and job.expires <= config.clock()):
        raise gone
    headers = {"Content-Length": str(job.result_bytes)}
    held = service.results.recent(job.id)
    if held is not None:
        return StreamingResponse(_memory_chunks(held), media_type="application/x-msgpack", headers=headers)
    handle = await run_in_threadpool(service.results.open, job.id)
    if handle is None:
        stored = await run_in_threadpool(service.jobs.stored_result, job.id)
        if stored is not None:
            return Response(stored, media_type="application/x-msgpack")
        raise ApiError(
            410,
            "result lost",
            f"job {job.id}'s result file is missing from the server's results folder: something outside "
            f"the server removed it before it expired. Run the trace again.",
        )
    return StreamingResponse(
        iterate_in_threadpool(iter_file(handle)), media_type="application/x-msgpack", headers=headers
    )


MEMORY_CHUNK = 256 << 10
"""Slice size for results served from memory: a slice this small mostly fits the socket's send
buffer, so asyncio sends it as it is; with 8 MiB slices it copied most of every slice into its
own write buffer first, and a 64 MiB download took twice as long."""


async def _memory_chunks(data: bytes | bytearray | mmap.mmap) -> AsyncIterator[memoryview]:
    """Slices of a result held in memory (no copies, no threads)."""
    view = memoryview(data)
    for start in range(0, len(view), MEMORY_CHUNK):
        yield view[start : start + MEMORY_CHUNK]


# ----- cancelling -----------------------------------------------------------------------------------
async def cancel(request: Request) -> JSONResponse:
    service = _service(request)
    job = await _job(request)
    if job.final:
        raise ApiError(
            409,
            "job already finished",
            f"job {job.id} is already {job.status}; there is nothing to cancel",
            status=job.status,
        )
    if await run_in_threadpool(service.jobs.cancel_if_queued, job.id, "cancelled by the client while queued"):
        return JSONResponse({"job_id": job.id, "status": "cancelled"})
    with service.notifier.subscribe(job.id) as changed:
        service.pool.cancel(job.model, job.id)
        deadline = asyncio.get_running_loop().time() + service.config.cancel_grace_s + 5.0
        while True:
            changed.clear()
            current = await run_in_threadpool(service.jobs.get, job.id)
            if current is None or current.final:
                status = current.status if current is not None else "cancelled"
                return JSONResponse({"job_id": job.id, "status": status})
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return JSONResponse({"job_id": job.id, "status": "cancelling"}, status_code=202)
            try:
                await asyncio.wait_for(changed.wait(), timeout=remaining)
            except asyncio.TimeoutError:
                pass


ROUTES = [
    Route("/health", health, methods=["GET"]),
    Route("/models", list_models, methods=["GET"]),
    Route("/jobs", submit, methods=["POST"]),
    Route("/jobs/{job_id}", job_status, methods=["GET"]),
    Route("/jobs/{job_id}", cancel, methods=["DELETE"]),
    Route("/jobs/{job_id}/events", job_events, methods=["GET"]),
    Route("/jobs/{job_id}/result", job_result, methods=["GET"]),
    Route("/jobs/{job_id}/cancel", cancel, methods=["POST"]),
]
"""Every endpoint of the server, in one declared list."""
