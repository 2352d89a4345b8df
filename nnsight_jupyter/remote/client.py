"""HTTP client for the remote backend: submit, follow, fetch, cancel.

One `RemoteClient` wraps one `httpx.Client` (tests hand it one wired to the app in process).
Network failures become `RemoteConnectionError` naming the host; error answers from the server
become `RemoteServerError` carrying its status, message and detail. A blocking run follows the
job's event stream, shows live status (queue position, loading, running, printed lines),
reconnects and resumes by event number if the connection drops, cancels the job on Ctrl-C or
when `timeout` passes, and then takes the result from the final event (results up to 64 KiB
ride in it) or downloads it.
"""

from __future__ import annotations

import base64
import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from ..errors import NNsightError, RemoteConnectionError, RemoteError, RemoteServerError, RemoteTimeout
from ..settings import CONFIG, RemoteConfig
from . import submitted
from .codec.memory import aligned_buffer
from .lifecycle import FINAL_STATES
from .protocol import TraceRequest, TraceResult, buffer_section_offset, decode_result, encode_request

FINAL_EVENTS = FINAL_STATES


@dataclass
class JobHandle:
    """A submitted job; fetch its result now or later (also after a kernel restart, by id)."""

    client: RemoteClient
    job_id: str
    model: str = ""

    def status(self) -> dict[str, Any]:
        return self.client.status(self.job_id)

    def wait(self, timeout: float | None = None, on_event: Callable[[dict], None] | None = None) -> dict:
        """Block until the job ends; returns its final event."""
        return self.client.follow(self.job_id, timeout=timeout, on_event=on_event)

    def result(self, timeout: float | None = None) -> TraceResult:
        """Wait for the job and return its `TraceResult`."""
        self.wait(timeout=timeout)
        return self.client.result(self.job_id)

    def values(self, timeout: float | None = None) -> dict[str, Any]:
        """Wait for the job and return the names its trace bound, as a local run would have."""
        from .capture import apply_result

        return apply_result(self.result(timeout=timeout), None)

    def cancel(self) -> dict[str, Any]:
        return self.client.cancel(self.job_id)


