"""`model.generator.streamer.output`: the tokens of a generation as `generate` streams them.

The reference is a plain recorder passed as `streamer=` to the Hugging Face model's own `generate`:
it is handed the prompt's ids, then each step's new tokens.
"""

from __future__ import annotations

import pytest
import torch

from nnsight_jupyter import save
from nnsight_jupyter.errors import TraceError
from nnsight_jupyter.models.language import LanguageModel

PROMPT = "The capital of France is"
N = 4


class Recorder:
    def __init__(self) -> None:
        self.values: list[torch.Tensor] = []
        self.ended = False

    def put(self, value: torch.Tensor) -> None:
        self.values.append(value.clone())

    def end(self) -> None:
        self.ended = True


def streamed_by_hf(hf, tok, prompts, n=N):
    recorder = Recorder()
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left")  # as LanguageModel batches
    with torch.no_grad():
        hf.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id, streamer=recorder)
    return recorder.values


def test_each_step_reads_what_generate_streamed(tiny_hf, gpt2_tokenizer):
    _, hf = tiny_hf
    model = LanguageModel(hf, tokenizer=gpt2_tokenizer)
    with model.generate(PROMPT, max_new_tokens=N) as tracer:
        chunks = save([])
        for _ in tracer.iter[:N]:
            chunks.append(model.generator.streamer.output)
        ids = tracer.result.save()
    want = streamed_by_hf(hf, gpt2_tokenizer, PROMPT)
    n_prompt = len(gpt2_tokenizer(PROMPT).input_ids)
    assert [tuple(c.shape) for c in chunks] == [(1, n_prompt)] + [(1,)] * (N - 1)  # as nnsight documents
    for got, expected in zip(chunks, want, strict=False):
        assert torch.equal(got, expected)
    assert torch.equal(torch.cat([chunks[0][0], *chunks[1:]]), ids[0, : n_prompt + N - 1])


def test_each_invoke_reads_its_own_rows_and_a_users_streamer_still_gets_everything(tiny_hf, gpt2_tokenizer):
    _, hf = tiny_hf
    prompts = ["Hi there, my name is", PROMPT]
    model = LanguageModel(hf, tokenizer=gpt2_tokenizer)
    mine = Recorder()
    with model.generate(max_new_tokens=N, streamer=mine) as tracer:
        per_invoke = save([])
        for prompt in prompts:
            with tracer.invoke(prompt):
                steps = save([])
                for _ in tracer.iter[1:N]:
                    steps.append(model.generator.streamer.output)
                per_invoke.append(steps)
    want = streamed_by_hf(hf, gpt2_tokenizer, prompts)
    assert len(mine.values) == len(want) and mine.ended
    for got, expected in zip(mine.values, want, strict=True):
        assert torch.equal(got, expected)
    for row, steps in enumerate(per_invoke):
        assert [s.tolist() for s in steps] == [[w[row].item()] for w in want[1:N]]


def test_a_generation_that_never_names_the_streamer_runs_without_one(tiny_hf, gpt2_tokenizer, monkeypatch):
    _, hf = tiny_hf
    model = LanguageModel(hf, tokenizer=gpt2_tokenizer)
    given = []
    generate = hf.generate
    monkeypatch.setattr(hf, "generate", lambda *a, **k: (given.append("streamer" in k), generate(*a, **k))[1])
    with model.generate(PROMPT, max_new_tokens=2) as tracer:
        tracer.result.save()
    with model.generate(PROMPT, max_new_tokens=2):
        model.generator.streamer.output.save()
    assert given == [False, True]


def test_outside_a_generation_it_is_a_clear_error_and_generator_output_is_the_result(tiny_hf, gpt2_tokenizer):
    _, hf = tiny_hf
    model = LanguageModel(hf, tokenizer=gpt2_tokenizer)
    with pytest.raises(TraceError, match="only has a value inside a generation"):
        model.generator.streamer.output  # noqa: B018 - the read is the test
    with model.generate(PROMPT, max_new_tokens=2) as tracer:
        ids = model.generator.output.save()  # nnsight's older spelling of tracer.result
        result = tracer.result.save()
    streamed = streamed_by_hf(hf, gpt2_tokenizer, PROMPT, 2)
    assert torch.equal(ids, result)
    assert torch.equal(ids, torch.cat([streamed[0], *[v[:, None] for v in streamed[1:]]], dim=1))
