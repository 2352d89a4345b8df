"""nnsight-jupyter: read and edit the internals of PyTorch models, in a notebook or on a server.

from nnsight_jupyter import NNsight
model = NNsight(net)
with model.trace(x):
    hidden = model.layers[2].output.save()
show(hidden)  # in a notebook: statistics, histogram and a sliceable heatmap
"""

from . import errors
from ._version import __version__
from .models.base import NNsight
from .models.language import LanguageModel
from .models.registry import models
from .settings import debug_tracebacks as _debug_tracebacks
from .show import show
from .tracing import Cache, Envoy, ScanResult, save
from .tracing.tracer import set_debug_switch as _set_debug_switch

_set_debug_switch(_debug_tracebacks)

__all__ = [
    "Cache",
    "Envoy",
    "LanguageModel",
    "NNsight",
    "ScanResult",
    "__version__",
    "errors",
    "models",
    "save",
    "show",
]


def _jupyter_labextension_paths():  # noqa: ANN202 - JupyterLab's discovery hook
    """Where the prebuilt JupyterLab extension lies (for `jupyter-builder develop`)."""
    return [{"src": "labextension", "dest": "nnsight-jupyter"}]


def load_ipython_extension(shell):  # noqa: ANN001 - IPython's extension hook
    """`%load_ext nnsight_jupyter`: register `%%trace`, `%nnsight` and module-path completion."""
    from .magics import load_ipython_extension as load

    load(shell)


def unload_ipython_extension(shell):  # noqa: ANN001
    from .magics import unload_ipython_extension as unload

    unload(shell)
