// Maintenance actions, each one call of the admin API the CLI uses: a model's rolling update (nebula update),
// a node's drain and undrain (nebula node drain|undrain) and pre-fetching weights (nebula pull). Each is built
// once per page and fed the live fleet, so what was typed survives the feed's updates.
import { del, get, patch, post } from "./api.js";
import { field, fill, h, showError, table } from "./ui.js";

const runtimesOf = (fleet) => [...new Set(fleet.nodes.flatMap((n) => n.runtimes || []))].sort();

// Keeps a select's options in step with `values`, and the operator's choice while it is still offered.
function offer(select, values, first) {
  const keep = select.value;
  fill(select, h("option", { value: "" }, first), values.map((v) => h("option", { value: v }, v)));
  select.value = values.includes(keep) ? keep : "";
}

function say(msg, ok, text) {
  msg.className = ok ? "ok-text" : "error";
  msg.textContent = text;
}

// The spec's argument list as the lines the form takes: a flag and its value on one line.
function argLines(list) {
  const out = [];
  for (let i = 0; i < list.length; i++) {
    const t = list[i], next = list[i + 1];
    if (t.startsWith("--") && !t.includes("=") && next !== undefined && !next.startsWith("-")) { out.push(`${t} ${next}`); i++; }
    else out.push(t);
  }
  return out;
}

// `nebula update NAME`: a new revision, other engine arguments (one per line, no shell quoting to get wrong)
// or another engine runtime; what was asked is compared with the spec so only real changes are sent.
export function updateForm(name) {
  const revision = h("input", { name: "revision", spellcheck: "false", placeholder: "unchanged" });
  const args = h("textarea", { name: "engine_args", rows: 3, spellcheck: "false",
                               placeholder: "--max-num-seqs 64\n--enforce-eager" });
  const runtime = h("select", { name: "engine_runtime" });
  const msg = h("p", { class: "error", role: "alert" });
  const form = h("form", { class: "update", novalidate: true, "aria-label": "Update" },
    field("update-revision", "Revision", revision, "A hub branch, tag or commit."),
    field("update-args", "Engine arguments", args, "All of them, one per line: `--flag value` or `--flag=value`."),
    field("update-runtime", "Engine runtime", runtime),
    h("button", { type: "submit" }, "Update"), msg);
  let spec = null;
  const argList = () => args.value.split("\n").map((l) => l.trim()).filter(Boolean)
    .flatMap((l) => (l.startsWith("--") && !l.includes("=") && l.includes(" ")
      ? [l.slice(0, l.indexOf(" ")), l.slice(l.indexOf(" ") + 1).trim()] : [l]));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    if (!spec) { say(msg, false, "The model is not loaded."); return; }
    const body = {};
    if (revision.value.trim() && revision.value.trim() !== (spec.revision || "")) body.revision = revision.value.trim();
    if (JSON.stringify(argList()) !== JSON.stringify(spec.engine_args || [])) body.engine_args = argList();
    if (runtime.value && runtime.value !== (spec.engine_runtime || "")) body.engine_runtime = runtime.value;
    if (!Object.keys(body).length) {
      showError(form, { message: "Nothing to change: edit the revision, the engine arguments or the runtime." }, msg);
      return;
    }
    try {
      const r = await patch(`/v1/admin/models/${encodeURIComponent(name)}`, body);
      showError(form, null, msg);
      say(msg, true, r.updated ? `Updating (${r.changes}): one new replica is ready before an old one drains.`
        : "No change.");
    } catch (e) { msg.className = "error"; showError(form, e, msg); }
  });
  const update = (fleet, m) => {
    offer(runtime, runtimesOf(fleet), "unchanged");
    if (!spec && m && m.spec) args.value = argLines(m.spec.engine_args || []).join("\n");
    spec = m ? m.spec : null;
  };
  return { el: form, update };
}

