// Users: the list (status, usage against the limit, expiry, last seen, devices online),
// search and filters, and one user's details: charts, subscription link and QR code, and
// every change the API offers (create, edit, disable/enable, reset, rotate, delete).

import { api, get } from "./api.js";
import { el, bytes, rate, when, ago, replace, field, GiB, MiB } from "./util.js";
import { lineChart, barChart, legend, Samples } from "./charts.js";

export const title = "Users";
const STATUSES = ["active", "disabled", "on_hold", "expired", "limited"];
let ctx = null;
let parts = null;
let list = [];
let selected = null; // {id, key, name}
let detail = null; // the open user's elements
const live = new Map(); // user id -> {up, down} Samples

function usageBar(user, big = false) {
  const used = user.bytes_up + user.bytes_down;
  const limit = user.limit_bytes;
  const pct = limit ? Math.min(100, (100 * used) / limit) : 0;
  const fill = el("div", { class: `fill ${pct >= 100 ? "full" : pct >= 80 ? "warn" : ""}` });
  fill.style.width = `${limit ? Math.max(pct, used > 0 ? 0.5 : 0) : 0}%`;
  const text = limit ? `${bytes(used)} of ${bytes(limit)} (${pct.toFixed(pct < 10 ? 1 : 0)}%)`
    : `${bytes(used)}, no limit`;
  return el("div", { class: `usage ${big ? "big" : ""}` },
    el("div", { class: "track", role: "progressbar", "aria-label": `Traffic used by ${user.name}`,
      "aria-valuemin": 0, "aria-valuemax": 100, "aria-valuenow": limit ? pct.toFixed(1) : null,
      "aria-valuetext": text, "data-percent": limit ? pct.toFixed(3) : "", "data-used": used }, fill),
    el("div", { class: "small muted", text }));
}

const badge = (status) => el("span", { class: `badge ${status}`, text: status.replace("_", " ") });

function userForm(user, onSubmit, submitText) {
  const name = el("input", { name: "name", autocomplete: "off", value: user ? user.name : "",
    pattern: "[A-Za-z0-9._@+\\-]{1,64}", spellcheck: "false" });
  const key = user ? null : el("input", { name: "key", autocomplete: "off", spellcheck: "false",
    placeholder: "generated when empty" });
  const unitGiB = user && user.limit_bytes && user.limit_bytes % GiB !== 0 ? false : true;
  const limit = el("input", { name: "limit", type: "number", min: "0", step: "any",
    inputmode: "decimal", placeholder: "no limit",
    value: user && user.limit_bytes ? String(user.limit_bytes / (unitGiB ? GiB : MiB)) : "" });
  const unit = el("select", { name: "unit", "aria-label": "Unit of the limit" },
    el("option", { value: "GiB", text: "GiB", selected: unitGiB }),
    el("option", { value: "MiB", text: "MiB", selected: !unitGiB }));
  const expiry = el("input", { name: "expires", type: "datetime-local",
    value: user && user.expires_at ? localInput(user.expires_at) : "" });
  const form = el("form", { class: "form-grid" },
    field("Name", name, user ? null : "generated when empty"),
    key ? field("Key", key, "8 to 128 of A-Z a-z 0-9 . _ ~ -") : null,
    el("div", { class: "field" }, el("label", { for: "lim-" + (user ? "e" : "n"), text: "Traffic limit" }),
      el("div", { class: "inline" }, limit, unit)),
    field("Expires", expiry, "empty: never"),
    el("div", { class: "field actions" }, el("button", { type: "submit", class: "primary", text: submitText })));
  limit.id = "lim-" + (user ? "e" : "n");
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const body = {};
    if (name.value.trim() || user) body.name = name.value.trim();
    if (key && key.value.trim()) body.key = key.value.trim();
    const n = limit.value.trim();
    body.limit_bytes = n === "" ? null : Math.round(Number(n) * (unit.value === "GiB" ? GiB : MiB));
    body.expires_at = expiry.value ? new Date(expiry.value).toISOString() : null;
    if (user && body.name === user.name) delete body.name;
    await onSubmit(body, form);
  });
  return form;
}

