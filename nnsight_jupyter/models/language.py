"""LanguageModel: trace and generate with a Hugging Face causal LM, from text or token ids.

    model = LanguageModel("smollm2")
    with model.trace("The capital of France is"):
        h = model.layers[10].output.save()
        logits = model.output.logits.save()

    with model.generate("Once upon a time", max_new_tokens=20) as tracer:
        for step in tracer.all():
            model.layers[10].output[:] += steer
        ids = tracer.result.save()
    print(model.decode(ids))                      # prompt + continuation
    print(model.last_generation.text)            # continuations only, one per row of the batch

Inputs. A string, a list of strings, token ids (a list of ints, a list of lists, a 1-D or 2-D
tensor), or a tokenizer `BatchEncoding` / dict with `input_ids` (and `attention_mask`). Prompts
of different lengths — in one list, or across `tracer.invoke(...)` blocks — are padded on the
LEFT with an attention mask, and position ids derived from the mask are passed to the forward,
so each prompt computes exactly what it would compute alone. Left padding keeps `[:, -1]` the
last real token of every prompt; the padded positions at the start hold meaningless values.

Loading. Without `dispatch=True` only the config and tokenizer are read: the module tree is built
on the meta device, so `print(model)` and paths work at once, and the weights are loaded on the
first trace, into the same module objects.

Shared names. `model.layers`, `model.embed`, `model.final_norm`, `model.lm_head` and each
layer's `.attn` / `.mlp` reach the same modules on GPT-2, Llama, Gemma, Mistral, Qwen, Phi,
GPT-NeoX, OPT... (see `architectures.py`); native paths keep working.

Generation is greedy unless `do_sample=True` is passed. `tracer.result` holds the token ids of
the invoke's rows (left-padded prompt followed by the new tokens); `model.decode(ids)` turns them
into text and `model.last_generation` describes the latest run as a whole.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InvokeError, ModulePathError, TraceError
from ..tracing.batching import Rows, rows_for
from ..tracing.streaming import Generator, Streamer, reads_streamer
from . import registry
from .architectures import ArchitectureNames, apply_aliases, names_for
from .base import NNsight, PreparedInput

__all__ = ["Generation", "LanguageModel"]

_CONFIG_KWARGS = (
    "revision",
    "trust_remote_code",
    "cache_dir",
    "token",
    "local_files_only",
    "subfolder",
    "gguf_file",
    "force_download",
    "proxies",
)
_SAMPLING_SWITCHES = ("do_sample", "generation_config", "num_beams")
_MODULE_STATE_KEPT = frozenset(
    {
        "_modules",
        "forward",
        "_forward_hooks",
        "_forward_hooks_with_kwargs",
        "_forward_hooks_always_called",
        "_forward_pre_hooks",
        "_forward_pre_hooks_with_kwargs",
        "_backward_hooks",
        "_backward_pre_hooks",
        "_state_dict_hooks",
        "_state_dict_pre_hooks",
        "_load_state_dict_pre_hooks",
        "_load_state_dict_post_hooks",
        "_is_full_backward_hook",
    }
)


@dataclass(frozen=True)
class Generation:
    """The latest `model.generate(...)` run, whole batch, rows in invoke order."""

    sequences: torch.Tensor
    prompt_length: int
    tokenizer: Any

    @property
    def new_tokens(self) -> torch.Tensor:
        """The generated ids only, `[batch, new]` (rows that stopped early end in pad tokens)."""
        return self.sequences[:, self.prompt_length :]

    @property
    def text(self) -> list[str]:
        """The generated continuation of each row, without the prompt and special tokens."""
        return _decode_rows(self.tokenizer, self.new_tokens)

    @property
    def full_text(self) -> list[str]:
        """Prompt and continuation of each row, without padding and special tokens."""
        return _decode_rows(self.tokenizer, self.sequences)


class LanguageModel(NNsight):
    """A Hugging Face causal LM (Hub id, folder, short name or built model) with string inputs and generation.

    Args:
        model: a short name from `nnsight_jupyter.models()` ("smollm2", "gpt2"), a local folder, a Hub id,
            or an already built `PreTrainedModel`.
        tokenizer: a tokenizer to use instead of the one stored with the model (required for text input
            when a built model's folder has none).
        device_map, dtype, attn_implementation: passed to `from_pretrained`. `attn_implementation="eager"`
            makes attention modules return their attention weights.
        dispatch: load the weights now. By default they load on the first trace; until then the module
            tree exists on the meta device.
        **kwargs: any other `from_pretrained` keyword (revision, trust_remote_code, ...).
    """

    def __init__(
        self,
        model: Any,
        *,
        tokenizer: Any = None,
        device_map: Any = None,
        dtype: Any = None,
        attn_implementation: str | None = None,
        dispatch: bool = False,
        rename: dict[Any, str] | None = None,
        envoys: Any = None,
        **kwargs: Any,
    ) -> None:
        object.__setattr__(self, "_arch", None)
        object.__setattr__(self, "_last_generation", None)
        object.__setattr__(self, "_load", None)
        object.__setattr__(self, "_tokenizer_error", None)
        if isinstance(model, torch.nn.Module):
            loose = {
                k: v
                for k, v in (("device_map", device_map), ("dtype", dtype), ("attn_implementation", attn_implementation))
                if v is not None
            }
            loose.update(kwargs)
            if loose:
                raise TypeError(
                    f"LanguageModel got an already built model together with loading options ({', '.join(loose)}); "
                    "those apply only when LanguageModel loads the model itself. Apply them to the model yourself "
                    "(e.g. model.to(dtype)) or pass a Hub id / folder instead."
                )
            hf_model = model
            object.__setattr__(self, "_dispatched", True)
            if tokenizer is None:
                tokenizer = self._tokenizer_for_built(hf_model)
        elif isinstance(model, (str, os.PathLike)):
            hf_model, tokenizer = self._open(
                str(model), tokenizer, device_map, dtype, attn_implementation, dispatch, kwargs
            )
        else:
            raise TypeError(
                f"LanguageModel takes a model name, folder, Hub id or torch module, not {type(model).__name__}."
            )
        if tokenizer is not None:
            _ensure_pad_token(tokenizer)
        object.__setattr__(self, "_tokenizer", tokenizer)
        object.__setattr__(self, "_accepts_position_ids", _accepts(hf_model, "position_ids"))
        super().__init__(
            hf_model,
            remote_id=str(model) if isinstance(model, (str, os.PathLike)) else None,
            rename=rename,
            envoys=envoys,
        )
        model_type = getattr(getattr(hf_model, "config", None), "model_type", None)
        names = names_for(hf_model)
        if names is not None:
            object.__setattr__(self, "_arch", (names, model_type))
            apply_aliases(self, names, model_type)

    # ----- loading --------------------------------------------------------------------------------
    def _open(
        self,
        name: str,
        tokenizer: Any,
        device_map: Any,
        dtype: Any,
        attn_implementation: str | None,
        dispatch: bool,
        kwargs: dict,
    ) -> tuple[torch.nn.Module, Any]:
        """The model (a meta skeleton unless `dispatch`) and its tokenizer.

        A model whose constructor cannot run on the meta device (custom code that reads tensor
        values while building) is loaded at once instead of failing.
        """
        where = registry.resolve(
            name, revision=kwargs.get("revision"), local_files_only=bool(kwargs.get("local_files_only"))
        )
        load_kwargs = {**where.extra, **kwargs}
        if device_map is not None:
            load_kwargs["device_map"] = device_map
        if dtype is not None:
            load_kwargs["dtype"] = dtype
        if attn_implementation is not None:
            load_kwargs["attn_implementation"] = attn_implementation
        object.__setattr__(self, "_load", (where, load_kwargs))
        config_kwargs = {k: v for k, v in load_kwargs.items() if k in _CONFIG_KWARGS}
        if tokenizer is None:
            tokenizer = self._load_tokenizer(where, config_kwargs)
        if dispatch:
            object.__setattr__(self, "_dispatched", True)
            return self._from_pretrained(), tokenizer
        try:
            skeleton = self._skeleton(where, config_kwargs, dtype, attn_implementation)
        except registry.ModelUnavailableOffline:
            raise
        except Exception:
            object.__setattr__(self, "_dispatched", True)
            return self._from_pretrained(), tokenizer
        object.__setattr__(self, "_dispatched", False)
        return skeleton, tokenizer

    def _load_tokenizer(self, where: registry.Resolved, config_kwargs: dict) -> Any:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(where.location, **config_kwargs)
        except Exception as exc:
            _raise_if_offline(where, exc)
            object.__setattr__(self, "_tokenizer_error", exc)
            return None
        tok.padding_side = "left"
        return tok

    def _skeleton(
        self, where: registry.Resolved, config_kwargs: dict, dtype: Any, attn_implementation: str | None
    ) -> torch.nn.Module:
        """The module tree without weights (meta device), so paths and print(model) work before loading."""
        from transformers import AutoConfig, AutoModelForCausalLM

        try:
            config = AutoConfig.from_pretrained(where.location, **config_kwargs)
        except Exception as exc:
            _raise_if_offline(where, exc)
            raise
        build: dict[str, Any] = {}
        if isinstance(dtype, torch.dtype):
            build["dtype"] = dtype
        if attn_implementation is not None:
            build["attn_implementation"] = attn_implementation
        if "trust_remote_code" in config_kwargs:
            build["trust_remote_code"] = config_kwargs["trust_remote_code"]
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, **build)

    def _from_pretrained(self) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        where, load_kwargs = self._load
        try:
            model = AutoModelForCausalLM.from_pretrained(where.location, **load_kwargs)
        except Exception as exc:
            _raise_if_offline(where, exc)
            raise
        _align_weights(model)
        return model.eval()

    def dispatch(self) -> None:
        """Load the real weights now (done automatically on the first trace). Does nothing if loaded."""
        if self._dispatched:
            return
        real = self._from_pretrained()
        if _adopt(self._model, real):
            object.__setattr__(self, "_accepts_position_ids", _accepts(self._model, "position_ids"))
        else:
            object.__setattr__(self, "_model", real)
            object.__setattr__(self, "_accepts_position_ids", _accepts(real, "position_ids"))
            self._refresh()
        object.__setattr__(self, "_dispatched", True)

    @property
    def dispatched(self) -> bool:
        """Whether the real weights are loaded (False while the module tree is still on the meta device)."""
        return self._dispatched

    def _tokenizer_for_built(self, hf_model: torch.nn.Module) -> Any:
        source = getattr(getattr(hf_model, "config", None), "_name_or_path", "") or ""
        if not source or not os.path.isdir(source):
            return None
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(source)
        except Exception as exc:
            object.__setattr__(self, "_tokenizer_error", exc)
            return None
        tok.padding_side = "left"
        return tok

    # ----- names --------------------------------------------------------------------------------
    def _refresh(self) -> None:
        super()._refresh()
        arch = self.__dict__.get("_arch")
        if arch is not None:
            apply_aliases(self, *arch)

    def _path_error(self, name: str) -> ModulePathError:
        error = super()._path_error(name)
        shared = {"layers", "embed", "final_norm", "lm_head"}
        if name in shared and self.__dict__.get("_arch") is None:
            model_type = getattr(getattr(self._model, "config", None), "model_type", None)
            return ModulePathError(
                f"{error} There are no architecture-agnostic names (model.{name}, ...) for model_type "
                f"{model_type!r}: use the native paths, or teach them with nnsight_jupyter.models.architectures."
                f"register_architecture({model_type!r}, ArchitectureNames(...))."
            )
        return error

    @property
    def architecture(self) -> ArchitectureNames | None:
        """The native paths behind `model.layers`, `.embed`, ... (None for a family not in the table)."""
        arch = self.__dict__.get("_arch")
        return arch[0] if arch else None

    # ----- tokenizer and text ---------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        """The tokenizer (padding on the left; pad token = eos when the model has none)."""
        return self._tokenizer

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "tokenizer":
            if value is not None:
                _ensure_pad_token(value)
            object.__setattr__(self, "_tokenizer", value)
            return
        super().__setattr__(name, value)

    def _require_tokenizer(self, what: str) -> Any:
        if self._tokenizer is None:
            raise TraceError(
                f"{what} needs a tokenizer, and this model has none. Pass tokenizer=AutoTokenizer.from_pretrained(...) "
                "to LanguageModel, set model.tokenizer, or give token ids instead of text."
            ) from self._tokenizer_error
        return self._tokenizer

    def decode(self, ids: Any, *, skip_special_tokens: bool = True) -> str | list[str]:
        """Token ids to text: a string for one sequence, a list for a batch (padding and special tokens dropped)."""
        tok = self._require_tokenizer("decode()")
        ids = torch.as_tensor(ids)
        if ids.dim() == 1:
            return tok.decode(ids.tolist(), skip_special_tokens=skip_special_tokens)
        return _decode_rows(tok, ids, skip_special_tokens=skip_special_tokens)

    @property
    def last_generation(self) -> Generation | None:
        """The latest `generate` run: `.sequences`, `.prompt_length`, `.new_tokens`, `.text`, `.full_text`."""
        return self._last_generation

    # ----- entry points: load before the trace body first runs ------------------------------------
    def trace(self, *inputs: Any, **kwargs: Any):
        if not kwargs.get("remote"):
            self.dispatch()
        return super().trace(*inputs, **kwargs)

    def generate(self, *inputs: Any, **kwargs: Any):
        if not kwargs.get("remote"):
            self.dispatch()
        return super().generate(*inputs, **kwargs)

    trace.__doc__ = NNsight.trace.__doc__
    generate.__doc__ = NNsight.generate.__doc__

    # ----- engine hooks -------------------------------------------------------------------------
    def _prepare_input(self, *args: Any, **kwargs: Any) -> PreparedInput:
        self.dispatch()
        if len(args) > 1:
            raise InvokeError(
                f"A language model takes one input per trace or invoke (text, token ids or an encoding), got "
                f"{len(args)} positional arguments. Put several prompts in a list, or use one tracer.invoke() each."
            )
        mask = kwargs.pop("attention_mask", None)
        if args:
            if "input_ids" in kwargs:
                raise InvokeError("Pass the input either positionally or as input_ids=..., not both.")
            data = args[0]
        elif "input_ids" in kwargs:
            data = kwargs.pop("input_ids")
        else:
            raise InvokeError("This trace or invoke has keyword arguments but no input: pass text or token ids.")
        if isinstance(data, Mapping):
            if "input_ids" not in data:
                raise InvokeError(
                    f"A dict input needs an 'input_ids' entry (and optionally 'attention_mask'); got keys {list(data)}."
                )
            extra = {k: v for k, v in data.items() if k not in ("input_ids", "attention_mask", "token_type_ids")}
            if mask is None:
                mask = data.get("attention_mask")
            kwargs = {**extra, **kwargs}
            data = data["input_ids"]
        ids, mask = self._to_rows(data, mask)
        return PreparedInput((), {"input_ids": ids, "attention_mask": mask, **kwargs}, ids.shape[0])

    def _to_rows(self, data: Any, mask: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """One invoke's input as left-padded `[rows, length]` ids and its attention mask."""
        if isinstance(data, str):
            data = [data]
        if isinstance(data, (list, tuple)) and data and all(isinstance(x, str) for x in data):
            tok = self._require_tokenizer("Text input")
            rows = tok(list(data), padding=False, return_attention_mask=False)["input_ids"]
            return self._pad_rows([list(r) for r in rows], None)
        if isinstance(data, torch.Tensor):
            if data.dtype.is_floating_point or data.dtype == torch.bool:
                raise InvokeError(f"Token ids must be integers, got a {data.dtype} tensor.")
            if data.dim() == 1:
                data = data.unsqueeze(0)
            if data.dim() != 2:
                raise InvokeError(f"Token ids must be 1-D or 2-D [batch, length]; got shape {tuple(data.shape)}.")
            if mask is None:
                mask = torch.ones_like(data)
            mask = torch.as_tensor(mask)
            if mask.dim() == 1:
                mask = mask.unsqueeze(0)
            if mask.shape != data.shape:
                raise InvokeError(
                    f"attention_mask shape {tuple(mask.shape)} does not match input_ids {tuple(data.shape)}."
                )
            return data.long(), mask.long()
        if isinstance(data, (list, tuple)) and data:
            if all(_is_int(x) for x in data):
                return self._pad_rows([[int(x) for x in data]], None if mask is None else [list(_as_list(mask))])
            if all(isinstance(r, (list, tuple, torch.Tensor)) for r in data):
                rows = [[int(x) for x in _as_list(r)] for r in data]
                masks = None if mask is None else [[int(x) for x in _as_list(m)] for m in _as_list(mask)]
                return self._pad_rows(rows, masks)
        if isinstance(data, (list, tuple, str)) and not data:
            raise InvokeError("The input is empty: give at least one prompt or token.")
        raise InvokeError(
            f"Cannot use a {type(data).__name__} as language model input. Give a string, a list of strings, token ids "
            "(list of ints, list of lists, or a 1-D/2-D tensor) or a tokenizer encoding with input_ids."
        )

    def _pad_rows(self, rows: list[list[int]], masks: list[list[int]] | None) -> tuple[torch.Tensor, torch.Tensor]:
        if any(len(r) == 0 for r in rows):
            raise InvokeError("A prompt tokenized to zero tokens; give it at least one token.")
        if masks is None:
            masks = [[1] * len(r) for r in rows]
        if len(masks) != len(rows) or any(len(m) != len(r) for m, r in zip(masks, rows)):
            raise InvokeError("attention_mask does not have the same shape as input_ids.")
        width = max(len(r) for r in rows)
        pad = self._pad_id()
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(m)) + m for m in masks], dtype=torch.long)
        return ids, mask

    def _pad_id(self) -> int:
        tok = self._tokenizer
        if tok is not None and tok.pad_token_id is not None:
            return int(tok.pad_token_id)
        config = getattr(self._model, "config", None)
        for name in ("pad_token_id", "eos_token_id"):
            value = getattr(config, name, None)
            if isinstance(value, (list, tuple)):
                value = value[0] if value else None
            if value is not None:
                return int(value)
        return 0

    def _batch_inputs(self, prepared: list[PreparedInput | None]) -> tuple[tuple, dict, list[Rows | None]]:
        real = [p for p in prepared if p is not None]
        width = max(p.kwargs["input_ids"].shape[1] for p in real)
        pad = self._pad_id()
        ids = torch.cat([_left_pad(p.kwargs["input_ids"], width, pad) for p in real])
        mask = torch.cat([_left_pad(p.kwargs["attention_mask"], width, 0) for p in real])
        extra_keys = [k for k in real[0].kwargs if k not in ("input_ids", "attention_mask")]
        if any(set(p.kwargs) != set(real[0].kwargs) for p in real):
            raise InvokeError(
                "Every invoke must pass the same keyword arguments to the model (e.g. all or none labels=)."
            )
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        for key in extra_keys:
            kwargs[key] = _merge_extra(key, [p.kwargs[key] for p in real], width)
        if self._accepts_position_ids:
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        device = self._input_device()
        kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        return (), kwargs, rows_for([p.size if p is not None else None for p in prepared])

    def _input_device(self) -> torch.device:
        try:
            return self._model.get_input_embeddings().weight.device
        except (AttributeError, NotImplementedError):
            for p in self._model.parameters():
                return p.device
        return torch.device("cpu")

    def _run_forward(self, args: tuple, kwargs: dict) -> Any:
        return self._model(*args, **kwargs)

    def _run_generate(self, args: tuple, kwargs: dict, generate_kwargs: dict) -> Any:
        kwargs = dict(kwargs)
        kwargs.pop("position_ids", None)
        options = dict(generate_kwargs)
        if not any(k in options for k in _SAMPLING_SWITCHES):
            options["do_sample"] = False
        if "pad_token_id" not in options and "generation_config" not in options:
            options["pad_token_id"] = self._pad_id()
        prompt_length = kwargs["input_ids"].shape[1]
        il = self._interleaver
        if il is not None and any(reads_streamer(m.code) for m in il.mediators):
            options["streamer"] = Streamer(il, options.get("streamer"))
        result = self._model.generate(*args, **kwargs, **options)
        sequences = result if isinstance(result, torch.Tensor) else getattr(result, "sequences", None)
        if isinstance(sequences, torch.Tensor):
            object.__setattr__(self, "_last_generation", Generation(sequences, prompt_length, self._tokenizer))
        return result

    @property
    def generator(self) -> Generator:
        """nnsight's `model.generator`: `.streamer.output` is each step's tokens inside `model.generate`."""
        return Generator(self)

    def __repr__(self) -> str:
        text = super().__repr__()
        if not self._dispatched:
            text += "\n(weights not loaded yet: they load on the first trace, or call model.dispatch())"
        return text


