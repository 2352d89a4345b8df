"""nnsight's idioms through the sandboxed server worker, checked against plain torch on the same model."""

from __future__ import annotations

import torch

from nnsight_jupyter import NNsight

from .conftest import Client, threads_like_workers, tokens, trace_request
from .tiny_models import tiny_gpt2


def test_backward_context_in_the_worker_matches_plain_autograd(server: Client):
    x = tokens(7, batch=2)
    source = (
        "h0 = model.transformer.h[0].output\n"
        "h1 = model.transformer.h[1].output\n"
        "loss = model.lm_head.output[:, -1].logsumexp(-1).sum()\n"
        "with loss.backward():\n"
        "    g1 = h1.grad.save()\n"
        "    h1.grad = h1.grad * 0.5\n"
        "    g0 = h0.grad.save()\n"
    )
    remote = server.run(trace_request(source, x))
    assert remote.error is None, remote.error

    module = tiny_gpt2()._model
    seen = {}
    hooks = [
        module.transformer.h[i].register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, o)) for i in (0, 1)
    ]
    with threads_like_workers():
        loss = module(x).logits[:, -1].logsumexp(-1).sum()
    for h in hooks:
        h.remove()
    raw = {}
    seen[1].register_hook(lambda g: raw.setdefault("g1", g) * 0.5)
    with threads_like_workers():
        (g0,) = torch.autograd.grad(loss, [seen[0]])
    assert torch.equal(remote.saved["g1"], raw["g1"])
    assert torch.equal(remote.saved["g0"], g0)


def test_skip_in_the_worker_matches_a_plain_hook(server: Client):
    x = tokens(8, batch=2)
    remote = server.run(trace_request("model.transformer.h[1].skip(model.transformer.h[1].input)\n"
                                      "logits = model.lm_head.output.save()\n", x))
    assert remote.error is None, remote.error
    module = tiny_gpt2()._model
    handle = module.transformer.h[1].register_forward_hook(lambda m, args, out: args[0])
    with torch.no_grad(), threads_like_workers():
        expected = module(x).logits
    handle.remove()
    assert torch.equal(remote.saved["logits"], expected)


def test_rename_aliases_apply_to_one_job_only(server: Client):
    x = tokens(9)
    source = "h = model.layers[1].ffn.output.save()\n"
    renamed = trace_request(source, x, aliases=[["", "layers", "transformer.h"], ["transformer.h.1", "ffn", "mlp"]])
    first = server.run(renamed)
    assert first.error is None, first.error
    module = tiny_gpt2()._model
    seen = {}
    handle = module.transformer.h[1].mlp.register_forward_hook(lambda m, a, out: seen.setdefault("mlp", out.detach()))
    with threads_like_workers():
        module(x)  # with gradients on, as the worker runs it
    handle.remove()
    assert torch.equal(first.saved["h"], seen["mlp"])
    plain = server.run(trace_request(source, x))  # the next job sees the model without those aliases
    assert plain.error is not None and plain.error.type_name == "ModulePathError"


def test_a_session_runs_as_one_job_in_the_worker(server: Client):
    a, b = tokens(10), tokens(11)
    source = (
        "with model.trace(a):\n"
        "    h = model.transformer.h[1].output\n"
        "with model.trace(b):\n"
        "    model.transformer.h[1].output[:, -1] = h[:, -1]\n"
        "    logits = model.lm_head.output.save()\n"
    )
    request = trace_request(source, kind="session")
    request.variables.update(a=a, b=b)
    result = server.run(request)
    assert result.error is None, result.error
    assert "h" not in result.saved or result.saved["h"] is None or not isinstance(result.saved["h"], torch.Tensor)

    module = tiny_gpt2()._model
    kept = {}
    block = module.transformer.h[1]

    def keep(mod, args, out):
        kept["h"] = out.detach().clone()

    def patch(mod, args, out):
        out = out.clone()
        out[:, -1] = kept["h"][:, -1]
        return out

    with threads_like_workers():
        handle = block.register_forward_hook(keep)
        module(a)
        handle.remove()
        handle = block.register_forward_hook(patch)
        expected = module(b).logits
        handle.remove()
    assert torch.equal(result.saved["logits"], expected)


