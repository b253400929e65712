// The chat page of `aura serve`: no framework, no CDN; talks to the server's OpenAI API.
"use strict";

const $ = (id) => document.getElementById(id);
const STORE = "aura-chat";
let state = load();
let controller = null;

function load() {
  try {
    const saved = JSON.parse(localStorage.getItem(STORE));
    if (saved && Array.isArray(saved.chats)) return saved;
  } catch (e) { /* a corrupt entry starts afresh */ }
  return { chats: [{ id: Date.now(), messages: [] }], current: 0 };
}

function persist() { localStorage.setItem(STORE, JSON.stringify(state)); }
function chat() { return state.chats[state.current]; }

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function render() {
  const list = $("messages");
  list.replaceChildren();
  for (const m of chat().messages) list.append(bubble(m));
  list.scrollTop = list.scrollHeight;
  const history = $("history");
  history.replaceChildren();
  state.chats.forEach((c, i) => {
    const li = document.createElement("li");
    const first = c.messages.find((m) => m.role === "user");
    li.textContent = (i === state.current ? "▸ " : "") + (first ? first.content.slice(0, 40) : "(empty)");
    li.onclick = () => { if (!controller) { state.current = i; persist(); render(); } };
    history.append(li);
  });
}

function bubble(m) {
  const li = document.createElement("li");
  li.className = m.role + (m.stopped ? " stopped" : "");
  li.textContent = m.content;
  return li;
}

function settings() {
  const body = {
    temperature: Number($("temperature").value),
    top_p: Number($("top_p").value),
    max_tokens: Number($("max_tokens").value),
  };
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  return body;
}

async function send(text) {
  const c = chat();
  c.messages.push({ role: "user", content: text });
  const reply = { role: "assistant", content: "" };
  c.messages.push(reply);
  render();
  const node = $("messages").lastElementChild;
  controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  $("status").textContent = "writing…";
  const messages = c.messages.slice(0, -1).map(({ role, content }) => ({ role, content }));
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: controller.signal,
      body: JSON.stringify({ ...settings(), messages, stream: true }),
    });
    if (!resp.ok) {
      const err = await resp.json().catch(() => ({}));
      throw new Error((err.error && err.error.message) || resp.statusText);
    }
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      const lines = buffer.split(/\r?\n/);
      buffer = lines.pop();
      for (const line of lines) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
        if (delta && delta.content) {
          reply.content += delta.content;
          node.textContent = reply.content;
          $("messages").scrollTop = $("messages").scrollHeight;
        }
      }
    }
    $("status").textContent = "";
  } catch (e) {
    if (e.name === "AbortError") {
      reply.stopped = true;
      node.classList.add("stopped");
      $("status").textContent = "stopped";
    } else {
      $("status").textContent = "error: " + e.message;
    }
  } finally {
    controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
    persist();
    render();
    showMemory();
  }
}

async function showMemory() {
  const list = $("memories");
  try {
    const resp = await fetch("/v1/memory", { headers: headers() });
    const mem = await resp.json();
    list.replaceChildren();
    if (!resp.ok || !mem.enabled) {
      $("memory-info").textContent = mem.enabled === false
        ? "no episodic memory in use (start the server with --memory-dir DIR or --memory write)" : "";
      return;
    }
    $("memory-info").textContent = mem.describe;
    const seen = new Set();
    for (const hit of mem.retrieved) {
      const text = hit.text || `(memory ${hit.id} of the checkpoint's bank)`;
      if (seen.has(text)) continue;
      seen.add(text);
      const li = document.createElement("li");
      const score = document.createElement("span");
      score.className = "score";
      score.textContent = hit.score.toFixed(3) + " ";
      li.append(score, text);
      list.append(li);
    }
  } catch (e) { $("memory-info").textContent = "memory: " + e.message; }
}

$("composer").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("input").value.trim();
  if (!text || controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("composer").requestSubmit(); }
});
$("stop").addEventListener("click", () => { if (controller) controller.abort(); });
$("new-chat").addEventListener("click", () => {
  if (controller) return;
  state.chats.push({ id: Date.now(), messages: [] });
  state.current = state.chats.length - 1;
  persist();
  render();
});
for (const id of ["temperature", "top_p", "max_tokens", "seed", "api_key"]) {
  const saved = localStorage.getItem(STORE + "-" + id);
  if (saved !== null) $(id).value = saved;
  $(id).addEventListener("change", () => localStorage.setItem(STORE + "-" + id, $(id).value));
}
fetch("/health").then((r) => r.json()).then((h) => { $("model").textContent = h.model; });
render();
showMemory();
