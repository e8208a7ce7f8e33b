// The chat page of `glmv serve`: plain JavaScript over the server's own OpenAI-compatible API.
//
// GET /v1/models gives the model and its limits; POST /v1/chat/completions with stream: true
// is read with fetch + ReadableStream (SSE `data:` lines until [DONE]). Model output is only
// ever put into the page as text nodes (see markdown.js), never as HTML.
"use strict";

(function () {
  const KEY_STORAGE = "glmv.apiKey";
  const $ = (id) => document.getElementById(id);
  const ui = {
    modelName: $("model-name"),
    modelLimits: $("model-limits"),
    newChat: $("new-chat"),
    keyPanel: $("key-panel"),
    keyForm: $("key-form"),
    keyInput: $("key-input"),
    keyNote: $("key-note"),
    messages: $("messages"),
    empty: $("empty-note"),
    composer: $("composer"),
    attachments: $("attachments"),
    attachInput: $("attach-input"),
    prompt: $("prompt"),
    send: $("send"),
    stop: $("stop"),
    thinking: $("thinking"),
    thinkingHint: $("thinking-hint"),
    budget: $("budget"),
    temperature: $("temperature"),
    topP: $("top-p"),
    maxTokens: $("max-tokens"),
    dropHint: $("drop-hint"),
  };

  const state = {
    model: null, // data[0] of /v1/models
    history: [], // OpenAI messages already answered (sent again each turn)
    pending: [], // attachments of the next message: {kind, name, url, size}
    controller: null, // AbortController of the stream in progress
    epoch: 0, // bumped by "New chat": a stream of an older conversation is not kept
  };

  // -- API key --------------------------------------------------------------------------------

  function apiKey() {
    try {
      return sessionStorage.getItem(KEY_STORAGE) || "";
    } catch (_) {
      return "";
    }
  }

  function headers(extra) {
    const out = Object.assign({}, extra || {});
    const key = apiKey();
    if (key) out.Authorization = "Bearer " + key;
    return out;
  }

  function askForKey(message) {
    ui.keyPanel.hidden = false;
    ui.keyNote.textContent = message || "Kept in this tab's session storage only.";
    ui.keyNote.classList.toggle("bad", Boolean(message));
    ui.keyInput.focus();
  }

  ui.keyForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const key = ui.keyInput.value.trim();
    if (!key) return;
    try {
      sessionStorage.setItem(KEY_STORAGE, key);
    } catch (_) {
      /* storage disabled: the key is lost on reload */
    }
    ui.keyInput.value = "";
    loadModel();
  });

  // -- model and its limits -------------------------------------------------------------------

  function formatBytes(n) {
    if (!n && n !== 0) return "?";
    if (n >= 1 << 20) return (n / (1 << 20)).toFixed(n % (1 << 20) ? 1 : 0) + " MiB";
    if (n >= 1024) return (n / 1024).toFixed(n % 1024 ? 1 : 0) + " KiB";
    return n + " B";
  }

  async function loadModel() {
    let response;
    try {
      response = await fetch("/v1/models", { headers: headers() });
    } catch (err) {
      ui.modelName.textContent = "server unreachable";
      return;
    }
    if (response.status === 401) {
      const hadKey = Boolean(apiKey());
      ui.modelName.textContent = "API key needed";
      ui.modelLimits.textContent = "";
      askForKey(hadKey ? "That key was refused; try another." : "");
      return;
    }
    if (!response.ok) {
      ui.modelName.textContent = "error " + response.status;
      return;
    }
    const body = await response.json();
    const model = (body.data || [])[0];
    if (!model) return;
    state.model = model;
    ui.keyPanel.hidden = true;
    ui.modelName.textContent = model.id;
    ui.modelName.title = model.id;
    const g = model.glmv || {};
    const mm = g.limit_mm_per_prompt || {};
    const parts = [];
    if (model.max_model_len) parts.push(model.max_model_len + " tokens");
    if (g.model_type) parts.push(g.model_type);
    parts.push("thinking " + (g.thinking || "?"));
    if (g.tools) parts.push("tools");
    parts.push(`${mm.image ?? "?"} images · ${mm.video ?? "?"} videos · ` +
               `${mm.document ?? "?"} PDFs per request`);
    parts.push(formatBytes(g.max_media_bytes) + " per file");
    if (g.max_document_pages) parts.push(g.max_document_pages + " pages per PDF");
    ui.modelLimits.textContent = parts.join(" · ");
    if (g.thinking === "always") {
      ui.thinking.checked = true;
      ui.thinking.disabled = true;
      ui.thinkingHint.textContent = "(always on for this model)";
    } else {
      ui.thinking.disabled = false;
      ui.thinkingHint.textContent = "";
    }
  }

  // -- attachments ----------------------------------------------------------------------------

  function kindOf(file) {
    const type = (file.type || "").toLowerCase();
    const name = (file.name || "").toLowerCase();
    if (type.startsWith("image/")) return "image";
    if (type.startsWith("video/")) return "video";
    if (type === "application/pdf" || name.endsWith(".pdf")) return "pdf";
    if (/\.(png|jpe?g|gif|bmp|webp|tiff?)$/.test(name)) return "image";
    if (/\.(mp4|avi|mkv|mov|wmv|flv|webm|mpe?g|m4v)$/.test(name)) return "video";
    return null;
  }

  function readAsDataURL(file) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(String(reader.result));
      reader.onerror = () => reject(reader.error);
      reader.readAsDataURL(file);
    });
  }

  async function addFiles(files) {
    for (const file of Array.from(files || [])) {
      const kind = kindOf(file);
      if (!kind) {
        notice(`"${file.name}" is not an image, a video or a PDF.`);
        continue;
      }
      const url = await readAsDataURL(file);
      state.pending.push({ kind, name: file.name || kind, url, size: file.size });
    }
    renderPending();
  }

  function chip(att, testid) {
    const item = document.createElement("div");
    item.className = "thumb thumb-" + att.kind;
    item.dataset.testid = testid;
    item.dataset.kind = att.kind;
    if (att.kind === "image") {
      const img = document.createElement("img");
      img.src = att.url;
      img.alt = att.name;
      item.appendChild(img);
    } else {
      const label = document.createElement("span");
      label.className = "chip-label";
      label.textContent = (att.kind === "pdf" ? "PDF · " : "Video · ") + att.name;
      item.appendChild(label);
    }
    item.title = `${att.name} (${formatBytes(att.size)})`;
    return item;
  }

  function renderPending() {
    ui.attachments.replaceChildren();
    state.pending.forEach((att, index) => {
      const item = chip(att, "attachment-thumb");
      const remove = document.createElement("button");
      remove.type = "button";
      remove.className = "remove";
      remove.dataset.testid = "attachment-remove";
      remove.setAttribute("aria-label", "Remove " + att.name);
      remove.textContent = "×";
      remove.addEventListener("click", () => {
        state.pending.splice(index, 1);
        renderPending();
      });
      item.appendChild(remove);
      ui.attachments.appendChild(item);
    });
  }

  ui.attachInput.addEventListener("change", async () => {
    await addFiles(ui.attachInput.files);
    ui.attachInput.value = "";
  });

  let dragDepth = 0;
  document.addEventListener("dragenter", (event) => {
    if (!event.dataTransfer || !Array.from(event.dataTransfer.types).includes("Files")) return;
    dragDepth += 1;
    ui.dropHint.hidden = false;
  });
  document.addEventListener("dragleave", () => {
    dragDepth = Math.max(0, dragDepth - 1);
    if (!dragDepth) ui.dropHint.hidden = true;
  });
  document.addEventListener("dragover", (event) => event.preventDefault());
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    dragDepth = 0;
    ui.dropHint.hidden = true;
    if (event.dataTransfer && event.dataTransfer.files.length) addFiles(event.dataTransfer.files);
  });
  document.addEventListener("paste", (event) => {
    const files = event.clipboardData ? Array.from(event.clipboardData.files || []) : [];
    if (files.length) {
      event.preventDefault();
      addFiles(files);
    }
  });

  function contentParts(text, attachments) {
    if (!attachments.length) return text;
    const parts = attachments.map((att) => {
      if (att.kind === "image") return { type: "image_url", image_url: { url: att.url } };
      if (att.kind === "video") return { type: "video_url", video_url: { url: att.url } };
      return { type: "file", file: { file_data: att.url, filename: att.name } };
    });
    if (text) parts.push({ type: "text", text });
    return parts;
  }

  // The images of a request in order: what `image_index` of a box counts.
  function requestImages(messages) {
    const out = [];
    for (const message of messages) {
      if (message.role !== "user" || !Array.isArray(message.content)) continue;
      for (const part of message.content) {
        if (part.type === "image_url") out.push(part.image_url.url);
      }
    }
    return out;
  }

  // -- conversation view ----------------------------------------------------------------------

  function node(tag, cls, testid) {
    const n = document.createElement(tag);
    if (cls) n.className = cls;
    if (testid) n.dataset.testid = testid;
    return n;
  }

  function scrollDown() {
    ui.messages.scrollTop = ui.messages.scrollHeight;
  }

  function notice(text) {
    const bubble = node("div", "message error", "error");
    bubble.textContent = text;
    ui.empty.hidden = true;
    ui.messages.appendChild(bubble);
    scrollDown();
  }

  function userBubble(text, attachments) {
    ui.empty.hidden = true;
    const msg = node("div", "message user", "message-user");
    if (attachments.length) {
      const row = node("div", "attachments sent");
      attachments.forEach((att) => row.appendChild(chip(att, "sent-attachment")));
      msg.appendChild(row);
    }
    if (text) {
      const body = node("div", "text");
      body.textContent = text;
      msg.appendChild(body);
    }
    ui.messages.appendChild(msg);
    scrollDown();
    return msg;
  }

  class AssistantTurn {
    constructor(images) {
      this.images = images;
      this.reasoning = "";
      this.content = "";
      this.toolCalls = []; // by index: {id, type, function: {name, arguments}}
      this.boxes = [];
      this.chunks = 0;
      this.el = node("div", "message assistant streaming", "message-assistant");
      this.el.dataset.chunks = "0";
      this.thinkingPanel = null;
      this.answer = node("div", "answer markdown", "answer");
      this.tools = node("div", "tool-calls");
      this.figures = node("div", "figures");
      this.meta = node("div", "meta");
      this.el.append(this.answer, this.tools, this.figures, this.meta);
      ui.messages.appendChild(this.el);
      this.frame = 0;
      scrollDown();
    }

    add(delta) {
      this.chunks += 1;
      this.el.dataset.chunks = String(this.chunks);
      if (delta.reasoning_content) this.reasoning += delta.reasoning_content;
      if (delta.content) this.content += delta.content;
      for (const call of delta.tool_calls || []) {
        const index = call.index ?? this.toolCalls.length;
        const slot = this.toolCalls[index] ||
          (this.toolCalls[index] = { id: "", type: "function",
                                     function: { name: "", arguments: "" } });
        if (call.id) slot.id = call.id;
        if (call.type) slot.type = call.type;
        if (call.function) {
          if (call.function.name) slot.function.name += call.function.name;
          if (call.function.arguments) slot.function.arguments += call.function.arguments;
        }
      }
      if (delta.boxes) this.boxes.push(...delta.boxes);
      this.schedule();
    }

    schedule() {
      if (this.frame) return;
      this.frame = requestAnimationFrame(() => {
        this.frame = 0;
        this.render();
      });
    }

    render() {
      const nearBottom =
        ui.messages.scrollHeight - ui.messages.scrollTop - ui.messages.clientHeight < 80;
      if (this.reasoning) {
        if (!this.thinkingPanel) {
          this.thinkingPanel = node("details", "thinking", "thinking-panel");
          this.thinkingPanel.open = true;
          const summary = node("summary");
          summary.textContent = "Thinking";
          this.thinkingText = node("div", "thinking-text", "thinking-text");
          this.thinkingPanel.append(summary, this.thinkingText);
          this.el.insertBefore(this.thinkingPanel, this.answer);
        }
        this.thinkingText.textContent = this.reasoning;
      }
      this.answer.replaceChildren(window.GlmvMarkdown.render(this.content));
      this.renderTools();
      this.renderBoxes();
      if (nearBottom) scrollDown();
    }

    renderTools() {
      this.tools.replaceChildren();
      for (const call of this.toolCalls) {
        if (!call) continue;
        const block = node("div", "tool-call", "tool-call");
        const head = node("div", "tool-head");
        const tag = node("span", "tool-tag");
        tag.textContent = "tool call";
        const name = node("code", "tool-name", "tool-name");
        name.textContent = call.function.name;
        head.append(tag, name);
        const args = node("pre", "tool-args", "tool-args");
        let text = call.function.arguments;
        try {
          text = JSON.stringify(JSON.parse(text), null, 2);
        } catch (_) {
          /* still streaming, or not JSON: shown as it is */
        }
        args.textContent = text;
        block.append(head, args);
        this.tools.appendChild(block);
      }
    }

    renderBoxes() {
      this.figures.replaceChildren();
      const byImage = new Map();
      for (const box of this.boxes) {
        const index = box.image_index ?? this.images.length - 1;
        if (!this.images[index] || !Array.isArray(box.box) || box.box.length !== 4) continue;
        if (!byImage.has(index)) byImage.set(index, []);
        byImage.get(index).push(box);
      }
      for (const [index, boxes] of byImage) {
        const figure = node("figure", "annotated", "annotated-image");
        const frame = node("div", "frame");
        const img = node("img");
        img.src = this.images[index];
        img.alt = "image " + (index + 1) + " with boxes";
        frame.appendChild(img);
        boxes.forEach((b, k) => {
          const [x1, y1, x2, y2] = b.box.map((v) => Math.max(0, Math.min(1000, Number(v))));
          const overlay = node("div", "box c" + (k % 6), "box-overlay");
          overlay.style.left = x1 / 10 + "%";
          overlay.style.top = y1 / 10 + "%";
          overlay.style.width = Math.max(0, x2 - x1) / 10 + "%";
          overlay.style.height = Math.max(0, y2 - y1) / 10 + "%";
          const label = node("span", "box-label", "box-label");
          label.textContent = b.label || b.text || "box " + (k + 1);
          overlay.appendChild(label);
          frame.appendChild(overlay);
        });
        const caption = node("figcaption");
        caption.textContent = `Image ${index + 1}: ${boxes.length} box` +
          (boxes.length === 1 ? "" : "es");
        figure.append(frame, caption);
        this.figures.appendChild(figure);
      }
    }

    error(message) {
      const bubble = node("div", "error-bubble", "error");
      bubble.textContent = message;
      this.el.appendChild(bubble);
      this.el.classList.add("failed");
    }

    finish(note) {
      if (this.frame) cancelAnimationFrame(this.frame);
      this.frame = 0;
      this.render();
      this.el.classList.remove("streaming");
      this.el.dataset.done = "true";
      if (note) this.meta.textContent = note;
      if (!this.content && !this.reasoning && !this.toolCalls.length &&
          !this.el.querySelector(".error-bubble")) {
        this.answer.textContent = "(empty answer)";
        this.answer.classList.add("muted");
      }
    }

    message() {
      const out = { role: "assistant", content: this.content };
      const calls = this.toolCalls.filter(Boolean);
      if (calls.length) out.tool_calls = calls;
      return out;
    }
  }

  // -- sending --------------------------------------------------------------------------------

  function numberField(input) {
    const value = input.value.trim();
    if (value === "") return undefined;
    const n = Number(value);
    return Number.isFinite(n) ? n : undefined;
  }

  function requestBody(messages) {
    const body = { messages, stream: true, stream_options: { include_usage: true } };
    if (state.model) body.model = state.model.id;
    const glmv = (state.model && state.model.glmv) || {};
    if (glmv.thinking !== "always") {
      body.chat_template_kwargs = { enable_thinking: ui.thinking.checked };
    }
    const budget = numberField(ui.budget);
    if (budget !== undefined) body.thinking_budget = Math.round(budget);
    const temperature = numberField(ui.temperature);
    if (temperature !== undefined) body.temperature = temperature;
    const topP = numberField(ui.topP);
    if (topP !== undefined) body.top_p = topP;
    const maxTokens = numberField(ui.maxTokens);
    if (maxTokens !== undefined) body.max_tokens = Math.round(maxTokens);
    return body;
  }

  function setStreaming(on) {
    ui.send.hidden = on;
    ui.stop.hidden = !on;
    document.body.classList.toggle("busy", on);
  }

  async function errorMessage(response) {
    try {
      const body = await response.json();
      if (body && body.error) {
        return typeof body.error === "string" ? body.error : body.error.message ||
          JSON.stringify(body.error);
      }
      if (body && body.detail) return JSON.stringify(body.detail);
    } catch (_) {
      /* not JSON */
    }
    return `the server answered ${response.status} ${response.statusText}`;
  }

  // The refused message goes back into the composer, so it can be fixed and sent again.
  function restore(text, attachments, userEl) {
    if (!ui.prompt.value) ui.prompt.value = text;
    state.pending = attachments.concat(state.pending);
    renderPending();
    if (userEl) userEl.classList.add("not-sent");
  }

  async function send() {
    if (state.controller) return;
    const text = ui.prompt.value.trim();
    const attachments = state.pending.slice();
    if (!text && !attachments.length) return;
    const user = { role: "user", content: contentParts(text, attachments) };
    const messages = state.history.concat([user]);
    ui.prompt.value = "";
    state.pending = [];
    renderPending();
    const userEl = userBubble(text, attachments);
    const turn = new AssistantTurn(requestImages(messages));
    const controller = new AbortController();
    const epoch = state.epoch;
    state.controller = controller;
    setStreaming(true);
    let ok = false;
    let note = "";
    try {
      const response = await fetch("/v1/chat/completions", {
        method: "POST",
        headers: headers({ "Content-Type": "application/json" }),
        body: JSON.stringify(requestBody(messages)),
        signal: controller.signal,
      });
      if (!response.ok) {
        const message = await errorMessage(response);
        turn.error(message);
        if (response.status === 401) {
          try {
            sessionStorage.removeItem(KEY_STORAGE);
          } catch (_) {
            /* ignore */
          }
          askForKey("The server refused the API key: " + message);
        }
        restore(text, attachments, userEl);
        return;
      }
      const result = await readStream(response, turn);
      if (result.error) {
        turn.error(result.error);
        restore(text, attachments, userEl);
        return;
      }
      ok = true;
      note = result.note;
    } catch (err) {
      if (err && err.name === "AbortError") {
        ok = true;
        note = "stopped";
      } else {
        turn.error("request failed: " + (err && err.message ? err.message : err));
        restore(text, attachments, userEl);
      }
    } finally {
      turn.finish(note);
      if (ok && epoch === state.epoch) state.history = messages.concat([turn.message()]);
      state.controller = null;
      setStreaming(false);
      ui.prompt.focus();
    }
  }

  // SSE: `data: {...}` lines separated by blank lines, until `data: [DONE]`.
  async function readStream(response, turn) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let finish = null;
    let usage = null;
    const handle = (payload) => {
      if (payload === "[DONE]") return true;
      let data;
      try {
        data = JSON.parse(payload);
      } catch (_) {
        return false;
      }
      if (data.error) {
        throw Object.assign(new Error("in-band"), {
          inBand: typeof data.error === "string" ? data.error : data.error.message ||
            JSON.stringify(data.error),
        });
      }
      if (data.usage) usage = data.usage;
      for (const choice of data.choices || []) {
        if (choice.index && choice.index !== 0) continue;
        if (choice.delta) turn.add(choice.delta);
        if (choice.finish_reason) finish = choice.finish_reason;
      }
      return false;
    };
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let newline;
        while ((newline = buffer.indexOf("\n")) >= 0) {
          const line = buffer.slice(0, newline).replace(/\r$/, "");
          buffer = buffer.slice(newline + 1);
          if (!line.startsWith("data:")) continue;
          if (handle(line.slice(5).trim())) {
            reader.cancel().catch(() => {});
            return { note: describe(finish, usage) };
          }
        }
      }
      if (buffer.startsWith("data:")) handle(buffer.slice(5).trim());
    } catch (err) {
      if (err && err.inBand) return { error: err.inBand };
      throw err;
    }
    return { note: describe(finish, usage) };
  }

  function describe(finish, usage) {
    const parts = [];
    if (finish) parts.push("finish: " + finish);
    if (usage) {
      parts.push(`${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion tokens`);
    }
    return parts.join(" · ");
  }

  ui.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  ui.prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  ui.stop.addEventListener("click", () => {
    if (state.controller) state.controller.abort();
  });
  ui.newChat.addEventListener("click", () => {
    state.epoch += 1;
    if (state.controller) state.controller.abort();
    state.history = [];
    state.pending = [];
    renderPending();
    ui.messages.replaceChildren(ui.empty);
    ui.empty.hidden = false;
    ui.prompt.value = "";
    ui.prompt.focus();
  });

  // On a narrow screen the settings start folded, leaving the room to the conversation.
  if (window.matchMedia("(max-width: 760px)").matches) $("settings-panel").open = false;

  loadModel();
})();
