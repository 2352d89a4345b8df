"""Every exception nnsight-jupyter raises on purpose, and how a server's error becomes one of them.

Messages name the problem and the fix, and point at the user's own code where one is involved::

    NNsightError
    ├── TraceError                  a trace is written in a way the engine cannot run
    │   ├── SourceUnavailableError  the `with` block's source cannot be read (stdin, some exec'd code)
    │   ├── InvokeError             invokes used the wrong way (nested, mixed with a trace input, ...)
    │   ├── MissingInputError       a trace with no input at all
    │   └── ModuleNotReachedError   a module value was asked for that the forward pass never produced
    │       └── OutOfOrderError     ... because the forward had already passed that module
    ├── ModulePathError             a module path that does not exist (with "did you mean" hints)
    ├── NotSavedError               a name set inside a trace is used afterwards without `.save()`
    ├── ScanError                   shape propagation could not get through the model
    ├── ArchitectureError           the architecture table names a module the model does not have
    ├── ModelUnavailableOffline     a Hub model is needed, the Hub cannot be reached, and it is not cached
    ├── MagicUsageError             a `%%trace` or `%nnsight` line that cannot be understood
    ├── ViewsNotBuiltError          the notebook views' front-end bundle is missing from this install
    ├── ProtocolError               a value cannot cross the wire, or bytes are not a valid message
    │   └── ProtocolVersionError    client and server speak different protocol versions
    └── RemoteError                 a remote run did not give its values back
        ├── RemoteConnectionError   the server cannot be reached
        ├── RemoteServerError       the server refused or failed a request (HTTP status and detail)
        ├── RemoteTimeout           the run took longer than its time limit (client's or server's)
        ├── RemoteTraceError        the trace raised an exception of a class this side does not know
        ├── SandboxViolation        the trace tried something the server's sandbox does not allow
        ├── ModelModifiedError      the trace changed the served model or state later jobs share
        ├── MemoryLimitExceeded     the job used more memory than the server allows
        ├── ResultTooLarge          the saved values are over the server's result size limit
        ├── WorkerDied              the worker process running the job died
        ├── JobStopped              the worker stopped the job without saying why
        ├── ModelLoadError          the server could not load the model
        ├── ModelUnavailable        the server no longer serves the job's model
        ├── ServerRestarted         the server stopped twice while the job ran
        └── ServerError             anything else the server reports about a job

`InvokeError` and `MissingInputError` are also `ValueError`s (nnsight raises `ValueError` for
them), `ModulePathError` an `AttributeError`, `NotSavedError` a `NameError`, `ProtocolError` a
`ValueError`, `RemoteTimeout` a `TimeoutError`, `MemoryLimitExceeded` a `MemoryError`,
`SandboxViolation` a `PermissionError`, and so on, so code that catches the built-in kinds keeps
working.

A server reports a failed trace as a type name, a message and a traceback (`TraceErrorInfo`).
`from_remote` turns that back into an exception through one table, `REMOTE_ERRORS`: the classes
above under their own names, the built-in exceptions under theirs, and the two built-in names a
server uses for its own limits (`TimeoutError`, `MemoryError`) as `RemoteTimeout` and
`MemoryLimitExceeded`. So `except SandboxViolation:` catches a sandbox refusal from a server, and
every time-out is a `RemoteTimeout`. A name not in the table (an exception class defined inside
the trace) arrives as `RemoteTraceError` carrying the name.
"""

from __future__ import annotations

import builtins


class NNsightError(Exception):
    """Base class of every error raised on purpose by nnsight-jupyter."""


class TraceError(NNsightError):
    """The trace cannot run as written."""


class SourceUnavailableError(TraceError):
    """The source of a `with model.trace(...)` block could not be found."""


class InvokeError(TraceError, ValueError):
    """`tracer.invoke(...)` was used in a way that cannot be batched into one forward pass."""


class MissingInputError(TraceError, ValueError):
    """A trace has no input: none given to `model.trace(...)` and no `tracer.invoke(input)`."""


class ModuleNotReachedError(TraceError):
    """A module value was requested that the forward pass never produced."""


class OutOfOrderError(ModuleNotReachedError):
    """A module value was requested after the forward pass had already gone past it."""


class ModulePathError(NNsightError, AttributeError):
    """A module path that does not exist in the wrapped model."""


class NotSavedError(NNsightError, NameError):
    """A value computed inside a trace was used after it without having been saved."""


class ScanError(NNsightError):
    """Shape propagation with fake tensors could not get through the model."""


class ArchitectureError(NNsightError):
    """The architecture table names a module the loaded model does not have."""


class ModelUnavailableOffline(NNsightError, OSError):
    """A Hugging Face Hub model was asked for, but the Hub cannot be reached and it is not cached."""


class MagicUsageError(NNsightError, ValueError):
    """A `%%trace` or `%nnsight` line that cannot be understood."""


class ViewsNotBuiltError(NNsightError, FileNotFoundError):
    """The notebook views' front-end bundle (`widgets/static/views.js`) is missing from this install."""