def _raise_if_offline(where: registry.Resolved, exc: BaseException) -> None:
    """A failed Hub download becomes the error that says so and lists the models available offline."""
    if where.hub_id is not None and registry.is_connection_error(exc):
        raise registry.unavailable_error(where.hub_id, "the download failed") from exc


WEIGHT_ALIGNMENT = 64


def _align_weights(model: torch.nn.Module) -> None:
    """Give every CPU parameter and buffer memory of its own at a 64-byte boundary, as torch allocates it.

    `from_pretrained` leaves safetensors weights inside the memory-mapped file, at whatever offset
    the file header gives (SmolLM2's sit 40 bytes past a 64-byte boundary). Matrix kernels choose
    their code path by alignment, so a one-token prompt or a generation step (a single-row product)
    then rounds differently from the same model held in freshly allocated memory, as a remote
    server holds it: SmolLM2's one-token logits differed by up to 1.7e-5. Copying costs one pass
    over the weights at load (about 0.1 s for SmolLM2's 540 MB) and moves them from the page cache
    into process memory. Tied weights stay tied: each tensor object is copied once.
    """
    seen: set[int] = set()
    with torch.no_grad():
        for tensor in (*model.parameters(), *model.buffers()):
            if id(tensor) in seen or tensor.device.type != "cpu" or tensor.is_sparse:
                continue
            seen.add(id(tensor))
            if tensor.numel() and tensor.data_ptr() % WEIGHT_ALIGNMENT:
                tensor.data = tensor.data.clone(memory_format=torch.contiguous_format)


