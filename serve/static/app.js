// chatforge chat page: sends the conversation to /v1/chat/completions with stream=true and renders the
// server-sent events as they arrive. No dependencies; everything it loads comes from this server.
"use strict";

const $ = (id) => document.getElementById(id);
const log = $("log"), input = $("input"), form = $("form"), send = $("send");
const regen = $("regenerate"), clear = $("clear"), note = $("note");

let modelId = null;
let history = [];        // [{role, content}] of finished turns
let controller = null;   // AbortController of the reply being streamed

// ------------------------------------------------------------------ model name and health

async function loadModel() {
  try {
    const r = await fetch("/v1/models");
    const body = await r.json();
    modelId = body.data[0].id;
    $("model-name").textContent = modelId;
    $("model-name").parentElement.title = body.data[0].key ? `key ${body.data[0].key}` : modelId;
    $("status-dot").className = "dot ok";
  } catch (e) {
    $("model-name").textContent = "server unreachable";
    $("status-dot").className = "dot down";
  }
}

// ------------------------------------------------------------------ settings

$("settings-toggle").addEventListener("click", () => {
  const panel = $("settings");
  panel.hidden = !panel.hidden;
  $("settings-toggle").setAttribute("aria-expanded", String(!panel.hidden));
});
$("temperature").addEventListener("input", () => { $("temperature-value").textContent = $("temperature").value; });

function settings() {
  const s = { temperature: Number($("temperature").value) };
  const k = parseInt($("top-k").value, 10);
  if (Number.isFinite(k)) s.top_k = Math.min(200, Math.max(0, k));
  const n = parseInt($("max-tokens").value, 10);
  if (Number.isFinite(n)) s.max_tokens = Math.min(4096, Math.max(1, n));
  const seed = parseInt($("seed").value, 10);
  if (Number.isFinite(seed)) s.seed = seed;
  return s;
}

// ------------------------------------------------------------------ rendering

function addMessage(role, text) {
  $("empty")?.remove();
  const wrap = document.createElement("div");
  wrap.className = `msg ${role}`;
  const who = document.createElement("div");
  who.className = "who";
  who.textContent = role === "user" ? "You" : (modelId || "assistant");
  const bubble = document.createElement("div");
  bubble.className = "bubble";
  bubble.textContent = text;
  wrap.append(who, bubble);
  log.append(wrap);
  scrollDown();
  return wrap;
}

function scrollDown() { log.scrollTop = log.scrollHeight; }

function setBusy(busy) {
  send.textContent = busy ? "Stop" : "Send";
  send.classList.toggle("stop", busy);
  regen.disabled = busy || !history.some((m) => m.role === "user");
  clear.disabled = busy || history.length === 0;
}

function autosize() {
  input.style.height = "auto";
  input.style.height = Math.min(input.scrollHeight, 192) + "px";
}

// ------------------------------------------------------------------ streaming

// Yields the JSON payload of each `data:` line of a server-sent event stream; stops at [DONE].
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
      const data = block.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

async function reply() {
  const wrap = addMessage("assistant", "");
  wrap.dataset.state = "streaming";
  const bubble = wrap.querySelector(".bubble");
  controller = new AbortController();
  setBusy(true);
  note.textContent = "";
  const messages = [...history];
  const system = $("system").value.trim();
  if (system) messages.unshift({ role: "system", content: system });
  let text = "", finish = null;
  const t0 = performance.now();
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model: modelId, messages, stream: true, ...settings() }),
      signal: controller.signal,
    });
    if (!r.ok) {
      let message = `HTTP ${r.status}`;
      try { message = (await r.json()).error.message; } catch (e) { /* not JSON */ }
      throw new Error(message);
    }
    for await (const chunk of events(r)) {
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) continue;
      if (choice.delta && choice.delta.content) {
        text += choice.delta.content;
        bubble.textContent = text.trimStart();
        scrollDown();
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    }
    wrap.dataset.state = "done";
    history.push({ role: "assistant", content: text });
    const secs = ((performance.now() - t0) / 1000).toFixed(1);
    meta(wrap, finish === "length" ? `cut at the token limit · ${secs} s` : `${secs} s`);
  } catch (e) {
    if (e.name === "AbortError") {
      if (!wrap.isConnected) return;  // cleared while streaming
      wrap.dataset.state = "done";
      history.push({ role: "assistant", content: text });
      meta(wrap, "stopped");
    } else {
      wrap.dataset.state = "error";
      bubble.textContent = e.message || String(e);
    }
  } finally {
    controller = null;
    setBusy(false);
    input.focus();
  }
}

function meta(wrap, text) {
  const m = document.createElement("div");
  m.className = "meta";
  m.textContent = text;
  wrap.append(m);
  scrollDown();
}

// ------------------------------------------------------------------ actions

function submit() {
  if (controller) { controller.abort(); return; }
  const text = input.value.trim();
  if (!text) return;
  input.value = "";
  autosize();
  history.push({ role: "user", content: text });
  addMessage("user", text);
  reply();
}

form.addEventListener("submit", (e) => { e.preventDefault(); submit(); });

input.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    if (!controller) submit();
  }
});
input.addEventListener("input", autosize);

regen.addEventListener("click", () => {
  if (controller) return;
  // Drop everything after the last user message (its reply, or an error bubble), then ask again.
  const last = history.map((m) => m.role).lastIndexOf("user");
  if (last < 0) return;
  history = history.slice(0, last + 1);
  const nodes = [...log.querySelectorAll(".msg")];
  const users = nodes.filter((n) => n.classList.contains("user"));
  const lastUser = users[users.length - 1];
  for (let n = lastUser.nextElementSibling; n; ) { const next = n.nextElementSibling; n.remove(); n = next; }
  reply();
});

clear.addEventListener("click", () => {
  if (controller) controller.abort();
  history = [];
  log.replaceChildren();
  const empty = document.createElement("div");
  empty.id = "empty";
  empty.className = "empty";
  empty.innerHTML = "<h1>Say hello</h1><p>A fresh conversation.</p>";
  log.append(empty);
  note.textContent = "";
  setBusy(false);
  input.focus();
});

loadModel();
input.focus();
