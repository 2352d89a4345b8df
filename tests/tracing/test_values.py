"""Reading values: `.output`, `.input`, `.inputs`, `model.output`, derived values and `.save()`."""

from __future__ import annotations

import pytest
import torch

import nnsight_jupyter
from nnsight_jupyter import NNsight
from nnsight_jupyter.errors import NotSavedError, TraceError

from .conftest import first_tensor, reference_run


def test_outputs_and_inputs_match_forward_hooks(arch):
    model = NNsight(arch.module)
    x = arch.make_input(2)
    ref_out, ref_in, ref_result = reference_run(arch.module, x, [arch.early, arch.late])
    early, late = model.resolve(arch.early), model.resolve(arch.late)
    with torch.no_grad(), model.trace(x):
        early_in = early.input.save()
        early_args, early_kwargs = early.inputs
        n_args = len(early_args)
        early_out = early.output.save()
        late_out = late.output.save()
        result = model.output.save()
    assert n_args == len(ref_in[arch.early][0][0])
    assert torch.equal(early_in, ref_in[arch.early][0][0][0])
    assert torch.equal(first_tensor(early_out), first_tensor(ref_out[arch.early][0]))
    assert torch.equal(first_tensor(late_out), first_tensor(ref_out[arch.late][0]))
    assert torch.equal(first_tensor(result), first_tensor(ref_result))


def test_values_work_with_torch_operations_and_python_control_flow(arch):
    model = NNsight(arch.module)
    x = arch.make_input(2)
    ref_out, _, _ = reference_run(arch.module, x, [arch.late])
    expected = first_tensor(ref_out[arch.late][0])
    late = model.resolve(arch.late)
    with torch.no_grad(), model.trace(x):
        h = first_tensor(late.output)
        mean = h.mean(dim=-1).save()
        last = h[:, -1].save()
        probs = torch.softmax(h, dim=-1).save()
        positive = (h > 0).sum().item()
        if positive > 0:
            branch = "some positive"
        else:
            branch = "none positive"
        count = 0
        for row in h:
            count += 1
    assert torch.equal(mean, expected.mean(dim=-1))
    assert torch.equal(last, expected[:, -1])
    assert torch.allclose(probs, torch.softmax(expected, dim=-1))
    assert positive == int((expected > 0).sum())
    assert branch == ("some positive" if positive > 0 else "none positive")
    assert count == expected.shape[0]


def test_print_inside_a_trace_shows_the_real_value(gpt2, capsys):
    model = NNsight(gpt2.module)
    x = gpt2.make_input(1)
    ref_out, _, _ = reference_run(gpt2.module, x, ["transformer.h.1"])
    with torch.no_grad(), model.trace(x):
        print("shape", tuple(model.transformer.h[1].output.shape))
    assert f"shape {tuple(ref_out['transformer.h.1'][0].shape)}" in capsys.readouterr().out


def test_save_function_keeps_python_objects(gpt2):
    model = NNsight(gpt2.module)
    x = gpt2.make_input(2)
    paths = [f"transformer.h.{i}" for i in range(3)]
    ref_out, _, _ = reference_run(gpt2.module, x, paths)
    with torch.no_grad(), model.trace(x):
        norms = nnsight_jupyter.save([])
        for layer in model.transformer.h:
            norms.append(layer.output.norm(dim=-1))
        shapes = {"first": model.lm_head.output.shape}
    assert len(norms) == 3
    for got, path in zip(norms, paths):
        assert torch.equal(got, ref_out[path][0].norm(dim=-1))
    assert shapes["first"] == (2, 7, 97)


def test_tuple_outputs_can_be_saved(gpt2):
    model = NNsight(gpt2.module)
    x = gpt2.make_input(1)
    ref_out, _, _ = reference_run(gpt2.module, x, ["transformer.h.0.attn"])
    with torch.no_grad(), model.trace(x):
        attn = model.transformer.h[0].attn.output.save()
    assert isinstance(attn, tuple)
    assert torch.equal(attn[0], ref_out["transformer.h.0.attn"][0][0])


