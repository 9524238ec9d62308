// Fleet at a glance, and one model's page (spec, replicas, live charts, scale and unload).
import { nodeActions, updateForm } from "./actions.js";
import { del, patch } from "./api.js";
import { logPanel } from "./logs.js";
import { ago, field, fill, h, mib, phaseClass, showError, sparkline, table } from "./ui.js";

const replicasWanted = (m) => (m.spec ? m.spec.replicas : 0);

function stat(label, value, detail) {
  return h("div", { class: "stat card" }, h("span", { class: "muted" }, label), h("strong", {}, value),
           detail ? h("small", { class: "muted" }, detail) : null);
}

function gpuCell(gpu) {
  const total = gpu.memory_total_mib || 0;
  const used = gpu.memory_used_mib || 0;
  const others = gpu.memory_outside_mib || 0;
  return h("div", { class: "gpu" }, h("span", {}, `GPU ${gpu.index}`, gpu.name ? ` · ${gpu.name}` : ""),
    h("span", { class: "muted" }, total ? mib(total) : ""),
    total ? h("meter", { min: 0, max: total, value: used, "aria-label": `GPU ${gpu.index} memory used` }) : null,
    h("small", { class: "muted" }, `${mib(Math.max(0, used - others))} Nebula · ${mib(others)} others · ${mib(Math.max(0, total - used))} free`),
    gpuLive(gpu));
}

function phaseHistory(i) { // how the replica got to its phase: each earlier phase and how long it lasted
  const steps = i.history || [];
  if (!steps.length) return null;
  const lasted = (from, to) => { const s = Math.max(0, Math.round(to - from)); return s < 120 ? `${s} s` : `${Math.round(s / 60)} min`; };
  const text = steps.map(([phase, since], n) => `${phase} ${lasted(since, n + 1 < steps.length ? steps[n + 1][1] : i.since)}`);
  return h("div", { class: "muted small phase-history" }, `${text.join(" → ")} → ${i.phase}`);
}

function gpuLive(gpu) { // from the node's agent, where it answered (gpu_live.py)
  const parts = [];
  if (typeof gpu.utilization === "number") parts.push(`${Math.round(gpu.utilization * 100)}% busy`);
  if (typeof gpu.temperature_c === "number") parts.push(`${Math.round(gpu.temperature_c)} °C`);
  return parts.length ? h("small", { class: "gpu-live" }, parts.join(" · ")) : null;
}

export function fleetPage() {
  const stats = h("div", { class: "stats" });
  const models = h("div", { class: "card" });
  const nodes = h("div", { class: "card" });
  const maintenance = nodeActions();
  const el = h("section", { "aria-labelledby": "fleet-h" },
    h("div", { class: "page-head" }, h("h1", { id: "fleet-h" }, "Fleet"),
      h("a", { class: "button primary", href: "#/load" }, "Load a model")),
    stats, h("h2", {}, "Models"), models, h("h2", {}, "Nodes"), nodes, maintenance.el);
  const update = ({ fleet }) => {
    if (!fleet) return;
    maintenance.update(fleet);
    const gpus = fleet.nodes.reduce((n, node) => n + node.gpus.length, 0);
    const ready = fleet.models.reduce((n, m) => n + m.ready, 0);
    const wanted = fleet.models.reduce((n, m) => n + replicasWanted(m), 0);
    fill(stats, stat("Nodes", fleet.nodes.length, "alive"), stat("GPUs", gpus),
                          stat("Models", fleet.models.length), stat("Replicas ready", `${ready} / ${wanted}`));
    fill(models, fleet.models.length ? table(["Model", "Task", "Ready", "Replicas", "Restarts", "Nodes"],
      fleet.models.map((m) => {
        const restarts = m.instances.reduce((n, i) => n + (i.restarts || 0), 0);
        const nodeNames = [...new Set(m.instances.map((i) => i.node))].join(", ");
        const full = m.spec && m.ready >= replicasWanted(m);
        return { attrs: { "data-model": m.name }, cells: [
          [h("a", { href: `#/model/${encodeURIComponent(m.name)}` }, m.name),
            m.pending_reason ? h("div", { class: "pending" }, `Pending: ${m.pending_reason}`) : null,
            m.rollout ? h("div", { class: "muted small" }, `Update: ${m.rollout}`) : null,
            !m.spec ? h("div", { class: "muted" }, "unloading") : null],
          m.spec ? m.spec.task : "–",
          h("span", { class: `badge ${full ? "ok" : "warn"}`, "data-ready": `${m.ready}/${replicasWanted(m)}` },
            `${m.ready} / ${replicasWanted(m)}`),
          m.instances.length ? m.instances.map((i) => h("span", { class: phaseClass(i.phase), title: `${i.instance} on ${i.node}${i.message ? `: ${i.message}` : ""}` },
            i.phase, i.progress != null && i.phase === "downloading" ? ` ${Math.round(i.progress * 100)}%` : "")) : "–",
          restarts, nodeNames || "–"] };
      }), { class: "models" })
      : h("p", { class: "empty" }, "No model is loaded. ", h("a", { href: "#/load" }, "Load one.")));
    fill(nodes, fleet.nodes.length ? table(["Node", "State", "Address", "GPUs", "Agent", "Runtimes"],
      fleet.nodes.map((n) => ({ attrs: { "data-node": n.name }, cells: [
        [h("span", { class: `dot ${n.drain ? "warn" : "ok"}`, "aria-hidden": "true" }), n.name],
        h("span", { class: `badge ${n.drain ? "warn" : "ok"}` }, n.drain || "alive"), n.address,
        n.gpus.length ? n.gpus.map(gpuCell) : h("span", { class: "muted" }, "CPU only"),
        n.agent_version || "–", (n.runtimes || []).join(", ") || "–"] })))
      : h("p", { class: "empty" }, "No node has joined."));
  };
  return { el, title: "Fleet", update };
}

