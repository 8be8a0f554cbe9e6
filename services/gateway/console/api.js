// Calls to the API behind the gateway (same origin). The token travels in the
// Authorization header only, never in a URL; it lives in sessionStorage (this tab).

const KEY = "baton.token";

export class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code;
  }

  static async from(response) {
    let message = `${response.status} ${response.statusText}`;
    let code = null;
    try {
      const body = await response.json();
      if (body && body.error) {
        message = body.error.message || message;
        code = body.error.code || null;
      }
    } catch {
      // not JSON: the status line says enough
    }
    return new ApiError(response.status, message, code);
  }
}

export class Api {
  constructor() {
    this.token = sessionStorage.getItem(KEY) || "";
  }

  setToken(token) {
    this.token = token;
    if (token) sessionStorage.setItem(KEY, token);
    else sessionStorage.removeItem(KEY);
  }

  // What the token says about itself (not verified here: each service checks it).
  claims() {
    try {
      const part = this.token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
      return JSON.parse(atob(part.padEnd(part.length + ((4 - (part.length % 4)) % 4), "=")));
    } catch {
      return {};
    }
  }

  async fetch(method, path, { json, form, signal } = {}) {
    const headers = { Authorization: `Bearer ${this.token}` };
    let body;
    if (json !== undefined) {
      headers["Content-Type"] = "application/json";
      body = JSON.stringify(json);
    } else if (form !== undefined) {
      body = form;
    }
    const response = await fetch(path, { method, headers, body, signal, cache: "no-store" });
    if (!response.ok) throw await ApiError.from(response);
    return response;
  }

  async call(method, path, options = {}) {
    const response = await this.fetch(method, path, options);
    return response.status === 204 ? null : response.json();
  }

  // Server-sent events, read with fetch so that the Authorization header is sent.
  async *events(method, path, options = {}) {
    const response = await this.fetch(method, path, options);
    yield* readEvents(response.body);
  }
}

export async function* readEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value.replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const event = { event: "message", data: [] };
        for (const line of block.split("\n")) {
          if (line.startsWith(":")) continue;
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
          if (field === "event") event.event = text;
          else if (field === "data") event.data.push(text);
        }
        if (event.data.length) yield { event: event.event, data: event.data.join("\n") };
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

// A DOM element in one call: el("li", {class: "x"}, "text", child).
export function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === false || value === null || value === undefined) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "style") node.style.cssText = value; // the CSSOM: the page's policy refuses style attributes
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

export function clock(seconds) {
  const total = Math.max(0, Math.floor(Number(seconds) || 0));
  return `${Math.floor(total / 60)}:${String(total % 60).padStart(2, "0")}`;
}
