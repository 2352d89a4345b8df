"""SavedValues (%%trace --show, show(tracer)) and JobStatus in a real JupyterLab, against plain torch."""

from __future__ import annotations

import pytest
import torch

from .conftest import GPT2_SETUP, build_gpt2, screenshot
from .views import close, hover, hovered_value, stats, wait_drawn

PROMPT = "The capital of France is"

CELLS = [
    GPT2_SETUP + "\nfrom nnsight_jupyter import save\n%load_ext nnsight_jupyter",
    f'''
%%trace gpt "{PROMPT}" --show
h = model.transformer.h[1].output.save()
logits = model.lm_head.output[0, -1].save()
norms = save(h[0].norm(dim=-1).tolist())
''',
    '''
with torch.no_grad(), gpt.trace("Hello world") as tracer:
    attn_out = gpt.transformer.h[0].attn.output[0].save()
show(tracer)
''',
    '''
from nnsight_jupyter.widgets import JobStatus
job = JobStatus("job-42", "smollm2")
job.update({"type": "queued", "position": 3})
job
''',
    '''
job.update({"type": "running"})
for i in range(7):
    job.update({"type": "log", "line": f"step {i}"})
job.update({"type": "completed"})
''',
]


@pytest.fixture(scope="module")
def reference():
    model, tokenizer = build_gpt2()
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    seen = {}
    hook = model.transformer.h[1].register_forward_hook(lambda m, a, out: seen.setdefault("h", out))
    with torch.no_grad():
        logits = model(ids).logits
    hook.remove()
    h = seen["h"][0] if isinstance(seen["h"], tuple) else seen["h"]
    return {"h": h, "logits": logits[0, -1], "norms": h[0].norm(dim=-1),
            "tokens": [tokenizer.decode([i]) for i in ids[0].tolist()]}


@pytest.fixture(scope="module")
def notebook(open_notebook):
    return open_notebook("saved_values.ipynb", CELLS)


def table(notebook, cell):
    view = notebook.output(cell).locator('.nnsj-view[data-view="saved_values"]')
    view.wait_for()
    return view


def test_the_table_lists_what_the_trace_saved(notebook, reference):
    view = table(notebook, 1)
    rows = view.locator("tr.nnsj-row")
    assert rows.evaluate_all("(rs) => rs.map((r) => r.dataset.name)") == ["h", "logits", "norms"]
    for name, shape in [("h", list(reference["h"].shape)), ("logits", [50257]), ("norms", [len(reference["norms"])])]:
        row = view.locator(f'tr.nnsj-row[data-name="{name}"]')
        assert row.locator('[data-field="shape"]').inner_text() == f"[{', '.join(map(str, shape))}]"
        summary = row.locator('[data-field="summary"]').inner_text().split()
        value = reference[name].double()
        assert close(summary[1], float(value.mean()), 4) and close(summary[3], float(value.std()), 4), summary
    assert view.locator('tr[data-name="norms"] svg.nnsj-spark path').count() == 1
    assert view.locator('tr[data-name="h"] canvas.nnsj-mini').count() == 1
    screenshot(view, "saved_values", readme=True)


def test_a_row_opens_its_tensor_view_through_the_table(notebook, reference):
    page = notebook.page
    view = table(notebook, 1)
    view.locator('tr.nnsj-row[data-name="h"]').click()
    tensor = view.locator('tr.nnsj-open-row[data-name="h"] .nnsj-view[data-view="tensor"]')
    tensor.wait_for()
    h = reference["h"].double()
    labels = tensor.locator(".nnsj-hm-rows .nnsj-hm-label").evaluate_all("(ls) => ls.map((l) => l.title)")
    assert labels == [f"{i}: {t}" for i, t in enumerate(reference["tokens"])]  # saved before the next trace ran
    shown = stats(tensor)
    assert close(shown["min"], float(h.min()), 4) and close(shown["max"], float(h.max()), 4)
    # swap rows and columns: the new slice is asked for through the table's channel
    tensor.locator('select[data-role="rows"]').select_option("2")
    wait_drawn(page, tensor, [0, 0, 0], axes=(2, 1))
    heatmap = tensor.locator(".nnsj-heatmap")
    assert tensor.get_attribute("data-axes") == "2,1"
    text = hover(page, heatmap, 40, 3)  # row = dim 2 (hidden), column = dim 1 (position)
    assert abs(hovered_value(text) - float(reference["h"][0, 3, 40])) < 1e-5
    screenshot(view, "saved_values_open")


def test_show_tracer_after_a_with_block(notebook):
    view = table(notebook, 2)
    assert view.locator("tr.nnsj-row").evaluate_all("(rs) => rs.map((r) => r.dataset.name)") == ["attn_out"]


def test_job_status_follows_the_jobs_events(notebook):
    view = notebook.output(3).locator('.nnsj-view[data-view="job_status"]')
    view.wait_for()
    assert view.get_attribute("data-state") == "completed"
    assert view.locator(".nnsj-job-state").inner_text() == "completed"
    assert "job-42" in view.inner_text() and "smollm2" in view.inner_text()
    assert view.locator("pre").inner_text() == "(2 earlier lines)\n" + "\n".join(f"step {i}" for i in range(2, 7))
    screenshot(view, "job_status", readme=True)


def test_dark_theme(notebook):
    from .views import colours

    view = table(notebook, 1)
    job = notebook.output(3).locator('.nnsj-view[data-view="job_status"]')
    notebook.set_theme(dark=True)
    try:
        for element in (view, job):
            background, text = colours(element)
            assert background < 60 and text > 150
        screenshot(view, "saved_values_dark")
        screenshot(job, "job_status_dark")
    finally:
        notebook.set_theme(dark=False)
