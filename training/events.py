"""Run events: one JSON object per line in `events.jsonl`, the single format read by the panel, the nodes and the CLI.

Event kinds (every event has `type`, `run`, `time`; step events carry the global step across resumes):
    status      {status, error?}
    step        {step, loss, lr, grad_norm, delta_norm (‖s·B·A‖ over the adapter), samples: [[t, loss], ...] (one pair
                per batch item), steps_per_s}
    checkpoint  {step, path (relative to the run folder), state_path}
    demo        {step, index, audio, image, settings}  (paths relative to the run folder)
    validation  {step, loss, levels: [[t, loss], ...], items}  (held-out items, `validation.py`)
    error       {message}
"""

from __future__ import annotations

import functools
import json
import math
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


def _lock_for(path: Path) -> threading.Lock:
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(str(path), threading.Lock())


class EventLog:
    """Append-only JSONL event file with optional live listeners (ComfyUI's websocket, tests)."""

    def __init__(self, path: str | Path, run_id: str, listeners: list[Callable[[dict], None]] | None = None):
        self.path, self.run_id = Path(path), run_id
        self.listeners = list(listeners or [])
        self._tail_checked = False

    def emit(self, type_: str, **payload) -> dict:
        event = _finite({"type": type_, "run": self.run_id, "time": round(time.time(), 3), **payload})
        line = json.dumps(event, ensure_ascii=False, allow_nan=False, default=_jsonable) + "\n"
        with _lock_for(self.path):
            with open(self.path, "a+b") as f:
                if not self._tail_checked:  # a crash may have torn the last line: never glue this event onto it
                    self._tail_checked = True
                    if f.seek(0, os.SEEK_END) > 0:
                        f.seek(-1, os.SEEK_END)
                        if f.read(1) != b"\n":
                            f.write(b"\n")
                f.write(line.encode("utf-8"))
                f.flush()
        notify(self.listeners, event)
        return event


def notify(listeners: list[Callable[[dict], None]], event: dict) -> None:
    """Give an event to live listeners (ComfyUI's websocket, tests); a failing one never stops training."""
    for listener in listeners:
        try:
            listener(event)
        except Exception:  # a broken browser connection
            pass


def _finite(value):
    """value with every NaN/inf float (a diverged loss, an fp16 overflow's grad norm) as None: the file stays strict
    JSON that browsers parse, and the event is still written."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def read_events(path: str | Path, offset: int = 0, limit_bytes: int = 8 << 20) -> tuple[list[dict], int]:
    """Events after byte `offset`, and the offset to continue from. A half-written last line is left for next time."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(limit_bytes)
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n")
    if end < 0:
        return [], offset
    events = []
    for raw in data[: end + 1].splitlines():
        try:
            events.append(json.loads(raw))
        except ValueError:  # JSONDecodeError, UnicodeDecodeError: a line torn by a crash mid-write
            continue
    return events, offset + end + 1


def ema(values: list[float], alpha: float = 0.05) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else acc + alpha * (v - acc)
        out.append(acc)
    return out


def read_all_events(path: str | Path) -> list[dict]:
    """Every event of a run's events file (up to 1 GB), for the views that need its whole history."""
    return read_events(path, 0, limit_bytes=1 << 30)[0]


def last_per_step(events: list[dict], kind: str) -> list[dict]:
    """The events of one kind in step order, the last of each step: a step done again after a crash and resume
    (trained, scored) replaces its first attempt, so curves never run backwards."""
    by_step = {}
    for e in events:
        if e.get("type") == kind:
            by_step[e["step"]] = e
    return [by_step[step] for step in sorted(by_step)]


def current_steps(events: list[dict]) -> list[dict]:
    """The step events of the run's current history, in step order (`last_per_step`)."""
    return last_per_step(events, "step")


def validation_events(events: list[dict]) -> list[dict]:
    """The run's validation scores (held-out items, `validation.py`) in step order, the last of each step."""
    return [e for e in last_per_step(events, "validation") if e.get("loss") is not None]


