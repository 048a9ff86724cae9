"""`sa3-lora quickstart`: the whole loop on a tiny built-in model, no downloads, a couple of minutes on a CPU.

1. write a tiny pack (base + ARC, real architecture, random weights) in the official Hub layout;
2. synthesise a small audio dataset (WAV/FLAC files with .txt captions and a JSON sidecar) and encode it;
3. train a DoRA adapter in the background with a demo at the start and the end, stop it half-way, resume it;
4. generate a WAV on the ARC model with the trained LoRA (skipping it on the first sampling step).
"""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path

import numpy as np


def synthesise_dataset(folder: Path, seed: int = 0) -> Path:
    """A few seconds of tones, chords and noise bursts as real files with captions."""
    import soundfile as sf

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sr = 44100
    clips = [("drone_low.wav", 55.0, "deep sub bass drone, dark, 60 BPM"),
             ("bell_high.flac", 1320.0, "bright glassy bell, shimmering"),
             ("pulse_mid.wav", 330.0, "pulsing synth stab, rhythmic, 120 BPM"),
             ("chord.flac", 220.0, "warm minor chord pad, ambient")]
    for name, freq, caption in clips:
        t = np.arange(int(sr * 1.2)) / sr
        tone = np.sin(2 * np.pi * freq * t) + 0.4 * np.sin(2 * np.pi * 1.5 * freq * t)
        envelope = (0.5 + 0.5 * np.sin(2 * np.pi * 2 * t)) if "pulse" in name else np.exp(-t)
        wav = 0.3 * tone * envelope
        stereo = np.stack([wav, np.roll(wav, 40)], axis=1) + 0.01 * rng.standard_normal((len(t), 2))
        sf.write(str(folder / name), stereo.astype(np.float32), sr)  # str: old soundfile builds take no Path
        (folder / name).with_suffix(".txt").write_text(caption)
    (folder / "chord.json").write_text(json.dumps({"prompt": "warm minor chord pad, ambient", "genre": "ambient"}))
    return folder


def run_quickstart(args) -> int:
    import soundfile as sf

    from .encoding import encode_folder
    from .sa3.model import load_model
    from .sa3.sibling import load_sibling
    from .sa3.tiny import write_tiny_pack
    from .training.events import best_validation, read_all_events
    from .training.manager import TrainingManager
    from .training.runs import DemoSpec, RunConfig

    out = Path(args.out).resolve()  # every path said below is absolute: it works from any folder
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    def say(message: str) -> None:
        print(f"[{time.time() - started:5.1f} s] {message}", flush=True)

    base_dir, arc_dir = write_tiny_pack(out / "models" / "tiny", seed=args.seed)
    say(f"tiny pack written: {base_dir} and {arc_dir}")
    base = load_model(base_dir)

    audio_dir = synthesise_dataset(out / "audio", args.seed)
    report = encode_folder(audio_dir, out / "dataset", encoder=base)
    say(f"dataset encoded: {report.summary()}")

    def provider(spec, variant, dtype, device):  # the run trains on the loaded base model; ARC demos load beside it
        return base

    manager = TrainingManager(out / "runs", model_provider=provider)
    demos = [DemoSpec("deep sub bass drone", False, 7.0, steps=8, seed=1, duration=1.0),
             DemoSpec(None, True, 1.0, steps=4, seed=2, duration=1.0)]
    config = RunConfig(dataset=str(out / "dataset"), model=str(base_dir), arc_model=str(arc_dir), name="quickstart",
                       adapter_type="dora-rows", rank=4, steps=12, batch_size=2, crop_seconds=0.5, lr=2e-3,
                       checkpoint_every=6, demo_every=12, demos=tuple(demos), seed=args.seed, trigger_word="qstyle",
                       validation_items=1)  # one file held out: its loss says when the adapter starts memorising
    half = {}

    def stop_half_way(event):
        if event["type"] == "step" and event["step"] == 6 and not half:
            half["run"] = event["run"]
            manager.worker.controls[event["run"]].request_stop()
        if event["type"] == "step":
            say(f"step {event['step']:>2}  loss {event['loss']:.4f}")
        elif event["type"] in ("checkpoint", "demo"):
            say(f"{event['type']}: {event.get('path') or event.get('audio')}")
        elif event["type"] == "validation":
            say(f"validation loss of the held-out file at step {event['step']}: {event['loss']:.4f}")

    manager.listeners.append(stop_half_way)
    run_id = manager.submit(config)
    say(f"training run {run_id} in {manager.registry.run_dir(run_id)} (its files below are relative to it)")
    record = manager.wait(run_id)
    say(f"run {record['status']} at step {record['step']} (stopped on purpose); resuming from its checkpoint")
    manager.control(run_id, "restart")
    record = manager.wait(run_id)
    if record["status"] != "done":
        print(f"training ended as {record['status']}: {record.get('error')}")
        return 1
    latest = manager.registry.latest_checkpoint(run_id)
    lora = manager.registry.run_dir(run_id) / latest["path"]
    say(f"trained LoRA: {lora}")

    arc = load_sibling(base, arc_dir)  # the ARC DiT, sharing the base model's autoencoder and text encoder
    audio, rate = arc.generate("qstyle, deep sub bass drone", duration=2.0, seed=args.seed,
                               loras=[{"path": str(lora), "strength": 1.0, "skip_first_steps": 1}])
    wav_path = out / "generated.wav"
    sf.write(str(wav_path), audio[0].T.numpy(), rate)
    from .sa3.spectrogram import spectrogram_png

    spectrogram_png(audio[0], rate, out / "generated.png")
    say(f"generated {audio.shape[-1] / rate:.2f} s on the ARC model with the LoRA: {wav_path} (its spectrogram: "
        f"{out / 'generated.png'})")
    best = best_validation(read_all_events(manager.events_path(run_id)))
    summary = {"lora": str(lora), "generated": str(wav_path), "spectrogram": str(out / "generated.png"),
               "run": str(manager.registry.run_dir(run_id)),
               "best_lora": str(manager.registry.run_dir(run_id) / best["path"]) if best else None,
               "dataset": str(out / "dataset"), "base_model": str(base_dir), "arc_model": str(arc_dir),
               "runs_dir": str(manager.registry.root),
               "try": f"sa3-lora generate {shlex.quote(str(arc_dir))} --prompt 'qstyle, warm pad' --duration 2 "
                      f"--lora {shlex.quote(f'{lora}@0.8')} --lora-skip-first-steps 1 "
                      f"--out {shlex.quote(str(out / 'again.wav'))}",
               "seconds": round(time.time() - started, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return 0
