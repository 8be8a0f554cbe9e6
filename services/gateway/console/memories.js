// Memories: search them (score, similarity and recency shown), add a text, delete one.

import { clock, el } from "./api.js";

export class MemoriesPanel {
  constructor(api, say) {
    this.api = api;
    this.say = say;
    this.results = document.getElementById("results");
    this.query = document.getElementById("query");
    this.recency = document.getElementById("recency");
    this.recency.addEventListener("input", () => {
      document.getElementById("recency-value").textContent = this.recency.value;
    });
    document.getElementById("search").addEventListener("submit", (event) => {
      event.preventDefault();
      this.search();
    });
    document.getElementById("ingest").addEventListener("submit", (event) => {
      event.preventDefault();
      this.ingest();
    });
  }

  async search() {
    const body = { query: this.query.value.trim(), top_k: 10, recency_bias: Number(this.recency.value) };
    if (!body.query) return;
    try {
      const { results } = await this.api.call("POST", "/v1/query", { json: body });
      this.results.replaceChildren(...results.map((r) => this.result(r)));
      if (!results.length) this.results.append(el("li", { class: "muted" }, "Nothing found."));
    } catch (error) {
      this.say(`Search: ${error.message}`);
    }
  }

  result(r) {
    const meta = r.metadata || {};
    const segment = meta.kind === "segment";
    const where = segment
      ? `${meta.speaker ? `${meta.speaker}, ` : ""}${meta.source || "a recording"} at ${clock(meta.start)}–${clock(meta.end)}`
      : meta.source || meta.title || meta.doc_id || r.id;
    const stored = typeof meta.created_at === "number" ? new Date(meta.created_at * 1000).toLocaleString() : "";
    // A segment is deleted alone; a document's chunks go together.
    const target = segment ? r.id : meta.doc_id || r.id;
    const item = el(
      "li",
      { class: "result", "data-id": target },
      el("strong", {}, where),
      el("span", { class: "scores" }, ` score ${r.score.toFixed(3)} · similarity ${r.similarity.toFixed(3)} · recency ${r.recency.toFixed(3)}${stored ? ` · ${stored}` : ""}`),
      el("p", {}, r.text),
    );
    item.append(
      el(
        "button",
        { type: "button", "aria-label": `Delete ${segment ? "segment" : "document"} ${where}`, onclick: () => this.remove(target, item) },
        segment ? "Delete segment" : "Delete document",
      ),
    );
    return item;
  }

  async remove(id, item) {
    try {
      await this.api.call("DELETE", `/v1/documents/${encodeURIComponent(id)}`);
      item.remove();
      this.say(`Deleted ${id}.`);
    } catch (error) {
      this.say(`Delete: ${error.message}`);
    }
  }

  async ingest() {
    const text = document.getElementById("doc-text").value;
    const title = document.getElementById("doc-title").value.trim() || "console";
    if (!text.trim()) return;
    try {
      const stored = await this.api.call("POST", "/v1/documents", { json: { documents: [{ text, metadata: { source: title } }] } });
      this.say(`Stored ${title} as ${stored.ids.join(", ")} (${stored.chunks} chunks).`);
      document.getElementById("doc-text").value = "";
    } catch (error) {
      this.say(`Add: ${error.message}`);
    }
  }
}
