"use strict";
// jmoss chat page: streams from the server's own /v1/chat/completions. Model output is untrusted,
// so every piece of it enters the DOM as a text node (append/textContent), never as markup.

const config = JSON.parse(document.getElementById("jmoss-config").textContent);
const $ = (id) => document.getElementById(id);
const ui = {
  messages: $("messages"), composer: $("composer"), input: $("input"), send: $("send"), stop: $("stop"),
  newChat: $("new-chat"), system: $("system"), resetSystem: $("reset-system"), temperature: $("temperature"),
  topP: $("top-p"), maxTokens: $("max-tokens"), keyForm: $("key-form"), keyInput: $("api-key"),
};
const KEY_SLOT = "jmoss-api-key";  // sessionStorage: this tab only, gone when it closes
const PANEL_TITLES = { thoughts: "Inner Thoughts", commands: "Commands", results: "Results", notice: "Notice" };

let history = [];        // [{role, content}] of this chat, sent with every request
let shown = [];          // the message element of each history entry (greyed once the server drops it)
let controller = null;   // the AbortController of the request in flight
let chatId = 0;          // bumped by New chat, so a request still finishing cannot write into the new chat
let memoryKey = "";      // the key when session storage is unavailable

function el(tag, className) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  return node;
}

// -- a small Markdown subset: fences, headings, lists, paragraphs; inline code, bold, italic, links --

const FENCE = /^\s*```(.*)$/;
const FENCE_END = /^\s*```\s*$/;
const HEADING = /^(#{1,6})\s+(.*)$/;
const ITEM = /^\s*([-*+]|\d{1,9}[.)])\s+(.*)$/;
const BLANK = /^\s*$/;

function renderMarkdown(target, text) {
  const blocks = [];
  const lines = text.split("\n");
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    const fence = line.match(FENCE);
    if (fence) {
      const code = [];
      for (i++; i < lines.length && !FENCE_END.test(lines[i]); i++) code.push(lines[i]);
      i++;  // the closing fence (an unclosed one, while streaming, runs to the end)
      const pre = el("pre");
      const c = el("code");
      const lang = fence[1].trim().split(/\s+/)[0];
      if (lang) c.dataset.lang = lang;
      c.textContent = code.join("\n");
      pre.append(c);
      blocks.push(pre);
    } else if (BLANK.test(line)) {
      i++;
    } else if (HEADING.test(line)) {
      const m = line.match(HEADING);
      const h = el("h" + Math.min(6, m[1].length + 2));
      inline(h, m[2]);
      blocks.push(h);
      i++;
    } else if (ITEM.test(line)) {
      const ordered = /^\s*\d/.test(line);
      const list = el(ordered ? "ol" : "ul");
      for (; i < lines.length && ITEM.test(lines[i]) && /^\s*\d/.test(lines[i]) === ordered; i++) {
        const li = el("li");
        inline(li, lines[i].match(ITEM)[2]);
        list.append(li);
      }
      blocks.push(list);
    } else {
      const p = el("p");
      for (let first = true; i < lines.length; i++, first = false) {
        const l = lines[i];
        if (BLANK.test(l) || FENCE.test(l) || HEADING.test(l) || ITEM.test(l)) break;
        if (!first) p.append(el("br"));
        inline(p, l);
      }
      blocks.push(p);
    }
  }
  target.replaceChildren(...blocks);
}

