"""The views' code travels once per kernel: every view holds a small loader and a reference to one bundle model."""

from __future__ import annotations

import json

import pytest
import torch

from nnsight_jupyter.errors import ViewsNotBuiltError
from nnsight_jupyter.widgets import JobStatus, ModuleTree, TensorView, bundle


def test_views_share_one_bundle_and_carry_only_a_loader():
    views = [TensorView(torch.zeros(3)), ModuleTree(torch.nn.Linear(2, 2)), JobStatus("job")]
    code = bundle.STATIC.read_text()
    assert {id(v._bundle) for v in views} == {id(views[0]._bundle)}
    assert views[0]._bundle.code == code and len(code) > 20_000
    for view in views:
        state = json.dumps(view.get_state(), default=str)
        assert len(view._esm) < 2_000 and code[:2000] not in state
        assert view.get_state()["_bundle"] == f"IPY_MODEL_{views[0]._bundle.model_id}"


def test_a_missing_bundle_says_how_to_build_it(monkeypatch, tmp_path):
    monkeypatch.setattr(bundle, "STATIC", tmp_path / "views.js")
    with pytest.raises(ViewsNotBuiltError, match="npm --prefix labextension ci && npm --prefix labextension run build"):
        TensorView(torch.zeros(2))
