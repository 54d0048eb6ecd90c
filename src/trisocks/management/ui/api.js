// The dashboard's only way to the server: the real API (/api/...) with the session cookie.
// Changes carry the session's CSRF token; an ended session goes back to the login page.

let csrf = "";

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export function setCsrf(token) {
  csrf = token;
}

let leaving = false; // set once the page goes to the login form: later 401s change nothing

export function toLogin(reason = "expired") {
  if (leaving) return;
  leaving = true;
  window.location.assign(`/ui/login?m=${reason}`);
}

// log-out: polls answered 401 meanwhile must not say "expired" instead
export async function logout() {
  leaving = true;
  try {
    await api("POST", "/ui/logout");
  } catch (err) {
    // an ended session is logged out already
  }
  window.location.assign("/ui/login?m=logout");
}

export async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  if (method !== "GET" && method !== "HEAD") headers["X-CSRF-Token"] = csrf;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, {
      method, headers, credentials: "same-origin", cache: "no-store",
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (err) {
    throw new ApiError(0, "the server cannot be reached");
  }
  let data = null;
  const type = response.headers.get("Content-Type") || "";
  if (type.includes("json")) {
    try { data = await response.json(); } catch (err) { data = null; }
  }
  if (response.status === 401) {
    toLogin("expired");
    throw new ApiError(401, (data && data.error) || "session ended");
  }
  if (!response.ok) {
    throw new ApiError(response.status, (data && data.error) || `HTTP ${response.status}`);
  }
  return data;
}

export const get = (path) => api("GET", path);
