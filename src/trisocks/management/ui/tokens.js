// Tokens: every kind (forward, reverse, connector), their clients and providers, and
// adding and removing them (the LinkSocks-compatible token API).

import { api, get } from "./api.js";
import { el, bytes, rate, replace, field } from "./util.js";

export const title = "Tokens";
let ctx = null;
let parts = null;

export function mount(main, context) {
  ctx = context;
  const type = el("select", { name: "type", id: "token-type" },
    ["forward", "reverse", "connector"].map((t) => el("option", { value: t, text: t })));
  const token = el("input", { name: "token", id: "token-value", autocomplete: "off", spellcheck: "false",
    placeholder: "generated when empty" });
  const port = el("input", { name: "port", type: "number", min: "0", max: "65535", placeholder: "any free port" });
  const username = el("input", { name: "username", autocomplete: "off" });
  const password = el("input", { name: "password", type: "password", autocomplete: "new-password" });
  const manage = el("input", { name: "allow_manage_connector", type: "checkbox", id: "token-manage" });
  const reverse = el("select", { name: "reverse_token", id: "token-reverse" });
  const reverseOnly = el("div", { class: "form-grid nested" }, field("SOCKS5 port", port),
    field("SOCKS5 username", username, "optional"), field("SOCKS5 password", password, "optional"),
    el("div", { class: "field check" }, manage, el("label", { for: "token-manage", text: "Providers may add connector tokens (autonomy: no SOCKS5 port)" })));
  const connectorOnly = field("For reverse token", reverse);
  const form = el("form", { class: "form-grid", id: "token-form" },
    field("Kind", type), field("Token", token), reverseOnly, connectorOnly,
    el("div", { class: "field actions" }, el("button", { type: "submit", class: "primary", text: "Add token" })));
  const shape = () => {
    reverseOnly.hidden = type.value !== "reverse";
    connectorOnly.hidden = type.value !== "connector";
  };
  type.addEventListener("change", shape);
  shape();
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const body = { type: type.value, token: token.value.trim() };
    if (type.value === "reverse") {
      if (port.value) body.port = Number(port.value);
      if (username.value) body.username = username.value;
      if (password.value) body.password = password.value;
      if (manage.checked) body.allow_manage_connector = true;
    }
    if (type.value === "connector") body.reverse_token = reverse.value;
    const r = await ctx.act("Token added", () => api("POST", "/api/token", body));
    if (r) form.reset();
    shape();
  });
  parts = { table: el("div", { id: "token-table" }), reverse };
  main.append(el("h1", { text: "Tokens" }),
    el("p", { class: "muted small", text: "Users are not tokens: see Users. Tokens given with -t on the command line are listed too." }),
    parts.table,
    el("section", { class: "panel", "aria-labelledby": "nt-h" }, el("h2", { id: "nt-h", text: "Add a token" }), form));
}

export async function refresh(ctx) {
  const status = await get("/api/status");
  const stats = ctx.stats;
  if (!parts) return;
  const info = new Map(status.tokens.map((t) => [t.token, t]));
  const rows = stats.tokens;
  const reverseTokens = rows.filter((t) => t.type === "reverse").map((t) => t.token);
  const chosen = parts.reverse.value;
  replace(parts.reverse, reverseTokens.length
    ? reverseTokens.map((t) => el("option", { value: t, text: t, selected: t === chosen }))
    : el("option", { value: "", text: "(no reverse token)" }));
  if (!rows.length) {
    replace(parts.table, el("p", { class: "muted", text: "No tokens." }));
    return;
  }
  replace(parts.table, el("table", { class: "tokens" },
    el("thead", {}, el("tr", {}, ["Token", "Kind", "Clients", "SOCKS5 port", "Channels", "Traffic", "Now", ""]
      .map((h) => el("th", { scope: "col", text: h })))),
    el("tbody", {}, rows.map((t) => {
      const st = info.get(t.token) || {};
      const clients = t.type === "reverse" ? `${t.providers ?? 0} provider(s)` : String(t.clients);
      const port = t.type !== "reverse" ? "–" : st.port === -1 ? "none (autonomy)" : String(st.port ?? "–");
      const remove = el("button", { type: "button", class: "danger small-button", "data-focus": `rm-${t.token}`,
        "aria-label": `Remove token ${t.token}`, text: "Remove" });
      remove.addEventListener("click", () => {
        if (window.confirm(`Remove token ${t.token}? Its clients are disconnected.`)) {
          ctx.act("Token removed", () => api("DELETE", `/api/token/${encodeURIComponent(t.token)}`));
        }
      });
      return el("tr", { "data-token": t.token },
        el("td", { "data-label": "Token", class: "mono" }, t.token,
          st.connector_tokens ? el("div", { class: "small muted", text: `connectors: ${st.connector_tokens.join(", ")}` }) : null),
        el("td", { "data-label": "Kind" }, el("span", { class: `badge kind-${t.type}`, text: t.type })),
        el("td", { "data-label": "Clients", text: clients }),
        el("td", { "data-label": "SOCKS5 port", text: port }),
        el("td", { "data-label": "Channels", text: String(t.channels) }),
        el("td", { "data-label": "Traffic", text: `${bytes(t.bytes_down)} down, ${bytes(t.bytes_up)} up` }),
        el("td", { "data-label": "Now", text: `${rate(t.rate_down)} down` }),
        el("td", { "data-label": "" }, remove));
    }))));
}
