"""`patching_sweep` against one plain forward per cell with `register_forward_hook` (see conftest.py).

Heads are checked against a reference that never looks at the output projection: it edits the
`[batch, position, head, head_dim]` tensor that transformers' own attention function returns,
where the head axis is explicit, so a wrong column layout or a key/value-head count under
grouped-query attention (Llama, Gemma, SmolLM2) would show.
"""

from __future__ import annotations

import math

import pytest
import torch

from nnsight_jupyter import NNsight
from nnsight_jupyter.analysis import PatchingResult, logit_diff, patching_sweep, token_prob
from nnsight_jupyter.analysis.patching import _bytes_per_row
from nnsight_jupyter.analysis.layout import layout_of

from .conftest import VOCAB, Reference, build_tiny, naive_sweep

GEN = torch.Generator().manual_seed(1)
CLEAN = torch.randint(0, VOCAB, (7,), generator=GEN)
CORRUPTED = torch.randint(0, VOCAB, (7,), generator=GEN)
DIFF = logit_diff(11, 23)


def blocks(hf):
    return hf.transformer.h if hasattr(hf, "transformer") else hf.model.layers


def site_modules(hf, site):
    layers = blocks(hf)
    attn = (lambda i: layers[i].attn) if hasattr(hf, "transformer") else (lambda i: layers[i].self_attn)
    return {
        "resid": (lambda i: layers[i], "output"),
        "resid_pre": (lambda i: layers[i], "input"),
        "attn": (attn, "output"),
        "mlp": (lambda i: layers[i].mlp, "output"),
    }[site]


@pytest.mark.parametrize("site", ["resid", "resid_pre", "attn", "mlp"])
def test_every_site_matches_one_plain_forward_per_cell(tiny, site):
    family, hf = tiny
    model = NNsight(hf)
    # 5 cells per pass: chunks start at different layers and straddle layer boundaries.
    result = patching_sweep(model, CLEAN, CORRUPTED, DIFF, site=site, batch_size=5, progress=False)
    module_of, kind = site_modules(hf, site)
    cells = [(layer, pos, None) for layer in range(3) for pos in range(7)]
    reference = naive_sweep(hf, module_of, kind, CLEAN, CORRUPTED, cells, DIFF)
    expected = reference.values.view(3, 7)
    assert result.values.shape == (3, 7) and result.dims == ("layer", "position")
    assert result.computed.all() and not result.interrupted
    torch.testing.assert_close(result.values, expected, rtol=0, atol=reference.atol)
    # The sweep must actually move the metric, or the comparison above would prove little.
    assert (expected - result.corrupted_baseline).abs().max() > 1e-2


