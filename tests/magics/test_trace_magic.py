"""`%%trace` and `%nnsight` driven through a real IPython shell, checked against forward hooks."""

from __future__ import annotations

import re
import traceback

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from nnsight_jupyter import NNsight
from nnsight_jupyter.magics import MagicUsageError, complete_module_paths

from ..numerics import assert_rounding_close, transformer_depth_width


@pytest.fixture(scope="module")
def shell():
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shell.run_cell("%load_ext nnsight_jupyter").raise_error()
    yield shell
    shell.run_cell("%unload_ext nnsight_jupyter")


@pytest.fixture
def gpt2():
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=97, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def _hooked(module, x, path):
    seen = []
    handle = module.get_submodule(path).register_forward_hook(lambda m, a, o: seen.append(o.detach().clone()))
    try:
        with torch.no_grad():
            module(x)
    finally:
        handle.remove()
    return seen[0]


def test_trace_cell_equals_with_block_and_forward_hooks(shell, gpt2):
    x = torch.randint(1, 97, (2, 6))
    model = NNsight(gpt2)
    shell.user_ns.update(net=model, x=x)
    shell.run_cell(
        "%%trace net x\nh = model.transformer.h[1].output.save()\nunsaved = model.lm_head.output\n"
    ).raise_error()
    with model.trace(x):
        h_with = model.transformer.h[1].output.save()
    expected = _hooked(gpt2, x, "transformer.h.1")
    assert torch.equal(shell.user_ns["h"], h_with)
    assert torch.equal(shell.user_ns["h"], expected)
    assert "model" not in shell.user_ns or shell.user_ns["model"] is not model
    result = shell.run_cell("unsaved + 1")
    assert type(result.error_in_exec).__name__ == "NotSavedError"


def test_plain_torch_module_in_the_notebook_is_wrapped(shell, gpt2):
    x = torch.randint(1, 97, (1, 5))
    shell.user_ns.update(raw=gpt2, x=x)
    shell.run_cell("%%trace raw x\nh0 = model.transformer.h[0].output.save()\n").raise_error()
    assert torch.equal(shell.user_ns["h0"], _hooked(gpt2, x, "transformer.h.0"))


def test_several_prompts_become_one_invoke_each(shell, gpt2):
    a, b = torch.randint(1, 97, (1, 4)), torch.randint(1, 97, (1, 4))
    calls = []
    handle = gpt2.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    shell.user_ns.update(raw=gpt2, batch=[a, b])
    try:
        shell.run_cell("%%trace raw batch\nh = model.transformer.h[1].output.save()\n").raise_error()
    finally:
        handle.remove()
    assert calls == [2]
    values = shell.user_ns["h"]
    assert isinstance(values, list) and len(values) == 2
    # One batch of 2 against each prompt alone: equal up to float32 rounding.
    depth, width = transformer_depth_width(gpt2.config)
    assert_rounding_close(values[0], _hooked(gpt2, a, "transformer.h.1"), depth=depth, width=width)
    assert_rounding_close(values[1], _hooked(gpt2, b, "transformer.h.1"), depth=depth, width=width)


def test_tracebacks_use_the_cells_own_line_numbers(shell, gpt2):
    shell.user_ns.update(raw=gpt2, x=torch.randint(1, 97, (1, 4)), batch=[torch.randint(1, 97, (1, 4))] * 2)
    for line in ("raw x", "raw batch"):
        result = shell.run_cell(f"%%trace {line}\nh = model.transformer.h[0].output\n\nh.no_such_method()\n")
        assert isinstance(result.error_in_exec, AttributeError)
        last = traceback.extract_tb(result.error_in_exec.__traceback__)[-1]
        assert last.lineno == 4
        assert "no_such_method" in last.line


def test_a_typo_in_a_module_path_suggests_the_name(shell, gpt2):
    shell.user_ns.update(raw=gpt2, x=torch.randint(1, 97, (1, 4)))
    result = shell.run_cell("%%trace raw x\nh = model.transformer.hh[0].output.save()\n")
    assert "Did you mean 'h'" in str(result.error_in_exec)


