// Stand-in for ComfyUI's scripts/api.js in the browser tests: the same surface the panel uses (fetchApi, apiURL,
// addEventListener with CustomEvent.detail, "reconnected" after the websocket comes back) over the test server's /ws.

class FakeComfyApi extends EventTarget {
  constructor() {
    super();
    this.registered = new Set();
    this.api_base = "";
    this.wasConnected = false;
    this.socket = null;
    this.connect();
  }

  // Like ComfyUI: a websocket message type is dispatched only if someone listens for it, else logged as unknown.
  addEventListener(type, callback, options) {
    this.registered.add(type);
    super.addEventListener(type, callback, options);
  }

  apiURL(route) {
    return `${this.api_base}/api${route}`;
  }

  fetchApi(route, options) {
    return fetch(this.apiURL(route), options);
  }

  connect() {
    const socket = new WebSocket(`ws://${location.host}/ws`);
    this.socket = socket;
    socket.addEventListener("open", () => {
      if (this.wasConnected) this.dispatchEvent(new CustomEvent("reconnected"));
      this.wasConnected = true;
      this.dispatchEvent(new CustomEvent("status", { detail: { connected: true } }));
    });
    socket.addEventListener("message", (m) => {
      const msg = JSON.parse(m.data);
      if (this.registered.has(msg.type)) this.dispatchEvent(new CustomEvent(msg.type, { detail: msg.data }));
      else console.error(`Unknown message type ${msg.type}`);
    });
    socket.addEventListener("close", () => {
      if (this.socket !== socket) return;
      if (this.wasConnected) this.dispatchEvent(new CustomEvent("reconnecting"));
      setTimeout(() => this.connect(), 150);
    });
  }
}

export const api = new FakeComfyApi();
window.fakeApi = api;
