// Charts of the selected run: loss (raw + smoothed, and the validation loss of held-out items), learning rate,
// grad norm, the adapter's size (how far it has moved the weights) and loss by noise level.

import { lineChart } from "./chart.js";
import { ema, lossByNoiseLevel, stepSeries, validationSeries } from "./series.js";

export const BINS = 5;
// Same order as BIN_COLOURS in training/events.py (the node's chart images), so both read alike.
export const BIN_COLOURS = ["#ef5350", "#ffa726", "#66bb6a", "#42a5f5", "#ba68c8", "#26c6da", "#ffee58", "#a1887f"];
const RAW = "var(--sa3-muted)";
const MAIN = "#42a5f5";
const VALIDATION = "#ffa726";  // VALIDATION_COLOUR of training/events.py (the node's chart image)

export function mount(el, store) {
  const section = el.appendChild(document.createElement("section"));
  section.className = "sa3-charts";
  section.setAttribute("aria-label", "Training charts");
  const charts = {
    loss: lineChart({ id: "loss", title: "Loss", logY: true }),
    lbt: lineChart({ id: "loss_by_noise", title: "Loss by noise level (smoothed)", logY: true }),
    lr: lineChart({ id: "lr", title: "Learning rate" }),
    grad: lineChart({ id: "grad_norm", title: "Grad norm" }),
    delta: lineChart({ id: "delta_norm", title: "Adapter size ‖s·B·A‖" }),
  };
  for (const chart of Object.values(charts)) section.appendChild(chart.el);
  const csv = section.appendChild(document.createElement("a"));
  csv.className = "sa3-button sa3-csv";
  csv.dataset.action = "metrics-csv";
  csv.textContent = "Metrics (CSV)";
  csv.title = "Download every step's loss, learning rate, grad norm, loss per noise level and validation loss as CSV";
  csv.setAttribute("aria-label", csv.title);

  const off = store.subscribe("events", ({ run, events }) => {
    csv.hidden = !run;
    if (run) csv.href = store.api.metricsUrl(run.id);
    const loss = stepSeries(events, "loss");
    const validation = validationSeries(events);
    charts.loss.update([
      { name: "raw", color: RAW, steps: loss.steps, values: loss.values, width: 1, opacity: 0.6 },
      { name: "smoothed", color: MAIN, steps: loss.steps, values: ema(loss.values), width: 2 },
      // held-out items at fixed noise (only runs with validation_items have it)
      ...(validation.steps.length ? [{ name: "validation", color: VALIDATION, ...validation, width: 2 }] : []),
    ]);
    charts.lbt.update(lossByNoiseLevel(events, BINS).map((bin, i) => ({
      name: `t ${bin.lo.toFixed(1)}–${bin.hi.toFixed(1)}`,
      color: BIN_COLOURS[i % BIN_COLOURS.length],
      steps: bin.steps,
      values: bin.smoothed,
      width: 1.75,
    })));
    const lr = stepSeries(events, "lr");
    charts.lr.update([{ name: "lr", color: MAIN, steps: lr.steps, values: lr.values }]);
    const delta = stepSeries(events, "delta_norm");  // how far the adapter has moved the weights
    charts.delta.update([{ name: "‖s·B·A‖", color: "#66bb6a", steps: delta.steps, values: delta.values }]);
    const grad = stepSeries(events, "grad_norm");
    charts.grad.update([
      { name: "raw", color: RAW, steps: grad.steps, values: grad.values, width: 1, opacity: 0.6 },
      { name: "smoothed", color: "#ab47bc", steps: grad.steps, values: ema(grad.values), width: 2 },
    ]);
  });
  return () => {
    off();
    Object.values(charts).forEach((c) => c.destroy());
    section.remove();
  };
}
