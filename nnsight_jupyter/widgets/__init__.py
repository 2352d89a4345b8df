"""Notebook views (anywidget), each with a static HTML fallback for places that cannot run widgets.

The browser code of every view is TypeScript in `labextension/src/views/`, bundled into
`static/views.js` and sent to the notebook once per kernel (see `bundle.py`).
"""

from .attention import AttentionView
from .job_status import JobStatus
from .logit_lens import LogitLensView
from .module_tree import ModuleTree
from .patching_heatmap import PatchingHeatmap, live_sweep
from .saved_values import SavedValues
from .tensor_view import TensorView

__all__ = [
    "AttentionView",
    "JobStatus",
    "LogitLensView",
    "ModuleTree",
    "PatchingHeatmap",
    "SavedValues",
    "TensorView",
    "live_sweep",
]