class ProtocolError(NNsightError, ValueError):
    """A value cannot be encoded for the remote protocol, or bytes are not a valid message."""


class ProtocolVersionError(ProtocolError):
    """The message was written for another protocol version than this side speaks."""

    def __init__(
        self, remote_protocol: int, remote_package: str, local_protocol: int = 0, local_package: str = ""
    ) -> None:
        import reprlib

        self.remote_protocol = remote_protocol
        self.remote_package = remote_package
        older = "this side" if remote_protocol > local_protocol else "the sender"
        super().__init__(
            f"the message uses wire protocol {remote_protocol} (nnsight-jupyter "
            f"{reprlib.repr(remote_package)}), but this side speaks protocol {local_protocol} "
            f"(nnsight-jupyter {local_package!r}). Install matching releases on client and "
            f"server: {older} is older, so upgrade it (on the client: "
            "pip install -U nnsight-jupyter; on the server: ask its operator to upgrade)."
        )


class RemoteError(NNsightError):
    """A remote run did not give its values back; the subclass says why."""


class RemoteConnectionError(RemoteError, ConnectionError):
    """The remote backend could not be reached."""


class RemoteServerError(RemoteError):
    """The server refused or failed a request; `status`, `error` and `detail` are its answer."""

    def __init__(self, status: int, error: str, detail: str, body: dict | None = None) -> None:
        super().__init__(f"{error} (HTTP {status}): {detail}")
        self.status = status
        self.error = error
        self.detail = detail
        self.body = body or {}


class RemoteTimeout(RemoteError, TimeoutError):
    """A remote run took longer than its `timeout` or the server's time limit; the job was stopped."""


class RemoteTraceError(RemoteError):
    """The trace raised on the server an exception of a class this side does not know.

    The message carries the server's traceback of the user's lines; `type_name` names the class.
    """

    def __init__(self, type_name: str, message: str, remote_traceback: str) -> None:
        super().__init__(f"{type_name}: {message}\n\nRemote traceback:\n{remote_traceback.rstrip()}")
        self.type_name = type_name
        self.remote_message = message
        self.remote_traceback = remote_traceback


class SandboxViolation(RemoteError, PermissionError):
    """The trace tried something the server's sandbox does not allow; the message says what and why.

    A ``PermissionError``, so library code that handles a refused file access also handles this.
    """


class ModelModifiedError(RemoteError):
    """The trace changed the served model or state shared with later jobs; the server undid it."""


class MemoryLimitExceeded(RemoteError, MemoryError):
    """The job used more memory than the server allows per job (`--max-job-memory-mb`)."""


class ResultTooLarge(RemoteError):
    """The trace's saved values are over the server's result size limit (`--max-result-mb`)."""


class WorkerDied(RemoteError):
    """The worker process running the job died; the server replaced it."""


class JobStopped(RemoteError):
    """The worker stopped the job without a recorded reason."""


class ModelLoadError(RemoteError):
    """The server could not load the job's model."""


class ModelUnavailable(RemoteError):
    """The server restarted without the job's model."""


class ServerRestarted(RemoteError):
    """The server stopped twice while the job ran, so it was not run a third time."""


class ServerError(RemoteError):
    """The server could not run the job for a reason of its own; the message says which."""


def _table() -> dict[str, type[BaseException]]:
    table: dict[str, type[BaseException]] = {
        name: value
        for name, value in vars(builtins).items()
        if isinstance(value, type) and issubclass(value, Exception)
    }
    table.update(
        {
            name: value
            for name, value in globals().items()
            if isinstance(value, type) and issubclass(value, NNsightError)
        }
    )
    table["TimeoutError"] = RemoteTimeout
    table["MemoryError"] = MemoryLimitExceeded
    return table


REMOTE_ERRORS: dict[str, type[BaseException]] = _table()
"""Type name a server reports -> the class a client raises (see the module docstring)."""


def wire_name(cls: type[BaseException]) -> str:
    """The type name a server reports for an error of class `cls`; refuses a class not in the table."""
    name = cls.__name__
    if name not in REMOTE_ERRORS or not (REMOTE_ERRORS[name] is cls or cls.__module__ == "builtins"):
        raise ValueError(f"{cls.__qualname__} is not in nnsight_jupyter.errors.REMOTE_ERRORS")
    return name


def from_remote(type_name: str, message: str, remote_traceback: str) -> BaseException:
    """The exception a client raises for an error a server reported, with its traceback as a note."""
    cls = REMOTE_ERRORS.get(type_name)
    if cls is None or cls is RemoteTraceError:
        return RemoteTraceError(type_name, message, remote_traceback)
    try:
        error = cls(message)
    except Exception:
        return RemoteTraceError(type_name, message, remote_traceback)
    where = f" Remote traceback:\n{remote_traceback.rstrip()}" if remote_traceback.strip() else ""
    error.add_note(f"Raised by the remote run.{where}")
    return error
