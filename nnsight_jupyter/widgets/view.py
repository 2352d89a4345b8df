"""What every view widget shares: the bundle loader, requests answered by id, static fallbacks.

A view is an anywidget whose `_view` names the front-end view (`labextension/src/views/index.ts`).
Its state is sent once when it is displayed; anything more (another slice, an opened row) is a
request `{id, kind, ...}` from the front-end, answered by `_handle` with a reply and binary buffers
sent back under the same id. A failed request answers `{id, ok: false, error}`, which the view
shows in place; the kernel keeps serving.

The display bundle also carries `text/html` (`_html`) and `text/plain` (`_text`), for places where
no widget can run: a notebook on GitHub, nbconvert's HTML, a terminal. A view whose first state
holds at most `SAVED_LIMIT` bytes of binary data also carries it as `VIEW_MIME` (buffers in base64),
which the JupyterLab extension draws when the widget's model is gone (a saved notebook reopened);
the limit keeps a notebook of many large tensors about as small as before (their static HTML
remains their saved form).
"""

from __future__ import annotations

import base64
import logging
from typing import Any

import anywidget
import traitlets
from ipywidgets import widget_serialization

from .bundle import LOADER, ViewsBundle, shared_bundle

log = logging.getLogger(__name__)

Buffers = list[Any]

VIEW_MIME = "application/vnd.nnsight-jupyter.view+json"
SAVED_LIMIT = 32 * 1024


class View(anywidget.AnyWidget):
    """Base of the notebook views. Subclasses set `_view` and implement `_handle`, `_html`, `_text`."""

    _esm = LOADER
    _view = traitlets.Unicode("").tag(sync=True)
    _bundle = traitlets.Instance(ViewsBundle, allow_none=True).tag(sync=True, **widget_serialization)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(_bundle=shared_bundle(), **kwargs)
        self.on_msg(self._on_request)

    def _on_request(self, _widget: Any, content: Any, buffers: Buffers) -> None:
        if not isinstance(content, dict) or not isinstance(content.get("id"), str):
            return
        request_id = content["id"]
        try:
            reply, out = self._handle(content, buffers)
        except Exception as exc:  # noqa: BLE001 - any failure goes back to the view, the kernel keeps serving
            log.debug("view request %r failed", content, exc_info=True)
            self.send({"id": request_id, "ok": False, "error": f"{type(exc).__name__}: {exc}"})
            return
        self.send({**reply, "id": request_id, "ok": True}, buffers=out)

    def _handle(self, content: dict[str, Any], buffers: Buffers) -> tuple[dict[str, Any], Buffers]:
        raise ValueError(f"{type(self).__name__} answers no request of kind {content.get('kind')!r}")

    def _html(self) -> str:
        return ""

    def _text(self) -> str:
        return repr(self)

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        bundle = super()._repr_mimebundle_(**kwargs)
        data, metadata = bundle if isinstance(bundle, tuple) else (bundle, {})
        data = dict(data or {})
        data["text/plain"] = self._text()
        page = self._html()
        if page:
            data["text/html"] = page
        saved = self._saved_state()
        if saved is not None:
            data[VIEW_MIME] = saved
        return data, metadata

    def _saved_state(self) -> dict[str, Any] | None:
        """The view's state for the extension's renderer, or None when its buffers exceed `SAVED_LIMIT`."""
        from ipywidgets.widgets.widget import _remove_buffers

        keys = [k for k in self.keys if k == "_view" or not k.startswith("_")]
        keys = [k for k in keys if k not in ("layout", "tabbable", "tooltip")]
        state, paths, buffers = _remove_buffers(self.get_state(keys))
        if sum(memoryview(b).nbytes for b in buffers) > SAVED_LIMIT:
            return None
        return {
            "view": self._view,
            "state": state,
            "buffer_paths": paths,
            "buffers": [base64.b64encode(memoryview(b).cast("B")).decode("ascii") for b in buffers],
        }
