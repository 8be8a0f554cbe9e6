// Chat: streamed answers, then the memories they drew on; a model picker; conversations.

import { clock, el } from "./api.js";

export class ChatPanel {
  constructor(api, say) {
    this.api = api;
    this.say = say;
    this.model = document.getElementById("model");
    this.conversation = document.getElementById("conversation");
    this.messages = document.getElementById("messages");
    this.question = document.getElementById("question");
    this.send = document.getElementById("send");
    this.stopButton = document.getElementById("stop");
    this.abort = null;
    document.getElementById("ask").addEventListener("submit", (event) => {
      event.preventDefault();
      this.ask();
    });
    this.question.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
        event.preventDefault();
        this.ask();
      }
    });
    this.stopButton.addEventListener("click", () => this.abort?.abort());
    document.getElementById("new-conversation").addEventListener("click", () => this.newConversation());
    this.conversation.addEventListener("change", () => this.openConversation());
  }

  async start() {
    try {
      const models = await this.api.call("GET", "/v1/models");
      const chat = models.data.filter((m) => !m.task || m.task === "chat");
      this.model.replaceChildren(...chat.map((m) => el("option", { value: m.id }, m.id)));
    } catch (error) {
      this.say(`Models: ${error.message}`);
    }
    await this.listConversations();
  }

  async listConversations(select = this.conversation.value) {
    try {
      const list = await this.api.call("GET", "/v1/conversations");
      const options = list.data.map((c) => el("option", { value: c.id }, c.title || `Conversation of ${new Date(c.created_at * 1000).toLocaleString()}`));
      this.conversation.replaceChildren(el("option", { value: "" }, "None: each question alone"), ...options);
      this.conversation.value = select;
    } catch (error) {
      this.say(`Conversations: ${error.message}`);
    }
  }

  async newConversation() {
    const title = this.question.value.trim().slice(0, 60) || `Started ${new Date().toLocaleString()}`;
    try {
      const made = await this.api.call("POST", "/v1/conversations", { json: { title } });
      await this.listConversations(made.id);
      this.messages.replaceChildren();
      this.say(`New conversation: ${title}`);
    } catch (error) {
      this.say(`New conversation: ${error.message}`);
    }
  }

  async openConversation() {
    this.messages.replaceChildren();
    const id = this.conversation.value;
    if (!id) return;
    try {
      const view = await this.api.call("GET", `/v1/conversations/${encodeURIComponent(id)}`);
      for (const message of view.messages) this.messages.append(this.message(message.role, message.content));
    } catch (error) {
      this.say(`Conversation: ${error.message}`);
    }
  }

  message(role, content) {
    return el("li", { class: `message ${role}` }, el("span", { class: "role" }, role === "user" ? "You" : "Baton"), el("div", { class: "content" }, content));
  }

  async ask() {
    const text = this.question.value.trim();
    if (!text || this.abort) return;
    this.question.value = "";
    this.messages.append(this.message("user", text));
    const answer = el("div", { class: "content", "aria-live": "polite", "aria-busy": "true" });
    const item = el("li", { class: "message assistant" }, el("span", { class: "role" }, "Baton"), answer);
    this.messages.append(item);
    const body = { model: this.model.value, stream: true, messages: [{ role: "user", content: text }] };
    if (this.conversation.value) body.conversation = this.conversation.value;
    if (document.getElementById("use-memories").checked) body.rag = { top_k: 5 }; // without it, no lookup
    this.abort = new AbortController();
    this.send.disabled = true;
    this.stopButton.disabled = false;
    let pieces = 0;
    try {
      for await (const { data } of this.api.events("POST", "/v1/chat/completions", { json: body, signal: this.abort.signal })) {
        if (data === "[DONE]") break;
        const chunk = JSON.parse(data);
        const content = chunk.choices?.[0]?.delta?.content;
        if (content) {
          answer.append(el("span", { class: "piece" }, content));
          pieces += 1;
        }
        if (chunk.sources) item.append(this.sources(chunk.sources));
        if (chunk.baton) item.append(this.facts(chunk.baton));
        this.messages.scrollTop = this.messages.scrollHeight;
      }
      item.dataset.pieces = String(pieces);
    } catch (error) {
      item.append(el("p", { class: "error", role: "alert" }, error.name === "AbortError" ? "Stopped." : error.message));
    } finally {
      answer.setAttribute("aria-busy", "false");
      this.abort = null;
      this.send.disabled = false;
      this.stopButton.disabled = true;
      item.dataset.done = "true";
    }
  }

  sources(sources) {
    if (!sources.length) return el("p", { class: "sources muted" }, "No memories used.");
    const list = el("ol", { class: "source-list", "aria-label": "Sources" });
    for (const source of sources) {
      const meta = source.metadata || {};
      let where;
      if (meta.kind === "segment") {
        const recorded = meta.recorded_at ? `, recorded ${meta.recorded_at}` : "";
        where = `${meta.speaker ? `${meta.speaker}, ` : ""}${meta.source || "a recording"} at ${clock(meta.start)}–${clock(meta.end)}${recorded}`;
      } else {
        where = source.title || meta.source || meta.title || meta.doc_id || source.id;
      }
      const score = typeof source.score === "number" ? ` (score ${source.score.toFixed(2)})` : "";
      const text = source.text ? el("q", {}, source.text.length > 240 ? `${source.text.slice(0, 240)}…` : source.text) : null;
      list.append(el("li", { class: "source" }, el("strong", {}, where), score, text ? " " : null, text));
    }
    return el("details", { class: "sources", open: true }, el("summary", {}, `Sources (${sources.length})`), list);
  }

  facts(baton) {
    const parts = [`on ${baton.device || "?"}`];
    if (typeof baton.gpu_wait_time === "number") parts.push(`waited ${baton.gpu_wait_time.toFixed(2)} s for the GPU`);
    if (typeof baton.inference_time === "number") parts.push(`answered in ${baton.inference_time.toFixed(2)} s`);
    for (const warning of baton.warnings || []) parts.push(warning);
    return el("p", { class: "facts muted" }, parts.join(" · "));
  }
}