def best_validation(events: list[dict]) -> dict | None:
    """{"step", "loss", "path"} of the saved checkpoint with the lowest validation loss (path relative to the run
    folder), or None when no checkpoint step has been scored. A later checkpoint wins a tie (more training for the
    same loss)."""
    checkpoints = {e["step"]: e for e in events if e.get("type") == "checkpoint"}
    scored = [e for e in validation_events(events) if e["step"] in checkpoints]
    if not scored:
        return None
    best = min(scored, key=lambda e: (e["loss"], -e["step"]))
    return {"step": best["step"], "loss": best["loss"], "path": checkpoints[best["step"]]["path"]}


def bin_edges(bins: int) -> list[tuple[float, float]]:
    """The `bins` equal-width noise-level bins over [0, 1] (t = 1 is noise) as (lo, hi)."""
    return [(i / bins, (i + 1) / bins) for i in range(bins)]


def noise_bin(t: float, bins: int) -> int:
    """The bin of noise level t among `bin_edges(bins)` (t = 1 falls in the last)."""
    return min(bins - 1, max(0, int(t * bins)))


def samples_by_bin(step_event: dict, bins: int) -> list[list[float]]:
    """The finite per-sample losses of one step event in each of `bins` noise-level bins (NaN/inf, written as
    null, are left out)."""
    per_bin = [[] for _ in range(bins)]
    for t, loss in step_event.get("samples", []):
        if loss is not None and math.isfinite(loss):
            per_bin[noise_bin(t, bins)].append(loss)
    return per_bin


def bin_means(step_event: dict, bins: int) -> list[float | None]:
    """Each noise-level bin's mean finite sample loss in one step event (None: no sample there this step); the
    metrics CSV's and TensorBoard's per-bin columns."""
    return [sum(losses) / len(losses) if losses else None for losses in samples_by_bin(step_event, bins)]


def loss_by_timestep(events: list[dict], bins: int = 5, alpha: float = 0.05) -> list[dict]:
    """Per-sample (t, loss) pairs binned into `bins` equal-width noise-level bins over [0, 1]; per bin the raw points
    and an EMA-smoothed curve over steps: [{"lo", "hi", "steps": [...], "loss": [...], "smoothed": [...]}]."""
    series = [{"lo": lo, "hi": hi, "steps": [], "loss": []} for lo, hi in bin_edges(bins)]
    for e in current_steps(events):
        for s, losses in zip(series, samples_by_bin(e, bins)):
            s["steps"] += [e["step"]] * len(losses)
            s["loss"] += losses
    for s in series:
        s["smoothed"] = ema(s["loss"], alpha)
    return series


def thinned(series: list[dict], points: int) -> list[dict]:
    """`loss_by_timestep` bins with at most `points` samples each: evenly spaced ones, the last always kept (a long
    run has hundreds of thousands; a chart needs a few thousand). The smoothed values are the full curve's."""
    out = []
    for s in series:
        n = len(s["loss"])
        keep = range(n) if n <= points else sorted({round(i * (n - 1) / (points - 1)) for i in range(points)})
        out.append({**s, **{key: [s[key][i] for i in keep] for key in ("steps", "loss", "smoothed")}})
    return out


