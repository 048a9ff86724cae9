// Runs and their events. Views subscribe here and never fetch. Live events come from the websocket; the events route
// is read once when a run is first shown and again after a reconnect (no polling loop while events flow).

import { ACTIVE } from "./series.js";

const SELECTED_KEY = "sa3.panel.selectedRun";

/** Identity of an event, the same whether it came from events.jsonl or the websocket (they are the same dict). */
const eventKey = (e) => JSON.stringify([e.type, e.time, e.step ?? null, e.index ?? null, e.status ?? null]);

export class Store {
  constructor(api, { storage = globalThis.localStorage } = {}) {
    this.api = api;
    this.storage = storage;
    this.runs = [];  // records of GET /sa3/runs, with live fields merged in
    this.selectedId = null;
    this.runData = new Map();  // run id -> {events, offset, seen, loaded, catchingUp, buffer}
    this.listeners = new Map();  // topic -> Set(callback)
    this.message = null;  // last user-facing message {text, kind}
    this.pendingList = null;  // a runs-list request in flight
    this.offs = [api.onEvent((e) => this.receive(e)), api.onReconnect(() => this.reconnected())];
  }

  destroy() {
    this.offs.forEach((off) => off());
    this.listeners.clear();
  }

  /** topics: "runs" (list changed), "selected" (another run), "events" (the selected run's events), "message". */
  subscribe(topic, callback) {
    if (!this.listeners.has(topic)) this.listeners.set(topic, new Set());
    this.listeners.get(topic).add(callback);
    callback(this.snapshot(topic));
    return () => this.listeners.get(topic)?.delete(callback);
  }

  snapshot(topic) {
    if (topic === "runs") return { runs: this.runs, selectedId: this.selectedId };
    if (topic === "selected" || topic === "events") {
      return { run: this.selectedRun(), events: this.selectedEvents(), loaded: this.selectedLoaded() };
    }
    if (topic === "message") return this.message;
    return null;
  }

  emit(topic) {
    const value = this.snapshot(topic);
    for (const callback of this.listeners.get(topic) || []) callback(value);
  }

  selectedRun() {
    return this.runs.find((r) => r.id === this.selectedId) || null;
  }

  selectedEvents() {
    return this.runData.get(this.selectedId)?.events || [];
  }

  say(text, kind = "info") {
    this.message = text ? { text, kind } : null;
    this.emit("message");
  }

  async start() {
    await this.refreshRuns();
    let wanted = null;
    try {
      wanted = this.storage?.getItem(SELECTED_KEY);
    } catch {
      wanted = null;  // storage can be blocked (private windows): just pick a run
    }
    await this.selectIfNone(wanted);
  }

  /** With no run selected: select `wanted` if listed, else the newest active run, else the newest. */
  async selectIfNone(wanted = null) {
    if (this.selectedId) return;
    const pick = this.runs.find((r) => r.id === wanted)
      || [...this.runs].reverse().find((r) => ACTIVE.includes(r.status))
      || this.runs[this.runs.length - 1];
    if (pick) await this.select(pick.id);
  }

  async refreshRuns() {
    try {
      const fresh = await this.api.runs();
      const old = new Map(this.runs.map((r) => [r.id, r]));
      // keep what only live events know (steps/s) across a refresh
      this.runs = fresh.map((r) => ({ steps_per_s: old.get(r.id)?.steps_per_s ?? null, ...r }));
      for (const id of this.runData.keys()) if (!this.runs.some((r) => r.id === id)) this.runData.delete(id);
      const selectedGone = this.selectedId && !this.runs.some((r) => r.id === this.selectedId);
      if (selectedGone) this.selectedId = null;
      this.emit("runs");
      if (selectedGone) await this.selectedWentAway();
    } catch (err) {
      this.say(`Could not list runs: ${err.message}`, "error");
    }
  }

  async select(runId) {
    if (runId !== this.selectedId && this.message) this.say("");  // a message was about the run shown before
    this.selectedId = runId;
    try {
      this.storage?.setItem(SELECTED_KEY, runId);
    } catch {
      // not fatal
    }
    this.emit("runs");
    this.emit("selected");
    this.emit("events");  // what we already have of this run (nothing on first view), not the previous run's
    await this.catchUp(runId);
  }

  /** The selected run went away (deleted, or its folder gone): show another (`selectIfNone`), or with none left
   * empty every view of a run, the views of its events too. */
  async selectedWentAway() {
    this.selectedId = null;
    await this.selectIfNone();
    if (this.selectedId) return;
    this.emit("selected");
    this.emit("events");
  }

  /** Whether the selected run's history has been read (tests and the loading hint use it). */
  selectedLoaded() {
    const d = this.runData.get(this.selectedId);
    return Boolean(d && d.loaded && !d.catchingUp);
  }

  data(runId) {
    if (!this.runData.has(runId)) {
      this.runData.set(runId, { events: [], offset: 0, seen: new Set(), loaded: false, catchingUp: null, buffer: [] });
    }
    return this.runData.get(runId);
  }

