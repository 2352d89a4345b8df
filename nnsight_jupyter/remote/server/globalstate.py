"""The process-wide state every job starts from: torch's, numpy's and Python's global settings.

A worker runs many jobs of one user in one process, and torch keeps much of its configuration in
process globals: a job that turns on autocast, switches an attention backend off or seeds the
random generator would otherwise change what every later job computes (autocast alone moved
SmolLM2's logits by up to 0.43). So before each job :meth:`FreshState.restore` puts back every
setting listed in :data:`SETTINGS` to the value it had when the worker finished loading, which is
the value a fresh worker would give the job, and reseeds what a fresh process seeds from the
operating system's entropy:

- torch's default CPU generator (and CUDA's, once initialised) goes back to its state at load
  time: a fresh torch process always starts from the same fixed seed, so this is what a fresh
  worker (and a fresh local kernel after loading the model) would produce;
- Python's ``random`` and numpy's global ``RandomState`` are reseeded from ``os.urandom``, as a
  fresh process seeds them, so no job can predict another's draws.

Settings that cannot be put back (:attr:`Setting.restore` is None) are compared after the job
instead; a change there retires the worker, so the next job runs in a fresh one. Users reach
most of these only through names the sandbox already refuses (``torch.set_default_dtype``...);
they are listed anyway, so that the reset does not depend on the sandbox catching every route.

Cost: one pass over the getters, about 60 calls, plus the three reseeds; on a 2-core VM about
0.1 ms per job (``benchmarks/remote.py`` prints it as part of "resets and checks").
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["SETTINGS", "FreshState", "Setting"]


@dataclass(frozen=True)
class Setting:
    """One process-wide setting: how to read it and how to put a value back (None: it cannot be)."""

    name: str
    get: Callable[[], Any]
    restore: Callable[[Any], Any] | None


def _attr(obj: Any, name: str) -> Setting:
    label = f"{getattr(obj, '__name__', type(obj).__name__)}.{name}"
    return Setting(label, lambda: getattr(obj, name), lambda value: setattr(obj, name, value))


def _c_flag(name: str, label: str) -> Setting:
    """A flag of torch's global context read and written through ``torch._C._get_X`` / ``_set_X``."""
    C = torch._C
    return Setting(label, getattr(C, f"_get_{name}"), getattr(C, f"_set_{name}"))


def _sdp(kind: str) -> Setting:
    C = torch._C
    return Setting(
        f"torch.backends.cuda.enable_{kind}_sdp",
        getattr(C, f"_get_{kind}_sdp_enabled"),
        getattr(C, f"_set_sdp_use_{kind}"),
    )


def _fp32_precision(backend: str, op: str) -> Setting:
    C = torch._C
    return Setting(
        f"torch.backends.{backend}.{op}.fp32_precision",
        lambda: C._get_fp32_precision_getter(backend, op),
        lambda value: C._set_fp32_precision_setter(backend, op, value),
    )


def _autocast(device: str) -> list[Setting]:
    return [
        Setting(
            f"torch.is_autocast_enabled({device!r})",
            lambda: torch.is_autocast_enabled(device),
            lambda value: torch.set_autocast_enabled(device, value),
        ),
        Setting(
            f"torch.get_autocast_dtype({device!r})",
            lambda: torch.get_autocast_dtype(device),
            lambda value: torch.set_autocast_dtype(device, value),
        ),
    ]


def _autocast_nesting() -> int:
    level = torch.autocast_increment_nesting()
    torch.autocast_decrement_nesting()
    return level - 1


def _restore_autocast_nesting(level: int) -> None:
    while _autocast_nesting() > level:
        torch.autocast_decrement_nesting()
    torch.clear_autocast_cache()


def _pop_function_modes(length: int) -> None:
    while torch._C._len_torch_function_stack() > length:
        torch._C._pop_torch_function_stack()


