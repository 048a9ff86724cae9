"""Demos during training: every `demo_every` steps (and at step 0, the base model's baseline), render each demo of
the run with the adapter as it is now, on the base model (Euler) or the ARC model (ping-pong), and write
`demos/step_<S>/demo_<i>.flac` (or .wav/.mp3/.opus: `RunConfig.demo_format`) + a tinted spectrogram `.png` + the settings
`.json`, every clip at `RunConfig.demo_loudness` (`write_clip`).
Before the first demos, a few dataset clips are written to `demos/reference/` to compare with (`render_references`).

Demos reuse the loaded model and apply the adapter as a private view that computes the adapter path beside the shared
weights (no merged copy), so nobody else using the shared model hears it and demos need no more memory than
training. ARC demos use the ARC pack's DiT loaded beside the base model for each round of demos, sharing its
autoencoder and text encoder (`sa3.sibling`; on a GPU its blocks stay in host memory and visit the device one at a
time).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from ..encoding import batch_prompts
from ..encoding.audio_write import write_audio
from ..encoding.loudness import normalize_loudness
from ..sa3.config import ConfigError
from ..sa3.loading import CheckpointError
from ..sa3.packs import PackError
from ..sa3.samplers import DEFAULTS
from ..sa3.spectrogram import spectrogram_png
from .runs import DemoSpec, atomic_write_json, default_demos


def demo_prompt(trainer, spec: DemoSpec, index: int, step: int) -> str:
    """The spec's prompt, or one re-rolled from the dataset (seeded by run seed, step and demo index) with the run's
    prompt composition — the same function training uses."""
    if spec.prompt is not None:
        return spec.prompt
    rng = random.Random(f"sa3-demo:{trainer.config.seed}:{step}:{index}")
    item = rng.randrange(len(trainer.items))
    return batch_prompts(trainer.items, [item], trainer.prompt_config, trainer.config.seed + 7919 * (index + 1), step)[0]


def arc_model_for(trainer):
    """The ARC model for ARC demos: `arc_model` of the run config, else the base pack's ARC variant, or None with a
    warning event. A missing or unusable checkpoint turns ARC demos off for the run (warned once); any other error
    (e.g. out of memory while loading) skips this round's ARC demos and the next round tries again.
    `Trainer.load_arc_model` says where the model comes from."""
    if getattr(trainer, "_arc_model", None) is not None or getattr(trainer, "_arc_missing", False):
        return getattr(trainer, "_arc_model", None)
    c = trainer.config
    spec = c.arc_model or c.model
    try:
        trainer._arc_model, trainer._arc_private = trainer.load_arc_model(spec)
    except (CheckpointError, ConfigError, PackError, OSError) as e:  # nothing to load: no use trying every round
        trainer._arc_missing = True
        trainer.log.emit("warning", message=f"ARC demos skipped: no ARC model ({e})")
        return None
    except Exception as e:
        trainer.log.emit("warning", message=f"ARC demos skipped this round: loading the ARC model failed "
                                            f"({type(e).__name__}: {e})")
        return None
    if not trainer._arc_model.is_arc and not getattr(trainer, "_arc_warned", False):
        trainer._arc_warned = True
        trainer.log.emit("warning", message=f"ARC demos: {spec} is not an ARC model; using it with ping-pong anyway")
    return trainer._arc_model


class DemoStopped(Exception):
    """A stop asked for while a demo was sampling: the demo ends at its next sampling step."""


def _render_demo(trainer, model, spec: DemoSpec, i: int, step: int, adapter, folder: Path,
                 stop_requested=lambda: False) -> tuple[int, str, dict]:
    """Demo i of the step into folder: audio, spectrogram, settings; returns (i, audio file name, settings).
    Raises DemoStopped at the first sampling step after `stop_requested()` turns true."""

    import torch

    def check_stop(info) -> None:
        if stop_requested():
            raise DemoStopped

    max_seconds = model.config.sample_size / model.config.sample_rate
    duration = min(spec.duration or trainer.config.crop_seconds, max_seconds)
    source, extra = None, {}
    if spec.mode == "generate":
        prompt = demo_prompt(trainer, spec, i, step)
    else:  # a dataset clip with a part to fill in: the middle third, or the second half. Its latents as training
        frames_wanted = max(1, round(duration * model.config.latent_rate))
        item = demo_source(trainer, i, frames_wanted)  # sees them, no decode and encode again at every round
        z, mask, _ = trainer.dataset.item(item, frames_wanted)
        frames = max(1, int(mask.sum()))
        source = torch.from_numpy(z[:, :frames].copy())
        duration = min(duration, frames / model.config.latent_rate)
        region = (duration / 3, 2 * duration / 3) if spec.mode == "inpaint" else (duration / 2, duration)
        prompt = spec.prompt if spec.prompt is not None else \
            batch_prompts(trainer.items, [item], trainer.prompt_config, trainer.config.seed, step)[0]  # the clip's own
        extra = {"inpaint_latents": source, "inpaint_regions": [region]}
    sampler, default_steps, default_cfg = DEFAULTS["arc" if spec.arc else "base"]  # an ARC demo samples as ARC,
    steps, cfg = spec.steps or default_steps, default_cfg if spec.cfg is None else spec.cfg  # whatever the model
    with model.residency.in_use():  # an ARC model from the shared cache may have been offloaded between rounds
        audio, rate = model.generate(prompt, duration=duration, seed=spec.seed, steps=steps, cfg_scale=cfg,
                                     sampler=sampler,
                                     loras=[{"adapter": adapter, "strength": spec.lora_strength,
                                             "skip_first_steps": spec.lora_skip_first_steps}],
                                     adapter_memory="low",  # no merged copy of the weights beside training's
                                     callback=check_stop, **extra)
    audio_name, level = write_clip(folder, f"demo_{i}", audio[0], rate, trainer.config)
    settings = {"prompt": prompt, "arc": spec.arc, "cfg": cfg, "steps": steps, "seed": spec.seed,
                "duration": duration, "lora_strength": spec.lora_strength,
                "lora_skip_first_steps": spec.lora_skip_first_steps, "step": step, **level}
    if source is not None:
        settings |= {"mode": spec.mode, "source_file": trainer.items[item][0],
                     "region": list(extra["inpaint_regions"][0])}
    atomic_write_json(folder / f"demo_{i}.json", settings)
    return i, audio_name, settings


def write_clip(folder: Path, stem: str, wav, rate: int, config) -> tuple[str, dict]:
    """A demo or dataset clip wav [C, N] (a tensor, full scale 1.0) at `rate` Hz as folder/stem.<demo_format> and its
    tinted spectrogram folder/stem.png, brought to `config.demo_loudness` LUFS first (`normalize_loudness`: every
    clip of the run at one loudness, so checkpoints are compared by sound, not level). Returns (the audio file's
    name, `normalize_loudness`'s level with "target_lufs"; {} when demo_loudness is None)."""
    import torch

    samples, level = wav.float().numpy(), {}
    if config.demo_loudness is not None:
        samples, level = normalize_loudness(samples, rate, config.demo_loudness)
        level["target_lufs"] = config.demo_loudness
    name = write_audio(folder / stem, samples, rate, config.demo_format).name
    spectrogram_png(torch.from_numpy(samples), rate, folder / f"{stem}.png")
    return name, level


def release_arc_model(trainer) -> None:
    """Drop an ARC model the run loaded for itself once a round of demos is rendered (the next round loads it again,
    seconds against the minutes of training between rounds), so training never holds it; a model from the
    provider's cache stays where it is."""
    if getattr(trainer, "_arc_private", False):
        trainer._arc_model = None


REFERENCE_CLIPS = 3  # dataset clips written once per run, to hear beside the demos


def dataset_clip(trainer, model, item: int, n_latents: int):
    """Dataset item `item` from its start, at most n_latents long (its real frames only), decoded by `model`'s
    autoencoder: waveform [2, N] float on the CPU at model.sample_rate. The real SAMEs add a little noise when
    decoding: it is seeded by (run seed, item), so the same run writes the same clip (after a resume too)."""
    import torch

    from .trainer import derive_seed

    z, mask, _ = trainer.dataset.item(item, n_latents)
    frames = max(1, int(mask.sum()))
    generator = torch.Generator().manual_seed(derive_seed(trainer.config.seed, item, "clip"))
    with torch.no_grad():
        return model.decode_latents(torch.from_numpy(z[:, :frames].copy())[None], generator=generator)[0].cpu()


def long_enough_items(dataset, frames: int) -> list[int]:
    """Indices of the dataset's items with at least `frames` latent frames, else (none is) those of the longest
    length: a demo or reference clip of a 0.05 s file shows nothing (each record's n_latents; unknown counts 0)."""
    lengths = [int(e.get("n_latents") or 0) for e in dataset.entries]
    enough = [i for i, n in enumerate(lengths) if n >= frames]
    return enough or [i for i, n in enumerate(lengths) if n == max(lengths, default=0)]


def demo_source(trainer, i: int, frames: int = 1) -> int:
    """The dataset item an inpaint/continue demo works on: one with at least `frames` latent frames where the
    dataset has any, fixed for the run (seed, demo index), so its demos compare step to step."""
    candidates = long_enough_items(trainer.dataset, frames)
    return candidates[random.Random(f"sa3-demo-source:{trainer.config.seed}:{i}").randrange(len(candidates))]


def render_references(trainer, n: int = REFERENCE_CLIPS) -> list[dict]:
    """Once per run, before its first demos: up to n dataset crops (from each file's start, the training crop's
    length) decoded by the model's own autoencoder into `demos/reference/ref_<i>.*` (audio, spectrogram, settings):
    the sound the adapter learns from, after the autoencoder's round trip (a dataset encoded wrongly sounds wrong
    here at once). Their prompt is the one training step 0 composes. Returns their "reference" events ([] when
    they exist already at the run's demo loudness); a failure is a warning, training goes on."""
    import json
    import shutil

    folder = trainer.folder / "demos" / "reference"
    if getattr(trainer, "_references_failed", False) or getattr(trainer, "_references_ready", False):
        return []  # failed once, or checked by this trainer already: not again
    if folder.is_dir():  # written: again only when a resume changed the demos' loudness, so they still compare
        first = folder / "ref_0.json"
        target = json.loads(first.read_text(encoding="utf-8")).get("target_lufs") if first.is_file() else None
        if target == trainer.config.demo_loudness or not first.is_file():
            trainer._references_ready = True
            return []
        shutil.rmtree(folder)
    tmp = folder.with_name("reference.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    c, dataset = trainer.config, trainer.dataset
    candidates = long_enough_items(dataset, trainer.crop_latents)  # a full training crop where the dataset has one
    chosen = set(candidates)
    others = [i for i in range(len(dataset)) if i not in chosen]
    rng = random.Random(f"sa3-reference:{c.seed}")
    picked = rng.sample(candidates, k=min(n, len(candidates)))
    picked += rng.sample(others, k=min(n - len(picked), len(others)))  # a dataset of short files still shows some
    written = []
    try:
        for i, item in enumerate(picked):
            wav = dataset_clip(trainer, trainer.model, item, trainer.crop_latents)
            rate = trainer.model.sample_rate
            audio_name, level = write_clip(tmp, f"ref_{i}", wav, rate, c)
            settings = {"prompt": batch_prompts(trainer.items, [item], trainer.prompt_config, c.seed, 0)[0],
                        "file": trainer.items[item][0], "duration": wav.shape[-1] / rate, "reference": True, **level}
            atomic_write_json(tmp / f"ref_{i}.json", settings)
            written.append((i, audio_name, settings))
        tmp.rename(folder)
        trainer._references_ready = True
    except Exception as e:  # like a demo: the clips illustrate, they must not end the run
        shutil.rmtree(tmp, ignore_errors=True)
        trainer._references_failed = True
        trainer.log.emit("warning", message=f"dataset reference clips skipped: {type(e).__name__}: {e}")
        return []
    return [trainer.log.emit("reference", index=i, audio=f"demos/reference/{name}",
                             image=f"demos/reference/ref_{i}.png", settings=settings) for i, name, settings in written]


def demo_event(trainer, step: int, index: int, audio_name: str, settings: dict) -> dict:
    """Emit the `demo` event of demo `index` of `step` (its files in demos/step_<S>/)."""
    rel = Path("demos") / f"step_{step:06d}"
    return trainer.log.emit("demo", step=step, index=index, audio=f"{rel}/{audio_name}",
                            image=f"{rel}/demo_{index}.png", settings=settings)


def emit_missing_demo_events(trainer) -> list[dict]:
    """The `demo` events of demos on disk that the events file lacks, emitted now: a process killed after a step's
    demos were in place (the folder is renamed whole) but before all their events were written would otherwise
    show that step with fewer demos for ever, since a resume renders only steps without a folder."""
    recorded = set()
    try:
        with open(trainer.log.path, "rb") as f:
            for line in f:
                if b'"type": "demo"' in line:  # the few demo lines of a long file, without parsing the rest
                    try:
                        event = json.loads(line)
                        recorded.add((int(event["step"]), int(event["index"])))
                    except (ValueError, KeyError, TypeError):
                        continue
    except FileNotFoundError:
        pass
    emitted = []
    for folder in sorted((trainer.folder / "demos").glob("step_*")):
        if not folder.is_dir() or not folder.name[5:].isdigit():  # step_*.partial: rendered again on resume
            continue
        step = int(folder.name[5:])
        for settings_file in sorted(folder.glob("demo_*.json")):
            index = settings_file.stem[5:]
            audio = [p for p in folder.glob(f"demo_{index}.*") if p.suffix not in (".json", ".png")]
            if not index.isdigit() or (step, int(index)) in recorded or not audio:
                continue
            try:
                settings = json.loads(settings_file.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            emitted.append(demo_event(trainer, step, int(index), audio[0].name, settings))
    return emitted


def run_demos(trainer, step: int, stop_requested=lambda: False) -> list[dict] | None:
    """Render the step's demos into `demos/step_<S>.partial/`, renamed to `step_<S>/` when all are written; returns
    their events, or None when `stop_requested()` turned true during the demos (the step's demos are then dropped
    and rendered again when the run resumes, so a stop acts within one sampling step, not after the demo or the
    whole set). A demo that fails is skipped with a warning event; training goes on."""
    import shutil

    specs = list(trainer.config.demos) or default_demos()
    if not stop_requested():
        render_references(trainer)
    out_dir = trainer.folder / "demos" / f"step_{step:06d}"
    tmp_dir = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp_dir, ignore_errors=True)  # an earlier attempt that crashed mid-demos
    tmp_dir.mkdir(parents=True)
    adapter = trainer.stack.export(0)
    written = []
    try:
        for i, spec in enumerate(specs):
            if stop_requested():
                shutil.rmtree(tmp_dir, ignore_errors=True)
                return None
            model = arc_model_for(trainer) if spec.arc else trainer.model
            if model is None:
                continue
            try:
                written.append(_render_demo(trainer, model, spec, i, step, adapter, tmp_dir, stop_requested))
            except DemoStopped:
                shutil.rmtree(tmp_dir, ignore_errors=True)
                return None
            except Exception as e:  # a demo must not end the training it illustrates (e.g. out of memory, a codec)
                for leftover in tmp_dir.glob(f"demo_{i}.*"):
                    leftover.unlink()
                trainer.log.emit("warning", message=f"demo {i} at step {step} failed and was skipped: "
                                                    f"{type(e).__name__}: {e}")
    finally:
        release_arc_model(trainer)
    if out_dir.exists():  # a re-run of the same step (resume): replace
        shutil.rmtree(out_dir)
    tmp_dir.rename(out_dir)
    return [demo_event(trainer, step, i, audio_name, settings) for i, audio_name, settings in written]


__all__ = ["run_demos", "demo_prompt", "arc_model_for", "release_arc_model", "render_references",
           "emit_missing_demo_events"]
