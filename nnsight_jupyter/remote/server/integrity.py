"""What a job may not leave behind: the served model and the state later jobs share.

A worker runs many users' jobs on one loaded model, so a job that edits the model in place
(``weight.data.zero_()``), leaves a hook on a module, swaps a module, changes a module's or a
class's attributes (``torch.Tensor.add = ...``), or registers a global module hook would change
every later job's results. Trace code is meant to change *activations* (``.output = ...``), which
live only for one forward pass.

After each job the worker resets what is cheap to reset (parameter gradients, grad mode, the
default dtype, anomaly detection) and compares everything else with a :class:`Baseline` taken
when the model finished loading. Any difference fails the job with ``ModelModifiedError`` naming
what changed, and the worker is replaced by a fresh one with a freshly loaded model, so the
change never reaches another job.

The comparison is by identity and version counters, not by value: a parameter's storage, dtype,
shape and in-place version; each module's class, training flag, hook counts and public
attributes (by object identity); each involved class's dictionary; the engine's envoy tree and
aliases; the configuration and tokenizer objects. It costs about a millisecond for a model the
size of SmolLM2.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["Baseline", "reset_shared_state"]

_HOOK_DICTS = (
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
    "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)
_GLOBAL_HOOKS = (
    "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks",
    "_global_forward_hooks_always_called", "_global_module_registration_hooks",
    "_global_parameter_registration_hooks", "_global_buffer_registration_hooks",
)


def _public_ids(obj: Any) -> tuple:
    try:
        items = vars(obj).items()
    except TypeError:
        return ()
    return tuple(sorted((k, id(v)) for k, v in items if not k.startswith("_")))


def _class_state(cls: type) -> tuple:
    return tuple((k, id(v)) for k, v in vars(cls).items())


class Baseline:
    """A snapshot of the model and shared state, compared after every job."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.torch_state = _torch_state()
        self.snapshot = self._take()

    def _take(self) -> dict[str, Any]:
        module: torch.nn.Module = self.model._model
        tensors = {}
        for kind, items in (("parameter", module.named_parameters(remove_duplicate=False)),
                            ("buffer", module.named_buffers(remove_duplicate=False))):
            for name, t in items:
                tensors[f"{kind} {name}"] = (
                    id(t), t.data_ptr(), t.dtype, tuple(t.shape), t._version, t.requires_grad, str(t.device),
                    bool(getattr(t, "_backward_hooks", None)),
                )
        modules = {}
        classes: dict[int, type] = {}
        for name, m in module.named_modules(remove_duplicate=False):
            modules[name or "(root)"] = (
                id(m), type(m), m.training, tuple(len(getattr(m, h, ()) or ()) for h in _HOOK_DICTS),
                _public_ids(m),
            )
            for cls in type(m).__mro__:
                classes.setdefault(id(cls), cls)
        for cls in (torch.Tensor, torch.nn.Parameter, type(self.model), *type(self.model).__mro__):
            classes.setdefault(id(cls), cls)
        envoys = {}
        for envoy in self.model.modules():
            envoys[envoy.path or "(root)"] = (
                id(envoy._module), tuple((k, id(v)) for k, v in envoy._children.items()),
                tuple(sorted(getattr(envoy, "_aliases", {}).items())),
            )
        shared = {}
        for label in ("config", "generation_config"):
            obj = getattr(module, label, None)
            if obj is not None:
                shared[label] = (id(obj), _public_ids(obj))
        tokenizer = vars(self.model).get("_tokenizer")
        if tokenizer is not None:
            shared["tokenizer"] = (id(tokenizer), _public_ids(tokenizer))
        shared["model wrapper"] = _public_ids(self.model)
        module_globals = torch.nn.modules.module
        hooks = {name: len(getattr(module_globals, name, ()) or ()) for name in _GLOBAL_HOOKS}
        return {
            "tensors": tensors,
            "modules": modules,
            "classes": {id(c): (c, _class_state(c)) for c in classes.values()},
            "envoys": envoys,
            "shared": shared,
            "global hooks": hooks,
        }

    def check(self) -> list[str]:
        """What differs from the baseline (empty when nothing does)."""
        now = self._take()
        problems: list[str] = []
        for section in ("tensors", "modules", "envoys", "shared", "global hooks"):
            before, after = self.snapshot[section], now[section]
            for key in sorted(set(before) | set(after)):
                if before.get(key) != after.get(key):
                    problems.append(_label(section, key, before.get(key), after.get(key)))
        before_classes, after_classes = self.snapshot["classes"], now["classes"]
        for key, (cls, state) in before_classes.items():
            if _class_state(cls) != state:
                problems.append(f"class {cls.__module__}.{cls.__qualname__} was changed")
        for key in set(after_classes) - set(before_classes):
            cls = after_classes[key][0]
            problems.append(f"a module's class became {cls.__module__}.{cls.__qualname__}")
        return problems


