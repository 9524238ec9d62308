// Load a model; API keys (create with the secret shown once, list, revoke).
import { pullSection } from "./actions.js";
import { del, get, post } from "./api.js";
import { ago, field, fill, h, showError, table } from "./ui.js";

const NAME_RE = /^[a-z0-9]([a-z0-9._-]{0,62}[a-z0-9])?$/i;

export function loadPage() {
  const source = h("input", { name: "source", required: true, spellcheck: "false", list: "catalog-names",
                              placeholder: "catalog name, org/model or /path/to/model" });
  const name = h("input", { name: "name", required: true, spellcheck: "false", placeholder: "my-model" });
  const replicas = h("input", { name: "replicas", type: "number", min: 1, max: 64, value: 1, inputmode: "numeric" });
  const maxLen = h("input", { name: "max_model_len", type: "number", min: 16, inputmode: "numeric", placeholder: "from the model" });
  const task = h("select", { name: "task" }, ["", "generate", "embed", "rerank", "transcribe"].map((t) =>
    h("option", { value: t }, t || "detect from the model")));
  const datalist = h("datalist", { id: "catalog-names" });
  const review = h("div", { class: "review", "aria-live": "polite" });
  const msg = h("p", { class: "error", role: "alert" });
  const confirm = h("button", { type: "button", class: "primary", hidden: true }, "Load");
  const form = h("form", { class: "card", novalidate: true, "aria-label": "Load a model" },
    field("load-source", "Source", source, "A catalog entry, a hub id or a path on the nodes."),
    field("load-name", "Name", name, "What clients send as \"model\"."),
    h("div", { class: "row" }, field("load-replicas", "Replicas", replicas),
      field("load-max", "Max model length", maxLen), field("load-task", "Task", task)),
    datalist, h("button", { type: "submit" }, "Review"), review, confirm, msg);
  let catalog = [];
  get("/v1/admin/catalog").then((c) => {
    catalog = c.data || [];
    fill(datalist, ...catalog.map((m) => h("option", { value: m.name }, m.description || m.source || "")));
  }).catch(() => {});
  const body = () => {
    const b = { name: nameValue(), source: source.value.trim(), replicas: Number(replicas.value || 1) };
    if (maxLen.value) b.max_model_len = Number(maxLen.value);
    if (task.value) b.task = task.value;
    return b;
  };
  const check = () => {
    if (!source.value.trim()) return { param: "source", message: "Enter a source." };
    if (!NAME_RE.test(nameValue())) return { param: "name", message: "Letters, digits, '.', '_' and '-', up to 64." };
    const r = Number(replicas.value);
    if (!Number.isInteger(r) || r < 1 || r > 64) return { param: "replicas", message: "From 1 to 64." };
    if (maxLen.value && (!Number.isInteger(Number(maxLen.value)) || Number(maxLen.value) < 16)) return { param: "max_model_len", message: "A whole number, 16 or more." };
    return null;
  };
  // The name defaults to the source's last part, offered as the placeholder until one is typed.
  let suggested = "";
  source.addEventListener("input", () => {
    const last = source.value.split(/[/:]/).filter(Boolean).pop() || "";
    suggested = last.toLowerCase().replace(/[^a-z0-9._-]/g, "-").replace(/^[^a-z0-9]+|[^a-z0-9]+$/g, "").slice(0, 64);
    name.placeholder = suggested || "my-model";
  });
  const nameValue = () => name.value.trim() || suggested;
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const bad = check();
    showError(form, bad, msg);
    confirm.hidden = !!bad;
    if (bad) { fill(review); return; }
    const entry = catalog.find((m) => m.name === source.value.trim());
    fill(review, h("h3", {}, "About to load"), h("pre", {}, JSON.stringify(body(), null, 2)),
      entry ? h("pre", { class: "muted" }, JSON.stringify(entry, null, 2)) : null,
      h("p", { class: "muted" }, "Nebula reads the model's files, sizes its GPU memory and picks its node when it is loaded; the result shows here and on the model's page."));
    confirm.focus();
  });
  confirm.addEventListener("click", async () => {
    const bad = check();
    if (bad) { showError(form, bad, msg); return; }
    confirm.disabled = true;
    try {
      const r = await post("/v1/admin/models", body());
      const spec = r.model;
      fill(review, h("p", { class: "ok-text" }, r.created ? `Loading ${spec.name}.` : `${spec.name} was already loaded.`),
        r.note ? h("p", { class: "muted" }, r.note) : null,
        h("p", {}, h("a", { href: `#/model/${encodeURIComponent(spec.name)}` }, `Watch ${spec.name} start →`)));
      confirm.hidden = true;
    } catch (e) { showError(form, e, msg); } finally { confirm.disabled = false; }
  });
  return { el: h("section", {}, h("h1", {}, "Load a model"), form, pullSection()), title: "Load" };
}