def _pop_dispatch_modes(length: int) -> None:
    while torch._C._len_torch_dispatch_stack() > length:
        torch._C._pop_torch_dispatch_stack(None)


def _saved_tensors_hooks() -> Any:
    return torch._C._autograd._top_saved_tensors_default_hooks(True)


def _pop_saved_tensors_hooks(top: Any) -> None:
    while _saved_tensors_hooks() is not None and _saved_tensors_hooks() != top:
        torch._C._autograd._pop_saved_tensors_default_hooks()


def _saved_tensors_hooks_enabled(value: bool) -> None:
    if value:
        torch._C._autograd._saved_tensors_hooks_enable()
    else:
        torch._C._autograd._saved_tensors_hooks_disable("disabled by an earlier job")


def _forward_ad_level() -> int:
    from torch.autograd import forward_ad

    return forward_ad._current_level


def _exit_forward_ad_levels(level: int) -> None:
    from torch.autograd import forward_ad

    while forward_ad._current_level > level:
        forward_ad.exit_dual_level()


def _anomaly() -> tuple[bool, bool]:
    return torch.is_anomaly_enabled(), torch.is_anomaly_check_nan_enabled()


def _deterministic() -> tuple[bool, bool]:
    return torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()


def _numpy_printoptions() -> dict[str, Any]:
    return dict(np.get_printoptions())


def _profiler(enabled: bool) -> None:
    if not enabled and torch.autograd._profiler_enabled():
        torch.autograd._disable_profiler()


