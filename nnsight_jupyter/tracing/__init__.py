"""The tracing engine: envoys, tracers, and the interleaving of user code with the forward pass."""

from .cache import Cache
from .envoy import Envoy
from .saving import NotSaved, save
from .scan import ScanResult
from .tracer import Invoker, Tracer

__all__ = ["Cache", "Envoy", "Invoker", "NotSaved", "ScanResult", "Tracer", "save"]
