// The console's entry: sign in (a pasted token, or the launcher's development token on
// this machine), then start the four panels.

import { Api, ApiError } from "./api.js";
import { ChatPanel } from "./chat.js";
import { GpuPanel } from "./gpu.js";
import { JobsPanel } from "./jobs.js";
import { MemoriesPanel } from "./memories.js";

const api = new Api();
const status = document.getElementById("status");
const say = (text) => {
  status.textContent = text;
};
const panels = [new GpuPanel(api, say), new ChatPanel(api, say), new JobsPanel(api, say), new MemoriesPanel(api, say)];

async function signIn(token) {
  api.setToken(token.trim());
  try {
    await api.call("GET", "/v1/models"); // any valid token may; a bad one is 401 here
  } catch (error) {
    api.setToken("");
    say(error instanceof ApiError && error.status === 401 ? `That token was refused: ${error.message}` : `Sign-in failed: ${error.message}`);
    return;
  }
  const claims = api.claims();
  document.getElementById("who-name").textContent = claims.sub || "?";
  document.getElementById("who-scopes").textContent = claims.scope ? `(${claims.scope})` : "";
  document.getElementById("signin").hidden = true;
  document.getElementById("who").hidden = false;
  document.body.dataset.signedIn = "true";
  say(`Signed in as ${claims.sub || "?"}.`);
  for (const panel of panels) panel.start?.();
}

function signOut() {
  for (const panel of panels) panel.stop?.();
  api.setToken("");
  document.getElementById("signin").hidden = false;
  document.getElementById("who").hidden = true;
  delete document.body.dataset.signedIn;
  say("Signed out.");
}

document.getElementById("signin").addEventListener("submit", (event) => {
  event.preventDefault();
  const field = document.getElementById("token");
  const token = field.value;
  field.value = "";
  signIn(token);
});

document.getElementById("dev-token").addEventListener("click", async () => {
  try {
    const response = await fetch("/console/dev-token", { cache: "no-store" });
    if (!response.ok) throw await ApiError.from(response);
    await signIn((await response.json()).token);
  } catch (error) {
    say(`No development token: ${error.message}`);
  }
});

document.getElementById("signout").addEventListener("click", signOut);

if (api.token) signIn(api.token);
