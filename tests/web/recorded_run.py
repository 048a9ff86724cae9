"""Recorded runs for the panel tests: run folders in the layout of training/runs.py, written without training.

`step_events` makes a plausible loss curve (falls, then flattens; higher loss at high noise levels t), a warmup +
cosine learning rate and a grad norm; `write_demo` renders a short stereo chord that gets cleaner with the step, its
FLAC, its tinted spectrogram PNG (the function the trainer's demos use) and its settings JSON.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
from sa3_lora_studio.training.events import EventLog
from sa3_lora_studio.training.runs import RunConfig, RunRegistry, atomic_write_json

DEMO_SETTINGS = [  # with their level as generated and the gain `training.demos.write_clip` applied
    {"prompt": "warm analog synth pad, slow arpeggio, 90 BPM", "arc": False, "cfg": 7.0, "steps": 50, "seed": 1,
     "loudness_lufs": -11.94, "gain_db": -6.06, "target_lufs": -18.0},
    {"prompt": "", "arc": True, "cfg": 1.0, "steps": 8, "seed": 3, "loudness_lufs": -41.5, "gain_db": 20.0,
     "limited_by": "max gain", "target_lufs": -18.0},
]


def step_events(first: int, last: int, total: int, seed: int = 0, batch: int = 4) -> list[dict]:
    """Step events `first..last` (inclusive) without run/time (EventLog.emit adds them)."""
    rng = random.Random(seed * 7919 + first)
    events = []
    for step in range(first, last + 1):
        base = 0.32 + 0.55 * math.exp(-step / 18)
        samples = []
        for _ in range(batch):
            t = 1 / (1 + math.exp(-rng.gauss(0, 1)))  # logit-normal noise level
            samples.append([round(t, 4), round(base * (0.55 + 0.9 * t) * rng.uniform(0.8, 1.2), 5)])
        warm = min(1.0, step / 10)
        lr = 1e-4 * warm * 0.5 * (1 + math.cos(math.pi * step / total))
        events.append({"type": "step", "step": step, "loss": round(sum(s[1] for s in samples) / batch, 5),
                       "lr": lr, "grad_norm": round(0.4 + 1.5 * math.exp(-step / 12) * rng.uniform(0.7, 1.3), 4),
                       "delta_norm": round(0.05 * (1 - math.exp(-step / 20)), 6),
                       "samples": samples, "steps_per_s": round(2.4 + rng.uniform(-0.2, 0.2), 3)})
    return events


def validation_loss(step: int) -> float:
    """A held-out loss that falls, then rises as the run starts to overfit (lowest near step 40)."""
    return round(0.5 + 0.3 * math.exp(-step / 15) + 0.002 * max(0, step - 35), 5)


def validation_event(step: int, items: int) -> dict:
    levels = [[t, round(validation_loss(step) * (0.55 + 0.9 * t), 5)] for t in (0.1, 0.3, 0.5, 0.7, 0.9)]
    return {"step": step, "loss": round(sum(v for _, v in levels) / 5, 6), "levels": levels, "items": items}


def write_checkpoint(run_dir: Path, name: str, step: int) -> str:
    """A tiny adapter file + state file and latest.json; returns the adapter path relative to the run folder."""
    import torch
    from safetensors.torch import save_file

    rel = f"checkpoints/{name}-step={step:06d}.safetensors"
    save_file({"lora_A": torch.zeros(2, 4), "lora_B": torch.zeros(4, 2)}, str(run_dir / rel))
    torch.save({"step": step}, run_dir / rel.replace(".safetensors", ".state.pt"))
    atomic_write_json(run_dir / "latest.json", {"path": rel, "step": step})
    return rel


def demo_audio(step: int, index: int, seconds: float = 1.5, rate: int = 22050) -> np.ndarray:
    """[N, 2] float32: a chord whose noise fades as training goes on (so the spectrograms differ by step)."""
    rng = np.random.default_rng(step * 10 + index)
    t = np.arange(int(seconds * rate)) / rate
    root = 110.0 * 2 ** (index * 5 / 12)
    tone = sum(np.sin(2 * np.pi * root * r * t) / (k + 1) for k, r in enumerate((1, 1.25, 1.5, 2, 3)))
    envelope = np.minimum(1, t * 20) * np.exp(-t * 1.2) * (0.6 + 0.4 * np.sin(2 * np.pi * 2 * t) ** 2)
    noise = rng.standard_normal((2, t.size)) * (1.2 * math.exp(-step / 25))
    left, right = tone * envelope + noise[0] * 0.3, tone * envelope * 0.9 + noise[1] * 0.3
    audio = np.stack([left, right], axis=1)
    return (0.5 * audio / np.abs(audio).max()).astype(np.float32)


def write_demo(run_dir: Path, step: int, index: int, settings: dict, rate: int = 22050) -> dict:
    """FLAC + PNG + JSON under demos/step_XXXXXX/; returns the demo event payload."""
    import soundfile as sf
    import torch
    from sa3_lora_studio.sa3.spectrogram import spectrogram_png

    folder = run_dir / "demos" / f"step_{step:06d}"
    folder.mkdir(parents=True, exist_ok=True)
    audio = demo_audio(step, index, rate=rate)
    sf.write(folder / f"demo_{index}.flac", audio, rate, format="FLAC")
    spectrogram_png(torch.from_numpy(audio.T.copy()), rate, folder / f"demo_{index}.png")
    settings = {"duration": len(audio) / rate, "lora_strength": 1.0, **settings}
    (folder / f"demo_{index}.json").write_text(json.dumps(settings))
    rel = f"demos/step_{step:06d}/demo_{index}"
    return {"step": step, "index": index, "audio": rel + ".flac", "image": rel + ".png", "settings": settings}


def write_reference(run_dir: Path, index: int, settings: dict, rate: int = 22050) -> dict:
    """A dataset clip as `training.demos.render_references` writes it (demos/reference/ref_<i>.*); returns the
    reference event payload."""
    import soundfile as sf
    import torch
    from sa3_lora_studio.sa3.spectrogram import spectrogram_png

    folder = run_dir / "demos" / "reference"
    folder.mkdir(parents=True, exist_ok=True)
    audio = demo_audio(0, index + 7, rate=rate)
    sf.write(folder / f"ref_{index}.flac", audio, rate, format="FLAC")
    spectrogram_png(torch.from_numpy(audio.T.copy()), rate, folder / f"ref_{index}.png")
    settings = {"duration": len(audio) / rate, "reference": True, **settings}
    (folder / f"ref_{index}.json").write_text(json.dumps(settings))
    rel = f"demos/reference/ref_{index}"
    return {"index": index, "audio": rel + ".flac", "image": rel + ".png", "settings": settings}


def write_recorded_run(registry: RunRegistry, name: str, steps_done: int, total: int, status: str,
                       demo_every: int = 20, checkpoint_every: int = 20, error: str | None = None,
                       model: str = "sa3-small-music", adapter_type: str = "dora-rows", rank: int = 16,
                       seed: int = 0, validation_items: int = 0) -> str:
    """A run folder as the trainer leaves it after `steps_done` steps, ending in `status`; with validation_items,
    validation events at step 0 and each checkpoint (`validation_loss`). Returns the run id."""
    config = RunConfig(dataset="datasets/tiny-synth", name=name, model=model, adapter_type=adapter_type, rank=rank,
                       steps=total, checkpoint_every=checkpoint_every, demo_every=demo_every,
                       validation_items=validation_items)
    run_id = registry.create(config)
    run_dir = registry.run_dir(run_id)
    log = EventLog(run_dir / "events.jsonl", run_id)
    for s in ("queued", "loading", "training"):
        log.emit("status", status=s)
    if validation_items:
        log.emit("validation", **validation_event(0, validation_items))
    for event in step_events(1, steps_done, total, seed=seed):
        kind = event.pop("type")
        log.emit(kind, **event)
        step = event["step"]
        if step % checkpoint_every == 0:
            rel = write_checkpoint(run_dir, name, step)
            log.emit("checkpoint", step=step, path=rel, state_path=rel.replace(".safetensors", ".state.pt"))
            if validation_items:
                log.emit("validation", **validation_event(step, validation_items))
        if demo_every and step % demo_every == 0:
            log.emit("status", status="demos")
            for index, settings in enumerate(DEMO_SETTINGS):
                log.emit("demo", **write_demo(run_dir, step, index, settings))
            log.emit("status", status="training")
    if status != "training":
        log.emit("status", status=status, **({"error": error} if error else {}))
    registry.update(run_id, status=status, step=steps_done, error=error)
    return run_id
