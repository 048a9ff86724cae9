// A small SVG line chart: x = global step, several series, optional log y, hover/keyboard cursor with a readout.
// No library (nothing may come from a CDN). The figure element keeps the plotted series in `figure.sa3Series`
// (full resolution, what the readout reports) so tests can check what is drawn.

import { stepTicks } from "./series.js";

const SVG = "http://www.w3.org/2000/svg";
const HEIGHT = 170;  // px; the width follows the panel
const PAD = { left: 46, right: 10, top: 8, bottom: 20 };
const MAX_DRAWN = 600;  // points per series on screen; more only cost time, the readout still uses all of them

function svg(tag, attrs = {}, parent = null) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (parent) parent.appendChild(node);
  return node;
}

function fmt(v) {
  if (!Number.isFinite(v)) return "–";
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(2);
  return Number(v.toPrecision(4)).toString();
}

/** Evenly strided indices, always keeping the last point. */
function strided(n, max) {
  if (n <= max) return [...Array(n).keys()];
  const stride = n / max;
  const idx = [];
  for (let i = 0; i < max; i++) idx.push(Math.floor(i * stride));
  if (idx[idx.length - 1] !== n - 1) idx.push(n - 1);
  return idx;
}

/**
 * lineChart({id, title, logY}) -> {el, update(series)}
 * series: [{name, color, steps: number[], values: (number|null)[], width?, opacity?}]
 */