def _adopt(skeleton: torch.nn.Module, real: torch.nn.Module) -> bool:
    """Move the loaded model's state into the skeleton's module objects, so existing references stay valid.

    Only when both trees match module for module and nothing (accelerate's dispatch) replaced a
    module's `forward` with a closure over the loaded model; otherwise the caller swaps models.
    Hooks registered on the skeleton are kept.
    """
    ours = list(skeleton.named_modules(remove_duplicate=False))
    theirs = list(real.named_modules(remove_duplicate=False))
    if len(ours) != len(theirs):
        return False
    for (name_a, a), (name_b, b) in zip(ours, theirs):
        if name_a != name_b or type(a) is not type(b) or "forward" in b.__dict__ or hasattr(b, "_hf_hook"):
            return False
        if any(_points_at_module(v) for k, v in b.__dict__.items() if k not in _MODULE_STATE_KEPT):
            return False
    for (_, a), (_, b) in zip(ours, theirs):
        a.__dict__.update({k: v for k, v in b.__dict__.items() if k not in _MODULE_STATE_KEPT})
    return True


def _points_at_module(value: Any) -> bool:
    """A module, or a method bound to one, kept outside `_modules`: moving it would point back at the old tree."""
    if isinstance(value, torch.nn.Module):
        return True
    return isinstance(getattr(value, "__self__", None), torch.nn.Module)


