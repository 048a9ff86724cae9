// The selected run's log: its warnings, errors, loss-scale changes and status messages (resumed from step N, the
// settings a restart changed, ...), newest first, from the same events as everything else. The runs list shows only
// the newest warning; this keeps all of them.

import { el } from "./dom.js";

const LOGGED = {  // event type -> label; status events only when they carry a message
  warning: "warning",
  error: "error",
  loss_scale: "loss scale",
  status: "status",
};
const SHOWN_AT_MOST = 200;

/** The log lines of a run's events, oldest first: [{kind, time, step, text}]. */
function logLines(events) {
  const lines = [];
  for (const e of events) {
    if (!(e.type in LOGGED)) continue;
    const text = e.message || e.error || "";
    if (!text) continue;  // a bare status change: the runs list shows it
    lines.push({ kind: e.type, time: e.time ?? null, step: e.step ?? null, text });
  }
  return lines;
}

function clock(time) {
  if (!time) return "";
  const d = new Date(time * 1000);
  return [d.getHours(), d.getMinutes(), d.getSeconds()].map((n) => String(n).padStart(2, "0")).join(":");
}

export function mount(root, store) {
  const box = root.appendChild(el("details", "sa3-log"));
  box.hidden = true;
  const summary = box.appendChild(el("summary"));
  const list = box.appendChild(el("ol", "sa3-log-list"));
  list.setAttribute("aria-live", "polite");

  let shown = { run: null, lines: [] };  // what the list shows: a step event alone changes nothing here
  const render = (line) => {
    const item = el("li", `sa3-log-${line.kind}`);
    item.dataset.kind = line.kind;
    const when = [clock(line.time), line.step !== null ? `step ${line.step}` : ""].filter(Boolean).join(" · ");
    item.append(el("span", "sa3-log-when", when), el("span", "sa3-log-kind", LOGGED[line.kind]),
      el("span", "sa3-log-text", line.text));
    return item;
  };
  const same = (a, b) => a.kind === b.kind && a.text === b.text && a.step === b.step && a.time === b.time;
  const off = store.subscribe("events", ({ run, events }) => {
    const lines = run ? logLines(events) : [];
    box.hidden = !run;
    const before = shown.lines;
    const sameRun = (run?.id ?? null) === shown.run;
    if (sameRun && lines.length === before.length) return;
    const count = (kind) => lines.filter((l) => l.kind === kind).length;
    const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;
    const notable = [["warning", count("warning")], ["error", count("error")]].filter(([, n]) => n)
      .map(([word, n]) => plural(n, word));
    summary.textContent = `Log (${plural(lines.length, "message")}${notable.length ? `: ${notable.join(", ")}` : ""})`;
    box.dataset.count = String(lines.length);
    const grew = sameRun && before.length > 0 && lines.length > before.length
      && same(lines[before.length - 1], before[before.length - 1]);
    // The store only ever appends to a run's events (deduplicated), so a longer log of the same run that still ends
    // where the shown one did is the shown one plus new lines
    if (grew) {  // only the new lines go in (on top), so a screen reader announces them and not the whole log
      list.prepend(...lines.slice(before.length).slice(-SHOWN_AT_MOST).reverse().map(render));
      while (list.children.length > SHOWN_AT_MOST) list.lastElementChild.remove();
    } else {  // another run, or a first look: shown whole, and not read out line by line
      list.setAttribute("aria-live", "off");
      list.replaceChildren(...lines.slice(-SHOWN_AT_MOST).reverse().map(render));
      setTimeout(() => list.setAttribute("aria-live", "polite"), 0);
    }
    shown = { run: run?.id ?? null, lines };
  });
  return () => {
    off();
    box.remove();
  };
}