export function lineChart({ id, title, logY = false, unit = "" }) {
  const figure = document.createElement("figure");
  figure.className = "sa3-chart";
  figure.dataset.chart = id;
  figure.tabIndex = 0;  // arrow keys move the cursor: the readout works without a mouse
  const caption = figure.appendChild(document.createElement("figcaption"));
  const heading = caption.appendChild(document.createElement("span"));
  heading.className = "sa3-chart-title";
  heading.textContent = title + (logY ? " (log)" : "");
  const legend = caption.appendChild(document.createElement("span"));
  legend.className = "sa3-legend";
  const box = figure.appendChild(document.createElement("div"));
  box.className = "sa3-chart-box";
  const root = svg("svg", { role: "img", height: HEIGHT }, box);
  const readout = box.appendChild(document.createElement("div"));
  readout.className = "sa3-readout";
  readout.setAttribute("aria-live", "polite");
  readout.hidden = true;

  let series = [];
  let scale = null;
  let cursor = null;  // index into the x positions of the first non-empty series

  const ty = (v) => (logY ? Math.log10(v) : v);
  const usable = (v) => v !== null && Number.isFinite(v) && (!logY || v > 0);

  function draw() {
    const width = Math.max(200, Math.floor(box.clientWidth || 320));
    root.setAttribute("width", width);
    root.setAttribute("viewBox", `0 0 ${width} ${HEIGHT}`);
    root.replaceChildren();
    legend.replaceChildren(...series.filter((s) => s.name).map((s) => {
      const item = document.createElement("span");
      item.className = "sa3-legend-item";
      const swatch = item.appendChild(document.createElement("i"));
      swatch.style.background = s.color;
      item.append(s.name);
      return item;
    }));
    const xs = series.flatMap((s) => s.steps);
    const ys = series.flatMap((s) => s.values.filter(usable).map(ty));
    const points = series.reduce((n, s) => n + s.values.filter(usable).length, 0);
    figure.dataset.points = String(points);
    if (!xs.length || !ys.length) {
      svg("text", { x: width / 2, y: HEIGHT / 2, "text-anchor": "middle", class: "sa3-axis" }, root).textContent =
        "no data yet";
      root.setAttribute("aria-label", `${title}: no data yet`);
      scale = null;
      return;
    }
    let [x0, x1] = [Math.min(...xs), Math.max(...xs)];
    if (x1 === x0) x1 = x0 + 1;
    let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
    const margin = (y1 - y0) * 0.05 || Math.abs(y0) * 0.05 || 1e-6;
    const nonNegative = !logY && y0 >= 0;
    y0 -= margin;
    y1 += margin;
    if (nonNegative) y0 = Math.max(y0, 0);  // a learning rate axis should not dip below zero
    const plotW = width - PAD.left - PAD.right;
    const plotH = HEIGHT - PAD.top - PAD.bottom;
    const px = (x) => PAD.left + (plotW * (x - x0)) / (x1 - x0);
    const py = (y) => PAD.top + plotH * (1 - (ty(y) - y0) / (y1 - y0));
    scale = { px, py, x0, x1, width };

    for (const frac of [0, 0.5, 1]) {
      const yv = y0 + frac * (y1 - y0);
      const y = PAD.top + plotH * (1 - frac);
      svg("line", { x1: PAD.left, x2: width - PAD.right, y1: y, y2: y, class: "sa3-grid" }, root);
      svg("text", { x: PAD.left - 4, y: y + 4, "text-anchor": "end", class: "sa3-axis" }, root).textContent =
        fmt(logY ? 10 ** yv : yv);
    }
    for (const [x, anchor] of stepTicks(x0, x1)) {
      svg("text", { x: px(x), y: HEIGHT - 5, "text-anchor": anchor, class: "sa3-axis" }, root).textContent =
        String(x);
    }
    for (const s of series) {
      let d = "";
      let pen = false;
      for (const i of strided(s.steps.length, MAX_DRAWN)) {
        const v = s.values[i];
        if (!usable(v)) {
          pen = false;  // NaN/inf/missing: a gap, not a zero
          continue;
        }
        d += `${pen ? "L" : "M"}${px(s.steps[i]).toFixed(1)},${py(v).toFixed(1)}`;
        pen = true;
      }
      svg("path", { d, fill: "none", stroke: s.color, "stroke-width": s.width ?? 1.5,
        "stroke-opacity": s.opacity ?? 1, "stroke-linejoin": "round", "data-series": s.name || "" }, root);
    }
    const last = series.find((s) => s.values.some(usable));
    const lastIdx = last ? last.values.length - 1 : -1;
    root.setAttribute("aria-label", last
      ? `${title}: ${points} points from step ${x0} to ${Math.round(x1)}; last ${last.name || ""} ${fmt(last.values[lastIdx])}`
      : title);
    if (cursor !== null) showCursor(cursor);
  }

  /** Readout at index i of the reference series (the first one with points). */
  function showCursor(i) {
    const ref = series.find((s) => s.steps.length);
    if (!ref || !scale) return;
    cursor = Math.max(0, Math.min(ref.steps.length - 1, i));
    const step = ref.steps[cursor];
    root.querySelector(".sa3-cursor")?.remove();
    const x = scale.px(step);
    svg("line", { x1: x, x2: x, y1: PAD.top, y2: HEIGHT - PAD.bottom, class: "sa3-cursor" }, root);
    const rows = [`step ${step}`];
    for (const s of series) {
      const j = nearest(s.steps, step);
      if (j >= 0 && usable(s.values[j])) rows.push(`${s.name || title}: ${fmt(s.values[j])}${unit}`);
    }
    readout.textContent = rows.join(" · ");
    readout.hidden = false;
    const w = readout.offsetWidth || 180;  // keep the readout inside the chart, on whichever side has room
    readout.style.left = `${Math.max(0, Math.min(x - w / 2, scale.width - w))}px`;
    figure.dataset.cursorStep = String(step);
  }

  function hideCursor() {
    cursor = null;
    readout.hidden = true;
    root.querySelector(".sa3-cursor")?.remove();
  }

  root.addEventListener("pointermove", (e) => {
    const ref = series.find((s) => s.steps.length);
    if (!ref || !scale) return;
    const rect = root.getBoundingClientRect();
    const step = scale.x0 + ((e.clientX - rect.left - PAD.left) / (scale.width - PAD.left - PAD.right))
      * (scale.x1 - scale.x0);
    showCursor(nearest(ref.steps, step));
  });
  root.addEventListener("pointerleave", hideCursor);
  figure.addEventListener("keydown", (e) => {
    const ref = series.find((s) => s.steps.length);
    if (!ref) return;
    const jump = e.shiftKey ? 10 : 1;
    if (e.key === "ArrowLeft") showCursor((cursor ?? ref.steps.length) - jump);
    else if (e.key === "ArrowRight") showCursor((cursor ?? -1) + jump);
    else if (e.key === "Home") showCursor(0);
    else if (e.key === "End") showCursor(ref.steps.length - 1);
    else if (e.key === "Escape") hideCursor();
    else return;
    e.preventDefault();
  });
  figure.addEventListener("blur", hideCursor);

  let pending = false;
  const schedule = () => {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => {
      pending = false;
      draw();
    });
  };
  const resize = typeof ResizeObserver === "function" ? new ResizeObserver(schedule) : null;
  resize?.observe(box);

  return {
    el: figure,
    update(next) {
      series = next;
      figure.sa3Series = next;
      draw();  // synchronous, so what the store just received is on screen (tests read it straight after)
    },
    destroy() {
      resize?.disconnect();
    },
  };
}

/** Index of the step closest to `step` (steps may repeat after a resume from an earlier checkpoint). */
function nearest(steps, step) {
  let best = -1;
  let dist = Infinity;
  for (let i = 0; i < steps.length; i++) {
    const d = Math.abs(steps[i] - step);
    if (d < dist || (d === dist && i > best)) {
      best = i;
      dist = d;
    }
  }
  return best;
}
