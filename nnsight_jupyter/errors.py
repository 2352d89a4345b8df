"""Every exception nnsight-jupyter raises on purpose.

Messages name the problem and the fix, and point at the user's own code where one is involved::

    NNsightError
    ├── TraceError                  a trace is written in a way the engine cannot run
    │   ├── SourceUnavailableError  the `with` block's source cannot be read (stdin, some exec'd code)
    │   ├── InvokeError             invokes used the wrong way (nested, mixed with a trace input, ...)
    │   └── ModuleNotReachedError   a module value was asked for that the forward pass never produced
    │       └── OutOfOrderError     ... because the forward had already passed that module
    ├── ModulePathError             a module path that does not exist (with "did you mean" hints)
    ├── NotSavedError               a name set inside a trace is used afterwards without `.save()`
    ├── ScanError                   shape propagation could not get through the model
    └── ProtocolError               a value cannot cross the wire, or bytes are not a valid message
        └── ProtocolVersionError    (in remote.protocol) client and server speak different versions

`ModulePathError` is also an `AttributeError`, `NotSavedError` a `NameError` and `ProtocolError`
a `ValueError`, so code that catches the built-in kinds keeps working.
"""

from __future__ import annotations


class NNsightError(Exception):
    """Base class of every error raised on purpose by nnsight-jupyter."""


class TraceError(NNsightError):
    """The trace cannot run as written."""


class SourceUnavailableError(TraceError):
    """The source of a `with model.trace(...)` block could not be found."""


class InvokeError(TraceError):
    """`tracer.invoke(...)` was used in a way that cannot be batched into one forward pass."""


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


class ProtocolError(NNsightError, ValueError):
    """A value cannot be encoded for the remote protocol, or bytes are not a valid message."""