function localInput(iso) {
  const d = new Date(iso);
  const pad = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}T${pad(d.getHours())}:${pad(d.getMinutes())}`;
}

export function mount(main, context, rest) {
  ctx = context;
  const search = el("input", { type: "search", id: "user-search", placeholder: "name or key",
    autocomplete: "off", spellcheck: "false" });
  const status = el("select", { id: "user-status" }, el("option", { value: "", text: "any" }),
    STATUSES.map((s) => el("option", { value: s, text: s.replace("_", " ") })));
  const create = el("div", { class: "panel", id: "create-user", hidden: true },
    el("h2", { text: "New user" }),
    userForm(null, async (body, form) => {
      const user = await ctx.act("User created", () => api("POST", "/api/users", body));
      if (user) {
        form.reset();
        create.hidden = true;
        toggle.setAttribute("aria-expanded", "false");
        window.location.hash = `#users/${user.id}`;
      }
    }, "Create user"));
  const toggle = el("button", { type: "button", id: "new-user", class: "primary",
    "aria-expanded": "false", "aria-controls": "create-user", text: "New user" });
  toggle.addEventListener("click", () => {
    create.hidden = !create.hidden;
    toggle.setAttribute("aria-expanded", String(!create.hidden));
    if (!create.hidden) create.querySelector("input").focus();
  });
  search.addEventListener("input", () => render());
  status.addEventListener("change", () => ctx.refresh());
  parts = { search, status, count: el("p", { class: "small muted", id: "user-count" }),
    table: el("div", { id: "user-table" }), detail: el("div", { id: "user-detail" }) };
  main.append(el("h1", { text: "Users" }),
    el("div", { class: "toolbar" }, field("Search", search), field("Status", status), toggle),
    create, parts.detail, parts.count, parts.table);
  route(rest);
}

export function route(rest) {
  const id = rest || null;
  if (!id) {
    selected = null;
    detail = null;
    replace(parts.detail);
    return;
  }
  if (!selected || selected.id !== id) {
    const known = list.find((u) => u.id === id);
    selected = { id, key: known ? known.key : null };
    detail = null;
    replace(parts.detail);
  }
}

function render() {
  const q = parts.search.value.trim().toLowerCase();
  const shown = list.filter((u) => !q || u.name.toLowerCase().includes(q) || u.key.toLowerCase().includes(q));
  parts.count.textContent = `${shown.length} of ${list.length} users shown`;
  if (!shown.length) {
    replace(parts.table, el("p", { class: "muted", text: list.length ? "No user matches." : "No users yet." }));
    return;
  }
  replace(parts.table, el("table", { class: "users" },
    el("thead", {}, el("tr", {}, ["Name", "Status", "Usage", "Expires", "Last seen", "Online"]
      .map((h) => el("th", { scope: "col", text: h })))),
    el("tbody", {}, shown.map((u) => el("tr", { "data-user": u.name, class: selected && selected.id === u.id ? "current" : null },
      el("td", { "data-label": "Name" }, el("a", { href: `#users/${u.id}`, "data-focus": `open-${u.id}`, text: u.name })),
      el("td", { "data-label": "Status" }, badge(u.status)),
      el("td", { "data-label": "Usage", class: "usage-cell" }, usageBar(u)),
      el("td", { "data-label": "Expires", text: u.expires_at ? when(u.expires_at) : "never" }),
      el("td", { "data-label": "Last seen", text: ago(u.last_seen) }),
      el("td", { "data-label": "Online", text: u.clients ? `${u.live.devices.length} device(s), ${u.clients} session(s)` : "offline" }))))));
}