function inline(target, text) {
  const re = /`([^`]+)`|\*\*(.+?)\*\*|\*([^*\s](?:[^*]*?[^*\s])?)\*|\[([^\]]+)\]\(([^)\s]+)\)/g;
  let last = 0;
  let m;
  while ((m = re.exec(text)) !== null) {
    if (m.index > last) target.append(text.slice(last, m.index));
    if (m[1] !== undefined) {
      const c = el("code");
      c.textContent = m[1];
      target.append(c);
    } else if (m[2] !== undefined) {
      const b = el("strong");
      inline(b, m[2]);
      target.append(b);
    } else if (m[3] !== undefined) {
      const e = el("em");
      inline(e, m[3]);
      target.append(e);
    } else {
      link(target, m[4], m[5], m[0]);
    }
    last = re.lastIndex;
  }
  if (last < text.length) target.append(text.slice(last));
}

function link(target, label, href, raw) {
  let url = null;
  try { url = new URL(href); } catch (err) { url = null; }
  if (!url || (url.protocol !== "http:" && url.protocol !== "https:")) {
    target.append(raw);  // javascript:, data:, relative…: shown as the text the model wrote
    return;
  }
  const a = el("a");
  a.href = url.href;
  a.rel = "noopener noreferrer nofollow";
  a.target = "_blank";
  a.textContent = label;
  target.append(a);
}

// -- the conversation view --

function addMessage(role, text) {
  const root = el("div", "msg " + role);
  const label = el("div", "role");
  label.textContent = role === "user" ? "You" : role === "error" ? "Error" : "MOSS";
  const content = el("div", "content");
  root.append(label, content);
  ui.messages.append(root);
  if (text !== undefined) content.textContent = text;
  scrollDown();
  return { root, content, panel: null };
}

function addNote(message, text) {
  const note = el("div", "note");
  note.textContent = text;
  message.root.append(note);
}

function addEvent(message, event) {
  if (!message.panel) {
    const details = el("details", "thoughts");
    const summary = el("summary");
    summary.textContent = "Inner Thoughts, Commands and Results";
    details.append(summary);
    message.root.insertBefore(details, message.content);
    message.panel = details;
  }
  const section = el("section", "event-" + String(event.kind));
  const title = el("h3");
  title.textContent = PANEL_TITLES[event.kind] || String(event.kind);
  const body = el("pre");
  let text = String(event.text);
  if (event.kind === "results") text = text.replace(/^<\|Results\|>:\s*/, "").replace(/\s*<eor>\s*$/, "");
  body.textContent = text;  // the field's body, without MOSS's markers
  section.append(title, body);
  message.panel.append(section);
}

// The server dropped the oldest `messages` of the history to fit the model's context: they stay on the
// page, greyed, and are not sent again (the next request starts where the server's context starts).
function dropOldest(reply, truncation) {
  const count = Math.min(Number(truncation.dropped_messages) || 0, history.length - 1);
  if (count <= 0) return;
  history.splice(0, count);
  for (const node of shown.splice(0, count)) node.classList.add("dropped");
  const turns = Number(truncation.dropped_turns) || count;
  const note = el("div", "note context-note");
  note.textContent = `The conversation outgrew the model's ${config.context}-position context: the oldest ` +
    `${turns} turn${turns === 1 ? "" : "s"} (greyed above) ${turns === 1 ? "was" : "were"} dropped; ` +
    "MOSS no longer sees them.";
  reply.root.insertBefore(note, reply.content);
}

function scrollDown() {
  ui.messages.scrollTop = ui.messages.scrollHeight;
}

function setBusy(busy) {
  document.body.dataset.state = busy ? "streaming" : "idle";
  ui.send.disabled = busy;
  ui.stop.disabled = !busy;
}

// -- the API key (servers started with --api-key): asked once, kept in the tab's session storage --

function apiKey() {
  try { return sessionStorage.getItem(KEY_SLOT) || ""; } catch (err) { return ""; }
}

function askForKey() {
  ui.keyForm.hidden = false;
  ui.keyInput.focus();
}

function saveKey(event) {
  event.preventDefault();
  const key = ui.keyInput.value.trim();
  if (!key) return;
  try { sessionStorage.setItem(KEY_SLOT, key); } catch (err) { /* storage off: the key lives until reload */ }
  memoryKey = key;
  ui.keyInput.value = "";
  ui.keyForm.hidden = true;
  ui.input.focus();
}

function authHeaders() {
  const key = apiKey() || memoryKey;
  return key ? { Authorization: "Bearer " + key } : {};
}

// -- talking to the server --

function number(input, fallback) {
  const value = Number(input.value);
  return input.value.trim() !== "" && Number.isFinite(value) ? value : fallback;
}

