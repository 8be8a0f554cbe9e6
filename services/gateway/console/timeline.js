// The GPU's timeline: one lane per holder, each grant a bar from its grant to its end,
// the wait before it, the yields asked of it, how it ended and what the holder did with
// the card. Filled from GET /v1/history, kept live by GET /v1/events.
//
// Windowed: only the grants inside the visible span become elements (found by binary
// search over grants kept in fence order), and when more than MAX_BARS fall inside it,
// each lane shows how much of each slice of the span it held instead.

import { el } from "./api.js";

const MAX_BARS = 400;
const SLICES = 200;
const KEEP = 20000;

const seconds = (ms) => (ms >= 10000 ? `${(ms / 1000).toFixed(1)} s` : `${Math.round(ms)} ms`);
const when = (t) => new Date(t * 1000).toLocaleTimeString([], { hour12: false });

export class Timeline {
  constructor(root, detail, label) {
    this.root = root;
    this.detail = detail;
    this.label = label;
    this.grants = new Map(); // fence -> grant
    this.order = []; // grants by fence
    this.dirty = false;
    this.lanes = [];
    this.span = 60; // seconds shown
    this.end = null; // null: follow now
    this.skew = 0; // server clock minus this browser's, in seconds
    this.focused = null;
    this.moved = () => {}; // called when the window moves (following now, or not)
  }

  now() {
    return Date.now() / 1000 + this.skew;
  }

  // One entry of GET /v1/history (times in seconds since the epoch).
  merge(entry) {
    const known = this.grants.get(entry.fence) || { fence: entry.fence, yields: [] };
    Object.assign(known, {
      holder: entry.holder,
      priority: entry.priority,
      requested_at: entry.requested_at,
      granted_at: entry.granted_at,
      ended_at: entry.ended_at ?? known.ended_at ?? null,
      end: entry.end ?? known.end ?? null,
      vram_mb: entry.vram_mb || 0,
      free_memory: entry.free_memory || false,
      handover: entry.handover ?? known.handover ?? null,
      handover_ms: entry.handover_ms ?? known.handover_ms ?? null,
    });
    this.add(known);
  }

  add(grant) {
    if (!this.grants.has(grant.fence)) {
      this.grants.set(grant.fence, grant);
      this.dirty = true;
    }
    if (!this.lanes.includes(grant.holder)) this.lanes.push(grant.holder);
  }

  // One event of GET /v1/events.
  event(type, e) {
    if (typeof e.at === "number") this.skew = e.at - Date.now() / 1000;
    const grant = e.fence != null ? this.grants.get(e.fence) : undefined;
    if (type === "granted") {
      this.merge({
        fence: e.fence,
        holder: e.holder,
        priority: e.priority,
        requested_at: e.at - (e.waited_ms || 0) / 1000,
        granted_at: e.at,
        vram_mb: e.vram_mb,
        free_memory: e.free_memory,
      });
    } else if (type === "yield_requested" && grant) {
      grant.yields.push(e.at);
    } else if ((type === "released" || type === "expired" || type === "revoked") && grant) {
      grant.ended_at = grant.ended_at ?? e.at;
      if (grant.end !== "revoked") grant.end = type === "revoked" ? "revoked" : e.end || type; // revoked stays
    }
  }

  sorted() {
    if (this.dirty) {
      this.order = [...this.grants.values()].sort((a, b) => a.fence - b.fence);
      while (this.order.length > KEEP) this.grants.delete(this.order.shift().fence);
      this.dirty = false;
    }
    return this.order;
  }

  window() {
    const order = this.sorted();
    const end = this.end ?? this.now();
    const span = this.span === "all" ? Math.max(10, end - (order[0]?.requested_at ?? end - 60)) : this.span;
    return [end - span, end];
  }

  // The grants whose hold or wait meets [t0, t1]; holds do not overlap, so fence order is time order.
  visible(t0, t1) {
    const order = this.sorted();
    const first = (test) => {
      let lo = 0;
      let hi = order.length;
      while (lo < hi) {
        const mid = (lo + hi) >> 1;
        if (test(order[mid])) hi = mid;
        else lo = mid + 1;
      }
      return lo;
    };
    const lo = first((g) => (g.ended_at ?? Infinity) >= t0);
    const hi = first((g) => g.requested_at > t1);
    return order.slice(Math.max(0, lo - 1), hi).filter((g) => (g.ended_at ?? Infinity) >= t0);
  }

  show(span) {
    this.span = span === "all" ? "all" : Number(span);
    this.render();
  }

  pan(direction) {
    const [t0, t1] = this.window();
    const shift = ((t1 - t0) / 2) * direction;
    const next = t1 + shift;
    this.end = next >= this.now() ? null : next;
    this.render();
  }

  follow() {
    this.end = null;
    this.render();
  }

  describe(g) {
    const now = this.now();
    const held = ((g.ended_at ?? now) - g.granted_at) * 1000;
    const parts = [
      `fence ${g.fence}`,
      `${g.holder} (${g.priority})`,
      `granted ${when(g.granted_at)} after waiting ${seconds((g.granted_at - g.requested_at) * 1000)}`,
      g.ended_at == null ? `holding for ${seconds(held)}` : `held ${seconds(held)}, ${g.end || "ended"}`,
    ];
    if (g.vram_mb) parts.push(`declared ${g.vram_mb} MB${g.free_memory ? ", asked to free it" : ""}`);
    if (g.yields.length) parts.push(`yield requested ${when(g.yields[0])}`);
    if (g.handover) parts.push(`hand-over: ${g.handover}${g.handover_ms != null ? ` in ${seconds(g.handover_ms)}` : ""}`);
    return parts.join(" · ");
  }

