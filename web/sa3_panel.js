// ComfyUI entry of the "SA3 Training" panel: the only module here with side effects. ComfyUI serves this folder under
// /extensions/<pack folder>/, so ComfyUI's own modules are two levels up.

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { comfyTransport, EVENT_TYPES } from "./panel/api.js";
import { copyName, mountPanel } from "./panel/mount.js";

const RUN_PREFIX = "sa3 runs/";  // how the server lists a run's checkpoints (nodes/lora_nodes.RUN_PREFIX)
const TAB = { id: "sa3-training", title: "SA3 Training", icon: "pi pi-chart-line", tooltip: "SA3 LoRA training runs" };

/** Put a configured SA3 Load LoRA node into the current graph, near the middle of the view; copy the name if the
 * graph API is missing or the node type is not registered. */
async function useCheckpoint(checkpoint) {
  try {
    const LiteGraph = globalThis.LiteGraph;
    const node = LiteGraph.createNode("SA3LoadLoRA");
    if (!node) throw new Error("SA3LoadLoRA is not a registered node type");
    const widget = node.widgets?.find((w) => w.name === "lora");
    if (widget) {
      // The server lists a run's checkpoints as "sa3 runs/<run>/<file>" (nodes/lora_nodes.py), each time it
      // validates a prompt; the combo here holds the list of when the page loaded, which misses checkpoints saved
      // since. So: this run's entry, else a copy in the loras folder (maybe in a sub-folder), else this run's entry
      // added to the combo (the server knows it).
      const runValue = `${RUN_PREFIX}${checkpoint.runId}/${checkpoint.name}`;
      const values = widget.options?.values;
      const list = Array.isArray(values) ? values : typeof values === "function" ? values() : [];
      // (a copy in the loras folder, never another run's entry: runs of one name share file names)
      const match = list.find((v) => v === runValue) ?? list.find((v) => !String(v).startsWith(RUN_PREFIX)
        && (v === checkpoint.name || String(v).replaceAll("\\", "/").endsWith(`/${checkpoint.name}`)));
      if (!match && Array.isArray(values)) values.unshift(runValue);
      widget.value = match ?? runValue;
      widget.callback?.(widget.value);
    }
    const canvas = app.canvas;
    if (canvas?.ds && canvas.canvas) {
      const [x, y] = canvas.ds.offset;
      const scale = canvas.ds.scale || 1;
      node.pos = [canvas.canvas.width / (2 * scale) - x - 120, canvas.canvas.height / (2 * scale) - y - 40];
    }
    app.graph.add(node);
    app.graph.setDirtyCanvas?.(true, true);
    return `Added an SA3 Load LoRA node with ${checkpoint.name} (step ${checkpoint.step}).`;
  } catch (err) {
    console.warn("SA3 Training: could not add an SA3 Load LoRA node, copying the name instead", err);
    return copyName(checkpoint);
  }
}

let mounted = null;
function render(el) {
  mounted?.unmount();
  mounted = mountPanel(el, { transport: comfyTransport(api), useCheckpoint });
}
function destroy() {
  mounted?.unmount();
  mounted = null;
}

// Frontends since 1.x have a sidebar (tall: good for charts on a laptop); older ones only bottom-panel tabs;
// the legacy menu gets a floating window.
const sidebar = typeof app.extensionManager?.registerSidebarTab === "function";

// ComfyUI's api only dispatches websocket message types that have a listener (others are logged as "Unknown message
// type"); register ours for the whole session, since the panel listens only while it is open, and now, as this
// module loads: a run's events flow from the first second, before extensions' setup() runs.
for (const type of EVENT_TYPES) api.addEventListener(`sa3.${type}`, () => {});

app.registerExtension({
  name: "sa3_lora_studio.training_panel",
  ...(sidebar ? {} : { bottomPanelTabs: [{ id: TAB.id, title: TAB.title, type: "custom", render, destroy }] }),
  async setup() {
    if (sidebar) {
      app.extensionManager.registerSidebarTab({ ...TAB, type: "custom", render, destroy });
    } else if (!app.extensionManager) {
      floatingWindow();
    }
  },
});

function floatingWindow() {
  const toggle = document.createElement("button");
  toggle.type = "button";
  toggle.className = "sa3-float-toggle";
  toggle.textContent = TAB.title;
  toggle.setAttribute("aria-expanded", "false");
  // inline: panel.css is only loaded when the panel mounts
  Object.assign(toggle.style, { position: "fixed", right: "12px", bottom: "12px", zIndex: "1000" });
  const box = document.createElement("div");
  box.className = "sa3-float";
  Object.assign(box.style, { position: "fixed", right: "12px", bottom: "48px", zIndex: "1000",
    width: "min(900px, 90vw)", height: "min(80vh, 900px)" });
  box.hidden = true;
  toggle.addEventListener("click", () => {
    box.hidden = !box.hidden;
    toggle.setAttribute("aria-expanded", String(!box.hidden));
    if (!box.hidden && !mounted) render(box);
  });
  document.body.append(toggle, box);
}
