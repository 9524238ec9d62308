// The console's only ways to the gateway: the admin API (with the session's CSRF header), the playground's
// chat, and one server-sent-events feed. A 401 anywhere opens the sign-in form over the page, so what was
// typed stays where it was, and the request is retried once signed in.
let csrf = "";
let who = null;
let signingIn = null;

export class ApiError extends Error {
  constructor(status, message, param, code) { super(message); this.status = status; this.param = param; this.code = code; }
}

async function errorOf(res) {
  let message = `${res.status} ${res.statusText}`;
  let param = null, code = null;
  try {
    const body = await res.json();
    if (body && body.error) { message = body.error.message || message; param = body.error.param; code = body.error.code; }
  } catch { /* not JSON: the status line says it */ }
  return new ApiError(res.status, message, param, code);
}

export async function request(method, path, body, { raw = false, signal } = {}) {
  for (let attempt = 0; ; attempt++) {
    const headers = { "X-Nebula-CSRF": csrf };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let res;
    try {
      res = await fetch(path, { method, headers, credentials: "same-origin", signal,
                                body: body === undefined ? undefined : JSON.stringify(body) });
    } catch (e) {
      if (e.name === "AbortError") throw e;
      throw new ApiError(0, "cannot reach the gateway; check the connection and retry");
    }
    if (res.status === 401 && attempt === 0 && !path.startsWith("/ui/login")) {
      const err = await errorOf(res);
      // An expired or revoked session says why; a first visit just asks for a key.
      await signIn(["session_expired", "session_revoked"].includes(err.code) ? err.message : "");
      continue;
    }
    if (!res.ok) throw await errorOf(res);
    return raw ? res : res.json();
  }
}

export const get = (path) => request("GET", path);
export const post = (path, body) => request("POST", path, body);
export const patch = (path, body) => request("PATCH", path, body);
export const del = (path) => request("DELETE", path);
export const whoami = () => who;

function adopt(session) {
  csrf = session.csrf;
  who = session.key;
  document.getElementById("who").textContent = who ? `${who.name} (${who.id})` : "open gateway";
}

// Shows the sign-in form over the page; resolves once signed in. Concurrent callers share one form.
export function signIn(why) {
  if (signingIn) return signingIn;
  const overlay = document.getElementById("login");
  const form = document.getElementById("login-form");
  const input = document.getElementById("login-key");
  const error = document.getElementById("login-error");
  document.getElementById("login-why").textContent = why || "Sign in with an admin API key.";
  error.textContent = "";
  overlay.hidden = false;
  document.querySelector("main").inert = true;
  input.focus();
  signingIn = new Promise((resolve) => {
    form.onsubmit = async (ev) => {
      ev.preventDefault();
      if (!input.value.trim()) { error.textContent = "Enter an admin API key."; input.focus(); return; }
      error.textContent = "";
      try {
        adopt(await request("POST", "/ui/login", { key: input.value }));
      } catch (e) {
        error.textContent = e.message;
        input.select();
        return;
      }
      input.value = "";
      overlay.hidden = true;
      document.querySelector("main").inert = false;
      signingIn = null;
      resolve();
    };
  });
  return signingIn;
}

export async function startSession() {
  adopt(await get("/ui/api/session"));
}

export async function signOut() {
  await request("POST", "/ui/logout", {}).catch(() => {});
  csrf = ""; who = null;
  await signIn("Signed out.");
}

// The live feed. EventSource reconnects by itself after a network error; a stream the server closed for
// an expired session is reopened after signing in again.
export function openFeed(handlers) {
  const banner = document.getElementById("banner");
  let source = null;
  let lost = null;
  const show = (text) => { banner.textContent = text; banner.hidden = !text; };
  const open = () => {
    source = new EventSource("/ui/api/events");
    source.onopen = () => { clearTimeout(lost); lost = null; show(""); };
    source.onerror = () => {
      if (!lost) lost = setTimeout(() => show("Connection to the gateway lost; reconnecting…"), 1500);
      if (source.readyState === EventSource.CLOSED) {
        source.close();
        // Closed for good: the session may be gone (401). Asking the session API signs in again if so.
        setTimeout(() => startSession().then(open, () => setTimeout(open, 3000)), 2000);
      }
    };
    for (const [kind, fn] of Object.entries(handlers)) {
      source.addEventListener(kind, (ev) => fn(JSON.parse(ev.data)));
    }
    source.addEventListener("expired", async (ev) => {
      source.close();
      await signIn(JSON.parse(ev.data).message);
      open();
    });
    source.addEventListener("trouble", (ev) => show(JSON.parse(ev.data).message));
  };
  open();
}
