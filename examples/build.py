"""Write and execute the example notebooks.

    python examples/build.py          # regenerate every notebook in examples/
    python examples/build.py 03       # only the notebooks whose name contains "03"

Each notebook is defined below as a list of markdown / code cells. The script writes
`examples/NN_name.ipynb` with nbformat, runs it top to bottom with nbclient (kernel `python3`,
working directory `examples/`, 300 s per cell) and saves the executed notebook with its outputs.
"""

from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
KERNEL = "python3"
CELL_TIMEOUT = 300


def md(text: str) -> tuple[str, str]:
    return ("markdown", textwrap.dedent(text).strip("\n"))


def code(text: str) -> tuple[str, str]:
    return ("code", textwrap.dedent(text).strip("\n"))


NOTEBOOKS: dict[str, list[tuple[str, str]]] = {}

NOTEBOOKS["01_quickstart"] = [
    md('''
        # 01 · Quickstart

        Load the bundled SmolLM2-135M-Instruct, look at its module tree, run a first trace and read
        the model's next-token prediction straight from the `lm_head` output.

        `show(...)` draws a view in the notebook: here the module tree (30 identical decoder layers
        folded into one row; click a module to copy its path), then a saved tensor. In JupyterLab
        the views are interactive; a saved or exported notebook keeps a static picture of each.
    '''),
    code('''
        import torch
        from nnsight_jupyter import LanguageModel, show

        model = LanguageModel("smollm2")   # bundled weights, no download
        show(model)
    '''),
    md('''
        ## A first trace

        Inside `with model.trace(prompt):` every `.output` / `.input` is a real tensor of the running
        forward pass. Values marked with `.save()` are kept after the block.
    '''),
    code('''
        prompt = "The capital of France is"
        with torch.no_grad(), model.trace(prompt):
            hidden = model.layers[5].output.save()          # residual stream after layer 5
            logits = model.lm_head.output[0, -1].save()     # next-token logits at the last position

        print("tokens:", [model.tokenizer.decode(t) for t in model.tokenizer(prompt)["input_ids"]])
        print("layer 5 output:", tuple(hidden.shape))
        print("logits:", tuple(logits.shape))
    '''),
    md('''
        The residual stream after layer 5, position by hidden unit, with the prompt's tokens on its
        rows (the trace knows them). Hover a cell for its value; the histogram covers every value.
    '''),
    code('''
        show(hidden, name="hidden")
    '''),
    md('''
        ## Logits to the top-5 next tokens
    '''),
    code('''
        probs = logits.softmax(-1)
        top = probs.topk(5)
        for p, i in zip(top.values, top.indices):
            print(f"{model.tokenizer.decode(int(i))!r:>12}  {p.item():.3f}")
    '''),
    md('''
        ## The same trace as a `%%trace` cell

        With the extension loaded, a `%%trace MODEL "prompt"` cell *is* the trace body: `model` and
        `tracer` are defined in it, and saved values land in the notebook. `--show` adds a table of
        what the cell saved; click a row to open its tensor.
    '''),
    code('''
        %load_ext nnsight_jupyter
    '''),
    code('''
        %%trace model "The capital of France is" --show
        logits_magic = model.lm_head.output[0, -1].save()
    '''),
    code('''
        print("same logits as the with-block:", torch.equal(logits, logits_magic))
        print("top token:", repr(model.tokenizer.decode(int(logits_magic.argmax()))))
    '''),
]

