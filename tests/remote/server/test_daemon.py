"""With no host configured, `remote=True` starts a local backend daemon and reuses it."""

from __future__ import annotations

import json

import torch

from nnsight_jupyter import LanguageModel
from nnsight_jupyter.remote import daemon
from nnsight_jupyter.remote.config import ENV_API_KEY, ENV_HOST


def test_remote_without_a_host_uses_a_local_daemon(tmp_path, monkeypatch):
    monkeypatch.setenv("NNSIGHT_JUPYTER_DAEMON_DIR", str(tmp_path / "daemon"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv(ENV_HOST, raising=False)
    monkeypatch.delenv(ENV_API_KEY, raising=False)
    model = LanguageModel("smollm2")
    prompt = "The capital of France is"
    try:
        with model.trace(prompt, remote=True):
            remote_logits = model.lm_head.output[0, -1].save()
        first = json.loads((tmp_path / "daemon" / "daemon.json").read_text())
        assert first["models"] == ["smollm2"]
        assert (tmp_path / "daemon" / "daemon.json").stat().st_mode & 0o077 == 0
        with model.trace(prompt, remote=True):
            again = model.lm_head.output[0, -1].save()
        assert json.loads((tmp_path / "daemon" / "daemon.json").read_text())["pid"] == first["pid"]
    finally:
        daemon.stop_daemon()
    with torch.no_grad(), model.trace(prompt):
        local_logits = model.lm_head.output[0, -1].save()
    assert torch.equal(remote_logits, local_logits)
    assert torch.equal(again, local_logits)
    assert model.tokenizer.decode(int(remote_logits.argmax())) == " Paris"
