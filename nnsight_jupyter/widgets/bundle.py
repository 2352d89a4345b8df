"""The views' front-end code, sent to the notebook once per kernel.

anywidget keeps a widget's `_esm` in its model state, so a notebook saved with widget state would
hold one copy of the 40 KB bundle per view (anywidget issue #613). Here every view's `_esm` is the
small `LOADER` below, and the bundle itself travels once, in one shared `ViewsBundle` model that
each view references through a widget trait. The loader imports the bundle's code from that model
(a blob URL, nothing fetched from the network) and caches the module per page by content hash.

The bundle is `static/views.js`, built from `labextension/src/views/` by `npm run build` (which
`pip install -e .`, building a wheel and `scripts/setup.sh` all run).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import ipywidgets
import traitlets

from ..errors import ViewsNotBuiltError

STATIC = Path(__file__).parent / "static" / "views.js"

LOADER = """\
const cache = (globalThis.__nnsight_jupyter_views ??= {});
async function load(model, host) {
  const ref = model.get("_bundle");
  let bundle = ref;
  if (typeof ref === "string") {
    const id = ref.startsWith("IPY_MODEL_") ? ref.slice(10) : ref;
    bundle = model.widget_manager ? await model.widget_manager.get_model(id) : await host.getModel(ref);
  }
  const hash = bundle.get("hash");
  if (!cache[hash]) {
    const url = URL.createObjectURL(new Blob([bundle.get("code")], { type: "text/javascript" }));
    cache[hash] = import(url).finally(() => URL.revokeObjectURL(url));
  }
  return cache[hash];
}
export default {
  async render(props) {
    try {
      const views = await load(props.model, props.host);
      return views.render(props);
    } catch (error) {
      props.el.textContent = "nnsight-jupyter: this view could not load its code (" + error + ").";
    }
  },
};
"""


class ViewsBundle(ipywidgets.Widget):
    """A plain widget model holding the views' JavaScript (`code`) and its `hash`."""

    code = traitlets.Unicode("").tag(sync=True)
    hash = traitlets.Unicode("").tag(sync=True)


_shared: ViewsBundle | None = None


def read_bundle() -> str:
    try:
        return STATIC.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ViewsNotBuiltError(
            f"The notebook views are not built ({STATIC} is missing). From a source checkout run "
            "`npm --prefix labextension ci && npm --prefix labextension run build` (or `pip install -e .`); "
            "a wheel from PyPI includes it."
        ) from None


def shared_bundle() -> ViewsBundle:
    """The kernel's one bundle model (made again if the file changed or the model was closed)."""
    global _shared
    code = read_bundle()
    digest = hashlib.sha256(code.encode()).hexdigest()[:16]
    if _shared is None or _shared.hash != digest or _shared.comm is None:
        _shared = ViewsBundle(code=code, hash=digest)
    return _shared
