/**
 * Module-path search as the tree's search box does it.
 *
 * A query with `*`, `?` or `[` is a glob matched against the end of a dotted path, starting at a
 * component boundary: `layers.*.mlp` matches `model.layers.3.mlp` but not `model.layers.3.mlp.up`.
 * `*` stays within one component, `**` crosses dots. Any other query is a case-insensitive
 * substring of the path, the access expression (`model.layers[3].mlp`) or the class name.
 */

export type Matcher = (path: string, access: string, className: string) => boolean;

export function isGlob(query: string): boolean {
  return /[*?[]/.test(query);
}

export function globToRegExp(glob: string): RegExp {
  let out = "";
  for (let i = 0; i < glob.length; i++) {
    const ch = glob[i];
    if (ch === "*") {
      if (glob[i + 1] === "*") {
        out += ".*";
        i++;
      } else {
        out += "[^.]*";
      }
    } else if (ch === "?") {
      out += "[^.]";
    } else if (ch === "[") {
      const end = glob.indexOf("]", i + 1);
      if (end < 0) {
        out += "\\[";
      } else {
        const body = glob.slice(i + 1, end).replace(/^!/, "^").replace(/\\/g, "\\\\");
        out += `[${body}]`;
        i = end;
      }
    } else {
      out += ch.replace(/[.+^${}()|\\\]]/g, "\\$&");
    }
  }
  return new RegExp(`(^|\\.)${out}$`);
}

export function matcher(query: string): Matcher | null {
  const q = query.trim();
  if (!q) return null;
  if (isGlob(q)) {
    const re = globToRegExp(q);
    return (path) => re.test(path);
  }
  const lower = q.toLowerCase();
  return (path, access, className) =>
    path.toLowerCase().includes(lower) || access.toLowerCase().includes(lower) ||
    className.toLowerCase().includes(lower);
}
