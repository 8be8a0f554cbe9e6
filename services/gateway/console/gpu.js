// The GPU panel: the card now (holder, queue, memory) and the timeline, backfilled
// from /v1/history once the event stream is live, so nothing falls between the two.

import { el } from "./api.js";
import { Timeline } from "./timeline.js";

const HISTORY = 10000;

export class GpuPanel {
  constructor(api, say) {
    this.api = api;
    this.say = say;
    this.timeline = new Timeline(
      document.getElementById("timeline"),
      document.getElementById("gpu-detail"),
      document.getElementById("window-label"),
    );
    this.timeline.moved = (live) => document.getElementById("live").setAttribute("aria-pressed", String(live));
    this.now = document.getElementById("gpu-now");
    this.abort = null;
    this.pendingState = null;
    for (const button of document.querySelectorAll("[data-span]")) {
      button.addEventListener("click", () => this.timeline.show(button.dataset.span));
    }
    document.getElementById("earlier").addEventListener("click", () => this.timeline.pan(-1));
    document.getElementById("later").addEventListener("click", () => this.timeline.pan(1));
    document.getElementById("live").addEventListener("click", () => this.timeline.follow());
    setInterval(() => {
      if (this.timeline.end == null) this.timeline.render();
    }, 1000);
    this.processes = document.getElementById("processes");
    this.showProcesses();
    setInterval(() => this.showProcesses(), 5000);
  }

  // The services, and what the launcher's supervisor did: restarts, crash loops.
  async showProcesses() {
    try {
      const ready = await this.api.call("GET", "/ready");
      const states = Object.entries(ready.services || {}).map(([name, state]) => {
        const supervised = (ready.processes || {})[name];
        if (!supervised) return `${name} ${state}`;
        const restarts = supervised.restarts ? `, restarted ${supervised.restarts}×` : "";
        const last = supervised.last_exit != null ? ` (last exit ${supervised.last_exit})` : "";
        const down = supervised.state !== "running" ? ` ${supervised.state}` : "";
        return `${name} ${state}${down}${restarts}${last}`;
      });
      this.processes.textContent = `Services: ${states.join(" · ")}`;
    } catch (error) {
      this.processes.textContent = `Services: not known (${error.message})`;
    }
  }

  start() {
    this.stop();
    this.abort = new AbortController();
    this.watch(this.abort.signal);
  }

  stop() {
    if (this.abort) this.abort.abort();
    this.abort = null;
  }

  async watch(signal) {
    let delay = 1000;
    while (!signal.aborted) {
      try {
        for await (const { event, data } of this.api.events("GET", "/v1/events", { signal })) {
          delay = 1000;
          if (event === "subscribed") {
            await this.backfill();
            continue;
          }
          this.timeline.event(event, JSON.parse(data));
          this.timeline.render();
          if (event === "released" || event === "expired" || event === "revoked") this.backfill(20);
          this.refreshState();
        }
      } catch (error) {
        if (signal.aborted) return;
        if (error.status === 401 || error.status === 403) {
          this.now.textContent = `The timeline needs a token with scope gpu or admin: ${error.message}`;
          return;
        }
        this.now.textContent = `The event stream broke (${error.message}); reconnecting.`;
      }
      await new Promise((resolve) => setTimeout(resolve, delay));
      delay = Math.min(delay * 2, 15000);
    }
  }

  async backfill(limit = HISTORY) {
    try {
      const entries = await this.api.call("GET", `/v1/history?limit=${limit}`);
      for (const entry of entries) this.timeline.merge(entry);
      this.timeline.render();
      await this.refreshState();
    } catch (error) {
      this.say(`History: ${error.message}`);
    }
  }

  // The card now; several events in a burst ask once.
  refreshState() {
    if (!this.pendingState) {
      this.pendingState = new Promise((resolve) => setTimeout(resolve, 200))
        .then(() => this.api.call("GET", "/v1/gpu"))
        .then((state) => this.showState(state))
        .catch((error) => this.say(`GPU state: ${error.message}`))
        .finally(() => {
          this.pendingState = null;
        });
    }
    return this.pendingState;
  }

  showState(s) {
    const parts = [];
    if (s.holder) {
      parts.push(el("span", { "data-holder": s.holder, class: "holder" }, `Held by ${s.holder}`), ` (fence ${s.fence}, ${s.priority})`);
      if (s.yield_requested) parts.push(", asked to yield");
      if (s.revoked) parts.push(", revoked");
      if (s.vram_mb) parts.push(`, declares ${s.vram_mb} MB`);
    } else {
      parts.push("Free");
    }
    parts.push(` · card memory: ${s.card_mb ? `${s.card_mb.toLocaleString()} MB` : "not known (no card here)"}`);
    if (s.quarantine_until) parts.push(" · quarantined after a revocation");
    const queue = s.queue.length
      ? el("ol", { class: "queue", "aria-label": "Waiting" }, ...s.queue.map((q) => el("li", {}, `${q.holder} (${q.priority}) waiting ${(q.waiting_ms / 1000).toFixed(1)} s`)))
      : el("span", { class: "muted" }, " · nobody waits");
    this.now.replaceChildren(el("span", {}, ...parts), queue);
  }
}