def _label(section: str, key: str, before: Any, after: Any) -> str:
    if section == "tensors":
        if before is None or after is None:
            return f"{key} was {'added' if before is None else 'removed'}"
        if before[4] != after[4] and before[:4] == after[:4]:
            return f"{key} was modified in place"
        return f"{key} was replaced or changed"
    if section == "modules":
        if before is None or after is None:
            return f"module {key} was {'added' if before is None else 'removed'}"
        if before[3] != after[3]:
            return f"module {key} gained or lost hooks"
        if before[2] != after[2]:
            return f"module {key} switched between train and eval mode"
        return f"module {key} was replaced or its attributes changed"
    if section == "global hooks":
        return f"a global module hook ({key}) was registered"
    if section == "envoys":
        return f"the envoy tree at {key} changed (aliases or children)"
    return f"the {key} object was changed"


def _torch_state() -> dict[str, Any]:
    return {
        "grad": torch.is_grad_enabled(),
        "dtype": torch.get_default_dtype(),
        "anomaly": torch.is_anomaly_enabled(),
    }


def reset_shared_state(baseline: Baseline) -> None:
    """Put back what every job may change but must not pass on: gradients and torch's global modes."""
    for parameter in baseline.model._model.parameters():
        parameter.grad = None
    state = baseline.torch_state
    torch.set_grad_enabled(state["grad"])
    torch.set_default_dtype(state["dtype"])
    torch.autograd.set_detect_anomaly(state["anomaly"])


def protect_weights(model: Any) -> str | None:
    """Move the model's CPU parameters into read-only memory; returns what was done, or why not.

    Version counters miss writes through ``.data`` (``weight.data.zero_()``), so the weights are
    copied into one anonymous mapping that is then made read-only with ``mprotect``: such a write
    crashes the worker (which the server reports and replaces) instead of silently changing the
    model for every later job. Parameters on a GPU are left as they are.
    """
    import ctypes
    import mmap

    module: torch.nn.Module = model._model
    parameters: list[torch.nn.Parameter] = []
    seen: set[int] = set()
    for _, parameter in module.named_parameters(remove_duplicate=False):
        if id(parameter) in seen:
            continue
        seen.add(id(parameter))
        if parameter.device.type != "cpu" or parameter.is_sparse or parameter.numel() == 0:
            return None if parameter.device.type == "cpu" else f"weights stay writable (on {parameter.device})"
        parameters.append(parameter)
    if not parameters:
        return None
    sizes = [-(-p.numel() * p.element_size() // 64) * 64 for p in parameters]
    total = -(-sum(sizes) // mmap.PAGESIZE) * mmap.PAGESIZE
    region = mmap.mmap(-1, total)
    offset = 0
    with torch.no_grad():
        for parameter, size in zip(parameters, sizes):
            view = torch.frombuffer(region, dtype=parameter.dtype, count=parameter.numel(), offset=offset)
            view = view.view(parameter.shape)
            view.copy_(parameter.data)
            parameter.data = view
            offset += size
    address = ctypes.addressof(ctypes.c_char.from_buffer(region))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mprotect(ctypes.c_void_p(address), ctypes.c_size_t(total), 1) != 0:
        return f"weights stay writable (mprotect: {ctypes.get_errno()})"
    _KEEP.append(region)
    return f"weights read-only ({total // 2**20} MiB)"


_KEEP: list[Any] = []