def _settings() -> list[Setting]:
    import torch.autograd.graph  # noqa: F401  (the saved-tensor hooks live there)
    import torch.backends.mha
    import torch.backends.mkldnn
    import torch.backends.opt_einsum
    import torch.backends.xnnpack
    import torch.distributions
    import torch.nn.utils.parametrize as parametrize
    import torch.utils.backcompat as backcompat
    import torch.utils.checkpoint as checkpoint
    import torch.utils.deterministic

    settings = [
        # autograd
        Setting("torch.is_grad_enabled()", torch.is_grad_enabled, torch.set_grad_enabled),
        Setting("torch.is_inference_mode_enabled()", torch.is_inference_mode_enabled, None),
        Setting("torch.is_anomaly_enabled() / check_nan", _anomaly, lambda v: torch.set_anomaly_enabled(*v)),
        Setting(
            "torch.autograd.is_multithreading_enabled()",
            torch.autograd.is_multithreading_enabled,
            torch.autograd.set_multithreading_enabled,
        ),
        Setting("torch.autograd view replay", torch._C._is_view_replay_enabled, torch._C._set_view_replay_enabled),
        Setting("torch.autograd.graph.saved_tensors_hooks", _saved_tensors_hooks, _pop_saved_tensors_hooks),
        Setting(
            "torch.autograd.graph.disable_saved_tensors_hooks",
            torch._C._autograd._saved_tensors_hooks_is_enabled,  # type: ignore[attr-defined]
            _saved_tensors_hooks_enabled,
        ),
        Setting("torch.autograd.forward_ad dual level", _forward_ad_level, _exit_forward_ad_levels),
        Setting("torch.autograd.profiler enabled", torch.autograd._profiler_enabled, _profiler),
        _c_flag("autograd_fallback_mode", "torch autograd fallback mode"),
        # modes that wrap every torch call (torch.device(...) as a context, TorchFunctionMode...)
        Setting("torch function mode stack", torch._C._len_torch_function_stack, _pop_function_modes),
        Setting("torch dispatch mode stack", torch._C._len_torch_dispatch_stack, _pop_dispatch_modes),
        _c_flag("torch_function_state", "torch function dispatch state"),
        # defaults for new tensors
        Setting("torch.get_default_dtype()", torch.get_default_dtype, torch.set_default_dtype),
        Setting("torch.get_default_device()", torch.get_default_device, torch.set_default_device),
        # threads (interop threads cannot change once work has run, so a change cannot happen either)
        Setting("torch.get_num_threads()", torch.get_num_threads, torch.set_num_threads),
        Setting("torch.get_num_interop_threads()", torch.get_num_interop_threads, None),
        # autocast
        Setting("torch.is_autocast_cache_enabled()", torch.is_autocast_cache_enabled, torch.set_autocast_cache_enabled),
        Setting("torch autocast nesting", _autocast_nesting, _restore_autocast_nesting),
        # numerics and algorithm choice
        Setting(
            "torch.are_deterministic_algorithms_enabled() / warn_only",
            _deterministic,
            lambda v: torch.use_deterministic_algorithms(v[0], warn_only=v[1]),
        ),
        Setting(
            "torch.get_deterministic_debug_mode()",
            torch.get_deterministic_debug_mode,
            torch.set_deterministic_debug_mode,
        ),
        _attr(torch.utils.deterministic, "fill_uninitialized_memory"),
        Setting(
            "torch.get_float32_matmul_precision()",
            torch.get_float32_matmul_precision,
            torch.set_float32_matmul_precision,
        ),
        _c_flag("cpu_allow_fp16_reduced_precision_reduction", "torch cpu fp16 reduced-precision reduction"),
        _c_flag("mkldnn_enabled", "torch.backends.mkldnn.enabled"),
        _c_flag("mkldnn_deterministic", "torch.backends.mkldnn.deterministic"),
        _c_flag("onednn_allow_tf32", "torch.backends.mkldnn.allow_tf32"),
        _c_flag("nnpack_enabled", "torch.backends.nnpack.enabled"),
        _c_flag("qengine", "torch.backends.quantized.engine"),
        _attr(torch.backends.xnnpack, "enabled"),
        _attr(torch.backends.opt_einsum, "enabled"),
        _attr(torch.backends.opt_einsum, "strategy"),
        Setting(
            "torch.backends.mha.get_fastpath_enabled()",
            torch.backends.mha.get_fastpath_enabled,
            torch.backends.mha.set_fastpath_enabled,
        ),
        # attention backends (scaled_dot_product_attention reads these on every device)
        *(_sdp(kind) for kind in ("flash", "mem_efficient", "math", "cudnn", "overrideable")),
        _c_flag("sdp_priority_order", "torch.nn.attention sdpa priority order"),
        _c_flag("math_sdp_allow_fp16_bf16_reduction", "torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp"),
        # GPU library flags (settable on any build; read by the GPU kernels)
        _c_flag("cudnn_enabled", "torch.backends.cudnn.enabled"),
        _c_flag("cudnn_benchmark", "torch.backends.cudnn.benchmark"),
        _c_flag("cudnn_deterministic", "torch.backends.cudnn.deterministic"),
        _c_flag("cudnn_allow_tf32", "torch.backends.cudnn.allow_tf32"),
        _c_flag("cudnn_depthwise_kernel", "torch.backends.cudnn depthwise kernel"),
        _c_flag("cublas_allow_tf32", "torch.backends.cuda.matmul.allow_tf32"),
        _c_flag(
            "cublas_allow_fp16_reduced_precision_reduction",
            "torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction",
        ),
        _c_flag(
            "cublas_allow_bf16_reduced_precision_reduction",
            "torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction",
        ),
        _c_flag("cublas_allow_fp16_accumulation", "torch.backends.cuda.matmul.allow_fp16_accumulation"),
        _c_flag("blas_preferred_backend", "torch.backends.cuda.preferred_blas_library()"),
        _c_flag("linalg_preferred_backend", "torch.backends.cuda.preferred_linalg_library()"),
        _c_flag("rocm_fa_preferred_backend", "torch.backends.cuda.preferred_rocm_fa_library()"),
        _c_flag("miopen_immediate", "torch.backends.miopen.immediate"),
        _c_flag("sm_carveout_experimental", "torch sm carveout"),
        *(
            _fp32_precision(backend, op)
            for backend, op in (
                ("generic", "all"),
                ("cuda", "all"),
                ("cuda", "matmul"),
                ("cuda", "conv"),
                ("cuda", "rnn"),
                ("mkldnn", "all"),
                ("mkldnn", "matmul"),
                ("mkldnn", "conv"),
                ("mkldnn", "rnn"),
            )
        ),
        # checks and warnings that change what later jobs see or raise
        Setting(
            "torch.sparse.check_sparse_tensor_invariants.is_enabled()",
            torch.sparse.check_sparse_tensor_invariants.is_enabled,
            torch._C._set_check_sparse_tensor_invariants,
        ),
        Setting("torch.is_warn_always_enabled()", torch.is_warn_always_enabled, torch.set_warn_always),
        _c_flag("backcompat_broadcast_warn", "torch.utils.backcompat.broadcast_warning.enabled"),
        _c_flag("backcompat_keepdim_warn", "torch.utils.backcompat.keepdim_warning.enabled"),
        Setting(
            "torch.distributions.Distribution default validate_args",
            lambda: torch.distributions.Distribution._validate_args,
            torch.distributions.Distribution.set_default_validate_args,
        ),
        _attr(checkpoint, "_checkpoint_debug_enabled"),
        _attr(parametrize, "_cache_enabled"),
        _attr(backcompat.broadcast_warning, "enabled"),
        # printing (a job's printed lines are its output)
        Setting(
            "torch.set_printoptions",
            torch._tensor_str.get_printoptions,
            lambda options: torch.set_printoptions(**options),
        ),
        Setting("numpy.set_printoptions", _numpy_printoptions, lambda options: np.set_printoptions(**options)),
        Setting("numpy.seterr", np.geterr, lambda errors: np.seterr(**errors)),
        Setting("numpy.seterrcall", np.geterrcall, np.seterrcall),
        Setting("numpy.setbufsize", np.getbufsize, np.setbufsize),
    ]
    for device in ("cpu", "cuda", "xpu", "mps", "hpu", "xla", "ipu", "mtia", "maia", "privateuseone"):
        if torch.amp.is_autocast_available(device):
            settings.extend(_autocast(device))
    return settings