def test_unsaved_names_fail_on_use_and_do_not_keep_stale_values(gpt2):
    model = NNsight(gpt2.module)
    x = gpt2.make_input(1)
    with torch.no_grad(), model.trace(x):
        hidden = model.transformer.h[0].output.save()
    stale = hidden
    with torch.no_grad(), model.trace(x):
        hidden = model.transformer.h[1].output
        width = model.transformer.h[1].output.shape[-1]
    assert width == 32  # plain Python values come back
    assert hidden is not stale
    with pytest.raises(NotSavedError, match=r"`hidden` was set inside the trace but not saved.*\.save\(\)"):
        hidden + 1
    with pytest.raises(NotSavedError):
        hidden.shape
    with pytest.raises(NotSavedError):
        torch.relu(hidden)
    with pytest.raises(NameError):  # still a NameError for code that catches that
        print(hidden)


def test_a_list_of_saved_values_comes_back_but_one_unsaved_item_spoils_it(gpt2):
    model = NNsight(gpt2.module)
    x = gpt2.make_input(1)
    ref_out, _, _ = reference_run(gpt2.module, x, ["transformer.h.0", "transformer.h.1"])
    with torch.no_grad(), model.trace(x):
        both = [model.transformer.h[i].output.save() for i in range(2)]
        mixed = [model.transformer.h[2].output.save(), model.transformer.h[2].output * 2]
    assert torch.equal(both[0], ref_out["transformer.h.0"][0])
    assert torch.equal(both[1], ref_out["transformer.h.1"][0])
    with pytest.raises(NotSavedError, match="`mixed`"):
        mixed[0]


def test_derived_values_and_aliases_of_saved_objects(gpt2):
    model = NNsight(gpt2.module)
    x = gpt2.make_input(1)
    ref_out, _, _ = reference_run(gpt2.module, x, ["transformer.h.2"])
    with torch.no_grad(), model.trace(x):
        h = model.transformer.h[2].output
        scaled = (h * 2).save()
        same = scaled
        doubled_norm = scaled.norm()
    assert torch.equal(scaled, ref_out["transformer.h.2"][0] * 2)
    assert same is scaled
    with pytest.raises(NotSavedError):
        float(doubled_norm)


def test_values_inside_a_function_come_back_to_its_locals(gpt2):
    model = NNsight(gpt2.module)
    x = gpt2.make_input(1)
    ref_out, _, _ = reference_run(gpt2.module, x, ["transformer.h.1"])

    def read(layer: int):
        with torch.no_grad(), model.trace(x):
            value = model.transformer.h[layer].output.save()
        return value

    assert torch.equal(read(1), ref_out["transformer.h.1"][0])


def test_output_outside_a_trace_explains_how_to_get_it(gpt2):
    model = NNsight(gpt2.module)
    with pytest.raises(TraceError, match=r"model\.transformer\.h\[0\]\.output only has a value inside a trace"):
        model.transformer.h[0].output
    with pytest.raises(Exception, match="only works inside a trace"):
        nnsight_jupyter.save(1)


def test_tree_navigation_mirrors_the_module(arch):
    model = NNsight(arch.module)
    assert model._model is arch.module
    for path, sub in arch.module.named_modules():
        assert model.resolve(path)._module is sub
    assert repr(model) == repr(arch.module)
    assert "torch.Size" not in repr(model)


def test_module_list_dict_and_sequential_access():
    from .conftest import NestedMLP

    net = NestedMLP()
    model = NNsight(net)
    assert model.blocks[1]["fc"]._module is net.blocks[1]["fc"]
    assert model.blocks[-1].norm._module is net.blocks[2]["norm"]
    assert [b._module for b in model.blocks] == list(net.blocks)
    assert len(model.blocks) == 3
    assert model.head[2]._module is net.head[2]
    assert [e._module for e in model.blocks[0:2]] == list(net.blocks)[0:2]