// Drain a node before maintenance (its replicas move away, ready first) and take it back.
export function nodeActions() {
  const node = h("select", { name: "node" });
  const msg = h("p", { class: "error", role: "alert" });
  const drain = h("button", { type: "button", class: "ghost" }, "Drain…");
  const yes = h("button", { type: "button", class: "danger", hidden: true }, "Yes, drain it");
  const force = h("button", { type: "button", class: "danger", hidden: true }, "Drain anyway (stops them)");
  const undrain = h("button", { type: "button" }, "Undrain");
  const form = h("form", { class: "card inline", novalidate: true, "aria-label": "Node maintenance" },
    field("drain-node", "Node", node), drain, yes, force, undrain, msg);
  form.addEventListener("submit", (ev) => ev.preventDefault());
  const chosen = () => node.value;
  const send = async (asForce) => {
    yes.hidden = force.hidden = true;
    try {
      const r = await post(`/v1/admin/nodes/${encodeURIComponent(chosen())}/drain`, { force: asForce });
      say(msg, true, `${r.node} is draining: its replicas move to other nodes, each ready before the old one stops` +
        (r.stopping.length ? `; stopping now: ${r.stopping.join("; ")}` : "") + ".");
    } catch (e) {
      say(msg, false, e.message);
      force.hidden = e.code !== "last_node";
    }
  };
  drain.addEventListener("click", () => {
    if (!chosen()) { say(msg, false, "Choose a node."); node.focus(); return; }
    msg.textContent = ""; yes.textContent = `Yes, drain ${chosen()}`; yes.hidden = false; yes.focus();
  });
  yes.addEventListener("click", () => send(false));
  force.addEventListener("click", () => send(true));
  undrain.addEventListener("click", async () => {
    if (!chosen()) { say(msg, false, "Choose a node."); node.focus(); return; }
    yes.hidden = force.hidden = true;
    try { await del(`/v1/admin/nodes/${encodeURIComponent(chosen())}/drain`); say(msg, true, `${chosen()} takes replicas again.`); }
    catch (e) { say(msg, false, e.message); }
  });
  node.addEventListener("change", () => { yes.hidden = force.hidden = true; });
  const update = (fleet) => offer(node, fleet.nodes.map((n) => n.name), "choose a node");
  return { el: form, update };
}

const PULL_REFRESH_MS = 3000; // while a pull runs and the page is open: one small read, not a storm

// Pre-fetch a hub model's weights into nodes' caches, and follow each pull per node.
export function pullSection() {
  const source = h("input", { name: "source", required: true, spellcheck: "false", placeholder: "org/name, hf://… or modelscope://…" });
  const revision = h("input", { name: "revision", spellcheck: "false", placeholder: "main" });
  const nodes = h("input", { name: "nodes", spellcheck: "false", placeholder: "every live node" });
  const msg = h("p", { class: "error", role: "alert" });
  const list = h("div", { "aria-live": "polite" });
  const form = h("form", { class: "card", novalidate: true, "aria-label": "Pre-fetch weights" },
    h("div", { class: "row" }, field("pull-source", "Hub model", source), field("pull-revision", "Revision", revision),
      field("pull-nodes", "Nodes", nodes, "Comma-separated; empty: every live node.")),
    h("button", { type: "submit" }, "Pull"), msg);
  let timer = null;
  const refresh = async () => {
    clearTimeout(timer);
    if (!list.isConnected && timer !== null) return; // the page was left
    try {
      const pulls = (await get("/v1/admin/pulls")).data;
      fill(list, pulls.length ? table(["Pull", "Source", "Nodes", ""], pulls.map((p) => {
        const cancel = h("button", { type: "button", class: "ghost danger", "aria-label": `Cancel pull ${p.id}` }, "Cancel");
        cancel.addEventListener("click", async () => {
          try { await del(`/v1/admin/pulls/${encodeURIComponent(p.id)}`); refresh(); } catch (e) { say(msg, false, e.message); }
        });
        return { attrs: { "data-pull": p.id }, cells: [h("code", {}, p.id), p.source,
          Object.entries(p.nodes).map(([n, r]) => h("div", { class: "small" }, `${n}: ${r.phase}`,
            r.progress != null ? ` ${Math.round(r.progress * 100)}%` : "", r.message ? ` · ${r.message}` : "")),
          cancel] };
      })) : h("p", { class: "empty" }, "No pull in progress."));
      const running = pulls.some((p) => Object.values(p.nodes).some((r) => !["ready", "failed"].includes(r.phase)));
      timer = running ? setTimeout(refresh, PULL_REFRESH_MS) : null;
    } catch (e) { fill(list, h("p", { class: "error" }, e.message)); }
  };
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    if (!source.value.trim()) { showError(form, { param: "source", message: "Enter a hub model (org/name)." }, msg); return; }
    const body = { source: source.value.trim() };
    if (revision.value.trim()) body.revision = revision.value.trim();
    const names = nodes.value.split(",").map((n) => n.trim()).filter(Boolean);
    if (names.length) body.nodes = names;
    try {
      const r = await post("/v1/admin/pulls", body);
      showError(form, null, msg);
      say(msg, true, `Pulling ${r.source} onto ${r.nodes.join(", ")}.`);
      refresh();
    } catch (e) { msg.className = "error"; showError(form, e, msg); }
  });
  refresh();
  return h("div", {}, h("h2", {}, "Pre-fetch weights"),
    h("p", { class: "muted" }, "Download a hub model into nodes' caches before it is loaded, so the load starts at once."),
    form, list);
}