class RemoteClient:
    """Talks to one nnsight-jupyter server."""

    def __init__(
        self, host: str, api_key: str | None = None, *, http: httpx.Client | None = None, show_status: bool = True
    ) -> None:
        self.host = host.rstrip("/")
        self.api_key = api_key
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = http or httpx.Client(base_url=self.host, timeout=httpx.Timeout(30.0, connect=5.0))
        self.http.headers.update(headers)
        self.show_status = show_status

    # ----- plain requests -------------------------------------------------------------------
    @contextlib.contextmanager
    def _translated(self) -> Iterator[None]:
        """Where httpx's errors become this package's: every request of this client runs inside it."""
        try:
            yield
        except RemoteError:
            raise
        except (httpx.TransportError, OSError) as exc:
            raise self._unreachable(exc) from exc

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        with self._translated():
            response = self.http.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise _server_error(response)
        return response

    def health(self) -> dict[str, Any]:
        return self._call("GET", "/health").json()

    def models(self) -> list[dict[str, Any]]:
        return self._call("GET", "/models").json()["models"]

    def submit(self, request: TraceRequest) -> JobHandle:
        body = encode_request(request)
        answer = self._call("POST", "/jobs", content=body, headers={"Content-Type": "application/x-msgpack"}).json()
        handle = JobHandle(self, answer["job_id"], request.model_id)
        submitted.record(handle)
        return handle

    def status(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/jobs/{job_id}").json()

    def result(self, job_id: str) -> TraceResult:
        return decode_result(self._download(job_id), adopt=True)

    def _download(self, job_id: str) -> memoryview:
        """A result's bytes, received into fresh memory laid out so that large tensors can use it in place.

        The message's buffer section is placed on a `BUFFER_ALIGNMENT` boundary; tensors decoded
        with ``adopt=True`` then wrap the downloaded bytes instead of copying them again.
        """
        with self._translated(), self.http.stream("GET", f"/jobs/{job_id}/result") as response:
            if response.status_code >= 400:
                response.read()
                raise _server_error(response)
            length = response.headers.get("content-length")
            if length is None or not length.isdigit():
                return memoryview(response.read())
            size = int(length)
            chunks = response.iter_raw()
            head = bytearray()
            for chunk in chunks:
                head += chunk
                if len(head) >= 4096 or buffer_section_offset(head) is not None:
                    break
            view = aligned_buffer(max(size, len(head)), buffer_section_offset(head) or 0)
            filled = len(head)
            view[:filled] = head
            if filled > size:
                raise RemoteConnectionError(f"the server sent more than the announced {size} bytes")
            try:
                for chunk in chunks:
                    end = filled + len(chunk)
                    if end > size:
                        raise RemoteConnectionError(f"the server sent more than the announced {size} bytes")
                    view[filled:end] = chunk
                    filled = end
            except httpx.TransportError:
                pass  # the connection ended early: said below, with how far it got
            if filled != size:
                raise RemoteConnectionError(
                    f"the download of job {job_id}'s result stopped after {filled} of {size} bytes; "
                    f"fetch it again with nnsight_jupyter.remote.job({job_id!r}).values()"
                )
            return view

    def _unreachable(self, exc: Exception) -> RemoteConnectionError:
        return RemoteConnectionError(
            f"Cannot reach the nnsight-jupyter server at {self.host}: {why_unreachable(exc, self.host)}. "
            "Check that it is running and that the host is right (%nnsight status shows it)."
        )

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._call("POST", f"/jobs/{job_id}/cancel").json()

    def job(self, job_id: str) -> JobHandle:
        """A handle for a job submitted earlier (by id, e.g. after a kernel restart)."""
        self.status(job_id)
        return JobHandle(self, job_id)

    # ----- following a job --------------------------------------------------------------------
    def events(
        self, job_id: str, after: int = 0, *, response: httpx.Response | None = None
    ) -> Iterator[dict[str, Any]]:
        """The job's events from number `after` on, reconnecting if the stream drops.

        `response`: an open stream of the job's events to read first (the submitting request's).
        """
        last = after
        failures = 0
        while True:
            try:
                with self._translated(), self._opened(response, job_id, last) as current:
                    response = None
                    if current.status_code >= 400:
                        current.read()
                        raise _server_error(current)
                    for event in _read_stream(current):
                        failures = 0
                        last = max(last, int(event.get("seq", last)))
                        yield event
                        if event.get("type") in FINAL_EVENTS:
                            return
            except RemoteConnectionError as exc:
                failures += 1
                if failures > 8:
                    raise RemoteConnectionError(
                        f"Lost the connection to {self.host} while following job {job_id} and could not "
                        f"reconnect ({exc}). The job keeps running; fetch it later with "
                        f"nnsight_jupyter.remote.job({job_id!r}).values()."
                    ) from exc
                time.sleep(min(0.2 * 2**failures, 5.0))
                continue
            status = self.status(job_id)
            if status["status"] in FINAL_EVENTS:
                return

    def _opened(
        self, response: httpx.Response | None, job_id: str, after: int
    ) -> contextlib.AbstractContextManager[httpx.Response]:
        if response is not None:
            return contextlib.nullcontext(response)
        return self.http.stream("GET", f"/jobs/{job_id}/events", params={"after": after}, timeout=_STREAM_TIMEOUT)

    def follow(
        self,
        job_id: str,
        *,
        timeout: float | None = None,
        on_event: Callable[[dict], None] | None = None,
        response: httpx.Response | None = None,
    ) -> dict[str, Any]:
        """Block until the job ends (cancelling it on Ctrl-C or timeout); returns the final event.

        `response`: an open stream of the job's events to read first (see `events`).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        display = _StatusDisplay(job_id) if self.show_status and on_event is None else None
        final: dict[str, Any] = {}
        try:
            for event in self.events(job_id, response=response):
                shown = event if "result" not in event else {k: v for k, v in event.items() if k != "result"}
                if on_event is not None:
                    on_event(shown)
                if display is not None:
                    display.update(shown)
                if event.get("type") in FINAL_EVENTS:
                    final = event
                    break
                if deadline is not None and time.monotonic() > deadline:
                    self._cancel_quietly(job_id)
                    raise RemoteTimeout(
                        f"The remote run took longer than timeout={timeout:g} s, so job {job_id} was cancelled. "
                        "Pass a larger timeout=, or blocking=False to fetch the result later."
                    )
        except KeyboardInterrupt:
            self._cancel_quietly(job_id)
            raise
        finally:
            if display is not None:
                display.close()
        return final

    def _cancel_quietly(self, job_id: str) -> None:
        try:
            self.cancel(job_id)
        except NNsightError:
            pass

    def run(self, request: TraceRequest, *, timeout: float | None = None) -> TraceResult:
        """Submit, follow to the end (printed lines appear as they happen), and return the result.

        One exchange: the submitting request asks for the job's event stream as its answer, so a
        small trace, whose result rides in the final event, costs one request on a kept-alive
        connection (a separate submit and event stream cost about 1 ms more over loopback). A
        server that answers the submission with the job's id only is followed as `follow` does.
        """
        body = encode_request(request)
        shown: list[str] = []
        display: _StatusDisplay | None = None

        def on_event(event: dict[str, Any]) -> None:
            if event.get("type") == "log":
                shown.append(event.get("line", ""))
                print(event.get("line", ""))
            elif display is not None:
                display.update(event)

        headers = {"Content-Type": "application/x-msgpack", "Accept": "text/event-stream"}
        with (
            self._translated(),
            self.http.stream("POST", "/jobs", content=body, headers=headers, timeout=_STREAM_TIMEOUT) as response,
        ):
            if response.status_code >= 400:
                response.read()
                raise _server_error(response)
            streamed = response.headers.get("content-type", "").startswith("text/event-stream")
            if streamed:
                job_id = response.headers.get("location", "").rsplit("/", 1)[-1]
            else:
                response.read()
                job_id = response.json()["job_id"]
            handle = JobHandle(self, job_id, request.model_id)
            submitted.record(handle)
            display = _StatusDisplay(handle.job_id, request.model_id) if self.show_status else None
            try:
                final = self.follow(
                    handle.job_id, timeout=timeout, on_event=on_event, response=response if streamed else None
                )
            finally:
                if display is not None:
                    display.close()
        if final.get("type") == "cancelled":
            raise RemoteServerError(409, "job cancelled", final.get("reason") or f"job {handle.job_id} was cancelled")
        result = _inline_result(final)
        if result is None:
            result = self.result(handle.job_id)
        if result.logs[: len(shown)] == shown:
            result.logs = result.logs[len(shown) :]
        return result


def why_unreachable(exc: BaseException, host: str, waited: float | None = None) -> str:
    """Why `host` did not answer, in words (``[Errno 111] Connection refused`` says it to few readers);
    `waited`: the seconds a timeout allowed, said when the cause is a timeout."""
    text = str(exc)
    lowered = text.lower()
    if isinstance(exc, (httpx.InvalidURL, httpx.UnsupportedProtocol)):
        return f"{host!r} is not a server address ({text})"
    try:
        where = httpx.URL(host).netloc.decode() or host
    except httpx.InvalidURL:
        where = host
    if isinstance(exc, httpx.TimeoutException):
        return f"no answer from {where}" + (f" within {waited:g} s" if waited else f" in time ({type(exc).__name__})")
    if "refused" in lowered:
        return f"nothing listens at {where} (connection refused)"
    if "name or service not known" in lowered or "name resolution" in lowered or "nodename nor servname" in lowered:
        return f"the host name in {host} does not resolve"
    return f"{type(exc).__name__}: {text}"


def _inline_result(final: dict[str, Any]) -> TraceResult | None:
    """The result a final event carries (small results do), or None to download it."""
    text = final.get("result")
    if not isinstance(text, str):
        return None
    try:
        data = base64.b64decode(text, validate=True)
    except ValueError:
        return None
    return decode_result(data)


_STREAM_TIMEOUT = httpx.Timeout(60.0, connect=5.0)
"""Event streams wait up to a minute for a byte: the server sends a keep-alive every few seconds."""


def _read_stream(response: httpx.Response) -> Iterator[dict[str, Any]]:
    """The events of one open stream. At the final event the stream is read to its end (the server
    ends it there) before the event is given out, so the connection goes back to the pool for the
    next request: left unread, it was closed, and each trace paid for a new connection."""
    events = _parse_sse(response.iter_lines())
    for event in events:
        if event.get("type") in FINAL_EVENTS:
            with contextlib.suppress(httpx.TransportError):
                for _ in events:
                    pass
            yield event
            return
        yield event


def _parse_sse(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    data: list[str] = []
    for line in lines:
        if line == "":
            if data:
                yield json.loads("\n".join(data))
                data = []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        if field == "data":
            data.append(value[1:] if value.startswith(" ") else value)
    if data:
        yield json.loads("\n".join(data))


def _server_error(response: httpx.Response) -> RemoteServerError:
    try:
        body = response.json()
    except ValueError:
        body = {"error": response.reason_phrase, "detail": response.text[:500]}
    return RemoteServerError(response.status_code, str(body.get("error", "error")), str(body.get("detail", "")), body)


class _StatusDisplay:
    """Live status of a job: the JobStatus widget in a notebook, a rewritten line on a terminal.

    Without anywidget (the ``jupyter`` extra), a notebook gets an updating text line instead.
    """

    def __init__(self, job_id: str, model: str = "") -> None:
        self.job_id = job_id
        self.handle: Any = None
        self.widget: Any = None
        if not _in_notebook():
            return
        from IPython.display import display

        try:
            from ..widgets import JobStatus
        except ImportError:
            self.handle = display(self._text("submitted"), display_id=True)
        else:
            self.widget = JobStatus(job_id, model)
            display(self.widget)

    def _text(self, state: str) -> Any:
        from IPython.display import Pretty

        return Pretty(f"nnsight-jupyter job {self.job_id}: {state}")

    def update(self, event: dict[str, Any]) -> None:
        if self.widget is not None:
            self.widget.update(event)
            return
        kind = event.get("type", "")
        if kind == "log":
            return
        state = kind
        if kind == "queued" and event.get("position") is not None:
            state = f"queued (position {event['position']})"
        if self.handle is not None:
            self.handle.update(self._text(state))
        else:
            sys.stderr.write(f"\rnnsight-jupyter job {self.job_id}: {state:<40}")
            sys.stderr.flush()

    def close(self) -> None:
        if self.handle is None and self.widget is None:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def default_backend(model_id: str | None = None, config: RemoteConfig | None = None) -> RemoteClient:
    """The client for `remote=True`: the configured host, or a local daemon started on demand."""
    config = config or CONFIG
    host = config.resolved_host()
    if host:
        return RemoteClient(host, config.resolved_api_key())
    from .daemon import local_daemon_client

    return local_daemon_client(model_id)


def job(job_id: str) -> JobHandle:
    """A handle for an earlier job by id: `nnsight_jupyter.remote.job("...").values()`."""
    return default_backend().job(job_id)