  render() {
    const hadFocus = this.root.contains(document.activeElement);
    this.moved(this.end == null);
    const [t0, t1] = this.window();
    const x = (t) => `${(((Math.min(Math.max(t, t0), t1) - t0) / (t1 - t0)) * 100).toFixed(3)}%`;
    const w = (a, b) => `${(((Math.min(b, t1) - Math.max(a, t0)) / (t1 - t0)) * 100).toFixed(3)}%`;
    const shown = this.visible(t0, t1);
    const sliced = shown.length > MAX_BARS;
    this.label.textContent =
      `${when(t0)} to ${this.end == null ? "now" : when(t1)} · ${shown.length} of ${this.grants.size} grants` +
      (sliced ? " (too many to draw one by one: each slice shows how much of it a holder held)" : "");
    this.root.dataset.mode = sliced ? "slices" : "bars";

    const rows = this.lanes.map((holder) => {
      const track = el("div", { class: "track" });
      const lane = el("div", { class: "lane", role: "listitem", "data-holder": holder }, el("span", { class: "lane-name" }, holder), track);
      return [holder, lane, track];
    });
    const trackOf = new Map(rows.map(([holder, , track]) => [holder, track]));

    if (sliced) {
      const size = (t1 - t0) / SLICES;
      const held = new Map(this.lanes.map((h) => [h, new Float64Array(SLICES)]));
      const count = new Map(this.lanes.map((h) => [h, new Uint32Array(SLICES)]));
      const now = this.now();
      for (const g of shown) {
        const a = Math.max(g.granted_at, t0);
        const b = Math.min(g.ended_at ?? now, t1);
        for (let i = Math.max(0, Math.floor((a - t0) / size)); i < SLICES && t0 + i * size < b; i++) {
          const s0 = t0 + i * size;
          held.get(g.holder)[i] += Math.max(0, Math.min(b, s0 + size) - Math.max(a, s0));
          count.get(g.holder)[i] += 1;
        }
      }
      for (const [holder, track] of trackOf) {
        const h = held.get(holder);
        const c = count.get(holder);
        for (let i = 0; i < SLICES; i++) {
          if (!c[i]) continue;
          const share = Math.min(1, h[i] / size);
          track.append(
            el("div", {
              class: "slice",
              style: `left:${(i / SLICES) * 100}%;width:${100 / SLICES}%;opacity:${(0.15 + 0.85 * share).toFixed(2)}`,
              title: `${holder}: ${c[i]} grants, held ${(share * 100).toFixed(0)}% of ${seconds(size * 1000)} from ${when(t0 + i * size)}`,
            }),
          );
        }
      }
    } else {
      const now = this.now();
      for (const g of shown) {
        const track = trackOf.get(g.holder);
        if (g.granted_at > g.requested_at && g.granted_at > t0) {
          track.append(el("div", { class: "wait", style: `left:${x(g.requested_at)};width:${w(g.requested_at, g.granted_at)}` }));
        }
        const classes = ["bar", g.priority, g.end ? `end-${g.end}` : "open", g.yields.length ? "yielded" : ""];
        const text = this.describe(g);
        const bar = el(
          "div",
          {
            class: classes.join(" ").trim(),
            style: `left:${x(g.granted_at)};width:${w(g.granted_at, g.ended_at ?? now)}`,
            tabindex: "-1",
            role: "button",
            "data-fence": g.fence,
            "data-holder": g.holder,
            "aria-label": text,
            title: text,
          },
          el("span", { class: "fence" }, String(g.fence)),
          g.handover ? el("span", { class: "handover" }, g.handover) : null,
        );
        bar.addEventListener("mouseenter", () => this.inspect(g));
        bar.addEventListener("focus", () => {
          this.focused = g.fence;
          this.inspect(g);
        });
        bar.addEventListener("keydown", (event) => this.key(event, g));
        track.append(bar);
        for (const at of g.yields) {
          if (at >= t0 && at <= t1) track.append(el("div", { class: "tick", style: `left:${x(at)}`, title: `yield requested of fence ${g.fence}` }));
        }
      }
    }
    this.root.replaceChildren(...rows.map(([, lane]) => lane));
    // One grant is reachable with Tab; the arrow keys move from it to the others.
    const bars = this.root.querySelectorAll(".bar");
    const keep = this.focused != null && this.root.querySelector(`.bar[data-fence="${this.focused}"]`);
    const entry = keep || bars[bars.length - 1];
    if (entry) entry.tabIndex = 0;
    if (hadFocus && keep) keep.focus({ preventScroll: true }); // a live redraw keeps the reader's place
  }

  inspect(g) {
    this.detail.textContent = this.describe(g);
  }

  key(event, g) {
    const order = this.sorted();
    const index = order.indexOf(g);
    const step = { ArrowLeft: -1, ArrowUp: -1, ArrowRight: 1, ArrowDown: 1 }[event.key];
    if (!step && event.key !== "Home" && event.key !== "End") return;
    event.preventDefault();
    const target = event.key === "Home" ? order[0] : event.key === "End" ? order[order.length - 1] : order[index + step];
    if (!target) return;
    this.focused = target.fence;
    const [t0, t1] = this.window();
    if (target.granted_at < t0 || target.granted_at > t1) {
      const span = t1 - t0;
      const end = Math.min(target.granted_at + span / 2, this.now());
      this.end = end >= this.now() ? null : end;
    }
    this.render();
    const bar = this.root.querySelector(`.bar[data-fence="${target.fence}"]`);
    if (bar) bar.focus();
    else this.inspect(target);
  }
}
