// Stand-in for ComfyUI's scripts/app.js: registerExtension, a sidebar-tab extension manager, a graph that records
// added nodes, and a LiteGraph.createNode that knows SA3LoadLoRA with a `lora` combo.

const registered = [];
export const app = {
  extensions: [],
  graph: {
    nodes: [],
    add(node) {
      this.nodes.push(node);
    },
    setDirtyCanvas() {},
  },
  canvas: null,
  extensionManager: {
    tabs: registered,
    registerSidebarTab(tab) {
      registered.push(tab);
    },
  },
  registerExtension(extension) {
    // which websocket types had a listener when the extension registered (ComfyUI logs others as unknown)
    window.typesAtRegister = [...(window.fakeApi?.registered ?? [])];
    this.extensions.push(extension);
    Promise.resolve().then(() => extension.setup?.(this));
  },
};

// ?frontend=bottom: a frontend with bottom-panel tabs only; ?frontend=legacy: no extension manager at all
const frontend = new URLSearchParams(location.search).get("frontend");
if (frontend === "bottom") delete app.extensionManager.registerSidebarTab;
if (frontend === "legacy") delete app.extensionManager;

window.LiteGraph = {
  createNode(type) {
    if (type !== "SA3LoadLoRA") return null;
    const choices = (window.loraChoices || []).slice();
    return { type, pos: [0, 0], widgets: [{ name: "lora", value: choices[0] ?? "", options: { values: choices } }] };
  },
};
window.app = app;
