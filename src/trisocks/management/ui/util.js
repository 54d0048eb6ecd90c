// Small helpers shared by the pages: building elements (text only, never HTML strings)
// and formatting bytes, rates and times.

export function el(tag, attrs = {}, ...children) {
  const node = tag === "svg" || attrs.svg
    ? document.createElementNS("http://www.w3.org/2000/svg", tag)
    : document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false || name === "svg") continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "class") node.setAttribute("class", value);
    else if (name === "text") node.textContent = value;
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function svgEl(tag, attrs = {}) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  return node;
}

const UNITS = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];

export function bytes(n) {
  if (n === null || n === undefined) return "–";
  let i = 0;
  let v = Number(n);
  while (Math.abs(v) >= 1024 && i < UNITS.length - 1) { v /= 1024; i += 1; }
  return `${i === 0 ? v.toFixed(0) : v.toFixed(v < 10 ? 2 : v < 100 ? 1 : 0)} ${UNITS[i]}`;
}

export function rate(n) {
  return `${bytes(n)}/s`;
}

export function when(iso) {
  if (!iso) return "never";
  const t = new Date(iso);
  return t.toLocaleString(undefined, { year: "numeric", month: "short", day: "numeric",
    hour: "2-digit", minute: "2-digit" });
}

export function ago(iso) {
  if (!iso) return "never";
  const s = (Date.now() - new Date(iso).getTime()) / 1000;
  if (s < 0) return `in ${duration(-s)}`;
  if (s < 5) return "just now";
  return `${duration(s)} ago`;
}

export function duration(s) {
  s = Math.round(s);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
}

export function clear(node) {
  while (node.firstChild) node.firstChild.remove();
  return node;
}

// Replace the children of ``node``; when the focused element was inside it and has a
// data-focus name, its new twin gets the focus, so that polling never steals the keyboard.
export function replace(node, ...children) {
  const active = document.activeElement;
  const name = active && node.contains(active) ? active.dataset.focus : undefined;
  clear(node);
  node.append(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
  if (name) {
    const twin = node.querySelector(`[data-focus="${CSS.escape(name)}"]`);
    if (twin) twin.focus();
  }
}

// a <label> and its control, as one block
export function field(label, control, hint) {
  if (!control.id) control.id = `f-${Math.random().toString(36).slice(2, 9)}`;
  return el("div", { class: "field" },
    el("label", { for: control.id, text: label }), control,
    hint ? el("span", { class: "hint small muted", text: hint }) : null);
}

export const GiB = 1024 ** 3;
export const MiB = 1024 ** 2;
