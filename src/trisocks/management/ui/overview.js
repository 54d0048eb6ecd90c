// Overview: throughput over the last minutes, sessions, channels, users, providers per
// reverse token, health.

import { get } from "./api.js";
import { el, bytes, rate, duration, replace } from "./util.js";
import { lineChart, legend, Samples } from "./charts.js";

export const title = "Overview";
const KEEP = 150; // samples: 5 minutes at one per 2 s
const up = new Samples(KEEP);
const down = new Samples(KEEP);
let parts = null;

export function mount(main) {
  parts = {
    cards: el("div", { class: "cards", id: "overview-cards" }),
    chart: el("div", { id: "throughput-chart" }),
    providers: el("div", { id: "providers" }),
    busiest: el("div", { id: "busiest" }),
  };
  main.append(
    el("h1", { text: "Overview" }),
    parts.cards,
    el("section", { class: "panel", "aria-labelledby": "tp-h" },
      el("div", { class: "row-between" },
        el("h2", { id: "tp-h", text: "Throughput, last 5 minutes" }),
        legend([["down", "down (to users)"], ["up", "up (from users)"]])),
      parts.chart),
    el("div", { class: "two" },
      el("section", { class: "panel", "aria-labelledby": "pv-h" },
        el("h2", { id: "pv-h", text: "Reverse tokens: providers" }), parts.providers),
      el("section", { class: "panel", "aria-labelledby": "bu-h" },
        el("h2", { id: "bu-h", text: "Busiest users now" }), parts.busiest)),
  );
}

function card(label, value, sub, id) {
  return el("div", { class: "card", id },
    el("div", { class: "card-label small muted", text: label }),
    el("div", { class: "card-value", text: value }),
    sub ? el("div", { class: "small muted", text: sub }) : null);
}

// every tick, whatever page is shown (app.js): the chart covers the last minutes even
// when the overview was not open
export function record(stats) {
  up.count(stats.totals.bytes_up);
  down.count(stats.totals.bytes_down);
}

export async function refresh(ctx) {
  const stats = ctx.stats;
  const [server, health] = await Promise.all([
    get("/api/server/status"),
    fetch("/healthz", { cache: "no-store" }).then((r) => r.json()).catch(() => null),
  ]);
  if (!parts) return;
  const t = stats.totals;
  const online = stats.users.filter((u) => u.clients > 0).length;
  const ok = health && health.status === "ok";
  replace(parts.cards,
    card("Down now", rate(t.rate_down), `${bytes(t.bytes_down)} since start`, "card-down"),
    card("Up now", rate(t.rate_up), `${bytes(t.bytes_up)} since start`, "card-up"),
    card("Sessions", String(t.clients), "WebSocket clients", "card-sessions"),
    card("Channels", String(t.channels), "open connections", "card-channels"),
    card("Users", String(server.total_users), `${online} online`, "card-users"),
    el("div", { class: `card ${ok ? "good" : "bad"}`, id: "card-health" },
      el("div", { class: "card-label small muted", text: "Health" }),
      el("div", { class: "card-value", text: ok ? "OK" : "Failing" }),
      el("div", { class: "small muted", text: health
        ? Object.entries(health.checks).map(([k, v]) => `${k} ${v}`).join(", ") : "no answer" })),
    card("Uptime", duration(stats.uptime_seconds), `version ${server.version}`, "card-uptime"),
    card("Internal errors", String(stats.internal_errors), "since start", "card-errors"),
  );
  replace(parts.chart, lineChart({
    series: [{ cls: "down", values: down.values }, { cls: "up", values: up.values }],
    label: "Throughput over the last 5 minutes", format: rate, span: "5 min ago", slots: KEEP,
  }));
  const reverse = stats.tokens.filter((x) => x.type === "reverse");
  replace(parts.providers, reverse.length
    ? el("table", {},
      el("thead", {}, el("tr", {}, el("th", { text: "Token" }), el("th", { text: "Providers" }),
        el("th", { text: "Channels" }), el("th", { text: "Down now" }))),
      el("tbody", {}, reverse.map((x) => el("tr", {},
        el("td", { class: "mono", "data-label": "Token", text: x.token }),
        el("td", { "data-label": "Providers", text: String(x.providers ?? 0) }),
        el("td", { "data-label": "Channels", text: String(x.channels) }),
        el("td", { "data-label": "Down now", text: rate(x.rate_down) })))))
    : el("p", { class: "muted", text: "No reverse tokens." }));
  const busy = [...stats.users].sort((a, b) => (b.rate_down + b.rate_up) - (a.rate_down + a.rate_up))
    .filter((u) => u.rate_down + u.rate_up > 0 || u.channels > 0).slice(0, 8);
  replace(parts.busiest, busy.length
    ? el("table", {},
      el("thead", {}, el("tr", {}, el("th", { text: "User" }), el("th", { text: "Down" }),
        el("th", { text: "Up" }), el("th", { text: "Channels" }))),
      el("tbody", {}, busy.map((u) => el("tr", {},
        el("td", { "data-label": "User", text: u.name }),
        el("td", { "data-label": "Down", text: rate(u.rate_down) }),
        el("td", { "data-label": "Up", text: rate(u.rate_up) }),
        el("td", { "data-label": "Channels", text: String(u.channels) })))))
    : el("p", { class: "muted", text: "No user traffic right now." }));
}