def step_series(events: list[dict], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for e in current_steps(events):
        if e.get(key) is not None:
            steps.append(e["step"])
            values.append(e[key])
    return steps, values


CHART_FONTS = ("DejaVuSans.ttf", "arial.ttf", "Arial.ttf", "LiberationSans-Regular.ttf", "Helvetica.ttc")


@functools.lru_cache(maxsize=1)
def chart_font():
    """A system sans-serif at 11 px (DejaVu Sans on Linux, Arial on Windows, Helvetica on macOS), else Pillow's own
    TrueType font (Pillow >= 10.1 with FreeType; its spaces are 2 px, "t0.60-0.65"), else its bitmap font."""
    from PIL import ImageFont

    for name in CHART_FONTS:
        try:
            return ImageFont.truetype(name, 11)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size=11)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def render_chart(series: list[tuple[str, list[int], list[float], tuple[int, int, int]]], width: int = 640,
                 height: int = 320, title: str = "", log_y: bool = False):
    """A simple line chart as an RGB uint8 array [H, W, 3] (for the `IMAGE` outputs of nodes). The legend gets its
    own rows between the title and the plot, as many as its names need, so no curve runs under it; a series with
    nothing to draw is left out of it."""
    import numpy as np
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), (24, 24, 28))
    draw = ImageDraw.Draw(img)
    draw.font = chart_font()

    def shown(y) -> bool:  # a point the chart can place: finite, and above 0 on a log scale
        return y is not None and math.isfinite(y) and (y > 0 or not log_y)

    pad_l, pad_r, pad_b, row_h = 48, 12, 22, 13
    legend_x, legend_y, placed = pad_l + 6, 20, []
    for name, _, values, colour in series:
        if not name or not any(map(shown, values)):
            continue
        text_w = draw.textlength(name)
        if legend_x + text_w > width - pad_r - 4 and legend_x > pad_l + 6:
            legend_x, legend_y = pad_l + 6, legend_y + row_h
        placed.append((legend_x, legend_y, name, colour))
        legend_x += text_w + 14
    pad_t = legend_y + row_h + 4 if placed else 22
    xs = [x for _, s, _, _ in series for x in s]
    ys = [y for _, _, v, _ in series for y in v if shown(y)]
    draw.text((pad_l, 4), title, fill=(220, 220, 220))
    for x, y, name, colour in placed:
        draw.text((x, y), name, fill=colour)
    if not xs or not ys:
        draw.text((width // 2 - 30, height // 2), "no data yet", fill=(160, 160, 160))
        return np.asarray(img)

    def ty(y):
        return math.log10(y) if log_y else y

    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    lo, hi = ty(min(ys)), ty(max(ys))
    hi = hi if hi > lo else lo + 1e-6
    lo, hi = lo - 0.04 * (hi - lo), hi + 0.04 * (hi - lo)  # lines at the extremes stay off the frame
    plot_w, plot_h = width - pad_l - pad_r, height - pad_t - pad_b
    draw.rectangle([pad_l, pad_t, width - pad_r, height - pad_b], outline=(70, 70, 80))
    for frac in (0.0, 0.5, 1.0):
        val = lo + frac * (hi - lo)
        label = f"{10 ** val:.3g}" if log_y else f"{val:.3g}"
        y = pad_t + plot_h * (1 - frac)
        draw.text((2, y - 6), label, fill=(170, 170, 170))
    draw.text((pad_l, height - pad_b + 4), str(x0), fill=(170, 170, 170))
    draw.text((width - pad_r - 40, height - pad_b + 4), str(x1), fill=(170, 170, 170))
    for _, steps, values, colour in series:
        pts = [(pad_l + plot_w * (s - x0) / (x1 - x0), pad_t + plot_h * (1 - (ty(v) - lo) / (hi - lo)))
               for s, v in zip(steps, values) if shown(v)]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        elif pts:
            draw.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=colour)
    return np.asarray(img)


# Material 400 tones, with purple and brown at 300 (their 400s are too dark to read on the panel's background)
BIN_COLOURS = [(239, 83, 80), (255, 167, 38), (102, 187, 106), (66, 165, 245), (186, 104, 200), (38, 198, 218),
               (255, 238, 88), (161, 136, 127)]


def bin_colours(bins: int) -> list[tuple[int, int, int]]:
    """A colour per noise-level bin, every one far from every other: the panel's palette (BIN_COLOURS) first, then
    each further bin the bright colour farthest, in OKLab (a perceptually even colour space), from all chosen so far.
    Bins far apart in t cross mid-run, so any two must differ, not only neighbours (hues spread around the wheel gave
    pairs of near-identical greens at 20 bins)."""
    return [tuple(c) for c in _far_apart_colours(bins)]


@functools.lru_cache(maxsize=8)
def _far_apart_colours(count: int) -> tuple[tuple[int, int, int], ...]:
    import numpy as np

    chosen = list(BIN_COLOURS[:count])
    if count <= len(chosen):
        return tuple(chosen)
    levels = np.arange(0, 256, 15)
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(-1, 3)
    lab = oklab(grid)
    # light and coloured enough to read as a line on the dark background (24, 24, 28)
    usable = (lab[:, 0] >= 0.65) & (lab[:, 0] <= 0.95) & (np.hypot(lab[:, 1], lab[:, 2]) >= 0.08)
    grid, lab = grid[usable], lab[usable]
    nearest = np.min([np.linalg.norm(lab - c, axis=1) for c in oklab(np.asarray(chosen))], axis=0)
    while len(chosen) < count:
        i = int(np.argmax(nearest))
        chosen.append(tuple(int(v) for v in grid[i]))
        nearest = np.minimum(nearest, np.linalg.norm(lab - lab[i], axis=1))
    return tuple(chosen)


def oklab(rgb):
    """sRGB colours [..., 3] in 0-255 -> OKLab [..., 3] (Björn Ottosson's): L 0-1, a, b; distances between colours
    follow how different they look (0.02 is about a just-noticeable difference)."""
    import numpy as np

    c = np.asarray(rgb, float) / 255
    linear = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    lms = linear @ np.array([[0.4122214708, 0.5363325363, 0.0514459929], [0.2119034982, 0.6806995451, 0.1073969566],
                             [0.0883024619, 0.2817188376, 0.6299787005]]).T
    return np.cbrt(lms) @ np.array([[0.2104542553, 0.7936177850, -0.0040720468],
                                    [1.9779984951, -2.4285922050, 0.4505937099],
                                    [0.0259040371, 0.7827717662, -0.8086757660]]).T


def bin_label(lo: float, hi: float, bins: int) -> str:
    """"t 0.2-0.4": one decimal where the bin edges have one (1, 2, 5 or 10 bins), else two (20 bins: t 0.05-0.10)."""
    places = 1 if 10 % bins == 0 else 2
    return f"t {lo:.{places}f}-{hi:.{places}f}"


def metrics_csv(events: list[dict], bins: int = 5) -> str:
    """The run's metrics as CSV text, one row per step of its current history (and step 0 when validation scored
    it): step, loss, lr, grad_norm, delta_norm, steps_per_s, the mean loss of that step's samples in each of `bins`
    noise-level bins (empty when none fell there), validation_loss where the held-out items were scored, and the
    checkpoint saved at that step. For spreadsheets, notebooks and other plotting tools."""
    import csv
    import io

    steps = {e["step"]: e for e in current_steps(events)}
    scored = {e["step"]: e["loss"] for e in validation_events(events)}
    checkpoints = {e["step"]: e.get("path", "") for e in events if e.get("type") == "checkpoint"}
    bin_names = [f"loss_t{lo:.2f}-{hi:.2f}" for lo, hi in bin_edges(bins)]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    fields = ("loss", "lr", "grad_norm", "delta_norm", "steps_per_s")
    writer.writerow(["step", *fields, *bin_names, "validation_loss", "checkpoint"])
    for step in sorted(set(steps) | set(scored)):
        e = steps.get(step, {})
        cells = [e.get(k) for k in fields]
        cells += bin_means(e, bins)
        writer.writerow([step, *("" if v is None else repr(float(v)) for v in cells + [scored.get(step)]),
                         checkpoints.get(step, "")])
    return out.getvalue()


VALIDATION_COLOUR = (255, 167, 38)  # the panel's validation line (web/panel/charts_view.js) in the same orange


def loss_chart(events: list[dict]):
    """Training loss (raw and smoothed) and, when the run holds items out, their validation loss."""
    steps, loss = step_series(events, "loss")
    series = [("loss", steps, loss, (120, 120, 140)), ("smoothed", steps, ema(loss), (66, 165, 245))]
    scored = validation_events(events)
    if scored:
        series.append(("validation", [e["step"] for e in scored], [e["loss"] for e in scored], VALIDATION_COLOUR))
    return render_chart(series, title="training loss", log_y=True)


def loss_by_timestep_chart(events: list[dict], bins: int = 5):
    """The smoothed loss of each noise-level bin over steps; the title counts the bins no sample fell in yet (the
    sampler rarely draws t near 0 or 1), which the legend leaves out."""
    binned = loss_by_timestep(events, bins)
    series = [(bin_label(s["lo"], s["hi"], bins), s["steps"], s["smoothed"], colour)
              for s, colour in zip(binned, bin_colours(bins))]
    empty = [bin_label(s["lo"], s["hi"], bins) for s in binned if not s["loss"]]
    title = "loss by noise level (smoothed)"
    if empty and len(empty) < bins:
        title += f"; no samples yet: {empty[0]}" if len(empty) == 1 else f"; {len(empty)} bins without samples yet"
    return render_chart(series, title=title, log_y=True)
