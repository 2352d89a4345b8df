"""The JobStatus widget: what it shows for a job's events, in the browser view and as static HTML."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path


from nnsight_jupyter.remote import client as client_module
from nnsight_jupyter.widgets import JobStatus

HERE = Path(__file__).parent
ESM = Path(sys.modules[JobStatus.__module__].__file__).with_name("job_status.js")


def _fed(events: list[dict]) -> JobStatus:
    widget = JobStatus("job-1", "smollm2")
    for event in events:
        widget.update(event)
    return widget


def test_events_move_the_widget_through_the_job():
    widget = _fed([{"type": "queued", "position": 3}])
    assert (widget.state, widget.position) == ("queued", 3)
    widget.update({"type": "queued", "position": 1})
    assert widget.position == 1
    widget.update({"type": "running"})
    assert (widget.state, widget.position) == ("running", None)
    for i in range(8):
        widget.update({"type": "log", "line": f"line {i}"})
    assert widget.lines == [f"line {i}" for i in range(3, 8)] and widget.line_count == 8
    assert not widget.finished
    widget.update({"type": "completed"})
    assert widget.state == "completed" and widget.finished and widget.message == ""


def test_an_error_shows_its_message():
    widget = _fed([{"type": "running"}, {"type": "error", "error": "NameError: name 'x' is not defined"}])
    assert widget.finished and "NameError" in widget.message
    assert "NameError" in widget.summary() and "NameError" in widget.to_html()


def test_static_html_escapes_what_the_job_printed():
    widget = _fed([{"type": "running"}, {"type": "log", "line": "<script>alert(1)</script> & more"}])
    page = widget.to_html()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt; &amp; more" in page
    assert "running" in page and "job-1" in page and "smollm2" in page


def test_the_display_bundle_has_the_widget_and_its_fallbacks():
    widget = _fed([{"type": "queued", "position": 2}])
    data, _ = widget._repr_mimebundle_()
    view = data["application/vnd.jupyter.widget-view+json"]
    assert view["model_id"] == widget.model_id
    assert data["text/plain"] == "nnsight-jupyter job job-1 (smollm2): queued, position 2 in the queue"
    assert "position 2 in the queue" in data["text/html"]


def _node_render(script: str) -> str:
    node = shutil.which("node")
    assert node is not None, "node is needed to run the widget's JavaScript (apt install nodejs)"
    done = subprocess.run([node, "--input-type=module", "-e", script], capture_output=True, text=True, timeout=60,
                          cwd=HERE)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_browser_view_renders_the_state_and_follows_changes():
    script = f"""
        import {{ document, Model, element }} from {json.dumps((HERE / 'fake_dom.mjs').as_uri())};
        globalThis.document = document;
        const view = (await import({json.dumps(ESM.as_uri())})).default;
        const model = new Model({{ job_id: "job-9", model: "gpt2", state: "queued", position: 4, elapsed: 0,
                                   lines: [], line_count: 0, message: "" }});
        const el = element();
        const cleanup = view.render({{ model, el }});
        const shown = [el.textContent];
        model.set("state", "running"); model.set("position", null); model.set("elapsed", 2.5);
        model.set("lines", ["hello"]); model.set("line_count", 1);
        shown.push(el.textContent);
        cleanup();
        model.set("state", "completed");
        shown.push(el.textContent);
        console.log(JSON.stringify(shown));
    """
    first, second, after_cleanup = json.loads(_node_render(script))
    assert "queued" in first and "job-9" in first and "gpt2" in first and "position 4 in the queue" in first
    assert "running" in second and "2.5 s" in second and "hello" in second and "position" not in second
    assert "completed" not in after_cleanup  # the cleanup function detached the view from the model


def test_a_notebook_gets_the_widget_and_a_terminal_the_text_line(monkeypatch, capsys):
    shown = []
    monkeypatch.setattr("IPython.display.display", lambda obj, **kw: shown.append(obj))
    monkeypatch.setattr(client_module, "_in_notebook", lambda: True)
    status = client_module._StatusDisplay("job-2", "smollm2")
    status.update({"type": "running"})
    status.update({"type": "completed"})
    status.close()
    assert isinstance(shown[0], JobStatus) and shown[0].state == "completed" and shown[0].model == "smollm2"

    monkeypatch.setattr(client_module, "_in_notebook", lambda: False)
    status = client_module._StatusDisplay("job-3")
    status.update({"type": "queued", "position": 1})
    status.close()
    assert "nnsight-jupyter job job-3: queued (position 1)" in capsys.readouterr().err


def test_without_anywidget_a_notebook_gets_an_updating_text_line(monkeypatch):
    shown = []

    class Handle:
        def update(self, obj):
            shown.append(obj)

    def display(obj, **kwargs):
        shown.append(obj)
        return Handle()

    monkeypatch.setattr("IPython.display.display", display)
    monkeypatch.setattr(client_module, "_in_notebook", lambda: True)
    monkeypatch.setitem(sys.modules, "nnsight_jupyter.widgets", None)  # as if anywidget were missing
    status = client_module._StatusDisplay("job-4")
    status.update({"type": "running"})
    assert [str(getattr(s, "data", s)) for s in shown] == ["nnsight-jupyter job job-4: submitted",
                                                          "nnsight-jupyter job job-4: running"]
