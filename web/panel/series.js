// Pure functions from a run's events (the events.jsonl format of training/events.py) to what the views draw.
// `ema` and `lossByNoiseLevel` mirror training/events.py (`ema`, `loss_by_timestep`): the browser test checks the
// panel's curves against the /loss_by_timestep route, so the two cannot drift apart.

export const ACTIVE = ["queued", "loading", "training", "demos", "paused"];

/** Exponential moving average, first value as the start (alpha 0.05 as on the server). */
export function ema(values, alpha = 0.05) {
  const out = [];
  let acc = null;
  for (const v of values) {
    if (v === null || !Number.isFinite(v)) {
      out.push(null);  // a gap stays a gap and does not poison the average
      continue;
    }
    acc = acc === null ? v : acc + alpha * (v - acc);
    out.push(acc);
  }
  return out;
}

/** The step events of the run's current history, in step order: a step trained again after a crash and resume
 * replaces its lost first attempt (the last event of each step wins). Mirrors `current_steps`. */
export function currentSteps(events) {
  return lastPerStep(events, "step");
}

/** The last event of a type per step, in step order (a resumed run logs its replayed steps again). Mirrors
 * `last_per_step`. */
function lastPerStep(events, type) {
  const byStep = new Map();
  for (const e of events) if (e.type === type) byStep.set(e.step, e);
  return [...byStep.keys()].sort((a, b) => a - b).map((step) => byStep.get(step));
}

/** Steps and values of one numeric field of the step events: {steps: [...], values: [...]}. */
export function stepSeries(events, key) {
  const steps = [];
  const values = [];
  for (const e of currentSteps(events)) {
    if (e[key] !== undefined && e[key] !== null) {
      steps.push(e.step);
      values.push(Number(e[key]));
    }
  }
  return { steps, values };
}

/** Per-sample (t, loss) pairs in `bins` equal noise-level bins over [0, 1], each with an EMA over steps:
 * [{lo, hi, steps, loss, smoothed}] (t = 1 is noise, t = 0 is data). */
export function lossByNoiseLevel(events, bins = 5, alpha = 0.05) {
  const series = Array.from({ length: bins }, (_, i) => ({ lo: i / bins, hi: (i + 1) / bins, steps: [], loss: [] }));
  for (const e of currentSteps(events)) {
    for (const [t, loss] of e.samples || []) {
      if (loss === null || !Number.isFinite(loss)) continue;
      const i = Math.min(bins - 1, Math.max(0, Math.floor(t * bins)));
      series[i].steps.push(e.step);
      series[i].loss.push(loss);
    }
  }
  for (const s of series) s.smoothed = ema(s.loss, alpha);
  return series;
}

/** Demo events grouped by step, oldest first: [{step, demos: [event sorted by index], checkpoint: event|null}]. */
export function demoSteps(events) {
  const byStep = new Map();
  const checkpoints = new Map();
  for (const e of events) {
    if (e.type === "demo") {
      if (!byStep.has(e.step)) byStep.set(e.step, new Map());
      byStep.get(e.step).set(e.index ?? 0, e);  // a re-rendered demo (after a resume) replaces the old one
    } else if (e.type === "checkpoint") {
      checkpoints.set(e.step, e);
    }
  }
  return [...byStep.keys()].sort((a, b) => a - b).map((step) => ({
    step,
    demos: [...byStep.get(step).values()].sort((a, b) => (a.index ?? 0) - (b.index ?? 0)),
    checkpoint: checkpoints.get(step) || null,
  }));
}

/** The run's dataset clips ("reference" events, training/demos.py `render_references`) by index. */
export function referenceClips(events) {
  const byIndex = new Map();
  for (const e of events) if (e.type === "reference") byIndex.set(e.index ?? 0, e);
  return [...byIndex.keys()].sort((a, b) => a - b).map((i) => byIndex.get(i));
}

/** Validation events (held-out items, training/validation.py) in step order, the last of each step: {steps, values}.
 * Mirrors `validation_events`. */
export function validationSeries(events) {
  // the last score of each step first, then the unscored dropped: a step re-scored as NaN (null) after a resume
  // has no score, not its stale earlier one (as `validation_events`)
  const scored = lastPerStep(events, "validation").filter((e) => e.loss !== null && e.loss !== undefined);
  return { steps: scored.map((e) => e.step), values: scored.map((e) => Number(e.loss)) };
}

/** The saved checkpoint with the lowest validation loss: {step, loss, path} (path relative to the run folder) or
 * null; a tie goes to the later step. Mirrors `best_validation`. */
export function bestValidation(events) {
  const checkpoints = new Map();
  for (const e of events) if (e.type === "checkpoint") checkpoints.set(e.step, e);
  const scored = validationSeries(events);
  let best = null;
  scored.steps.forEach((step, i) => {
    if (!checkpoints.has(step)) return;
    const loss = scored.values[i];
    if (!best || loss < best.loss || (loss === best.loss && step > best.step)) best = { step, loss };
  });
  return best && { ...best, path: checkpoints.get(best.step).path };
}

/** The newest checkpoint event, or null. */
export function latestCheckpoint(events) {
  let best = null;
  for (const e of events) if (e.type === "checkpoint" && (!best || e.step >= best.step)) best = e;
  return best;
}

/** Seconds left at `stepsPerS`, or null when unknown. */
export function etaSeconds(step, total, stepsPerS) {
  if (!stepsPerS || !(stepsPerS > 0) || !total || step >= total) return null;
  return (total - step) / stepsPerS;
}

export function formatDuration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "–";
  const s = Math.round(seconds);
  if (s < 60) return `${s} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${String(s % 60).padStart(2, "0")} s`;
  const h = Math.floor(m / 60);
  return `${h} h ${String(m % 60).padStart(2, "0")} min`;
}

export function formatNumber(v) {
  if (v === null || v === undefined || !Number.isFinite(v)) return "–";
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(2);
  return Number(v.toPrecision(4)).toString();
}

/** File name of a relative path ("checkpoints/x-step=000400.safetensors" -> "x-step=000400.safetensors"). */
export function baseName(path) {
  return String(path || "").split(/[\\/]/).pop();
}

/** Step labels of a chart's x axis from step x0 to x1: [[step, text-anchor]], first, middle and last, each step once
 * (in a 2-step run the middle rounds to the last step and would print over it). */
export function stepTicks(x0, x1) {
  const last = Math.round(x1);
  const middle = Math.round((x0 + x1) / 2);
  const ticks = [[x0, "start"]];
  if (middle !== x0 && middle !== last) ticks.push([middle, "middle"]);
  if (last !== x0) ticks.push([last, "end"]);
  return ticks;
}