def _flush_denormal_off() -> None:
    torch.set_flush_denormal(False)


SETTINGS: tuple[Setting, ...] = tuple(_settings())
"""Every process-wide setting a job starts with as a fresh worker has it (see the module docstring).

Besides these, each job start turns flushing denormals off (``torch.set_flush_denormal``, which
has no getter and affects the calling thread), restores torch's random generators and reseeds
Python's ``random`` and numpy's global generator."""


class FreshState:
    """The settings' values at load time, and the means to give each job those values."""

    def __init__(self) -> None:
        self.values = [(setting, setting.get()) for setting in SETTINGS]
        self.rng = torch.get_rng_state()
        cuda = getattr(torch, "cuda", None)
        self.cuda_rng = cuda.get_rng_state_all() if cuda is not None and cuda.is_initialized() else None

    def restore(self) -> list[str]:
        """Put back every setting that differs; returns the names of those that could not be."""
        stuck = []
        for setting, value in self.values:
            try:
                now = setting.get()
                if now == value or (now is value):
                    continue
                if setting.restore is None:
                    stuck.append(setting.name)
                    continue
                setting.restore(value)
            except Exception:  # a broken setting must not block the job; report it as stuck
                stuck.append(setting.name)
        _flush_denormal_off()
        self._reseed()
        return stuck

    def unrestorable_changes(self) -> list[str]:
        """The settings without a way back whose value differs now (checked after each job)."""
        changed = []
        for setting, value in self.values:
            if setting.restore is None:
                try:
                    if setting.get() != value:
                        changed.append(setting.name)
                except Exception:
                    changed.append(setting.name)
        return changed

    def _reseed(self) -> None:
        torch.set_rng_state(self.rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)
        random.seed()
        np.random.seed()
