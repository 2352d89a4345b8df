/**
 * Light or dark: views follow the notebook's theme.
 *
 * Colours of text, lines and backgrounds come from JupyterLab's CSS variables (with light
 * fallbacks elsewhere), so most of a view follows a theme switch by itself. Canvas drawings and
 * palettes need to know, so `isDark` reads the page: JupyterLab marks `<body data-jp-theme-light>`,
 * VS Code sets `vscode-dark` / `vscode-high-contrast` classes, and anything else is judged by the
 * luminance of the element's text colour (light text means a dark background).
 */

export function isDark(el: Element): boolean {
  const body = el.ownerDocument.body;
  const light = body.getAttribute("data-jp-theme-light");
  if (light === "true") return false;
  if (light === "false") return true;
  if (body.classList.contains("vscode-dark") || body.classList.contains("vscode-high-contrast")) return true;
  if (body.classList.contains("vscode-light")) return false;
  const colour = getComputedStyle(el).color.match(/\d+(\.\d+)?/g);
  if (!colour || colour.length < 3) return false;
  const [r, g, b] = colour.slice(0, 3).map(Number);
  return 0.2126 * r + 0.7152 * g + 0.0722 * b > 140;
}

/** Call `callback` whenever the page switches theme; returns a function that stops watching. */
export function onThemeChange(el: Element, callback: () => void): () => void {
  const observer = new MutationObserver(callback);
  observer.observe(el.ownerDocument.body, {
    attributes: true,
    attributeFilter: ["data-jp-theme-light", "data-jp-theme-name", "class"],
  });
  return () => observer.disconnect();
}

/** A CSS variable's value on `el` (or the fallback when the page does not define it). */
export function cssVar(el: Element, name: string, fallback: string): string {
  const value = getComputedStyle(el).getPropertyValue(name).trim();
  return value || fallback;
}
