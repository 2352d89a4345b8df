"""`show(x)`: the right notebook view for a tensor, a model or module, a trace, or a dict of values.

    from nnsight_jupyter import show
    show(hidden)                         # TensorView: statistics, histogram, sliceable heatmap
    show(norms, labels={0: layer_names}) # name the entries of any dim
    show(model)                          # ModuleTree; show(model, "a prompt") adds every module's shapes
    show(model.layers[3])                # the tree below one module
    show(tracer)                         # SavedValues: what the trace saved, each row opens its tensor
    show({"h": h, "logits": logits})     # the same table for values of your own
    show(patching_sweep(...))            # PatchingHeatmap: the sweep's grid, click a cell for its top tokens
    show(logit_lens(...), other_lens)    # LogitLensView: top token per layer and position, two prompts side by side
    show(attention_patterns(...))        # AttentionView: every head of a layer, one large

The view is displayed at once (also from inside a loop or function); `show` returns None so that it
is not displayed twice. The view classes in `nnsight_jupyter.widgets` build one without displaying it.
Importing this module imports no widget code; that happens on the first call.
"""

from __future__ import annotations

from typing import Any


def view_for(value: Any, *args: Any, name: str = "", **kwargs: Any) -> Any:
    """The view widget `show` would display for `value`."""
    import torch

    from .tracing.envoy import Envoy
    from .tracing.tracer import Tracer

    if isinstance(value, torch.Tensor):
        from .widgets import TensorView

        if args or set(kwargs) - {"labels", "tokens"}:
            raise TypeError("show(tensor) takes name=, labels={dim: [...]} and tokens=False, nothing else")
        return TensorView(value, name=name, **kwargs)
    if isinstance(value, (Envoy, torch.nn.Module)):
        from .widgets import ModuleTree

        return ModuleTree(value, *args, **kwargs)
    from .analysis.attention import AttentionPatterns
    from .analysis.logit_lens import LogitLensResult
    from .analysis.patching import PatchingResult

    if isinstance(value, PatchingResult):
        from .widgets import PatchingHeatmap

        if args or kwargs:
            raise TypeError("show(patching_result) takes no other arguments")
        return PatchingHeatmap(value)
    if isinstance(value, LogitLensResult):
        from .widgets import LogitLensView

        if len(args) > 1 or set(kwargs) - {"titles"}:
            raise TypeError("show(lens) takes a second lens to compare with and titles=(a, b), nothing else")
        return LogitLensView(value, *args, **kwargs)
    if isinstance(value, AttentionPatterns):
        from .widgets import AttentionView

        if args or set(kwargs) - {"layer", "head"}:
            raise TypeError("show(attention_patterns) takes layer= and head=, nothing else")
        return AttentionView(value, **kwargs)
    if isinstance(value, Tracer):
        from .widgets import SavedValues

        return SavedValues(value.saved, title=name or "saved by the trace")
    if isinstance(value, dict):
        from .widgets import SavedValues

        return SavedValues(value, title=name)
    if isinstance(value, (list, tuple)):
        from .widgets import SavedValues, TensorView
        from .widgets.saved_values import as_tensor

        tensor, _ = as_tensor(value)
        if tensor is not None:
            return TensorView(tensor, name=name, **kwargs)
        return SavedValues({str(i): v for i, v in enumerate(value)}, title=name)
    raise TypeError(
        f"show() has no view for a {type(value).__name__}. It shows tensors, models and their modules "
        "(NNsight, LanguageModel, torch.nn.Module, model.layers[0]), a finished trace's tracer, or a dict "
        "of named values."
    )


def show(value: Any, *args: Any, name: str = "", **kwargs: Any) -> None:
    """Display the notebook view of `value` (a tensor, a model or module, a tracer, a dict of values).

    For a model, extra arguments are a sample input: `show(model, "Hello")` adds every module's
    input and output shapes from `model.scan(...)` (fake tensors, no compute).
    """
    from IPython.display import display

    display(view_for(value, *args, name=name, **kwargs))
