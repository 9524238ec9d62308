// The console: a hash router over five pages, all drawn from the live feed and the admin API.
import { openFeed, signOut, startSession } from "./api.js";
import { fleetPage, modelPage } from "./fleet.js";
import { loadPage, keysPage } from "./forms.js";
import { playgroundPage } from "./playground.js";

export const live = { fleet: null, figures: [] }; // the feed's latest fleet and a short history of figures
const HISTORY = 90; // figure snapshots kept (every 2 s: three minutes)
const pages = { fleet: fleetPage, model: modelPage, load: loadPage, keys: keysPage, playground: playgroundPage };
let current = null; // { name, arg, view }: view.update(live) is called when the feed brings news

function route() {
  const [, name = "fleet", arg] = location.hash.match(/^#\/([a-z]+)\/?(.*)$/) || [];
  const page = pages[name] ? name : "fleet";
  for (const a of document.querySelectorAll("[data-nav]")) {
    if (a.dataset.nav === (page === "model" ? "fleet" : page)) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  const main = document.getElementById("main");
  if (current && current.view.close) current.view.close(); // e.g. the model page's log stream
  const view = pages[page](decodeURIComponent(arg || ""), live);
  main.replaceChildren(view.el);
  document.title = `${view.title} · Nebula`;
  current = { name: page, view };
  if (live.fleet && view.update) view.update(live);
  main.focus({ preventScroll: true });
}

function news() {
  if (current && current.view.update) current.view.update(live);
}

async function main() {
  document.getElementById("logout").addEventListener("click", () => signOut());
  await startSession();
  window.addEventListener("hashchange", route);
  route();
  openFeed({
    fleet: (data) => {
      live.fleet = data;
      news();
      if (!document.body.dataset.fleet) performance.mark("nebula-first-fleet"); // time to first render
      document.body.dataset.fleet = "live";
    },
    figures: (data) => {
      live.figures.push(data);
      if (live.figures.length > HISTORY) live.figures.shift();
      news();
    },
  });
  // An operator at work stays signed in: the session API renews the cookie past half its life. An idle
  // tab does not call it, so its session lapses.
  let active = false;
  for (const ev of ["keydown", "pointerdown"]) document.addEventListener(ev, () => { active = true; }, { passive: true });
  setInterval(() => { if (active) { active = false; startSession().catch(() => {}); } }, 5 * 60 * 1000);
}

main();
