// A minimal DOM and widget model, enough to run a view's render() under node and read what it shows.
class Node {
  constructor(tag, text = "") { this.tag = tag; this.children = []; this.text = text; this.className = "";
    this.style = { props: {}, setProperty: (k, v) => { this.style.props[k] = v; } }; }
  appendChild(child) { this.children.push(child); return child; }
  replaceChildren(...nodes) { this.children = nodes; }
  set textContent(value) { this.text = String(value); this.children = []; }
  get textContent() { return this.text + this.children.map((c) => c.textContent).join(""); }
  get ownerDocument() { return document; }
}
export const document = {
  createElement: (tag) => new Node(tag),
  createTextNode: (text) => new Node("#text", text),
};
export class Model {
  constructor(state) { this.state = { ...state }; this.handlers = {}; }
  get(name) { return this.state[name]; }
  set(name, value) { this.state[name] = value; (this.handlers[`change:${name}`] || []).forEach((f) => f()); }
  on(event, f) { (this.handlers[event] ||= []).push(f); }
  off(event, f) { this.handlers[event] = (this.handlers[event] || []).filter((g) => g !== f); }
}
export function element() { return new Node("div"); }
