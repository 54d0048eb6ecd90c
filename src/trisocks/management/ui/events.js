// Events: what happened, newest first, filtered by type, user and token; live while the
// box is ticked.

import { get } from "./api.js";
import { el, replace, field } from "./util.js";

export const title = "Events";
let parts = null;
let lastQuery = ""; // what was fetched last
let lastStamp = ""; // and what it showed

export function mount(main, ctx) {
  const type = el("select", { id: "event-type" }, el("option", { value: "", text: "any" }),
    (ctx.session.event_types || []).map((t) => el("option", { value: t, text: t })));
  const user = el("input", { id: "event-user", type: "search", placeholder: "name or key", autocomplete: "off" });
  const token = el("input", { id: "event-token", type: "search", autocomplete: "off" });
  const liveBox = el("input", { id: "event-live", type: "checkbox", checked: true });
  const changed = () => { lastQuery = ""; lastStamp = ""; ctx.refresh(); };
  type.addEventListener("change", changed);
  user.addEventListener("change", changed);
  token.addEventListener("change", changed);
  liveBox.addEventListener("change", changed);
  parts = { type, user, token, liveBox, table: el("div", { id: "event-table" }), count: el("p", { class: "small muted" }) };
  main.append(el("h1", { text: "Events" }),
    el("form", { class: "toolbar", onsubmit: (ev) => { ev.preventDefault(); changed(); } },
      field("Type", type), field("User", user), field("Token", token),
      el("div", { class: "field check" }, liveBox, el("label", { for: "event-live", text: "Live" })),
      el("button", { type: "submit", text: "Apply" })),
    parts.count, parts.table);
}

export async function refresh() {
  if (!parts) return;
  const q = new URLSearchParams({ limit: "200" });
  if (parts.type.value) q.set("type", parts.type.value);
  if (parts.user.value.trim()) q.set("user", parts.user.value.trim());
  if (parts.token.value.trim()) q.set("token", parts.token.value.trim());
  const key = q.toString();
  if (!parts.liveBox.checked && key === lastQuery) return;
  lastQuery = key;
  const data = await get(`/api/events?${key}`);
  const events = [...data.events].reverse();
  const stamp = `${key}#${events.length ? events[0].id : 0}`;
  if (stamp === lastStamp) return;
  lastStamp = stamp;
  parts.count.textContent = `${events.length} newest matching events${parts.liveBox.checked ? ", live" : ", paused"}`;
  replace(parts.table, events.length
    ? el("table", { class: "events" },
      el("thead", {}, el("tr", {}, ["Time", "Type", "User", "Token", "Peer", "Detail"].map((h) => el("th", { scope: "col", text: h })))),
      el("tbody", {}, events.map((e) => el("tr", { "data-type": e.type },
        el("td", { "data-label": "Time", class: "nowrap", text: new Date(e.time).toLocaleString() }),
        el("td", { "data-label": "Type" }, el("span", { class: `badge ev ${e.type}`, text: e.type })),
        el("td", { "data-label": "User", text: e.user || "" }),
        el("td", { "data-label": "Token", class: "mono", text: e.token || "" }),
        el("td", { "data-label": "Peer", class: "mono", text: e.peer || "" }),
        el("td", { "data-label": "Detail", text: e.detail || "" })))))
    : el("p", { class: "muted", text: "No event matches." }));
}
