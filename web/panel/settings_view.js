// The selected run's settings (its config.json, from the run route): the knobs that shape a run at a glance, and the
// whole config as JSON to copy into `sa3-lora train --config` or to compare runs. Read again when the run changes
// or is resumed with other settings (a "queued" status event naming what changed).

import { el } from "./dom.js";

const SHOWN = [  // [label, text of the config]
  ["Model", (c) => c.model],
  ["Dataset", (c) => c.dataset],
  ["Adapter", (c) => `${c.adapter_type}, rank ${c.rank}, alpha ${c.alpha ?? c.rank}`
    + (c.detach_norm ? ", detached norms" : "") + (c.dropout ? `, dropout ${c.dropout}` : "")],
  ["Layers", (c) => [c.targets, ...(c.include || []).map((p) => `+${p}`), ...(c.exclude || []).map((p) => `−${p}`)]
    .join(" ")],
  ["Steps", (c) => `${c.steps}, batch ${c.batch_size}, ${c.crop_seconds} s crops`
    + (c.crop_from && c.crop_from !== "random" ? ` from the ${c.crop_from}` : "")],
  ["Optimiser", (c) => `lr ${c.lr}` + (c.warmup_steps ? `, warm-up ${c.warmup_steps}` : "")
    + `, betas ${(c.betas || []).join("/")}, weight decay ${c.weight_decay}, clip ${c.grad_clip || "off"}`],
  ["Precision", (c) => c.precision + (c.gradient_checkpointing ? ", gradient checkpointing" : "")],
  ["Cadence", (c) => `checkpoint every ${c.checkpoint_every}`
    + (c.keep_states ? ` (training states of the newest ${c.keep_states} kept)` : "")
    + (c.demo_every ? `, demos every ${c.demo_every}` : ", no demos")
    + (c.demo_every ? `, demos at ${c.demo_loudness === null || c.demo_loudness === undefined ? "their own level"
      : `${c.demo_loudness} LUFS`}` : "")],
  ["Validation", (c) => (c.validation_items ? `${c.validation_items} file${c.validation_items > 1 ? "s" : ""} held `
    + `out, scored ${c.validation_every ? `every ${c.validation_every} steps` : "with each checkpoint"}` : "off")],
  ["Seed", (c) => String(c.seed)],
];

export function mount(root, store) {
  const box = root.appendChild(el("details", "sa3-settings"));
  box.hidden = true;
  box.appendChild(el("summary", null, "Settings"));
  const list = box.appendChild(el("dl", "sa3-settings-list"));
  const copy = box.appendChild(el("button", "sa3-button sa3-small", "Copy as JSON"));
  copy.type = "button";
  copy.dataset.action = "copy-settings";
  copy.title = "Copy the run's config (the schema of sa3-lora train --config)";
  const json = box.appendChild(el("pre", "sa3-settings-json"));
  json.hidden = true;

  let runId = null;
  let config = null;
  let seenChanges = 0;  // settings-changing events counted so far, and how many events were scanned for them
  let scanned = 0;
  let request = 0;  // only the newest fetch may fill the card (a slow one for another run or older settings may not)

  function render() {
    box.hidden = !config;
    list.replaceChildren();
    if (!config) return;
    for (const [label, text] of SHOWN) {
      list.appendChild(el("dt", null, label));
      list.appendChild(el("dd", null, text(config))).dataset.field = label.toLowerCase();
    }
    json.textContent = JSON.stringify(config, null, 1);
  }

  async function load(id) {
    const mine = ++request;
    let fresh = null;
    try {
      fresh = (await store.api.run(id)).config || null;
    } catch {
      fresh = null;  // the run is gone: nothing to show
    }
    if (mine !== request || id !== runId) return;  // another run was selected, or a newer fetch went out
    config = fresh;
    render();
  }

  const offs = [
    store.subscribe("selected", ({ run }) => {
      const id = run?.id ?? null;
      if (id === runId) return;
      runId = id;
      config = null;
      seenChanges = 0;
      scanned = 0;
      json.hidden = true;
      render();
      if (id) load(id);
    }),
    store.subscribe("events", ({ run, events }) => {
      if (!run || run.id !== runId) return;
      if (scanned > events.length) scanned = seenChanges = 0;  // the history was read anew
      let changes = seenChanges;
      for (; scanned < events.length; scanned += 1) {  // the new events only
        if (events[scanned].type === "status" && events[scanned].changed) changes += 1;
      }
      if (changes > seenChanges) {  // resumed with other settings (or first read of a run that was)
        seenChanges = changes;
        load(runId);
      }
    }),
  ];

  copy.addEventListener("click", async () => {
    if (!config) return;
    json.hidden = false;  // shown either way: selectable when the clipboard is not available
    try {
      await navigator.clipboard.writeText(json.textContent);
      store.say("Settings copied as JSON (use them with sa3-lora train --config).");
    } catch {
      store.say("Select the settings below to copy them.");
    }
  });

  return () => {
    offs.forEach((off) => off());
    box.remove();
  };
}