// --- a model's page ----------------------------------------------------------------------------------

function quantile(q, now, then) {
  const bounds = Object.keys(now).filter((b) => b !== "inf").map(Number).sort((a, b) => a - b);
  const delta = (b) => (now[String(b)] || 0) - ((then && then[String(b)]) || 0);
  const total = (now.inf || 0) - ((then && then.inf) || 0);
  if (total <= 0) return NaN;
  let prevBound = 0, prevCount = 0;
  for (const b of bounds) {
    const c = delta(b);
    if (c >= q * total) return prevBound + (b - prevBound) * ((q * total - prevCount) / Math.max(c - prevCount, 1e-9));
    prevBound = b; prevCount = c;
  }
  return prevBound;
}

const WINDOW = 5; // snapshots (10 s) per chart point: a rate over 2 s of a quiet model is mostly noise

function series(figures, name) {
  const out = { rps: [], tps: [], p50: [], p99: [], waiting: [], kv: [] };
  for (let i = 1; i < figures.length; i++) {
    const a = figures[Math.max(0, i - WINDOW)], b = figures[i];
    const ma = a.models[name], mb = b.models[name];
    const dt = Math.max(b.at - a.at, 1e-3);
    if (!mb) { for (const k of Object.keys(out)) out[k].push(k.startsWith("p") ? NaN : 0); continue; }
    out.rps.push(ma ? (mb.requests - ma.requests) / dt : 0);
    out.tps.push(ma ? (mb.tokens - ma.tokens) / dt : 0);
    out.p50.push(quantile(0.5, mb.ttft_buckets, ma && ma.ttft_buckets) * 1000);
    out.p99.push(quantile(0.99, mb.ttft_buckets, ma && ma.ttft_buckets) * 1000);
    out.waiting.push(mb.waiting);
    out.kv.push(mb.kv_cache * 100);
  }
  return out;
}