function requestBody() {
  const messages = [];
  if (ui.system.value.trim()) messages.push({ role: "system", content: ui.system.value });
  messages.push(...history);
  const body = {
    model: config.model, messages, stream: true,
    temperature: number(ui.temperature, config.defaults.temperature),
    top_p: number(ui.topP, config.defaults.top_p),
    max_tokens: Math.max(1, Math.round(number(ui.maxTokens, config.defaults.max_tokens))),
  };
  if (config.plugins.length) body.jmoss_events = true;  // opt-in: Inner Thoughts/Commands/Results chunks
  return body;
}

async function errorText(response) {
  let message = response.statusText || "request failed";
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (err) { /* not JSON: keep the status text */ }
  return `${response.status}: ${message}`;
}

// Yields each parsed `data:` payload of a server-sent event stream.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function send() {
  const text = ui.input.value;
  if (controller || !text.trim()) return;
  ui.input.value = "";
  const mine = chatId;
  history.push({ role: "user", content: text });
  shown.push(addMessage("user", text).root);
  const reply = addMessage("assistant");
  reply.root.classList.add("streaming");
  controller = new AbortController();
  setBusy(true);
  let answer = "";
  let failure = null;
  let stopped = false;
  let finish = null;
  try {
    const response = await fetch("v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify(requestBody()), signal: controller.signal,
    });
    if (response.status === 401) {  // no key yet, or a wrong one: forget it and ask
      try { sessionStorage.removeItem(KEY_SLOT); } catch (err) { /* nothing stored */ }
      memoryKey = "";
      askForKey();
      failure = await errorText(response);
    } else if (!response.ok) {
      failure = await errorText(response);
    } else {
      for await (const chunk of events(response)) {
        if (chunk.error) {
          failure = chunk.error.message || "the server reported an error";
          break;
        }
        if (chunk.jmoss_event) addEvent(reply, chunk.jmoss_event);
        if (chunk.jmoss_truncation && mine === chatId) dropOldest(reply, chunk.jmoss_truncation);
        const choice = chunk.choices && chunk.choices[0];
        if (choice && choice.delta && typeof choice.delta.content === "string" && choice.delta.content) {
          answer += choice.delta.content;
          renderMarkdown(reply.content, answer);
          scrollDown();
        }
        if (choice && choice.finish_reason) finish = choice.finish_reason;
      }
    }
  } catch (err) {
    if (err && err.name === "AbortError") stopped = true;
    else failure = "the connection to the server failed: " + (err && err.message ? err.message : String(err));
  }
  controller = null;
  setBusy(false);
  reply.root.classList.remove("streaming");
  if (mine !== chatId) return;  // New chat was pressed meanwhile: this turn belongs to no chat
  if (failure !== null && !answer) {
    reply.root.remove();
    history.pop();  // the server did not take this turn: do not resend it
    shown.pop();
    addMessage("error", failure).root.dataset.error = "true";
    return;
  }
  history.push({ role: "assistant", content: answer });  // a stopped reply stays, as MOSS's Chat keeps it
  shown.push(reply.root);
  if (stopped) addNote(reply, "stopped");
  else if (finish === "length") addNote(reply, "cut off at max tokens");
  if (failure !== null) addMessage("error", failure).root.dataset.error = "true";
  scrollDown();
}

function stop() {
  if (controller) controller.abort();  // closes the connection; the server cancels the generation
}

function newChat() {
  stop();
  chatId++;
  history = [];
  shown = [];
  ui.messages.replaceChildren();
  ui.input.focus();
}

// -- wiring --

$("model-name").textContent = config.model;
$("plugins").textContent = config.plugins.length ? "plugins: " + config.plugins.join(", ") : "";
ui.system.value = config.meta;
ui.temperature.value = config.defaults.temperature;
ui.topP.value = config.defaults.top_p;
ui.maxTokens.value = config.defaults.max_tokens;
ui.maxTokens.max = config.max_tokens;
ui.resetSystem.addEventListener("click", () => { ui.system.value = config.meta; });
ui.composer.addEventListener("submit", (event) => { event.preventDefault(); send(); });
ui.input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    send();
  }
});
ui.stop.addEventListener("click", stop);
ui.newChat.addEventListener("click", newChat);
ui.keyForm.addEventListener("submit", saveKey);
setBusy(false);
ui.input.focus();
if (config.auth && !apiKey()) askForKey();