  /** Read the events route from the last offset until it has nothing new. Live events arriving meanwhile are
   * buffered and merged afterwards without duplicates. */
  catchUp(runId) {
    const d = this.data(runId);
    if (d.catchingUp) return d.catchingUp;
    d.catchingUp = (async () => {
      try {
        for (;;) {
          const { events, offset } = await this.api.events(runId, d.offset);
          d.offset = offset;
          this.append(runId, events);
          if (!events.length) break;
        }
        d.loaded = true;
        // steps/s is only in the step events: take the newest for the runs list
        const lastStep = d.events.findLast((e) => e.type === "step" && e.steps_per_s !== undefined);
        const attempt = d.events.findLastIndex((e) => e.type === "status" && e.status === "queued");
        const lastWarning = d.events.slice(Math.max(0, attempt)).findLast((e) => e.type === "warning");
        const record = this.runs.find((r) => r.id === runId);
        if (record && (lastStep || lastWarning)) {
          if (lastStep) record.steps_per_s = lastStep.steps_per_s;
          if (lastWarning) record.warning = lastWarning.message;
          this.emit("runs");
        }
      } catch (err) {
        this.say(`Could not read the events of ${runId}: ${err.message}`, "error");
      } finally {
        const buffered = d.buffer.splice(0);
        d.catchingUp = null;
        this.append(runId, buffered);
        if (runId === this.selectedId) this.emit("events");
      }
    })();
    return d.catchingUp;
  }

  append(runId, events) {
    const d = this.data(runId);
    let added = 0;
    for (const e of events) {
      const key = eventKey(e);
      if (d.seen.has(key)) continue;
      d.seen.add(key);
      d.events.push(e);
      added += 1;
    }
    return added;
  }

  /** One live websocket event. */
  receive(event) {
    const runId = event.run;
    if (!runId) return;
    if (event.type === "deleted") {  // a run deleted while it trained: gone once its trainer stopped
      this.runs = this.runs.filter((r) => r.id !== runId);
      this.runData.delete(runId);
      if (this.selectedId === runId) this.selectedWentAway();
      this.emit("runs");
      return;
    }
    const record = this.runs.find((r) => r.id === runId);
    if (!record) {
      // a run we have not seen yet (submitted from a node): list once, not once per event of the burst
      // (and shown, when nothing is: e.g. the first run queued while the panel was open)
      this.pendingList ??= this.refreshRuns().then(() => this.selectIfNone()).finally(() => {
        this.pendingList = null;
      });
      return;
    }
    if (event.type === "step") {
      record.step = Math.max(record.step || 0, event.step);
      if (event.steps_per_s !== undefined) record.steps_per_s = event.steps_per_s;
      if (!ACTIVE.includes(record.status) || record.status === "queued" || record.status === "loading") {
        record.status = "training";
      }
    } else if (event.type === "status") {
      record.status = event.status;
      if (Number.isFinite(event.total_steps)) record.total_steps = event.total_steps;  // a run trained further
      if (event.status === "queued") record.warning = null;  // a warning belongs to the attempt that raised it
      record.error = event.error ?? (event.status === "failed" ? record.error : null);
    } else if (event.type === "checkpoint") {
      record.latest_checkpoint = { path: event.path, step: event.step };
    } else if (event.type === "error") {
      record.error = event.message;
    } else if (event.type === "warning") {
      record.warning = event.message;  // the newest one: a skipped update, a damaged checkpoint, no ARC model...
    }
    this.emit("runs");
    if (runId === this.selectedId) this.emit("selected");

    const d = this.runData.get(runId);
    if (!d) return;  // never shown: its history is read when it is selected
    if (d.catchingUp) {
      d.buffer.push(event);
    } else if (this.append(runId, [event]) && runId === this.selectedId) {
      this.emit("events");
    }
  }

  /** After a websocket drop: list again and read what the selected run wrote meanwhile. */
  async reconnected() {
    await this.refreshRuns();
    if (this.selectedId) await this.catchUp(this.selectedId);
  }

  async control(action, body = {}) {
    const run = this.selectedRun();
    if (!run) return null;
    try {
      const result = await this.api.control(run.id, action, body);
      if (action === "delete" && result?.run?.deleting) {
        this.say(`Deleting ${run.name}: it stops at its next step, then its files go.`);
      } else if (action === "delete") {
        this.runData.delete(run.id);
        await this.refreshRuns();  // shows another run, or none, once the deleted one is no longer listed
        if (this.selectedId === run.id) await this.selectedWentAway();
        this.say(`Deleted ${run.name}.`);
      } else {
        // the new status arrives as a live event; the response's record may already be older than that event
        const label = body.more_steps ? `Train ${body.more_steps} more steps` : labelFor(action);
        this.say(`${label}: sent to ${run.name}.`);
      }
      return result;
    } catch (err) {
      this.say(err.message, "error");
      return null;
    }
  }
}

const labelFor = (action) => ({ stop: "Stop", pause: "Pause", resume: "Continue", save: "Save now",
  restart: "Resume", delete: "Delete" })[action] || action;
