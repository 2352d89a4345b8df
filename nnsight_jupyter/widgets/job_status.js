// Live view of one remote job; the Python side (job_status.py) feeds it server events.
const COLOURS = {
  submitted: "#6b7280", queued: "#b45309", loading: "#2563eb", running: "#2563eb",
  completed: "#15803d", error: "#b91c1c", cancelled: "#6b7280",
};

function text(doc, tag, className, value) {
  const node = doc.createElement(tag);
  if (className) node.className = className;
  node.textContent = value;
  return node;
}

export function describe(model) {
  const parts = [];
  const position = model.get("position");
  if (position !== null && position !== undefined) parts.push(`position ${position} in the queue`);
  const elapsed = model.get("elapsed");
  if (elapsed) parts.push(`${elapsed.toFixed(1)} s`);
  return parts.join(", ");
}

function render({ model, el }) {
  const doc = el.ownerDocument;
  const root = doc.createElement("div");
  root.className = "nnsj-job";
  el.appendChild(root);

  const draw = () => {
    const state = model.get("state");
    root.style.setProperty("--nnsj-colour", COLOURS[state] || COLOURS.submitted);
    root.replaceChildren();
    root.appendChild(text(doc, "span", "nnsj-state", state));
    root.appendChild(doc.createTextNode(" job "));
    root.appendChild(text(doc, "code", "", model.get("job_id")));
    const name = model.get("model");
    if (name) {
      root.appendChild(doc.createTextNode(" on "));
      root.appendChild(text(doc, "code", "", name));
    }
    const details = describe(model);
    if (details) root.appendChild(doc.createTextNode(`, ${details}`));
    const message = model.get("message");
    if (message) root.appendChild(text(doc, "div", "nnsj-message", message));
    const lines = model.get("lines") || [];
    if (lines.length) {
      const hidden = model.get("line_count") - lines.length;
      const more = hidden > 0 ? `(${hidden} earlier lines)\n` : "";
      root.appendChild(text(doc, "pre", "", more + lines.join("\n")));
    }
  };

  const names = ["state", "position", "elapsed", "lines", "line_count", "message", "job_id", "model"];
  for (const name of names) model.on(`change:${name}`, draw);
  draw();
  return () => {
    for (const name of names) model.off(`change:${name}`, draw);
  };
}

export default { render };
