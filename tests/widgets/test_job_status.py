"""The JobStatus widget: what it keeps of a job's events, and its static HTML (the browser view: tests/browser)."""

from __future__ import annotations

import sys

from nnsight_jupyter.remote import client as client_module
from nnsight_jupyter.widgets import JobStatus


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