NOTEBOOKS["02_activations"] = [
    md('''
        # 02 · Reading activations

        The residual-stream norm at every layer (one trace, one saved list), an attention pattern,
        and the model's top next tokens.
    '''),
    code('''
        import torch
        from nnsight_jupyter import LanguageModel, save

        model = LanguageModel("smollm2")
        prompt = "The capital of France is"
    '''),
    md('''
        ## Residual norm at every layer

        A plain `for` loop over `model.layers` inside the trace; `save([])` keeps the list.
    '''),
    code('''
        from nnsight_jupyter import show

        with torch.no_grad(), model.trace(prompt):
            norms = save([])
            for layer in model.layers:
                norms.append(layer.output[0, -1].norm().item())

        print("largest norm at layer", max(range(len(norms)), key=norms.__getitem__))
        show(norms, name="norm", labels={0: [f"layer {i}" for i in range(len(norms))]})
    '''),
    md('''
        ## The `%%trace` form of the same read
    '''),
    code('''
        %load_ext nnsight_jupyter
    '''),
    code('''
        %%trace model "The capital of France is"
        norms_magic = save([layer.output[0, -1].norm().item() for layer in model.layers])
    '''),
    code('''
        print("same norms:", norms_magic == norms)
    '''),
    md('''
        ## Attention pattern of one layer

        With `attn_implementation="eager"` the attention module returns `(output, weights)`;
        `weights` has shape `[batch, heads, query, key]`. Here: layer 3, one head at a time (the
        slider picks the head). Rows are query positions, columns key positions, both labelled with
        the prompt's tokens; most of the weight goes to the first token (an "attention sink"), the
        rest to recent tokens.
    '''),
    code('''
        eager = LanguageModel("smollm2", attn_implementation="eager")
        with torch.no_grad(), eager.trace(prompt):
            weights = eager.layers[3].attn.output[1].save()

        print("weights:", tuple(weights.shape))
        print("share of attention on the first token, mean over heads and queries:",
              round(weights[0, :, :, 0].mean().item(), 3))
        show(weights, name="weights")
    '''),
    md('''
        ## Top next tokens
    '''),
    code('''
        with torch.no_grad(), model.trace(prompt):
            probs = model.lm_head.output[0, -1].softmax(-1).save()
        top = probs.topk(5)
        for p, i in zip(top.values, top.indices):
            print(f"{model.tokenizer.decode(int(i))!r:>12}  {p.item():.3f}")
    '''),
]

NOTEBOOKS["03_patching"] = [
    md('''
        # 03 · Activation patching

        Clean prompt "The Eiffel Tower is in" vs corrupted "The Colosseum is in". We copy the clean
        run's residual stream at one (layer, position) into the corrupted run and watch P(" Paris").
        Both prompts tokenize to the same length, so positions line up one to one.
    '''),
    code('''
        import torch
        from nnsight_jupyter import LanguageModel, save

        model = LanguageModel("smollm2")
        clean, corrupted = "The Eiffel Tower is in", "The Colosseum is in"
        paris = model.tokenizer.encode(" Paris")[0]
        ids_clean = model.tokenizer(clean)["input_ids"]
        ids_corr = model.tokenizer(corrupted)["input_ids"]
        assert len(ids_clean) == len(ids_corr)
        print([model.tokenizer.decode(t) for t in ids_clean])
        print([model.tokenizer.decode(t) for t in ids_corr])
    '''),
    md('''
        ## Baselines
    '''),
    code('''
        def p_paris(prompt):
            with torch.no_grad(), model.trace(prompt):
                probs = model.lm_head.output[0, -1].softmax(-1).save()
            return probs[paris].item()

        p_clean, p_corr = p_paris(clean), p_paris(corrupted)
        print(f"P(' Paris') clean:     {p_clean:.4f}")
        print(f"P(' Paris') corrupted: {p_corr:.4f}")
    '''),
    md('''
        ## Patch one layer's last position

        Two invokes in **one** forward pass: invoke 1 reads the clean activation, invoke 2 writes it
        into the corrupted run. Everything after the patched layer sees the clean value.
    '''),
    code('''
        LAYER = 24
        with torch.no_grad(), model.trace() as tracer:
            with tracer.invoke(clean):
                h_clean = model.layers[LAYER].output[0, -1]
            with tracer.invoke(corrupted):
                model.layers[LAYER].output[0, -1] = h_clean
                p_patched = model.lm_head.output[0, -1].softmax(-1)[paris].save()

        print(f"P(' Paris') corrupted {p_corr:.4f} -> patched at layer {LAYER}, last position: {p_patched.item():.4f}")
    '''),
    md('''
        ## Layer × position sweep

        `patching_sweep` patches every (layer, position) cell, here every 3rd layer and every
        position, and runs many cells per forward pass. Each cell is P(" Paris") in the corrupted
        run after patching that single cell. `live_sweep` runs it with its heatmap on screen, the
        cells filling in as the chunks finish (`show(sweep)` draws the same view of a finished
        sweep). White is the corrupted baseline; the colour bar marks the clean run's value. Hover
        a cell for its value and both baselines, click it for that patched run's top tokens; the
        SVG and PNG buttons save the picture. The subject tokens carry the information through
        the early and middle layers; from about layer 24 it has moved to the last position, which
        is why the single patch above uses layer 24.
    '''),
    code('''
        from nnsight_jupyter.analysis import token_prob
        from nnsight_jupyter.widgets import live_sweep

        sweep = live_sweep(model, clean, corrupted, token_prob(" Paris"),
                           layers=range(0, len(model.layers), 3), progress=False)
    '''),
    code('''
        print(sweep)
        print("P(' Paris') patched at layer 24, last position:", round(sweep.value(24, -1), 4))
        print("top tokens there:", [(t, round(p, 3)) for t, p in sweep.top_tokens(24, -1)[:3]])
    '''),
]

