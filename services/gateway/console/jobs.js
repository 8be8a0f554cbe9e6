// Transcription: drop or choose a recording, follow its job (progress, segments as they
// arrive, then the transcript becoming memories), list the jobs, cancel one, open a
// finished one and name who spoke in it.

import { clock, el } from "./api.js";

const FINAL = new Set(["done", "failed", "cancelled"]);

export class JobsPanel {
  constructor(api, say) {
    this.api = api;
    this.say = say;
    this.drop = document.getElementById("drop");
    this.file = document.getElementById("file");
    this.list = document.getElementById("jobs");
    this.current = document.getElementById("current-job");
    this.progress = document.getElementById("job-progress");
    this.percent = document.getElementById("job-percent");
    this.state = document.getElementById("job-state");
    this.indexed = document.getElementById("job-indexed");
    this.segments = document.getElementById("segments");
    this.speakers = document.getElementById("job-speakers");
    this.names = document.getElementById("speaker-names");
    this.enrol = document.getElementById("enrol-speakers");
    this.following = null;
    this.speakers.addEventListener("submit", (event) => {
      event.preventDefault();
      this.nameSpeakers();
    });
    this.drop.addEventListener("dragover", (event) => {
      event.preventDefault();
      this.drop.classList.add("over");
    });
    this.drop.addEventListener("dragleave", () => this.drop.classList.remove("over"));
    this.drop.addEventListener("drop", (event) => {
      event.preventDefault();
      this.drop.classList.remove("over");
      const file = event.dataTransfer?.files?.[0];
      if (file) this.upload(file);
    });
    this.file.addEventListener("change", () => {
      if (this.file.files[0]) this.upload(this.file.files[0]);
      this.file.value = "";
    });
    document.getElementById("refresh-jobs").addEventListener("click", () => this.refresh());
  }

  start() {
    return this.refresh();
  }

  stop() {
    this.following?.abort();
    this.following = null;
  }

  async upload(file) {
    const form = new FormData();
    form.append("file", file, file.name);
    this.say(`Uploading ${file.name}…`);
    try {
      const job = await this.api.call("POST", "/v1/jobs", { form });
      this.say(`${file.name}: job ${job.job_id}, ${clock(job.duration)} of audio`);
      this.refresh();
      this.follow(job.job_id, file.name);
    } catch (error) {
      this.say(`${file.name}: ${error.message}`);
    }
  }

  show(view) {
    this.progress.value = view.progress;
    this.percent.textContent = `${Math.round(view.progress * 100)}%`;
    this.state.textContent = view.state;
    this.state.dataset.state = view.state;
  }

  segment(s) {
    const who = s.speaker ? [el("span", { class: "speaker" }, s.speaker), " "] : [];
    this.segments.append(el("li", {}, el("span", { class: "at" }, `${clock(s.start)}–${clock(s.end)}`), " ", ...who, s.text.trim()));
  }

  async follow(jobId, name) {
    this.stop();
    const abort = new AbortController();
    this.following = abort;
    this.current.hidden = false;
    this.current.dataset.job = jobId;
    document.getElementById("job-name").textContent = name;
    this.segments.replaceChildren();
    this.speakers.hidden = true;
    this.indexed.textContent = "";
    delete this.current.dataset.indexed;
    let state = "queued";
    try {
      for await (const { data } of this.api.events("GET", `/v1/jobs/${encodeURIComponent(jobId)}/events`, { signal: abort.signal })) {
        if (data === "[DONE]") break;
        const e = JSON.parse(data);
        if (e.type === "snapshot") {
          this.segments.replaceChildren();
          for (const s of e.segments) this.segment(s);
          this.show(e);
        } else if (e.type === "segment") {
          this.segment(e.segment);
        } else if (e.type === "progress") {
          this.show({ progress: e.progress, state: state === "queued" ? "running" : state });
        } else if (e.state) {
          this.show({ progress: e.progress ?? this.progress.value, state: e.state });
        }
        state = e.state || state;
        if (e.type !== "segment" && e.type !== "progress") this.refresh();
      }
      if (state === "done") await this.awaitIndexing(jobId, abort.signal);
    } catch (error) {
      if (!abort.signal.aborted) this.say(`Job ${jobId}: ${error.message}`);
    } finally {
      if (this.following === abort) this.following = null;
      this.refresh();
    }
  }