def test_unquoted_unknown_prompt_and_bad_options_are_explained(shell, gpt2):
    shell.user_ns.update(raw=gpt2)
    result = shell.run_cell("%%trace raw Hello\nmodel.lm_head.output\n")
    assert isinstance(result.error_in_exec, MagicUsageError)
    assert 'Quote literal prompts: %%trace MODEL "Hello"' in str(result.error_in_exec)
    result = shell.run_cell("%%trace raw x --bogus\nmodel.lm_head.output\n")
    assert "Unknown option(s) --bogus" in str(result.error_in_exec)


def test_time_then_trace_composes(shell, gpt2):
    x = torch.randint(1, 97, (1, 5))
    shell.user_ns.update(raw=gpt2, x=x)
    shell.run_cell("%%time\n%%trace raw x\ntimed = model.transformer.h[1].output.save()\n").raise_error()
    assert torch.equal(shell.user_ns["timed"], _hooked(gpt2, x, "transformer.h.1"))


def test_generation_cell_with_per_step_values(shell, gpt2):
    x = torch.randint(1, 97, (1, 5))
    shell.user_ns.update(raw=gpt2, x=x)
    shell.run_cell("import nnsight_jupyter").raise_error()
    shell.run_cell(
        "%%trace raw x --max-new-tokens 3\n"
        "shapes = nnsight_jupyter.save([])\n"
        "for step in tracer.all():\n"
        "    shapes.append(tuple(model.transformer.h[0].output.shape))\n"
        "ids = tracer.result.save()\n",
    ).raise_error()
    expected = gpt2.generate(x, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(shell.user_ns["ids"], expected)
    assert shell.user_ns["shapes"] == [(1, 5, 32), (1, 1, 32), (1, 1, 32)]


def test_show_displays_a_summary(shell, gpt2, capsys):
    shell.user_ns.update(raw=gpt2, x=torch.randint(1, 97, (1, 5)))
    shown = []
    shell.display_pub.publish = lambda data, **kw: shown.append(data)
    shell.run_cell("%%trace raw x --show\nh = model.transformer.h[0].output.save()\n").raise_error()
    views = [d for d in shown if "application/vnd.jupyter.widget-view+json" in d]
    assert len(views) == 1
    table = views[0]["text/plain"]
    h = shell.user_ns["h"]
    assert table.startswith(f"h: [1, 5, 32] float32  mean {h.mean().item():.4g}".replace("e-0", "e-"))
    assert "<b>h</b>" in views[0]["text/html"]


def test_nnsight_line_magic(shell, gpt2, capsys):
    shell.user_ns.update(raw=gpt2)
    shell.run_cell("%nnsight help").raise_error()
    assert "%nnsight tree MODEL" in capsys.readouterr().out
    shown = []
    shell.display_pub.publish = lambda data, **kw: shown.append(data)
    shell.run_cell("%nnsight tree raw").raise_error()
    tree = shown[-1]["text/plain"]
    assert tree.startswith("model: GPT2LMHeadModel") and "h.0–1: 2 × GPT2Block" in tree
    from nnsight_jupyter.remote.config import CONFIG

    shell.run_cell("%nnsight config host=http://127.0.0.1:9 api_key=abc").raise_error()
    try:
        assert CONFIG.resolved_host() == "http://127.0.0.1:9" and CONFIG.resolved_api_key() == "abc"
        result = shell.run_cell("%nnsight status")
        assert str(result.error_in_exec).startswith(
            "Cannot reach the nnsight-jupyter server at http://127.0.0.1:9: nothing listens at 127.0.0.1:9 "
            "(connection refused). Check that it is running"
        )
    finally:
        CONFIG.host = CONFIG.api_key = None
    result = shell.run_cell("%nnsight config colour=blue")
    assert "Unknown setting 'colour'" in str(result.error_in_exec)
    result = shell.run_cell("%nnsight frobnicate")
    assert "Unknown %nnsight command 'frobnicate'" in str(result.error_in_exec)


def test_module_path_completion(shell, gpt2):
    shell.user_ns["m"] = NNsight(gpt2)
    block_children = [name for name, _ in gpt2.transformer.h[0].named_children()]
    assert complete_module_paths(shell, "m.transformer.h[0].")[: len(block_children)] == block_children
    assert complete_module_paths(shell, "x = m.transformer.h[1].a")[0] == "attn"
    assert complete_module_paths(shell, "m.transformer.zz[0].") == []
    assert "source" in complete_module_paths(shell, "m.transformer.h[0].attn.so")
    # GPT2Attention.forward calls self.c_attn twice (cross- and self-attention branches), then self.c_proj
    assert complete_module_paths(shell, "m.transformer.h[0].attn.source.self_c") == [
        "self_c_attn_0", "self_c_attn_1", "self_c_proj_0"]
    from IPython.core.completer import provisionalcompleter

    text = "m.transformer.h[0].ml"
    with provisionalcompleter():
        completions = [c.text for c in shell.Completer.completions(text, len(text))]
    assert any(c.endswith("mlp") for c in completions)


def _completions(shell, cell):
    from IPython.core.completer import provisionalcompleter

    with provisionalcompleter():
        return [c.text for c in shell.Completer.completions(cell, len(cell))]


def test_completions_come_in_forward_order_with_exact_prefixes_first(shell, gpt2):
    """What the front end lists, in its order: child modules as `named_modules()` has them, not alphabetically."""
    shell.user_ns["m"] = NNsight(gpt2)
    shell.user_ns.pop("model", None)
    top = [name for name, _ in gpt2.transformer.named_children()]
    assert top != sorted(top)  # so the order below is the forward's, not the alphabet's
    assert _completions(shell, '%%trace m "hi"\nh = model.transformer.')[: len(top)] == top
    block = [name.split(".")[-1] for name, _ in gpt2.transformer.h[0].named_modules() if name.count(".") == 0 and name]
    assert _completions(shell, "m.transformer.h[1].")[: len(block)] == block
    # `.c`: names starting with "c" first (children in forward order), then those holding a "c" elsewhere.
    mlp = [name for name, _ in gpt2.transformer.h[0].mlp.named_children()]
    offered = _completions(shell, "m.transformer.h[0].mlp.c")
    starts = [n for n in offered if n.startswith("c")]
    assert offered[: len(starts)] == starts and starts[:2] == [n for n in mlp if n.startswith("c")]
    rest = offered[len(starts):]
    assert rest and all("c" in n.lower() for n in rest)
    assert rest[0] == next(n for n in mlp if not n.startswith("c") and "c" in n)  # a child first: `act`
    assert all(hasattr(gpt2.transformer.h[0].mlp, n) or n in ("source", "call") for n in offered)


def test_the_trace_header_completes_registry_models_first(shell, gpt2):
    from nnsight_jupyter.models.registry import available

    registry = [m.name for m in available()]
    for name in [n for n, v in shell.user_ns.items() if isinstance(v, (NNsight, torch.nn.Module))]:
        del shell.user_ns[name]
    shell.user_ns.update(gpt=NNsight(gpt2), raw_block=gpt2.transformer.h[0], not_a_model=3)
    assert _completions(shell, "%%trace ") == registry + ["gpt", "raw_block"]
    assert _completions(shell, "%%trace g") == [n for n in registry if n.startswith("g")] + ["gpt"]
    # Once the model is written, the prompt is not completed from the model list.
    assert "smollm2" not in _completions(shell, "%%trace smollm2 sm")


def test_module_path_completion_in_a_trace_cell_body(shell, gpt2):
    """Inside `%%trace m`, `model` is m's envoy: the body completes as the trace will run it."""
    shell.user_ns["m"] = NNsight(gpt2)
    shell.user_ns.pop("model", None)
    from IPython.core.completer import provisionalcompleter

    cell = '%%trace m "hello"\nh = model.transformer.h[0].ml'
    with provisionalcompleter():
        completions = [c.text for c in shell.Completer.completions(cell, len(cell))]
    children = [name for name, _ in gpt2.transformer.h[0].named_children()]
    assert "mlp" in children and any(c.endswith("mlp") for c in completions)
    # Outside a %%trace cell, `model` is not known, so nothing is offered from the envoy.
    plain = "h = model.transformer.h[0].ml"
    with provisionalcompleter():
        assert not [c.text for c in shell.Completer.completions(plain, len(plain)) if c.text.endswith("mlp")]


def test_registry_models_are_loaded_once_per_kernel(shell, monkeypatch):
    from nnsight_jupyter.models.language import LanguageModel

    loads = []
    original = LanguageModel._from_pretrained

    def counting(self):
        loads.append(1)
        return original(self)

    monkeypatch.setattr(LanguageModel, "_from_pretrained", counting)
    magics = shell._nnsight_jupyter[0]
    magics._models.pop("smollm2", None)
    for _ in range(2):
        shell.run_cell('%%trace smollm2 "The capital of France is"\n'
                       "top = model.lm_head.output[0, -1].argmax().item()\n").raise_error()
    assert loads == [1]
    assert magics._models["smollm2"].tokenizer.decode([shell.user_ns["top"]]) == " Paris"


def test_a_missing_model_says_what_is_available(shell):
    result = shell.run_cell('%%trace no-such-model-anywhere "x"\nmodel.lm_head.output\n')
    message = str(result.error_in_exec)
    assert "no-such-model-anywhere" in message and "smollm2" in message


def test_an_error_shows_the_cell_and_line_not_the_engine(shell, gpt2, capsys):
    from nnsight_jupyter.settings import CONFIG

    shell.user_ns.update(raw=gpt2, x=torch.randint(1, 97, (1, 4)))
    cell = "%%trace raw x\nh = model.transformer.h[0].output\nbad = len(h) + zero_of_wrong_kind\n"
    shell.user_ns["zero_of_wrong_kind"] = "0"  # a TypeError raised by Python, in the user's line
    number = shell.execution_count
    shell.run_cell(cell, store_history=True)
    shown = re.sub(r"\x1b\[[0-9;]*m", "", capsys.readouterr().out)
    assert f"Cell In[{number}], line 3" in shown and "bad = len(h) + zero_of_wrong_kind" in shown
    assert "TypeError" in shown
    for engine_file in ("interleave.py", "tracer.py", "magics.py", "hooks.py", "backend.py"):
        assert engine_file not in shown, shown
    CONFIG.APP.DEBUG = True  # nnsight's switch: the engine's frames too
    try:
        shell.run_cell(cell, store_history=True)
        debug = re.sub(r"\x1b\[[0-9;]*m", "", capsys.readouterr().out)
    finally:
        CONFIG.debug = None
    assert "interleave.py" in debug and "bad = len(h) + zero_of_wrong_kind" in debug



@pytest.mark.parametrize(("cell", "accepted"), [
    ('%%trace m "hello"\nh = model.transformer.h[0].ml', '%%trace m "hello"\nh = model.transformer.h[0].mlp'),
    ("x = m.transformer.h[1].ml", "x = m.transformer.h[1].mlp"),
    ("m.transformer.h[-1].at", "m.transformer.h[-1].attn"),
    ("m.transformer.ln", "m.transformer.ln_f"),
    ("m.lm", "m.lm_head"),
])
def test_an_accepted_completion_gives_the_path(shell, gpt2, cell, accepted):
    """What a front end does with a completion (put its text in place of start:end) must give the path."""
    assert accepted.rsplit(".", 1)[-1] in {name.rsplit(".", 1)[-1] for name, _ in gpt2.named_modules()}
    shell.user_ns["m"] = NNsight(gpt2)
    shell.user_ns.pop("model", None)
    from IPython.core.completer import provisionalcompleter

    with provisionalcompleter():
        completions = list(shell.Completer.completions(cell, len(cell)))
    applied = [cell[: c.start] + c.text + cell[c.end :] for c in completions]
    assert accepted in applied, applied[:10]
