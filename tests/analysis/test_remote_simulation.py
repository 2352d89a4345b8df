"""`remote="local"`: every step of a remote analysis (request, codec both ways, the server's
`run_request` with its named-analysis entry) except the network, against a local call."""

from __future__ import annotations

import torch

from nnsight_jupyter import NNsight
from nnsight_jupyter.analysis import attention_patterns, logit_lens, patching_sweep, token_prob

from .conftest import VOCAB, build_tiny

CLEAN = torch.randint(0, VOCAB, (5,), generator=torch.Generator().manual_seed(7))
CORRUPTED = torch.randint(0, VOCAB, (5,), generator=torch.Generator().manual_seed(8))
SCALE = 2.0


def test_each_analysis_gives_the_local_result():
    model = NNsight(build_tiny("llama"), remote_id="tiny-llama")

    def metric(logits):  # reads a module global and torch: both travel with it
        return torch.tanh(logits[:, 3] / SCALE)

    for chosen in (token_prob(3), metric):
        local = patching_sweep(model, CLEAN, CORRUPTED, chosen, site="head", over=("layer", "head"), progress=False)
        remote = patching_sweep(model, CLEAN, CORRUPTED, chosen, site="head", over=("layer", "head"), progress=False,
                                remote="local")
        assert torch.equal(remote.values, local.values) and remote.metric == local.metric
        assert remote.token_text == local.token_text
    local_lens, remote_lens = logit_lens(model, CLEAN, target=4), logit_lens(model, CLEAN, target=4, remote="local")
    assert torch.equal(remote_lens.top_ids, local_lens.top_ids)
    assert torch.equal(remote_lens.target_probs, local_lens.target_probs)
    local_att, remote_att = attention_patterns(model, CLEAN), attention_patterns(model, CLEAN, remote="local")
    assert torch.equal(remote_att.patterns, local_att.patterns)
