// Controls for the selected run: stop, pause/continue, save now, resume an interrupted run, train a finished or
// stopped run further, use/download the newest checkpoint or the one with the lowest validation loss, delete (asks
// first). Buttons are enabled only when the server would accept the action.

import { ACTIVE, baseName, bestValidation, formatNumber, latestCheckpoint } from "./series.js";
import { el } from "./dom.js";

const RESUMABLE = ["interrupted", "stopped", "failed"];  // restart continues from the last checkpoint
const EXTENDABLE = [...RESUMABLE, "done"];  // restart with more_steps: trains on past the run's total

function button(label, action, help) {
  const b = el("button", "sa3-button", label);
  b.type = "button";
  b.dataset.action = action;
  b.title = help;
  b.setAttribute("aria-label", help);
  return b;
}

/** A link styled as a button (a download: its href is set when there is something to fetch). */
function link(label, action) {
  const a = el("a", "sa3-button", label);
  a.dataset.action = action;
  return a;
}

export function mount(root, store, { useCheckpoint }) {
  const section = root.appendChild(el("section", "sa3-controls"));
  section.setAttribute("aria-label", "Run controls");
  const title = section.appendChild(document.createElement("h3"));
  // the id SA3 Run Status / Run Control take in their run_id field, for a run this graph did not start
  const idRow = section.appendChild(el("div", "sa3-run-id-row"));
  const idText = idRow.appendChild(el("code", "sa3-run-id"));
  const copyId = idRow.appendChild(button("Copy id", "copy-id", "Copy the run id (for the run_id field of SA3 Run Status and SA3 Run Control)"));
  const bar = section.appendChild(el("div", "sa3-button-row"));
  bar.setAttribute("role", "toolbar");
  bar.setAttribute("aria-label", "Run controls");

  const stop = button("Stop", "stop", "Stop the run (saves a checkpoint first)");
  const pause = button("Pause", "pause", "Pause the run");
  const save = button("Save now", "save", "Save a checkpoint after the current step");
  const restart = button("Resume", "restart", "Resume the run from its last checkpoint");
  const use = button("Use checkpoint", "use", "Add an SA3 Load LoRA node with the newest checkpoint to the graph");
  const download = link("Download", "download");
  const del = button("Delete…", "delete", "Delete the run with its checkpoints and demos");
  bar.append(stop, pause, save, restart, use, download, del);

  const bestRow = section.appendChild(el("div", "sa3-button-row sa3-best"));
  bestRow.hidden = true;
  const bestText = bestRow.appendChild(document.createElement("span"));
  const useBest = button("Use best", "use-best", "Add an SA3 Load LoRA node with the checkpoint of lowest validation loss");
  const downloadBest = link("Download best", "download-best");
  bestRow.append(useBest, downloadBest);

  const more = section.appendChild(el("div", "sa3-button-row sa3-more"));
  const moreLabel = more.appendChild(el("label", "", "Train "));
  const moreSteps = moreLabel.appendChild(el("input", "sa3-number"));
  moreSteps.type = "number";
  moreSteps.min = "1";
  moreSteps.step = "1";
  moreSteps.value = "500";
  moreSteps.setAttribute("aria-label", "Steps to train beyond the run's total");
  moreLabel.append(" more steps");
  const moreGo = button("Train more", "more", "Resume from the last checkpoint and train this many steps beyond the run's total");
  more.append(moreGo);

  const confirmBox = section.appendChild(el("div", "sa3-confirm"));
  confirmBox.setAttribute("role", "alertdialog");
  confirmBox.setAttribute("aria-label", "Confirm delete");
  confirmBox.hidden = true;
  const confirmText = confirmBox.appendChild(document.createElement("p"));
  const yes = button("Delete run", "confirm-delete", "Yes, delete this run and its files");
  yes.classList.add("sa3-danger");
  const no = button("Cancel", "cancel-delete", "Keep the run");
  confirmBox.append(yes, no);

  const message = section.appendChild(el("p", "sa3-message"));
  message.setAttribute("role", "status");
  message.setAttribute("aria-live", "polite");

  let run = null;
  let checkpoint = null;  // {path, step}
  let best = null;  // {step, loss, path}: the lowest validation loss among saved checkpoints

  function render() {
    section.hidden = !run;
    if (!run) return;
    title.textContent = run.name || run.id;
    idText.textContent = run.id;
    const active = ACTIVE.includes(run.status);
    stop.disabled = !active;
    const paused = run.status === "paused";
    pause.textContent = paused ? "Continue" : "Pause";
    pause.dataset.action = paused ? "resume" : "pause";
    pause.setAttribute("aria-label", paused ? "Continue the paused run" : "Pause the run");
    pause.disabled = !active || run.status === "queued";
    save.disabled = !active || run.status === "queued";
    restart.disabled = !RESUMABLE.includes(run.status);
    moreGo.disabled = moreSteps.disabled = !EXTENDABLE.includes(run.status);
    use.disabled = !checkpoint;
    if (checkpoint) {
      download.href = store.api.fileUrl(run.id, checkpoint.path, true);
      download.removeAttribute("aria-disabled");
      download.tabIndex = 0;
      const name = baseName(checkpoint.path);
      download.setAttribute("aria-label", `Download checkpoint ${name}`);
      use.setAttribute("aria-label", `Add an SA3 Load LoRA node with ${name} (step ${checkpoint.step})`);
      use.title = use.getAttribute("aria-label");
      use.textContent = `Use step ${checkpoint.step}`;
    } else {
      download.removeAttribute("href");
      download.setAttribute("aria-disabled", "true");
      download.tabIndex = -1;
      use.textContent = "Use checkpoint";
    }
    bestRow.hidden = !best;
    if (best) {
      const name = baseName(best.path);
      bestText.textContent = `Lowest validation loss ${formatNumber(best.loss)} at step ${best.step}`;
      useBest.textContent = `Use best (step ${best.step})`;
      useBest.setAttribute("aria-label", `Add an SA3 Load LoRA node with ${name}, the lowest validation loss`);
      useBest.title = useBest.getAttribute("aria-label");
      downloadBest.href = store.api.fileUrl(run.id, best.path, true);
      downloadBest.setAttribute("aria-label", `Download the best checkpoint ${name}`);
    } else {  // nothing of another run's best may linger (a link is followable even when its row is hidden)
      bestText.textContent = "";
      downloadBest.removeAttribute("href");
    }
  }

  const offs = [
    store.subscribe("selected", ({ run: r, events }) => {
      if (r?.id !== run?.id) confirmBox.hidden = true;
      run = r;
      checkpoint = latestCheckpoint(events) || r?.latest_checkpoint || null;
      best = bestValidation(events);
      render();
    }),
    store.subscribe("events", ({ run: r, events }) => {
      checkpoint = latestCheckpoint(events) || r?.latest_checkpoint || null;
      best = bestValidation(events);
      render();
    }),
    store.subscribe("message", (m) => {
      message.textContent = m ? m.text : "";
      message.dataset.kind = m ? m.kind : "";
    }),
  ];

  copyId.addEventListener("click", async () => {
    if (!run) return;
    try {
      await navigator.clipboard.writeText(run.id);
      store.say(`Copied the run id ${run.id}: paste it into run_id of SA3 Run Status or SA3 Run Control.`);
    } catch {  // no clipboard (an insecure origin): the id is selectable text
      getSelection()?.selectAllChildren(idText);
      store.say(`Run id: ${run.id} (selected: copy it with Ctrl+C).`);
    }
  });
  for (const b of [stop, pause, save, restart]) {
    b.addEventListener("click", () => store.control(b.dataset.action));
  }
  moreGo.addEventListener("click", () => {
    const n = Number(moreSteps.value);
    if (!Number.isInteger(n) || n < 1) {
      store.say("Train more: give a whole number of steps (1 or more).", "error");
      moreSteps.focus();
      return;
    }
    store.control("restart", { more_steps: n });
  });
  use.addEventListener("click", async () => {
    if (!run || !checkpoint) return;
    store.say(await useCheckpoint({ runId: run.id, path: checkpoint.path, step: checkpoint.step,
      name: baseName(checkpoint.path) }));
  });
  useBest.addEventListener("click", async () => {
    if (!run || !best) return;
    store.say(await useCheckpoint({ runId: run.id, path: best.path, step: best.step,
      name: baseName(best.path) }));
  });
  del.addEventListener("click", () => {
    confirmText.textContent = `Delete “${run.name}” with its checkpoints and demos? This cannot be undone.`;
    confirmBox.hidden = false;
    no.focus();  // the safe choice has the focus
  });
  no.addEventListener("click", () => {
    confirmBox.hidden = true;
    del.focus();
  });
  yes.addEventListener("click", async () => {
    confirmBox.hidden = true;
    await store.control("delete", { confirm: true });
  });
  confirmBox.addEventListener("keydown", (e) => {
    if (e.key === "Escape") no.click();
  });

  return () => {
    offs.forEach((off) => off());
    section.remove();
  };
}