  // A finished transcript is stored as memories just after the job ends.
  async awaitIndexing(jobId, signal) {
    this.indexed.textContent = "Indexing into memories…";
    for (let i = 0; i < 120 && !signal.aborted; i++) {
      const job = await this.api.call("GET", `/v1/jobs/${encodeURIComponent(jobId)}`, { signal });
      if (job.indexed || job.index_error) {
        this.indexed.textContent = job.indexed ? "Indexed into memories: ask about it in the chat." : `Not indexed: ${job.index_error}`;
        this.current.dataset.indexed = String(job.indexed);
        this.offerNames(job);
        return;
      }
      await new Promise((resolve) => setTimeout(resolve, 1000));
    }
  }

  // Once its memories are written, a finished job's speakers can be named: its
  // transcript and memories are rewritten, and "remember" enrols each voice.
  offerNames(job) {
    const heard = job.state === "done" ? job.speakers : [];
    this.speakers.hidden = heard.length === 0;
    this.names.replaceChildren(
      ...heard.map((label) =>
        el("label", {}, `${label} `, el("input", { name: label, value: label, maxlength: "64", required: true, "aria-label": `Name of speaker ${label}` })),
      ),
    );
  }

  async nameSpeakers() {
    const jobId = this.current.dataset.job;
    const names = {};
    for (const input of this.names.querySelectorAll("input")) {
      const name = input.value.trim();
      if (name && name !== input.name) names[input.name] = name;
    }
    if (Object.keys(names).length === 0) {
      this.say("Type a name over a speaker's label first.");
      return;
    }
    this.stop();
    const abort = new AbortController();
    this.following = abort;
    const enrol = this.enrol.checked ? "?enrol=true" : "";
    try {
      const job = await this.api.call("PATCH", `/v1/jobs/${encodeURIComponent(jobId)}/speakers${enrol}`, { json: names, signal: abort.signal });
      this.segments.replaceChildren();
      for (const s of job.segments) this.segment(s);
      this.speakers.hidden = true;
      delete this.current.dataset.indexed;
      this.say(`Named ${Object.entries(names).map(([label, name]) => `${label} as ${name}`).join(", ")}${enrol ? ", voices remembered" : ""}.`);
      await this.awaitIndexing(jobId, abort.signal);
    } catch (error) {
      if (!abort.signal.aborted) this.say(`Speakers: ${error.message}`);
    } finally {
      if (this.following === abort) this.following = null;
      this.refresh();
    }
  }

  async refresh() {
    try {
      const { jobs } = await this.api.call("GET", "/v1/jobs?limit=50");
      this.list.replaceChildren(...jobs.map((job) => this.row(job)));
    } catch (error) {
      this.list.replaceChildren(el("tr", {}, el("td", { colspan: "5", class: "error" }, error.message)));
    }
  }

  row(job) {
    const actions = el("td", {});
    if (job.state === "done") {
      actions.append(el("button", { type: "button", "aria-label": `Open ${job.file}`, onclick: () => this.follow(job.job_id, job.file) }, "Open"));
    } else if (!FINAL.has(job.state)) {
      actions.append(
        el("button", { type: "button", onclick: () => this.follow(job.job_id, job.file) }, "Follow"),
        " ",
        el("button", { type: "button", "aria-label": `Cancel ${job.file}`, onclick: () => this.cancel(job.job_id) }, "Cancel"),
      );
    }
    const memories = job.indexed ? "indexed" : job.index_error ? "not indexed" : job.state === "done" ? "indexing…" : "";
    return el(
      "tr",
      { "data-job": job.job_id, "data-state": job.state },
      el("td", {}, `${job.file} (${clock(job.duration)})`),
      el("td", {}, job.state + (job.yields ? `, yielded ${job.yields}×` : "")),
      el("td", {}, el("progress", { max: "1", value: String(job.progress), "aria-label": `Progress of ${job.file}` }), ` ${Math.round(job.progress * 100)}%`),
      el("td", {}, memories),
      actions,
    );
  }

  async cancel(jobId) {
    try {
      const answer = await this.api.call("DELETE", `/v1/jobs/${encodeURIComponent(jobId)}`);
      this.say(`Job ${jobId}: ${answer.state}`);
    } catch (error) {
      this.say(`Cancel ${jobId}: ${error.message}`);
    }
    this.refresh();
  }
}
