// mountPanel(el, {api, useCheckpoint}): the whole "SA3 Training" panel in any element. No ComfyUI needed: the
// entry (sa3_panel.js) passes ComfyUI's api as a transport, tests and standalone pages pass their own.

import { PanelApi } from "./api.js";
import { mount as mountCharts } from "./charts_view.js";
import { mount as mountControls } from "./controls_view.js";
import { mount as mountDemos } from "./demos_view.js";
import { mount as mountLog } from "./log_view.js";
import { mount as mountRuns } from "./runs_view.js";
import { mount as mountSettings } from "./settings_view.js";
import { Store } from "./store.js";

function addStylesheet(doc) {
  const href = new URL("./panel.css", import.meta.url).href;
  if ([...doc.querySelectorAll("link[rel=stylesheet]")].some((l) => l.href === href)) return;
  const link = doc.createElement("link");
  link.rel = "stylesheet";
  link.href = href;
  doc.head.appendChild(link);
}

/** Copy a checkpoint's file name (the fallback when there is no graph to add a node to). */
export async function copyName({ name }) {
  try {
    await navigator.clipboard.writeText(name);
    return `Copied “${name}”: paste it into an SA3 Load LoRA node.`;
  } catch {
    return `Checkpoint: ${name} (select it in an SA3 Load LoRA node).`;
  }
}

/**
 * el: the container; transport: {fetchJson(path, init), url(path), on(name, cb) -> off} (see api.js).
 * useCheckpoint({runId, path, step, name}) -> Promise<message>: puts the checkpoint into the graph.
 * Returns {store, unmount}.
 */
export function mountPanel(el, { transport, useCheckpoint = copyName } = {}) {
  addStylesheet(el.ownerDocument || document);
  const root = el.appendChild(document.createElement("div"));
  root.className = "sa3-panel";
  const store = new Store(new PanelApi(transport));
  const main = root.appendChild(document.createElement("div"));
  main.className = "sa3-main";
  const side = main.appendChild(document.createElement("div"));
  side.className = "sa3-side";
  const detail = main.appendChild(document.createElement("div"));
  detail.className = "sa3-detail";
  const unmounts = [
    mountRuns(side, store),
    mountControls(side, store, { useCheckpoint }),
    mountSettings(side, store),
    mountLog(side, store),
    mountCharts(detail, store),
    mountDemos(detail, store, { useCheckpoint }),
  ];
  unmounts.push(store.subscribe("events", ({ run, loaded }) => {
    root.dataset.run = run?.id ?? "";
    root.dataset.loaded = String(loaded);  // "false" while the history is being read
  }));
  store.start().then(() => {
    root.dataset.ready = "true";  // tests wait for this
  });
  return {
    store,
    unmount() {
      unmounts.forEach((u) => u());
      store.destroy();
      root.remove();
    },
  };
}