NOTEBOOKS["04_cross_prompt"] = [
    md('''
        # 04 · Cross-prompt injection

        Take one prompt's activation and inject it into another prompt, in a single forward pass:
        the first invoke reads, the second writes, and both run as one batch.
    '''),
    code('''
        import torch
        from nnsight_jupyter import LanguageModel

        model = LanguageModel("smollm2")
        source = "The capital of France is"
        target = "The capital of Japan is"

        def top3(logits):
            top = logits.softmax(-1).topk(3)
            return ", ".join(f"{model.tokenizer.decode(int(i))!r} {p.item():.3f}" for p, i in zip(top.values, top.indices))
    '''),
    code('''
        with torch.no_grad(), model.trace() as tracer:
            with tracer.invoke(source):
                src_logits = model.lm_head.output[0, -1].save()
            with tracer.invoke(target):
                tgt_logits = model.lm_head.output[0, -1].save()
        print("source:", top3(src_logits))
        print("target:", top3(tgt_logits))
    '''),
    md('''
        ## Inject the source's last-position residual into the target

        The whole residual stream at the last position after layer 24 is swapped in (notebook 03
        shows the answer reaches the last position around there); from there on the target run
        "thinks" about France. At an earlier layer such as 12 the country is still held at the
        subject token, and the same injection barely changes the prediction.
    '''),
    code('''
        LAYER = 24
        with torch.no_grad(), model.trace() as tracer:
            with tracer.invoke(source):
                h = model.layers[LAYER].output[0, -1]
            with tracer.invoke(target):
                model.layers[LAYER].output[0, -1] = h
                injected = model.lm_head.output[0, -1].save()
        print(f"target with source layer-{LAYER} residual:", top3(injected))
    '''),
    md('''
        ## The same injection as a `%%trace` cell

        A `%%trace` cell traces one prompt (or runs its body once per prompt, as one invoke each).
        To inject across prompts from a cell, save the source activation first and use it as an
        ordinary notebook variable in the target's cell: two passes, same result.
    '''),
    code('''
        %load_ext nnsight_jupyter
    '''),
    code('''
        with torch.no_grad(), model.trace(source):
            h_source = model.layers[LAYER].output[0, -1].save()
    '''),
    code('''
        %%trace model "The capital of Japan is"
        model.layers[LAYER].output[0, -1] = h_source
        injected_magic = model.lm_head.output[0, -1].save()
    '''),
    code('''
        print("magic:", top3(injected_magic))
        print("same as the single-pass injection:", torch.allclose(injected, injected_magic, atol=1e-4))
    '''),
]

NOTEBOOKS["05_gradients"] = [
    md('''
        # 05 · Gradients

        The gradient of the target-token logit with respect to hidden states: `h.retain_grad()` on
        the activations, `backward()` inside the trace, and the gradients read afterwards.
        No `torch.no_grad()` here, since we want the graph.
    '''),
    code('''
        import torch
        from nnsight_jupyter import LanguageModel, save, show

        model = LanguageModel("smollm2")
        prompt = "The capital of France is"
        paris = model.tokenizer.encode(" Paris")[0]
    '''),
    md('''
        ## One layer
    '''),
    code('''
        with model.trace(prompt):
            h = model.layers[10].output
            h.retain_grad()
            logit = model.lm_head.output[0, -1, paris]
            logit.backward()
            grad = h.grad.save()
            logit = logit.save()

        print("logit of ' Paris':", round(logit.item(), 3))
        print("grad shape:", tuple(grad.shape))
        print("grad norm per position:", [round(x, 3) for x in grad[0].norm(dim=-1).tolist()])
    '''),
    md('''
        ## Gradient norm at every layer

        The same in one trace for all layers: keep each layer's output, retain its grad,
        backpropagate once.
    '''),
    code('''
        with model.trace(prompt):
            hs = [layer.output for layer in model.layers]
            for x in hs:
                x.retain_grad()
            model.lm_head.output[0, -1, paris].backward()
            grad_norms = save([x.grad[0].norm().item() for x in hs])

        print("largest gradient norm at layer", max(range(len(grad_norms)), key=grad_norms.__getitem__))
        show(grad_norms, name="grad norm", labels={0: [f"layer {i}" for i in range(len(grad_norms))]})
    '''),
    md('''
        ## The `%%trace` form
    '''),
    code('''
        %load_ext nnsight_jupyter
    '''),
    code('''
        %%trace model "The capital of France is"
        h = model.layers[10].output
        h.retain_grad()
        model.lm_head.output[0, -1, paris].backward()
        grad_magic = h.grad.save()
    '''),
    code('''
        print("same gradient:", torch.allclose(grad, grad_magic))
        model.zero_grad(set_to_none=True)   # parameter grads accumulated by the backward passes
    '''),
]