export function modelPage(name, live) {
  const head = h("div", { class: "page-head" }, h("h1", {}, name), h("span", { id: "model-ready", class: "badge" }));
  const charts = h("div", { class: "charts", "aria-label": "Live figures" });
  const replicas = h("div", { class: "card" });
  const spec = h("dl", { class: "spec" });
  const replicasInput = h("input", { type: "number", name: "replicas", min: 0, max: 64, required: true, inputmode: "numeric" });
  const scaleMsg = h("p", { class: "error", role: "alert" });
  const scaleForm = h("form", { class: "inline", novalidate: true, "aria-label": "Scale" },
    field("scale-replicas", "Replicas", replicasInput),
    h("button", { type: "submit", class: "primary" }, "Scale"), scaleMsg);
  scaleForm.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const n = Number(replicasInput.value);
    if (!Number.isInteger(n) || n < 0 || n > 64 || replicasInput.value === "") {
      showError(scaleForm, { param: "replicas", message: "Enter a whole number from 0 to 64." }, scaleMsg); return;
    }
    try {
      await patch(`/v1/admin/models/${encodeURIComponent(name)}`, { replicas: n });
      showError(scaleForm, null, scaleMsg);
      scaleMsg.textContent = ""; scaleMsg.className = "ok-text"; scaleMsg.textContent = `Scaling to ${n}.`;
    } catch (e) { scaleMsg.className = "error"; showError(scaleForm, e, scaleMsg); }
  });
  const unloadMsg = h("p", { class: "error", role: "alert" });
  const confirmBtn = h("button", { type: "button", class: "danger", hidden: true }, `Yes, unload ${name}`);
  const unloadBtn = h("button", { type: "button", class: "danger ghost" }, "Unload…");
  unloadBtn.addEventListener("click", () => { confirmBtn.hidden = false; confirmBtn.focus(); });
  confirmBtn.addEventListener("click", async () => {
    try {
      await del(`/v1/admin/models/${encodeURIComponent(name)}`);
      unloadMsg.className = "ok-text"; unloadMsg.textContent = "Unloading: its engines are stopping.";
      confirmBtn.hidden = true;
    } catch (e) { unloadMsg.className = "error"; unloadMsg.textContent = e.message; }
  });
  const updating = updateForm(name);
  const rollout = h("p", { id: "model-rollout", class: "muted", "aria-live": "polite" });
  const logs = logPanel(name);
  const el = h("section", {}, head, h("p", {}, h("a", { href: "#/fleet" }, "← Fleet")), charts,
    h("div", { class: "cols" },
      h("div", {}, h("h2", {}, "Replicas"), rollout, replicas),
      h("div", {}, h("h2", {}, "Actions"), h("div", { class: "card actions" }, scaleForm, updating.el,
        h("div", { class: "unload" }, unloadBtn, confirmBtn, unloadMsg)))),
    logs.el, h("h2", {}, "Spec"), h("div", { class: "card" }, spec));
  let seededReplicas = false;
  const update = ({ fleet, figures }) => {
    const m = fleet && fleet.models.find((x) => x.name === name);
    const ready = head.querySelector("#model-ready");
    if (fleet) updating.update(fleet, m);
    rollout.textContent = m && m.rollout ? `Update: ${m.rollout}` : "";
    if (!m) {
      ready.textContent = "not loaded"; ready.className = "badge";
      fill(replicas, h("p", { class: "empty" }, "This model is not loaded."));
      return;
    }
    ready.textContent = `${m.ready} / ${replicasWanted(m)} ready`;
    ready.className = `badge ${m.spec && m.ready >= replicasWanted(m) ? "ok" : "warn"}`;
    ready.dataset.ready = `${m.ready}/${replicasWanted(m)}`;
    if (!seededReplicas && m.spec) { replicasInput.value = m.spec.replicas; seededReplicas = true; }
    fill(replicas, 
      m.pending_reason ? h("p", { class: "pending" }, `Pending: ${m.pending_reason}`) : null,
      m.instances.length ? table(["Replica", "Phase", "Node", "Restarts", "Since"], m.instances.map((i) => ({ attrs: { "data-instance": i.instance }, cells: [
          [i.instance, i.message ? h("div", { class: "muted small" }, i.message) : null],
          [h("span", { class: phaseClass(i.phase) }, i.phase), phaseHistory(i)], i.node, i.restarts || 0, ago(i.since)] })))
        : h("p", { class: "empty" }, "No replica yet."));
    const s = series(figures, name);
    const fmt = (d, u) => (v) => `${v.toFixed(d)}${u}`;
    fill(charts, sparkline("Requests/s", s.rps, fmt(2, "")), sparkline("TTFT p50", s.p50, fmt(0, " ms")),
      sparkline("TTFT p99", s.p99, fmt(0, " ms")), sparkline("Tokens/s", s.tps, fmt(1, "")),
      sparkline("Waiting", s.waiting, fmt(0, "")), sparkline("KV cache", s.kv, fmt(0, " %")));
    if (m.spec) {
      const rows = Object.entries(m.spec).filter(([k, v]) => k !== "profile" && v !== "" && v !== null
        && !(Array.isArray(v) && !v.length) && !(typeof v === "object" && !Array.isArray(v) && !Object.keys(v).length));
      if (m.spec.profile) rows.push(["profile", m.spec.profile]);
      fill(spec, ...rows.flatMap(([k, v]) => [h("dt", {}, k.replaceAll("_", " ")),
        h("dd", {}, typeof v === "object" ? h("code", { class: "json" }, JSON.stringify(v, null, 1)) : String(v))]));
    }
  };
  return { el, title: name, update, close: logs.close };
}
