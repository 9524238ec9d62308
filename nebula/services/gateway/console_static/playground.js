// Chat with a ready model, streamed, and the same request as curl and Python to copy.
import { request } from "./api.js";
import { field, fill, h, showError } from "./ui.js";

export function playgroundPage(_arg, live) {
  const model = h("select", { name: "model", required: true });
  const system = h("textarea", { name: "system", rows: 2, placeholder: "You are a helpful assistant." });
  const temperature = h("input", { name: "temperature", type: "number", min: 0, max: 2, step: 0.1, value: 0.7 });
  const maxTokens = h("input", { name: "max_tokens", type: "number", min: 1, max: 32768, value: 128 });
  const tools = h("textarea", { name: "tools", rows: 3, spellcheck: "false", placeholder: '[{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]' });
  const prompt = h("textarea", { name: "prompt", rows: 3, required: true, placeholder: "Say hello" });
  const transcript = h("div", { class: "transcript", "aria-live": "polite", id: "transcript" });
  const msg = h("p", { class: "error", role: "alert" });
  const send = h("button", { type: "submit", class: "primary" }, "Send");
  const stop = h("button", { type: "button", hidden: true }, "Stop");
  const snippets = h("div", { class: "snippets" });
  const form = h("form", { class: "card play", novalidate: true, "aria-label": "Chat" },
    h("div", { class: "row" }, field("play-model", "Model", model), field("play-temp", "Temperature", temperature),
      field("play-max", "Max tokens", maxTokens)),
    field("play-system", "System prompt", system),
    h("details", {}, h("summary", {}, "Tools"), field("play-tools", "Tool definitions (JSON list)", tools)),
    transcript, field("play-prompt", "Message", prompt), h("div", { class: "row" }, send, stop), msg);
  const history = [];
  let controller = null;

  const parseTools = () => {
    if (!tools.value.trim()) return undefined;
    const t = JSON.parse(tools.value);
    if (!Array.isArray(t)) throw new Error("must be a JSON list");
    return t;
  };
  const body = (messages) => {
    const b = { model: model.value, messages, stream: true, temperature: Number(temperature.value), max_tokens: Number(maxTokens.value) };
    try { const t = parseTools(); if (t) b.tools = t; } catch { /* shown on send */ }
    return b;
  };
  const withSystem = (msgs) => (system.value.trim() ? [{ role: "system", content: system.value.trim() }, ...msgs] : msgs);
  const renderSnippets = () => {
    const b = body(withSystem([...history, { role: "user", content: prompt.value || "Say hello" }]));
    const json = JSON.stringify(b, null, 2);
    const base = `${location.origin}/v1`;
    const curl = `curl ${base}/chat/completions \\\n  -H "Authorization: Bearer $NEBULA_API_KEY" \\\n  -H "Content-Type: application/json" \\\n  -d '${json.replaceAll("'", "'\\''")}'`;
    const py = `from openai import OpenAI\n\nclient = OpenAI(base_url="${base}", api_key=os.environ["NEBULA_API_KEY"])\nstream = client.chat.completions.create(**${JSON.stringify(b, null, 4).replaceAll("true", "True").replaceAll("false", "False").replaceAll("null", "None")})\nfor chunk in stream:\n    print(chunk.choices[0].delta.content or "", end="")`;
    fill(snippets, ...[["curl", curl], ["Python", `import os\n${py}`]].map(([t, code]) => {
      const copy = h("button", { type: "button", class: "ghost small" }, "Copy");
      copy.addEventListener("click", () => { navigator.clipboard?.writeText(code); copy.textContent = "Copied"; });
      return h("div", { class: "card snippet" }, h("div", { class: "row between" }, h("h3", {}, t), copy), h("pre", {}, h("code", {}, code)));
    }));
  };
  for (const el of [model, system, temperature, maxTokens, tools, prompt]) el.addEventListener("input", renderSnippets);

  const bubble = (role, text) => h("div", { class: `msg ${role}` }, h("span", { class: "role" }, role), h("div", { class: "text" }, text));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    if (!model.value) { showError(form, { param: "model", message: "No model is ready to chat with." }, msg); return; }
    if (!prompt.value.trim()) { showError(form, { param: "prompt", message: "Type a message." }, msg); return; }
    const t = Number(temperature.value);
    if (!(t >= 0 && t <= 2)) { showError(form, { param: "temperature", message: "From 0 to 2." }, msg); return; }
    if (!(Number.isInteger(Number(maxTokens.value)) && Number(maxTokens.value) >= 1)) { showError(form, { param: "max_tokens", message: "A whole number, 1 or more." }, msg); return; }
    try { parseTools(); } catch (e) { showError(form, { param: "tools", message: `Tools: ${e.message}` }, msg); return; }
    showError(form, null, msg);
    const user = { role: "user", content: prompt.value.trim() };
    transcript.append(bubble("user", user.content));
    const out = bubble("assistant", "");
    out.classList.add("streaming");
    transcript.append(out);
    const text = out.querySelector(".text");
    controller = new AbortController();
    send.disabled = true; stop.hidden = false;
    let answer = "";
    try {
      const res = await request("POST", "/ui/api/chat", body(withSystem([...history, user])), { raw: true, signal: controller.signal });
      history.push(user);
      prompt.value = "";
      const reader = res.body.getReader();
      const decoder = new TextDecoder();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += decoder.decode(value, { stream: true });
        const lines = buf.split("\n");
        buf = lines.pop();
        for (const line of lines) {
          if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
          const chunk = JSON.parse(line.slice(6));
          const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
          if (!delta) continue;
          if (delta.content) { answer += delta.content; text.textContent = answer; }
          for (const call of delta.tool_calls || []) {
            const fn = call.function || {};
            answer += `${fn.name ? `\n[tool call] ${fn.name}(` : ""}${fn.arguments || ""}`;
            text.textContent = answer;
          }
          transcript.scrollTop = transcript.scrollHeight;
        }
      }
      history.push({ role: "assistant", content: answer });
    } catch (e) {
      if (e.name !== "AbortError") { out.remove(); transcript.lastChild?.remove(); showError(form, e, msg); }
    } finally {
      out.classList.remove("streaming");
      out.dataset.done = "true";
      send.disabled = false; stop.hidden = true; controller = null;
      renderSnippets();
    }
  });
  stop.addEventListener("click", () => controller && controller.abort());

  const update = ({ fleet }) => {
    if (!fleet) return;
    const ready = fleet.models.filter((m) => m.ready > 0 && m.spec && m.spec.task === "generate").map((m) => m.name);
    const have = [...model.options].map((o) => o.value);
    if (ready.join() === have.join()) return;
    const keep = model.value;
    fill(model, ...ready.map((n) => h("option", { value: n }, n)));
    if (ready.includes(keep)) model.value = keep;
    renderSnippets();
  };
  renderSnippets();
  return { el: h("section", {}, h("h1", {}, "Playground"), h("div", { class: "cols play-cols" }, form, h("div", {}, h("h2", {}, "Same request, from code"), snippets))),
           title: "Playground", update };
}
