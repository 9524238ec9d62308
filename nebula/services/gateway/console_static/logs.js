// A model's engine logs, live from every node that runs it (GET /ui/api/models/<name>/logs: server-sent
// events). Newest at the bottom; it follows unless the reader scrolled up; Pause holds new lines; at most
// KEEP lines stay in the page. Errors and warnings are marked by colour and by their level's name.
import { h } from "./ui.js";

const KEEP = 1000;
const LEVELS = ["emerg", "alert", "crit", "error", "warn", "notice", "info", "debug"];

export function logPanel(name) {
  const list = h("ol", { id: "model-logs", class: "log-lines", tabindex: 0, role: "log", "aria-labelledby": "logs-h" });
  const status = h("span", { class: "muted small", "aria-live": "polite" });
  const pause = h("button", { type: "button", class: "small", "aria-pressed": "false" }, "Pause");
  let paused = false, held = [], source = null, retry = null, closed = false;
  const row = (x) => (x.banner
    ? h("li", { class: "log banner-line", role: "alert" }, x.banner)
    : h("li", { class: `log p${x.priority}` },
      h("time", { datetime: new Date(x.t * 1000).toISOString() }, new Date(x.t * 1000).toLocaleTimeString()), " ",
      h("span", { class: "log-src" }, `${x.node} ${x.instance}`), " ",
      h("span", { class: "log-level" }, LEVELS[x.priority] || ""), " ", h("span", { class: "log-msg" }, x.message)));
  const add = (items) => {
    if (paused) { held = held.concat(items).slice(-KEEP); return; }
    const follow = list.scrollHeight - list.scrollTop - list.clientHeight < 24;
    list.append(...items.slice(-KEEP).map(row));
    while (list.childElementCount > KEEP) list.firstElementChild.remove();
    if (follow) list.scrollTop = list.scrollHeight;
  };
  pause.addEventListener("click", () => {
    paused = !paused;
    pause.textContent = paused ? "Resume" : "Pause";
    pause.setAttribute("aria-pressed", String(paused));
    if (!paused) { const waiting = held; held = []; add(waiting); }
  });
  const open = () => {
    source = new EventSource(`/ui/api/models/${encodeURIComponent(name)}/logs`);
    const on = (kind, fn) => source.addEventListener(kind, (ev) => fn(JSON.parse(ev.data)));
    on("start", (d) => {
      list.replaceChildren(); held = []; // a reconnect starts again from the backlog
      status.textContent = d.nodes.length ? `Following ${d.nodes.join(", ")}` : "No replica is placed yet.";
    });
    on("lines", add);
    on("unavailable", (d) => add([{ banner: `node ${d.node}: logs unavailable: ${d.reason}` }]));
    on("expired", (d) => { source.close(); status.textContent = `${d.message}: reload to follow the logs.`; });
    source.onerror = () => {
      if (source.readyState !== EventSource.CLOSED || closed) return;
      status.textContent = "Logs unavailable; retrying…";
      retry = setTimeout(open, 5000);
    };
  };
  open();
  const el = h("section", { class: "logs", "aria-labelledby": "logs-h" },
    h("div", { class: "row between" }, h("h2", { id: "logs-h" }, "Logs"), h("div", { class: "row" }, status, pause)),
    h("div", { class: "card" }, list));
  return { el, close: () => { closed = true; clearTimeout(retry); if (source) source.close(); } };
}
