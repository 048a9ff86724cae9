// The runs list: name, pack, adapter type/rank, status, step/total with a progress bar, steps/s, ETA.

import { etaSeconds, formatDuration } from "./series.js";
import { el } from "./dom.js";

function runRow(run, selected, store) {
  const li = el("li", "sa3-run");
  li.dataset.runId = run.id;
  li.dataset.status = run.status;
  const button = li.appendChild(el("button", "sa3-run-select"));
  button.type = "button";
  button.setAttribute("aria-pressed", String(selected));
  if (selected) li.classList.add("sa3-selected");
  button.addEventListener("click", () => store.select(run.id));

  const top = button.appendChild(el("span", "sa3-run-top"));
  top.appendChild(el("span", "sa3-run-name", run.name || run.id));
  const badge = top.appendChild(el("span", `sa3-status sa3-status-${run.status}`, run.status));
  badge.dataset.field = "status";

  const meta = button.appendChild(el("span", "sa3-run-meta"));
  meta.appendChild(el("span", "sa3-run-pack", run.model || "?")).dataset.field = "pack";
  meta.appendChild(el("span", "sa3-run-adapter", `${run.adapter_type} r${run.rank}`)).dataset.field = "adapter";

  const total = run.total_steps || 0;
  const step = run.step || 0;
  const progress = button.appendChild(el("progress", "sa3-progress"));
  progress.max = Math.max(total, 1);
  progress.value = Math.min(step, progress.max);
  progress.setAttribute("aria-label", `${run.name}: step ${step} of ${total}`);

  const numbers = button.appendChild(el("span", "sa3-run-numbers"));
  numbers.appendChild(el("span", null, `${step} / ${total}`)).dataset.field = "step";
  // a speed and an ETA only while it trains (a queued run's last rate is from before it waited)
  const active = ["training", "demos"].includes(run.status);
  const rate = active && run.steps_per_s ? `${run.steps_per_s.toFixed(2)} steps/s` : "– steps/s";
  numbers.appendChild(el("span", null, rate)).dataset.field = "rate";
  const eta = active ? etaSeconds(step, total, run.steps_per_s) : null;
  numbers.appendChild(el("span", null, `ETA ${formatDuration(eta)}`)).dataset.field = "eta";

  if (run.status === "interrupted") {  // what Resume does: the steps after the last checkpoint are trained again
    const saved = run.latest_checkpoint?.step;
    const note = li.appendChild(el("p", "sa3-run-note", saved !== undefined
      ? `Stopped unexpectedly (a restart or crash) at step ${step}; Resume continues from the checkpoint of step ${saved}.`
      : `Stopped unexpectedly (a restart or crash) before its first checkpoint; Resume starts it again.`));
    note.dataset.field = "interrupted";
  }
  if (run.warning && !(run.error && run.status === "failed")) {
    const warning = li.appendChild(el("p", "sa3-run-warning", `⚠ ${run.warning}`));
    warning.dataset.field = "warning";
    warning.setAttribute("role", "note");
  }
  if (run.error && (run.status === "failed" || run.status === "interrupted")) {
    const error = li.appendChild(el("p", "sa3-run-error", run.error));
    error.dataset.field = "error";
    error.setAttribute("role", "note");
  }
  return li;
}

export function mount(root, store) {
  const section = root.appendChild(el("section", "sa3-runs"));
  section.setAttribute("aria-label", "Training runs");
  const head = section.appendChild(el("div", "sa3-section-head"));
  head.appendChild(el("h3", null, "Runs"));
  const refresh = head.appendChild(el("button", "sa3-button sa3-small", "Refresh"));
  refresh.type = "button";
  refresh.setAttribute("aria-label", "Refresh the runs list");
  refresh.addEventListener("click", () => store.reconnected());
  const list = section.appendChild(el("ul", "sa3-run-list"));
  const empty = section.appendChild(el("p", "sa3-empty",
    "No runs yet. Start one with the SA3 Train LoRA node or `sa3-lora train`."));

  const off = store.subscribe("runs", ({ runs, selectedId }) => {
    // newest first: the run you just started is on top
    const rows = [...runs].reverse().map((run) => runRow(run, run.id === selectedId, store));
    const focused = document.activeElement?.closest?.(".sa3-run")?.dataset.runId;
    list.replaceChildren(...rows);
    if (focused) list.querySelector(`[data-run-id="${CSS.escape(focused)}"] button`)?.focus();
    empty.hidden = runs.length > 0;
  });
  return () => {
    off();
    section.remove();
  };
}
