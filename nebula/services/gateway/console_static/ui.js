// Small DOM helpers: elements are built with text nodes only (never as HTML strings), so nothing the cluster
// reports can become markup.
export function h(tag, attrs = {}, ...children) {
  const svg = ["svg", "path", "polyline", "line", "text", "rect", "g"].includes(tag);
  const el = svg ? document.createElementNS("http://www.w3.org/2000/svg", tag) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.setAttribute("class", v);
    else if (k in el && !svg && typeof v !== "string") el[k] = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

export const phaseClass = (phase) => `chip phase-${phase}`;

export function field(id, label, input, hint) {
  input.id = id;
  return h("div", { class: "field" }, h("label", { for: id }, label), input,
           hint ? h("small", { class: "muted" }, hint) : null,
           h("p", { class: "error", id: `${id}-error`, role: "alert" }));
}

// Shows a validation or API error next to its field (the API names the field in `param`), or in `fallback`.
export function showError(form, err, fallback) {
  for (const p of form.querySelectorAll(".error")) p.textContent = "";
  const name = err && err.param ? String(err.param) : null;
  const target = name && form.querySelector(`[name="${CSS.escape(name)}"]`);
  const box = target ? form.querySelector(`#${CSS.escape(target.id)}-error`) : null;
  (box || fallback).textContent = err ? err.message : "";
  if (target) target.focus();
}

export function ago(epochS) {
  if (!epochS) return "";
  const s = Math.max(0, Date.now() / 1000 - epochS);
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

export const mib = (n) => (n >= 1024 ? `${(n / 1024).toFixed(1)} GiB` : `${n} MiB`);

// A sparkline: values over time as an inline SVG polyline, with the latest value as text.
export function sparkline(title, values, format) {
  const w = 220, hgt = 48;
  const finite = values.filter((v) => Number.isFinite(v));
  const max = Math.max(1e-9, ...finite);
  const step = values.length > 1 ? w / (values.length - 1) : w;
  const pts = values.map((v, i) => `${(i * step).toFixed(1)},${(hgt - 2 - ((Number.isFinite(v) ? v : 0) / max) * (hgt - 6)).toFixed(1)}`);
  const last = finite.length ? finite[finite.length - 1] : null;
  return h("figure", { class: "spark" },
    h("figcaption", {}, h("span", {}, title), h("strong", {}, last === null ? "–" : format(last))),
    h("svg", { viewBox: `0 0 ${w} ${hgt}`, width: "100%", height: hgt, role: "img",
               "aria-label": `${title}: ${last === null ? "no data" : format(last)}`, preserveAspectRatio: "none" },
      h("polyline", { points: pts.join(" "), fill: "none", stroke: "currentColor", "stroke-width": "2",
                      "vector-effect": "non-scaling-stroke" })));
}

// el's children become `kids` (null and false left out).
export function fill(el, ...kids) {
  el.replaceChildren(...kids.flat().filter((k) => k !== null && k !== undefined && k !== false));
  return el;
}

// A table whose cells carry their column's name, which the narrow layout shows beside each value.
export function table(headers, rows, attrs = {}) {
  return h("table", attrs, h("thead", {}, h("tr", {}, headers.map((t) => h("th", { scope: "col" }, t)))),
    h("tbody", {}, rows.map(({ attrs: rowAttrs = {}, cells }) => h("tr", rowAttrs,
      cells.map((c, i) => h("td", { "data-label": headers[i] }, c))))));
}