def test_edits_sent_with_a_trace_apply_to_that_job_only(server: Client):
    x = tokens(12)
    edit = {"source": "model.transformer.h[1].mlp.output[:] = 0\n", "first_line": 1, "filename": "<edit>",
            "variables": {}, "modules": {}, "model_names": ["model"]}
    edited = server.run(trace_request("logits = model.lm_head.output.save()\n", x, edits=[edit]))
    assert edited.error is None, edited.error
    plain = server.run(trace_request("logits = model.lm_head.output.save()\n", x))
    module = tiny_gpt2()._model
    with threads_like_workers():
        handle = module.transformer.h[1].mlp.register_forward_hook(lambda m, a, out: torch.zeros_like(out))
        expected = module(x).logits
        handle.remove()
        clean = module(x).logits
    assert torch.equal(edited.saved["logits"], expected)
    assert torch.equal(plain.saved["logits"], clean)



def test_source_operations_in_the_worker_match_plain_calls(server: Client):
    x = tokens(7, batch=2)
    source = (
        "src = model.transformer.h[1].attn.source\n"
        "listing = str(src)\n"
        "inner = src.attention_interface_0.source\n"
        "inner_names = list(inner)\n"
        "module_is_envoy = src.attention_interface_0.input is model.transformer.h[1].attn\n"
        "attn_in = src.self_c_proj_0.input.save()\n"
        "src.self_c_proj_0.output = src.self_c_proj_0.output * 0.5\n"
        "logits = model.lm_head.output.save()\n"
    )
    remote = server.run(trace_request(source, x))
    assert remote.error is None, remote.error

    module = tiny_gpt2()._model
    seen = {}
    c_proj = module.transformer.h[1].attn.c_proj
    handles = [
        c_proj.register_forward_pre_hook(lambda m, args: seen.__setitem__("in", args[0].detach().clone())),
        c_proj.register_forward_hook(lambda m, args, out: out * 0.5),
    ]
    with torch.no_grad(), threads_like_workers():
        expected = module(x).logits
    for h in handles:
        h.remove()
    assert torch.equal(remote.saved["attn_in"], seen["in"])
    assert torch.equal(remote.saved["logits"], expected)
    assert remote.saved["module_is_envoy"] is True
    assert "self_c_proj_0" in remote.saved["listing"] and "self.c_proj(" in remote.saved["listing"]
    # The nested source was read in the worker, from the library's own file.
    assert any("scaled_dot_product_attention" in name for name in remote.saved["inner_names"])


def test_source_and_operations_named_outside_a_remote_trace_travel_by_path():
    model = NNsight(tiny_gpt2()._model, remote_id="tiny")
    x = tokens(6)
    src = model.transformer.h[0].attn.source  # bound outside the trace: sent as a path, resolved remotely
    proj = src.self_c_proj_0
    with model.trace(x, remote="local"):
        attn_in = proj.input.save()
        out = model.transformer.h[0].attn.output[0].save()
        same = src.self_c_proj_0 is proj

    seen = {}
    module = tiny_gpt2()._model
    attn = module.transformer.h[0].attn
    handles = [
        attn.c_proj.register_forward_pre_hook(lambda m, args: seen.__setitem__("in", args[0].detach().clone())),
        attn.register_forward_hook(lambda m, args, out: seen.__setitem__("out", out[0].detach().clone())),
    ]
    with torch.no_grad():
        module(x)
    for h in handles:
        h.remove()
    assert torch.equal(attn_in, seen["in"])
    assert torch.equal(out, seen["out"])
    assert same is True
