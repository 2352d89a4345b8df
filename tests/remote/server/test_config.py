"""Model specs and settings: clear errors naming the problem and the flag."""

from __future__ import annotations

import pytest

from nnsight_jupyter.remote.server.config import ModelSpec, ServerConfig, describe_bytes, parse_model_specs


def test_parse_model_specs():
    assert parse_model_specs("smollm2, tiny=pkg.mod:fn") == (ModelSpec("smollm2", "smollm2"),
                                                               ModelSpec("tiny", "pkg.mod:fn"))
    assert parse_model_specs(["a", "b=org/model"])[1] == ModelSpec("b", "org/model")
    assert ModelSpec("t", "pkg.mod:fn").is_factory and not ModelSpec("s", "smollm2").is_factory
    assert not ModelSpec("h", "org/model").is_factory


@pytest.mark.parametrize(("text", "message"), [
    ("", "no models"), ("a,a", "unique"), ("=x", "invalid model spec"), ("bad name=x", "invalid model spec"),
])
def test_bad_model_specs(text, message):
    with pytest.raises(ValueError, match=message):
        parse_model_specs(text)


def test_config_validation(tmp_path):
    models = parse_model_specs("smollm2")
    with pytest.raises(ValueError, match="--add-key"):
        ServerConfig(models=models, data_dir=tmp_path)
    with pytest.raises(ValueError, match="--max-request-mb"):
        ServerConfig(models=models, data_dir=tmp_path, auth=False, max_request_bytes=0)
    with pytest.raises(ValueError, match="start_method"):
        ServerConfig(models=models, data_dir=tmp_path, auth=False, start_method="fork")
    with pytest.raises(ValueError, match="--cancel-grace"):
        ServerConfig(models=models, data_dir=tmp_path, auth=False, cancel_grace_s=-1.0)
    config = ServerConfig(models=models, data_dir=str(tmp_path), auth=False)
    assert config.database == tmp_path / "jobs.sqlite3" and config.model("smollm2") is models[0]


def test_describe_bytes():
    assert describe_bytes(64 * 2**20) == "64 MiB"
    assert describe_bytes(1536) == "1.5 KiB" and describe_bytes(12) == "12 bytes"
