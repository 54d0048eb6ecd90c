// Charts drawn as SVG from numbers: a line chart of samples (throughput over the last
// minutes) and a bar chart of buckets (usage per hour). No library, no inline styles:
// colours come from classes in style.css.

import { svgEl, el } from "./util.js";

const W = 640;
const PAD = { left: 0, right: 0, top: 4, bottom: 0 };

// the SVG stretches to the width of its box (shapes only); the labels are HTML, so that
// they keep their size on a phone
function wrap(svg, top, span) {
  return el("figure", { class: "chart-box" },
    el("div", { class: "axis small", text: top }),
    svg,
    el("div", { class: "axis small row-between" }, el("span", { text: span }), el("span", { text: "now" })));
}

function frame(height, label) {
  const svg = svgEl("svg", { viewBox: `0 0 ${W} ${height}`, class: "chart", role: "img",
    "aria-label": label, preserveAspectRatio: "none" });
  const h = height - PAD.top - PAD.bottom;
  for (let i = 0; i <= 4; i += 1) {
    const y = PAD.top + (h * i) / 4;
    svg.append(svgEl("line", { x1: PAD.left, x2: W - PAD.right, y1: y, y2: y, class: "grid" }));
  }
  return svg;
}

function niceMax(v) {
  if (v <= 0) return 1;
  const p = 1024 ** Math.floor(Math.log(v) / Math.log(1024));
  const m = v / p;
  const steps = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024];
  return steps.find((s) => s >= m) * p;
}

// series: [{name, cls, values: [number]}], all of one length; newest last. slots: how many
// samples the width stands for (the span's), so a page open for 10 s fills only the right end.
export function lineChart({ series, height = 180, label, format, span, slots = 0 }) {
  const svg = frame(height, label);
  const n = Math.max(2, slots, ...series.map((s) => s.values.length));
  const max = niceMax(Math.max(0, ...series.flatMap((s) => s.values)));
  const h = height - PAD.top - PAD.bottom;
  const x = (i, len) => PAD.left + ((W - PAD.left - PAD.right) * (n - len + i)) / (n - 1);
  const y = (v) => PAD.top + h - (h * v) / max;
  let total = 0;
  for (const s of series) {
    if (!s.values.length) continue;
    total += s.values.reduce((a, b) => a + b, 0);
    const pts = s.values.map((v, i) => `${x(i, s.values.length).toFixed(1)},${y(v).toFixed(1)}`);
    const first = x(0, s.values.length).toFixed(1);
    const last = x(s.values.length - 1, s.values.length).toFixed(1);
    svg.append(svgEl("path", { d: `M${first},${y(0)} L${pts.join(" L")} L${last},${y(0)} Z`,
      class: `area ${s.cls}` }));
    svg.append(svgEl("polyline", { points: pts.join(" "), class: `line ${s.cls}` }));
  }
  svg.dataset.total = String(total);
  return wrap(svg, format(max), span);
}

// buckets: [{label, up, down}] oldest first; stacked bars
export function barChart({ buckets, height = 180, label, format, span }) {
  const svg = frame(height, label);
  const n = Math.max(1, buckets.length);
  const max = niceMax(Math.max(0, ...buckets.map((b) => b.up + b.down)));
  const h = height - PAD.top - PAD.bottom;
  const slot = (W - PAD.left - PAD.right) / n;
  let total = 0;
  buckets.forEach((b, i) => {
    total += b.up + b.down;
    const x = PAD.left + i * slot + slot * 0.15;
    const w = Math.max(1, slot * 0.7);
    const hd = (h * b.down) / max;
    const hu = (h * b.up) / max;
    const base = PAD.top + h;
    const title = svgEl("title", {});
    title.textContent = `${b.label}: ${format(b.down)} down, ${format(b.up)} up`;
    const g = svgEl("g", {});
    g.append(title);
    if (hd > 0) g.append(svgEl("rect", { x, y: base - hd, width: w, height: hd, class: "bar down" }));
    if (hu > 0) g.append(svgEl("rect", { x, y: base - hd - hu, width: w, height: hu, class: "bar up" }));
    svg.append(g);
  });
  svg.dataset.total = String(total);
  return wrap(svg, format(max), span);
}

export function legend(items) {
  return el("ul", { class: "legend small" },
    items.map(([cls, text]) => el("li", {}, el("span", { class: `swatch ${cls}`, "aria-hidden": "true" }), text)));
}

// A ring of samples kept between polls. ``count`` takes a byte counter: the sample is its
// growth per second since the last poll, so a burst shorter than a poll still shows.
export class Samples {
  constructor(size) {
    this.size = size;
    this.values = [];
    this.last = null;
  }

  push(v) {
    this.values.push(v);
    if (this.values.length > this.size) this.values.shift();
  }

  count(total) {
    const now = performance.now();
    if (this.last && total >= this.last.total && now > this.last.at) {
      this.push(((total - this.last.total) * 1000) / (now - this.last.at));
    } else if (this.last) {
      this.push(0); // a reset: no rate to tell
    }
    this.last = { total, at: now };
  }
}
