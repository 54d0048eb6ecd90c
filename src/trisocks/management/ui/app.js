// The dashboard's shell: the session, the pages (one per #hash), polling every 2 s,
// the health banner, messages, log-out.

import { get, logout, setCsrf, toLogin, ApiError } from "./api.js";
import { when } from "./util.js";
import * as overview from "./overview.js";
import * as users from "./users.js";
import * as tokens from "./tokens.js";
import * as events from "./events.js";

const PAGES = { overview, users, tokens, events };
const POLL_MS = 2000;
const main = document.getElementById("main");
const banner = document.getElementById("health-banner");
const toastBox = document.getElementById("toast");
let current = null;
let timer = null;
let toastTimer = null;
let busy = false;

const ctx = {
  session: null,
  // a message for the user: kind "error" for refused actions (the API's own words)
  toast(message, kind = "info") {
    toastBox.textContent = message;
    toastBox.className = `toast ${kind}`;
    toastBox.setAttribute("role", kind === "error" ? "alert" : "status");
    toastBox.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => { toastBox.hidden = true; }, kind === "error" ? 10000 : 4000);
  },
  // run a change; its refusal is shown, and the page refreshed either way
  async act(what, fn) {
    try {
      const result = await fn();
      if (what) ctx.toast(what, "ok");
      return result;
    } catch (err) {
      if (err instanceof ApiError && err.status !== 401) {
        ctx.toast(`Refused (${err.status || "no answer"}): ${err.message}`, "error");
      } else if (!(err instanceof ApiError)) {
        ctx.toast(`Error: ${err.message}`, "error");
      }
      return undefined;
    } finally {
      tick();
    }
  },
  refresh: () => tick(),
};

function route() {
  const hash = window.location.hash.replace(/^#/, "") || "overview";
  const [name, ...rest] = hash.split("/");
  const page = PAGES[name] ? name : "overview";
  for (const link of document.querySelectorAll("nav a")) {
    if (link.dataset.page === page) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  if (current !== page) {
    current = page;
    main.replaceChildren();
    document.title = `${PAGES[page].title} · trisocks`;
    PAGES[page].mount(main, ctx, rest.join("/"));
  } else if (PAGES[page].route) {
    PAGES[page].route(rest.join("/"));
  }
  tick();
}

async function health() {
  try {
    const r = await fetch("/healthz", { cache: "no-store", credentials: "same-origin" });
    const body = await r.json();
    if (body.status === "ok") {
      banner.hidden = true;
      return;
    }
    const failed = Object.entries(body.checks || {}).filter(([, v]) => v !== "ok").map(([k]) => k);
    banner.textContent = `The server is unhealthy: ${failed.join(", ") || "a check"} failing ` +
      "(see the server's log). /healthz answers 503.";
  } catch (err) {
    banner.textContent = "The server does not answer: it may be stopped or unreachable.";
  }
  banner.hidden = false;
}

async function tick() {
  clearTimeout(timer);
  if (busy) {
    timer = setTimeout(tick, 200);
    return;
  }
  busy = true;
  try {
    const [stats] = await Promise.all([get("/api/stats"), health()]);
    ctx.stats = stats;
    overview.record(stats);
    await PAGES[current].refresh(ctx);
  } catch (err) {
    if (!(err instanceof ApiError && err.status === 401)) {
      console.warn("refresh failed", err);
    }
  } finally {
    busy = false;
    timer = setTimeout(tick, POLL_MS);
  }
}

async function start() {
  try {
    ctx.session = await get("/ui/session");
  } catch (err) {
    if (!(err instanceof ApiError && err.status === 401)) toLogin("expired");
    return;
  }
  setCsrf(ctx.session.csrf_token);
  document.getElementById("session-info").textContent =
    `Session until ${when(ctx.session.expires_at)}`;
  document.getElementById("logout").addEventListener("click", logout);
  window.addEventListener("hashchange", route);
  route();
}

start();