def _attention_reference(hf, clean, corrupted, cells, metric, monkeypatch):
    """Patch head h at layer l by editing the [b, s, head, head_dim] output of transformers' attention function."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    state: dict = {"record": {}, "patch": None}

    def wrapped(module, *args, **kwargs):
        out, weights = sdpa(module, *args, **kwargs)
        layer = module.layer_idx
        if state["patch"] is None:
            state["record"][layer] = out[0].clone()
        elif state["patch"][0] == layer:
            _, position, head = state["patch"]
            out = out.clone()
            where = (slice(None) if position is None else position, head)
            out[0][where] = state["record"][layer][where]
        return out, weights

    assert hf.config._attn_implementation == "sdpa"
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "sdpa", wrapped)
    with torch.no_grad():
        hf(clean.unsqueeze(0))
        values, logits = [], []
        for cell in cells:
            state["patch"] = cell
            logits.append(hf(corrupted.unsqueeze(0)).logits[0, -1])
            values.append(metric(logits[-1].unsqueeze(0))[0])
    return Reference(torch.stack(values), logits, hf.config)


def test_heads_match_the_attention_functions_own_head_axis(tiny, monkeypatch):
    family, hf = tiny
    model = NNsight(hf)
    result = patching_sweep(model, CLEAN, CORRUPTED, DIFF, site="head", over=("layer", "position", "head"),
                            layers=[0, 2], positions=[1, -1], batch_size=6, progress=False)
    assert result.values.shape == (2, 2, 4) and result.coords == {"layer": [0, 2], "position": [1, 6],
                                                                  "head": [0, 1, 2, 3]}
    cells = [(layer, pos, head) for layer in (0, 2) for pos in (1, 6) for head in range(4)]
    reference = _attention_reference(hf, CLEAN, CORRUPTED, cells, DIFF, monkeypatch)
    expected = reference.values.view(2, 2, 4)
    torch.testing.assert_close(result.values, expected, rtol=0, atol=reference.atol)
    assert (expected - result.corrupted_baseline).abs().max() > 1e-2


def test_axis_order_subsets_and_baselines():
    hf = build_tiny("llama")
    model = NNsight(hf)
    a = patching_sweep(model, CLEAN, CORRUPTED, DIFF, layers=[2, 0], positions=[-1, 0, 3], progress=False)
    b = patching_sweep(model, CLEAN, CORRUPTED, DIFF, over=("position", "layer"), layers=[0, 2],
                       positions=[0, 3, 6], progress=False)
    assert a.coords == {"layer": [0, 2], "position": [0, 3, 6]} and b.dims == ("position", "layer")
    assert torch.equal(b.values, a.values.T)  # the same cells in the same passes, only the axes swapped
    whole = patching_sweep(model, CLEAN, CORRUPTED, DIFF, over="layer", progress=False)
    assert whole.values.shape == (3,)
    with torch.no_grad():
        clean_logits = hf(CLEAN.unsqueeze(0)).logits[:, -1]
        corrupted_logits = hf(CORRUPTED.unsqueeze(0)).logits[:, -1]
    assert whole.clean_baseline == pytest.approx(float(DIFF(clean_logits)[0]), abs=1e-4)
    assert whole.corrupted_baseline == pytest.approx(float(DIFF(corrupted_logits)[0]), abs=1e-4)
    # Patching the whole residual stream after a layer makes the run the clean run from there on.
    torch.testing.assert_close(whole.values, torch.full((3,), whole.clean_baseline), rtol=0, atol=1e-4)
    torch.testing.assert_close(whole.normalized(), torch.ones(3), rtol=0, atol=1e-4)
    assert whole.baseline_top_ids[0].tolist() == clean_logits[0].topk(5).indices.tolist()


def test_metrics_ready_made_and_written_by_hand():
    hf = build_tiny("gpt2")
    model = NNsight(hf)
    cells = [(layer, pos, None) for layer in range(3) for pos in range(7)]
    module_of, kind = site_modules(hf, "resid")

    def by_hand(logits):
        return logits.softmax(-1)[:, 42]

    reference = naive_sweep(hf, module_of, kind, CLEAN, CORRUPTED, cells, by_hand)
    for metric in (token_prob(42), by_hand, lambda logits: logits[0].softmax(-1)[42]):  # the last: one run at a time
        result = patching_sweep(model, CLEAN, CORRUPTED, metric, batch_size=8, progress=False)
        torch.testing.assert_close(result.values, reference.values.view(3, 7), rtol=0, atol=reference.atol)
    assert patching_sweep(model, CLEAN, CORRUPTED, token_prob(42), progress=False, over="layer").metric == "P('42')"
    with pytest.raises(ValueError, match="one number per run"):
        patching_sweep(model, CLEAN, CORRUPTED, lambda logits: logits[:, :2], progress=False)


def test_updates_stream_into_one_result_and_chunks_follow_the_budget():
    hf = build_tiny("llama")
    model = NNsight(hf)
    seen = []

    def on_update(result, cells):
        seen.append((result, list(cells), int(result.computed.sum()), result.values.clone()))

    final = patching_sweep(model, CLEAN, CORRUPTED, DIFF, batch_size=4, on_update=on_update, progress=False)
    assert [len(cells) for _, cells, _, _ in seen] == [4, 4, 4, 4, 4, 1]
    assert all(r is final for r, _, _, _ in seen)
    assert [done for _, _, done, _ in seen] == [4, 8, 12, 16, 20, 21]
    first_values = seen[0][3]
    assert torch.isnan(first_values).sum() == 21 - 4  # cells not computed yet are NaN
    for index in seen[0][1]:
        assert first_values[index] == final.values[index]
    assert sorted(i for _, cells, _, _ in seen for i in cells) == sorted(
        (a, b) for a in range(3) for b in range(7))

    per_row = _bytes_per_row(layout_of(model), 7)
    chunks = []
    patching_sweep(model, CLEAN, CORRUPTED, DIFF, memory_budget=3 * per_row + 1, progress=False,
                   on_update=lambda result, cells: chunks.append(len(cells)))
    assert chunks == [3] * 7
    smaller = []
    patching_sweep(model, CLEAN, CORRUPTED, DIFF, memory_budget="1MiB", progress=False, over="layer",
                   on_update=lambda result, cells: smaller.append(len(cells)))
    assert sum(smaller) == 3
    with pytest.raises(ValueError, match="less than one patched run"):
        patching_sweep(model, CLEAN, CORRUPTED, DIFF, memory_budget=per_row // 2, progress=False)
    with pytest.raises(ValueError, match="memory_budget"):
        patching_sweep(model, CLEAN, CORRUPTED, DIFF, memory_budget="lots", progress=False)


class _Interrupt:
    """A forward hook that raises KeyboardInterrupt at the n-th call: Ctrl-C in the middle of a pass."""

    def __init__(self, at_call: int) -> None:
        self.calls = 0
        self.at_call = at_call

    def __call__(self, module, args, output):
        self.calls += 1
        if self.calls == self.at_call:
            raise KeyboardInterrupt


def test_ctrl_c_keeps_the_computed_cells_and_leaves_the_model_as_it_was(capsys):
    hf = build_tiny("gpt2")
    model = NNsight(hf)
    with torch.no_grad():
        before = hf(CORRUPTED.unsqueeze(0)).logits
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    cells = [(layer, pos, None) for layer in range(3) for pos in range(7)]
    module_of, kind = site_modules(hf, "resid")
    reference = naive_sweep(hf, module_of, kind, CLEAN, CORRUPTED, cells, DIFF)
    expected = reference.values.view(3, 7)
    # ln_f runs once per pass: the baseline pass, then passes of 8 cells; interrupt the third pass.
    handle = hf.transformer.ln_f.register_forward_hook(_Interrupt(at_call=4))
    try:
        result = patching_sweep(model, CLEAN, CORRUPTED, DIFF, batch_size=8, progress=False)
    finally:
        handle.remove()
    assert result.interrupted and int(result.computed.sum()) == 16
    assert "interrupted: 16 of 21 cells computed" in capsys.readouterr().err
    done = result.computed
    assert torch.isnan(result.values[~done]).all()
    torch.testing.assert_close(result.values[done], expected[done], rtol=0, atol=reference.atol)
    assert "(interrupted)" in repr(result)
    # The model is as it was: no wrapper left on any module, same weights, same outputs.
    for module in hf.modules():
        assert "forward" not in module.__dict__ and "_call_impl" not in module.__dict__
    assert all(torch.equal(state[k], v) for k, v in hf.state_dict().items())
    with torch.no_grad():
        assert torch.equal(hf(CORRUPTED.unsqueeze(0)).logits, before)


def test_progress_bar_counts_cells(capsys):
    model = NNsight(build_tiny("gpt2"))
    patching_sweep(model, CLEAN, CORRUPTED, DIFF, batch_size=10, progress=True)
    err = capsys.readouterr().err
    assert "patching sweep" in err and "21/21" in err and "cell" in err


def test_bad_input_says_what_to_do():
    model = NNsight(build_tiny("llama"))
    cases = [
        (dict(clean=CLEAN[:5]), ValueError, "same length"),
        (dict(site="embed"), ValueError, "site='embed' is not one of"),
        (dict(over=("position",)), ValueError, "no 'layer' axis"),
        (dict(over=("layer", "head")), ValueError, "heads are patched with site='head'"),
        (dict(site="head"), ValueError, "add 'head' to over"),
        (dict(layers=[3]), ValueError, "has layer 3, but this model has 3"),
        (dict(positions=[7]), ValueError, "has position 7"),
        (dict(clean="some text"), TypeError, "no tokenizer"),
        (dict(metric="logits"), TypeError, "metric must be a function"),
        (dict(batch_size=0), ValueError, "batch_size must be a positive int"),
    ]
    for change, kind, message in cases:
        arguments = dict(clean=CLEAN, corrupted=CORRUPTED, metric=DIFF)
        arguments.update(change)
        with pytest.raises(kind, match=message):
            patching_sweep(model, arguments.pop("clean"), arguments.pop("corrupted"), arguments.pop("metric"),
                           progress=False, **arguments)
    with pytest.raises(TypeError, match="traced model"):
        patching_sweep(torch.nn.Linear(2, 2), CLEAN, CORRUPTED, DIFF)
    with pytest.raises(ValueError, match="not in the architecture table"):
        patching_sweep(NNsight(torch.nn.Sequential(torch.nn.Linear(2, 2))), CLEAN, CORRUPTED, DIFF)


def test_repr_and_static_table_show_the_values():
    model = NNsight(build_tiny("gpt2"))
    result = patching_sweep(model, CLEAN, CORRUPTED, DIFF, progress=False)
    text = repr(result)
    assert f"clean {result.clean_baseline:.4g}" in text and "21/21 cells" in text and "largest change" in text
    page = result._repr_html_()
    for label in result.labels("position"):
        assert label.replace("'", "&#x27;") in page
    for value in result.values.reshape(-1).tolist():
        assert f">{value:.3g}<" in page
    assert isinstance(result, PatchingResult) and result.labels("layer") == ["0", "1", "2"]
    heads = patching_sweep(model, CLEAN, CORRUPTED, DIFF, site="head", over=("layer", "position", "head"),
                           positions=[-1], progress=False)
    assert "largest change" in heads._repr_html_()
    assert heads.top_tokens(2, -1, 3) == [(heads.token_text[i], p) for i, p in
                                          zip(heads.top_ids[2, 0, 3].tolist(), heads.top_probs[2, 0, 3].tolist())]
    assert heads.value(1, 6, 0) == float(heads.values[1, 0, 0])
    with pytest.raises(ValueError, match="position 3 is not in this sweep"):
        heads.index(0, 3, 0)
    with pytest.raises(ValueError, match="Name the cell's head"):
        heads.index(0, 6)


@pytest.mark.slow
def test_smollm2_layers_positions_and_gqa_heads_match_plain_forwards(smollm2, monkeypatch):
    hf = smollm2._model
    tok = smollm2.tokenizer
    clean, corrupted = "The Eiffel Tower is in", "The Colosseum is in"
    clean_ids = torch.tensor(tok(clean).input_ids)
    corrupted_ids = torch.tensor(tok(corrupted).input_ids)
    paris, rome = tok(" Paris").input_ids[0], tok(" Rome").input_ids[0]
    metric = logit_diff(" Paris", " Rome")
    layers = [0, 8, 16, 24, 29]
    result = patching_sweep(smollm2, clean, corrupted, metric, layers=layers, batch_size=7, progress=False)
    assert result.clean_tokens == ["The", " E", "iffel", " Tower", " is", " in"]
    assert result.labels("position")[1] == "1 ' E'/' Col'"
    assert result.metric == "logit(' Paris') - logit(' Rome')"
    by_hand = logit_diff(paris, rome)
    cells = [(layer, pos, None) for layer in layers for pos in range(6)]
    reference = naive_sweep(hf, lambda i: hf.model.layers[i], "output", clean_ids, corrupted_ids, cells, by_hand)
    torch.testing.assert_close(result.values, reference.values.view(5, 6), rtol=0, atol=reference.atol)
    assert result.clean_baseline > 0 > result.corrupted_baseline  # Paris wins on the clean prompt only

    assert smollm2.config.num_attention_heads == 9 and smollm2.config.num_key_value_heads == 3
    heads = patching_sweep(smollm2, clean_ids, corrupted_ids, by_hand, site="head", over=("layer", "head"),
                           layers=[3, 20], progress=False)
    head_cells = [(layer, None, head) for layer in (3, 20) for head in range(9)]
    reference = _attention_reference(hf, clean_ids, corrupted_ids, head_cells, by_hand, monkeypatch)
    torch.testing.assert_close(heads.values, reference.values.view(2, 9), rtol=0, atol=reference.atol)
    assert not math.isnan(float(heads.values.sum()))