export function keysPage() {
  const name = h("input", { name: "name", required: true, maxlength: 128, placeholder: "ci-bot" });
  const inference = h("input", { type: "checkbox", name: "scope-inference", checked: true });
  const admin = h("input", { type: "checkbox", name: "scope-admin" });
  const msg = h("p", { class: "error", role: "alert" });
  const secret = h("div", { "aria-live": "polite" });
  const list = h("div", { class: "card" });
  const form = h("form", { class: "card", novalidate: true, "aria-label": "Create a key" },
    field("key-name", "Name", name),
    h("fieldset", {}, h("legend", {}, "Scopes"),
      h("label", { class: "check" }, inference, " inference"), h("label", { class: "check" }, admin, " admin")),
    h("button", { type: "submit", class: "primary" }, "Create key"), msg, secret);
  const refresh = async () => {
    try {
      const keys = (await get("/v1/admin/keys")).data;
      fill(list, table(["Name", "Id", "Scopes", "Created", "Actions"], keys.map((k) => {
        const out = [];
        if (k.source === "etcd") {
          const yes = h("button", { type: "button", class: "danger", hidden: true }, "Confirm revoke");
          const ask = h("button", { type: "button", class: "ghost danger", "aria-label": `Revoke ${k.name}` }, "Revoke");
          const err = h("p", { class: "error", role: "alert" });
          ask.addEventListener("click", () => { yes.hidden = false; yes.focus(); });
          yes.addEventListener("click", async () => {
            try { await del(`/v1/admin/keys/${encodeURIComponent(k.id)}`); refresh(); } catch (e) { err.textContent = e.message; }
          });
          out.push(ask, " ", yes, err);
        } else out.push(h("span", { class: "muted" }, "from the config"));
        return { attrs: { "data-key": k.id }, cells: [k.name, h("code", {}, k.id), (k.scopes || []).join(", "), ago(k.created), out] };
      })));
    } catch (e) { fill(list, h("p", { class: "error" }, e.message)); }
  };
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    fill(secret);
    const scopes = [inference.checked && "inference", admin.checked && "admin"].filter(Boolean);
    if (!name.value.trim()) { showError(form, { param: "name", message: "Name the key." }, msg); return; }
    if (!scopes.length) { showError(form, { message: "Pick at least one scope." }, msg); return; }
    try {
      const k = await post("/v1/admin/keys", { name: name.value.trim(), scopes });
      showError(form, null, msg);
      const value = h("input", { readonly: true, value: k.key, id: "new-key", class: "secret", spellcheck: "false" });
      const copy = h("button", { type: "button" }, "Copy");
      copy.addEventListener("click", () => { value.select(); navigator.clipboard?.writeText(k.key); copy.textContent = "Copied"; });
      fill(secret, h("div", { class: "secret-box" }, h("label", { for: "new-key" }, `Key for ${k.name} — shown once, copy it now`),
        h("div", { class: "row" }, value, copy)));
      name.value = "";
      refresh();
    } catch (e) { showError(form, e, msg); }
  });
  refresh();
  return { el: h("section", {}, h("h1", {}, "API keys"), form, h("h2", {}, "Keys"), list), title: "API keys" };
}