def _accepts(model: torch.nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(type(model).forward).parameters
    except (TypeError, ValueError):
        return False


def _ensure_pad_token(tokenizer: Any) -> None:
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token


def _left_pad(t: torch.Tensor, width: int, value: int) -> torch.Tensor:
    if t.shape[1] == width:
        return t
    return torch.nn.functional.pad(t, (width - t.shape[1], 0), value=value)


def _merge_extra(key: str, values: list[Any], width: int) -> Any:
    head = values[0]
    if isinstance(head, torch.Tensor) and head.dim() >= 2 and key == "labels":
        return torch.cat([_left_pad(v, width, -100) for v in values])
    if isinstance(head, torch.Tensor) and head.dim() >= 1:
        if len(values) == 1:
            return head
        try:
            return torch.cat(values)
        except RuntimeError as exc:
            raise InvokeError(f"Cannot batch keyword {key!r} across invokes: its shapes differ beyond dim 0.") from exc
    if any(v is not head and v != head for v in values[1:]):
        raise InvokeError(f"Invokes pass different values for {key!r}; only tensors can differ between invokes.")
    return head


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) or (isinstance(x, torch.Tensor) and x.dim() == 0)


def _as_list(x: Any) -> list:
    return x.tolist() if isinstance(x, torch.Tensor) else list(x)


def _decode_rows(tokenizer: Any, ids: torch.Tensor, *, skip_special_tokens: bool = True) -> list[str]:
    if tokenizer is None:
        raise TraceError("Decoding needs a tokenizer; set model.tokenizer.")
    return [tokenizer.decode(row.tolist(), skip_special_tokens=skip_special_tokens) for row in ids]