function openDetail(user) {
  const actions = {
    toggle: el("button", { type: "button", id: "user-toggle" }),
    reset: el("button", { type: "button", id: "user-reset", text: "Reset usage" }),
    rotate: el("button", { type: "button", id: "user-rotate", text: "Rotate key" }),
    edit: el("button", { type: "button", id: "user-edit", "aria-expanded": "false", "aria-controls": "user-edit-form", text: "Edit" }),
    remove: el("button", { type: "button", id: "user-delete", class: "danger", text: "Delete" }),
  };
  const d = {
    id: user.id, key: null, actions,
    head: el("div", { class: "row-between" }),
    facts: el("div", { class: "facts" }),
    usage: el("div", {}),
    liveChart: el("div", { id: "user-live-chart" }),
    hourChart: el("div", { id: "user-usage-chart" }),
    sub: el("div", { class: "subscription", id: "user-subscription" }),
    editBox: el("div", { id: "user-edit-form", class: "panel inset", hidden: true }),
  };
  actions.toggle.addEventListener("click", () => {
    const u = current();
    const next = u.status === "disabled" ? "active" : "disabled";
    ctx.act(next === "active" ? `${u.name} enabled` : `${u.name} disabled`,
      () => api("PATCH", `/api/users/${encodeURIComponent(u.key)}`, { status: next }));
  });
  actions.reset.addEventListener("click", () => {
    const u = current();
    if (window.confirm(`Zero the traffic counters of ${u.name}?`)) {
      ctx.act(`${u.name}: usage reset`, () => api("POST", `/api/users/${encodeURIComponent(u.key)}/reset`));
    }
  });
  actions.rotate.addEventListener("click", async () => {
    const u = current();
    if (!window.confirm(`Give ${u.name} a new key? The old one stops working at once.`)) return;
    const r = await ctx.act(`${u.name}: new key`, () => api("POST", `/api/users/${encodeURIComponent(u.key)}/rotate`));
    if (r) selected.key = r.key;
  });
  actions.remove.addEventListener("click", async () => {
    const u = current();
    if (!window.confirm(`Delete ${u.name}? Their key stops working at once.`)) return;
    const r = await ctx.act(`${u.name} deleted`, () => api("DELETE", `/api/users/${encodeURIComponent(u.key)}`));
    if (r) window.location.hash = "#users";
  });
  actions.edit.addEventListener("click", () => {
    const open = d.editBox.hidden;
    d.editBox.hidden = !open;
    actions.edit.setAttribute("aria-expanded", String(open));
    if (open) {
      const u = current();
      replace(d.editBox, el("h3", { text: `Edit ${u.name}` }), userForm(u, async (body) => {
        const r = await ctx.act(`${u.name} saved`, () => api("PATCH", `/api/users/${encodeURIComponent(current().key)}`, body));
        if (r) {
          d.editBox.hidden = true;
          actions.edit.setAttribute("aria-expanded", "false");
        }
      }, "Save"));
      d.editBox.querySelector("input").focus();
    }
  });
  const close = el("a", { href: "#users", class: "button", text: "Close" });
  replace(parts.detail, el("section", { class: "panel detail", "aria-labelledby": "ud-h" },
    d.head,
    el("div", { class: "detail-grid" },
      el("div", {}, d.facts, d.usage,
        el("div", { class: "actions", role: "group", "aria-label": "Actions" }, Object.values(actions)),
        d.editBox),
      el("div", {}, el("h3", { text: "Subscription" }), d.sub)),
    el("div", { class: "two" },
      el("div", {}, el("div", { class: "row-between" }, el("h3", { text: "Throughput, last 5 minutes" }),
        legend([["down", "down"], ["up", "up"]])), d.liveChart),
      el("div", {}, el("div", { class: "row-between" }, el("h3", { text: "Traffic per hour, last 24 h" }),
        legend([["down", "down"], ["up", "up"]])), d.hourChart)),
    el("div", { class: "actions" }, close)));
  d.close = close;
  return d;
}

function current() {
  return list.find((u) => u.id === selected.id) || detail.last;
}

function fact(label, value, cls) {
  return [el("dt", { text: label }), el("dd", { class: cls, text: value })];
}