NOTEBOOKS["06_generation"] = [
    md('''
        # 06 · Generation and steering

        `model.generate` runs a trace over every generated step. A steering vector — the mean
        difference of layer-10 residuals between positive and negative sentences — is added at
        every step with `for step in tracer.all():`.
    '''),
    code('''
        import torch
        from nnsight_jupyter import LanguageModel

        model = LanguageModel("smollm2")
        prompt = "I think the movie was"
        LAYER = 10
    '''),
    md('''
        ## Plain generation
    '''),
    code('''
        with torch.no_grad(), model.generate(prompt, max_new_tokens=12) as tracer:
            plain = tracer.result.save()
        print(repr(model.decode(plain[0])))
    '''),
    md('''
        ## A steering vector

        Mean of each sentence's layer-10 residual over its tokens, positives minus negatives.
    '''),
    code('''
        positive = ["I love this, it is wonderful.", "What a great, happy day.", "This is excellent and delightful."]
        negative = ["I hate this, it is awful.", "What a terrible, sad day.", "This is horrible and disgusting."]

        def mean_residual(sentences):
            acts = []
            for s in sentences:
                with torch.no_grad(), model.trace(s):
                    acts.append(model.layers[LAYER].output[0].mean(0).save())
            return torch.stack(acts).mean(0)

        steering = mean_residual(positive) - mean_residual(negative)
        print("steering vector:", tuple(steering.shape), "norm", round(steering.norm().item(), 2))
    '''),
    md('''
        ## Steered generation

        The vector (scaled) is added to the last position's residual at every step.
    '''),
    code('''
        SCALE = 4.0
        def generate(vec):
            with torch.no_grad(), model.generate(prompt, max_new_tokens=12) as tracer:
                for step in tracer.all():
                    model.layers[LAYER].output[:, -1] += vec
                ids = tracer.result.save()
            return model.decode(ids[0])

        print("plain:   ", repr(model.decode(plain[0])))
        print("positive:", repr(generate(SCALE * steering)))
        print("negative:", repr(generate(-SCALE * steering)))
    '''),
    md('''
        ## The `%%trace` form

        `--max-new-tokens N` turns the cell into a generation.
    '''),
    code('''
        %load_ext nnsight_jupyter
        vec = SCALE * steering
    '''),
    code('''
        %%trace model "I think the movie was" --max-new-tokens 12
        for step in tracer.all():
            model.layers[LAYER].output[:, -1] += vec
        ids_magic = tracer.result.save()
    '''),
    code('''
        print("magic:   ", repr(model.decode(ids_magic[0])))
    '''),
]

NOTEBOOKS["07_remote"] = [
    md('''
        # 07 · Remote execution

        The same trace with `remote=True`. With no server configured, the first remote call starts
        a local backend daemon on 127.0.0.1 (about 20 s); the block's source and the values it reads
        are sent there, and the saved values come back.
    '''),
    code('''
        import torch
        from nnsight_jupyter import LanguageModel

        model = LanguageModel("smollm2")
        prompt = "The capital of France is"
        with torch.no_grad(), model.trace(prompt):
            local_hidden = model.layers[5].output.save()
            local_logits = model.lm_head.output[0, -1].save()
        print("local top token:", repr(model.tokenizer.decode(int(local_logits.argmax()))))
    '''),
    md('''
        ## `remote=True`
    '''),
    code('''
        import time
        t0 = time.perf_counter()
        with model.trace(prompt, remote=True, timeout=180):
            remote_hidden = model.layers[5].output.save()
            remote_logits = model.lm_head.output[0, -1].save()
        print(f"remote trace took {time.perf_counter() - t0:.1f} s")
        print("remote top token:", repr(model.tokenizer.decode(int(remote_logits.argmax()))))
        print("hidden equal:", torch.equal(local_hidden, remote_hidden))
        print("logits equal:", torch.equal(local_logits, remote_logits))
    '''),
    md('''
        ## `%%trace ... --remote`
    '''),
    code('''
        %load_ext nnsight_jupyter
    '''),
    code('''
        %%trace smollm2 "The capital of France is" --remote --timeout 180
        magic_logits = model.lm_head.output[0, -1].save()
    '''),
    code('''
        print("magic logits equal to local:", torch.equal(local_logits, magic_logits))
    '''),
    md('''
        ## Stop the daemon
    '''),
    code('''
        from nnsight_jupyter.remote.daemon import stop_daemon
        print("daemon stopped:", stop_daemon())
    '''),
]


