// Every request and event subscription the panel makes: the /sa3/... routes and the `sa3.<type>` websocket events.
// A transport hides where they come from: ComfyUI's `api` object inside ComfyUI, plain fetch in a standalone page.

export const EVENT_TYPES = ["status", "step", "checkpoint", "demo", "reference", "validation", "error", "warning",
  "deleted", "loss_scale"];

/** Transport over ComfyUI's `api` (scripts/api.js): fetchApi prefixes /api, events arrive as CustomEvent.detail,
 * and "reconnected" fires after the websocket comes back (we then catch up from the events route). */
export function comfyTransport(api) {
  return {
    async fetchJson(path, init = {}) {
      return readJson(await api.fetchApi(path, init), path);
    },
    url: (path) => (api.apiURL ? api.apiURL(path) : path),
    on(name, callback) {
      const listener = (e) => callback(e.detail);
      api.addEventListener(name, listener);
      return () => api.removeEventListener?.(name, listener);
    },
  };
}

/** Transport over plain fetch and an EventTarget the page feeds (a standalone page, or tests). */
export function fetchTransport(events = new EventTarget(), base = "") {
  return {
    async fetchJson(path, init = {}) {
      return readJson(await fetch(base + path, init), path);
    },
    url: (path) => base + path,
    on(name, callback) {
      const listener = (e) => callback(e.detail);
      events.addEventListener(name, listener);
      return () => events.removeEventListener(name, listener);
    },
  };
}

async function readJson(response, path) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  if (!response.ok) {
    const why = body && body.error ? body.error : `${response.status} ${response.statusText}`;
    throw new Error(`${path}: ${why}`);
  }
  return body;
}

const runPath = (runId) => `/sa3/runs/${encodeURIComponent(runId)}`;

/** The routes of nodes/routes.py, one method each. */
export class PanelApi {
  constructor(transport) {
    this.transport = transport;
  }

  async runs() {
    return (await this.transport.fetchJson("/sa3/runs")).runs;
  }

  run(runId) {
    return this.transport.fetchJson(runPath(runId));
  }

  /** Events after byte `offset` of events.jsonl -> {events, offset} (offset to continue from). */
  events(runId, offset = 0) {
    return this.transport.fetchJson(`${runPath(runId)}/events?offset=${offset}`);
  }

  async lossByTimestep(runId, bins = 5) {
    return (await this.transport.fetchJson(`${runPath(runId)}/loss_by_timestep?bins=${bins}`)).bins;
  }

  /** URL of a file inside the run folder (demo audio, spectrogram, checkpoint); the server confines the path. */
  /** The run's metrics as a CSV download (training/events.py `metrics_csv`). */
  metricsUrl(runId) {
    return this.transport.url(`${runPath(runId)}/metrics.csv`);
  }

  fileUrl(runId, relative, download = false) {
    const query = `path=${encodeURIComponent(relative)}${download ? "&download=1" : ""}`;
    return this.transport.url(`${runPath(runId)}/file?${query}`);
  }

  /** stop | pause | resume | save | restart | delete (delete sends {confirm: true}). */
  control(runId, action, body = {}) {
    return this.transport.fetchJson(`${runPath(runId)}/${action}`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
  }

  /** Live run events: callback(event) for every `sa3.<type>` websocket message. Returns an unsubscribe function. */
  onEvent(callback) {
    const offs = EVENT_TYPES.map((type) =>
      this.transport.on(`sa3.${type}`, (event) => callback({ type, ...event })));
    return () => offs.forEach((off) => off && off());
  }

  /** The websocket came back after a drop: whatever was sent meanwhile must be read from the events route. */
  onReconnect(callback) {
    return this.transport.on("reconnected", callback) || (() => {});
  }
}