async function refreshDetail() {
  let user = list.find((u) => u.id === selected.id);
  if (!user && selected.key) {
    try {
      user = await get(`/api/users/${encodeURIComponent(selected.key)}`);
    } catch (err) {
      user = null;
    }
  }
  if (!user) {
    replace(parts.detail, el("p", { class: "panel muted", text: "This user no longer exists." }));
    detail = null;
    return;
  }
  selected.key = user.key;
  if (!detail || detail.id !== user.id) detail = openDetail(user);
  detail.last = user;
  const d = detail;
  replace(d.head, el("h2", { id: "ud-h" }, user.name, " ", badge(user.status)));
  replace(d.facts, el("dl", {},
    fact("Key", user.key, "mono"),
    fact("Used", `${bytes(user.bytes_down)} down, ${bytes(user.bytes_up)} up`),
    fact("Limit", user.limit_bytes ? bytes(user.limit_bytes) : "none"),
    fact("Expires", user.expires_at ? `${when(user.expires_at)} (${ago(user.expires_at)})` : "never"),
    fact("Blocked", user.blocked || "no"),
    fact("Last seen", user.last_seen ? `${when(user.last_seen)} (${ago(user.last_seen)})` : "never"),
    fact("Now", `${rate(user.live.rate_down)} down, ${rate(user.live.rate_up)} up, ${user.connections} connection(s)`),
    fact("Devices", user.live.devices.length
      ? user.live.devices.map((x) => `${x.address} (${x.sessions} session${x.sessions === 1 ? "" : "s"}, since ${ago(x.since)})`).join("; ")
      : "none online"),
    fact("Created", when(user.created_at))));
  replace(d.usage, usageBar(user, true));
  d.actions.toggle.textContent = user.status === "disabled" ? "Enable" : "Disable";
  const s = live.get(user.id) || { up: new Samples(150), down: new Samples(150) };
  live.set(user.id, s);
  s.up.count(user.bytes_up);
  s.down.count(user.bytes_down);
  replace(d.liveChart, lineChart({ series: [{ cls: "down", values: s.down.values }, { cls: "up", values: s.up.values }],
    label: `Throughput of ${user.name} over the last 5 minutes`, format: rate, span: "5 min ago", height: 140, slots: 150 }));
  const hourMs = 3600 * 1000;
  const now = Date.now();
  const from = new Date(Math.floor(now / hourMs) * hourMs - 23 * hourMs);
  const usage = await get(`/api/users/${encodeURIComponent(user.key)}/usage?step=hour&from=${from.toISOString()}`);
  const byStart = new Map(usage.buckets.map((b) => [new Date(b.start).getTime(), b]));
  const buckets = [];
  for (let i = 0; i < 24; i += 1) {
    const t = from.getTime() + i * hourMs;
    const b = byStart.get(t);
    buckets.push({ label: new Date(t).toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit" }),
      up: b ? b.bytes_up : 0, down: b ? b.bytes_down : 0 });
  }
  replace(d.hourChart, barChart({ buckets, label: `Traffic of ${user.name} per hour`, format: bytes,
    span: "24 h ago", height: 140 }));
  if (d.key !== user.key) {
    d.key = user.key;
    const link = await get(`/ui/users/${encodeURIComponent(user.key)}/link`);
    replace(d.sub,
      el("img", { src: link.qr, alt: `QR code of the subscription link of ${user.name}`, class: "qr",
        id: "user-qr" }),
      el("p", { class: "small muted", text: "Subscription link (trisocks client --subscribe, or a panel-aware client):" }),
      el("code", { class: "link", id: "user-link", text: link.url }),
      link.share_link ? el("p", { class: "small muted" }, "Share link: ", el("code", { text: link.share_link })) : null);
  }
}

export async function refresh() {
  const status = parts.status.value;
  const data = await get(`/api/users${status ? `?status=${status}` : ""}`);
  list = data.users;
  render();
  if (selected) await refreshDetail();
}