NOTEBOOKS["08_logit_lens_attention"] = [
    md('''
        # 08 · Logit lens and attention patterns

        Two analyses with views: what each layer of SmolLM2 would predict if the model stopped
        there, and how its attention heads look on one prompt.
    '''),
    code('''
        from nnsight_jupyter import LanguageModel, show
        from nnsight_jupyter.analysis import attention_patterns, logit_lens

        model = LanguageModel("smollm2")
    '''),
    md('''
        ## Logit lens

        `logit_lens` reads every layer's residual stream in one trace and applies the model's own
        final norm and unembedding, keeping the top 5 tokens per layer and position and the
        probability and rank of a target token. The view shows the top token of every cell,
        coloured by its probability (hover for the top 5); "colour by" switches to the target's
        probability or rank. Two prompts sit side by side: " Paris" rises in the late layers of
        the Eiffel Tower prompt and stays low for the Colosseum.
    '''),
    code('''
        eiffel = logit_lens(model, "The Eiffel Tower is in the city of", target=" Paris")
        colosseum = logit_lens(model, "The Colosseum is in the city of", target=" Paris")
        show(eiffel, colosseum, titles=("Eiffel Tower", "Colosseum"))
    '''),
    code('''
        print(eiffel)
        ranks = eiffel.target_ranks[:, -1]
        first = next(layer for layer, rank in zip(eiffel.layers, ranks.tolist()) if rank == 1)
        print(f"' Paris' is first at the last position from layer {first}")
        print(f"P(' Paris') at the last layer: Eiffel {eiffel.target_probs[-1, -1]:.3f}, "
              f"Colosseum {colosseum.target_probs[-1, -1]:.3f}")
    '''),
    md('''
        ## Attention patterns

        `attention_patterns` returns `[layer, head, query, key]` probabilities, running eager
        attention for that one call (SmolLM2 normally runs SDPA, which does not return them). The
        view shows every head of a layer as a thumbnail with its previous-token score (mean
        attention to the token before) and first-token score (mean attention to position 0), and
        one head large; hover a thumbnail to preview it, click to keep it, hover a query token to
        see what it attends to. Here it opens on the head with the strongest previous-token score.
    '''),
    code('''
        att = attention_patterns(model, "When Mary and John went to the store, John gave a drink to")
        prev = att.previous_token_scores()
        flat = int(prev.argmax())
        layer, head = att.layers[flat // prev.shape[1]], flat % prev.shape[1]
        print(f"patterns: {tuple(att.patterns.shape)}")
        print(f"strongest previous-token head: layer {layer} head {head} ({float(prev.max()):.2f})")
        show(att, layer=layer, head=head)
    '''),
]


def make_notebook(cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": KERNEL, "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for kind, source in cells:
        cell = nbformat.v4.new_markdown_cell(source) if kind == "markdown" else nbformat.v4.new_code_cell(source)
        nb.cells.append(cell)
    return nb


def execute(nb: nbformat.NotebookNode, cwd: Path = HERE, timeout: int = CELL_TIMEOUT) -> nbformat.NotebookNode:
    """Run `nb` in place with a fresh `python3` kernel; raises CellExecutionError on the first error."""
    # No widget state in the files: the views' static pictures show on GitHub, and running the notebook
    # makes them live again.
    NotebookClient(nb, timeout=timeout, kernel_name=KERNEL, resources={"metadata": {"path": str(cwd)}},
                   store_widget_state=False).execute()
    return nb


def build(name: str) -> float:
    nb = make_notebook(NOTEBOOKS[name])
    nbformat.validate(nb)
    t0 = time.perf_counter()
    execute(nb)
    elapsed = time.perf_counter() - t0
    nbformat.write(nb, HERE / f"{name}.ipynb")
    return elapsed


def main(argv: list[str]) -> int:
    names = [n for n in NOTEBOOKS if not argv or any(a in n for a in argv)]
    if not names:
        print(f"no notebook matches {argv}; have {list(NOTEBOOKS)}", file=sys.stderr)
        return 1
    for name in names:
        print(f"{name}: {build(name):.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
