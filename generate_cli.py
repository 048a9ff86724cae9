"""`sa3-lora generate`: text-to-audio, audio-to-audio and inpainting from the command line, with stacked LoRAs.

    sa3-lora generate sa3-small-music --variant arc --prompt "dusty boom bap, 90 bpm" --duration 20 \\
        --lora runs/my-style-step=001000.safetensors@0.8 --out beat.flac
    sa3-lora generate ./my-model --prompt "rain on a tin roof" --inpaint take.wav --regions 4-6.5 --out fixed.wav

The same engine call as the SA3 Generate nodes (`sa3.generate.generate`); defaults follow the model kind (ARC:
ping-pong, 8 steps, CFG 1; base: Euler, 50 steps, CFG 7). Prints one JSON line per written file with its settings,
the seed included, so a take can be made again.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def parse_lora(spec: str) -> dict:
    """"FILE" or "FILE@STRENGTH" -> {"path", "strength"}; '@' splits only when what follows is a number."""
    path, _, strength = spec.rpartition("@")
    if path:
        try:
            return {"path": path, "strength": float(strength)}
        except ValueError:
            pass
    return {"path": spec, "strength": 1.0}


def read_prompts(prompt: str | None, prompts_file: str | None) -> list[str]:
    """--prompt, or the lines of --prompts-file (blank lines and lines starting with '#' skipped)."""
    if prompt is not None and prompts_file is not None:
        raise ValueError("give --prompt TEXT or --prompts-file FILE, not both")
    if prompt is None and prompts_file is None:
        raise ValueError("give --prompt TEXT or --prompts-file FILE (one prompt per line)")
    if prompt is not None:
        return [prompt]
    try:
        lines = Path(prompts_file).read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--prompts-file {prompts_file}: {e}") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"--prompts-file {prompts_file}: no prompts (one per line; '#' starts a comment line)")
    return prompts


def output_paths(out: str, n: int, n_prompts: int = 1) -> list[list[Path]]:
    """Per prompt, one path per batch item: `out` itself for a single take, else `<stem>_<i><suffix>` (`<stem>_p<k>`
    per prompt of a prompts file, then `_<i>` per take of a batch); the suffix picks the format."""
    from .encoding.audio_write import OUTPUT_FORMATS

    path = Path(out)
    extensions = [ext for ext, *_ in OUTPUT_FORMATS.values()]
    if path.suffix.lower() not in extensions:
        raise ValueError(f"--out {out}: the extension picks the format; use one of {', '.join(extensions)}")
    stems = [path.stem] if n_prompts == 1 else [f"{path.stem}_p{k}" for k in range(n_prompts)]
    if n == 1:
        return [[path.with_name(stem + path.suffix)] for stem in stems]
    return [[path.with_name(f"{stem}_{i}{path.suffix}") for i in range(n)] for stem in stems]


class StepPrinter:
    """A sampler callback printing "step i/total" to stderr: one rewritten line at a terminal, else every tenth step.
    (Audio-to-audio starts part-way down the schedule, so fewer than `total` steps may come.)"""

    def __init__(self, total: int):
        self.total, self.count, self.tty = total, 0, sys.stderr.isatty()

    def __call__(self, info: dict) -> None:
        self.count += 1
        if self.tty:
            print(f"\rsampling: step {self.count}/{self.total}", end="", file=sys.stderr, flush=True)
        elif self.count % 10 == 0:
            print(f"sampling: step {self.count}/{self.total}", file=sys.stderr, flush=True)

    def finish(self) -> None:
        if self.tty and self.count:
            print(file=sys.stderr)


def _source_audio(path: str | None, option: str):
    if path is None:
        return None
    from .encoding.audio_io import AudioFileError, decode_audio

    try:
        decoded = decode_audio(path)
    except AudioFileError as e:
        raise ValueError(f"{option} {path}: {e}") from None
    return decoded.samples, decoded.sample_rate


def check_numbers(args) -> None:
    """ValueError naming the option whose number is out of range (before any model loads)."""
    from .encoding.loudness import target_problem

    if args.batch < 1:
        raise ValueError(f"--batch {args.batch}: must be 1 or more")
    if args.duration is not None and not args.duration > 0:
        raise ValueError(f"--duration {args.duration}: must be more than 0 seconds")
    if args.steps < 0 or args.lora_skip_first_steps < 0:
        raise ValueError("--steps and --lora-skip-first-steps must be 0 or more")
    if args.cfg is not None and not args.cfg >= 0:
        raise ValueError(f"--cfg {args.cfg}: must be 0 or more")
    if not 0 < args.init_noise_level <= 1:
        raise ValueError(f"--init-noise-level {args.init_noise_level}: must be in (0, 1] (1 ignores the init audio)")
    if args.loudness is not None and target_problem(args.loudness):
        raise ValueError(f"--loudness {args.loudness}: {target_problem(args.loudness)}")
    lo, hi = args.lora_interval
    if not 0 <= lo <= hi <= 1:
        raise ValueError(f"--lora-interval {lo:g} {hi:g}: give LO HI with 0 <= LO <= HI <= 1 (noise levels, 1 = pure "
                         "noise)")


def run_generate(args) -> int:
    from .adapters import notices
    from .encoding.audio_write import write_audio
    from .encoding.loudness import normalize_loudness
    from .sa3.atomic import writable_folder_problem
    from .sa3.generate import (
        check_regions_inside,
        continuation_region,
        generate,
        max_output_seconds,
        output_seconds,
        parse_regions,
        resolve_seed,
        sampling_defaults,
    )
    from .sa3.model import load_model
    from .training.trainer import usable_device

    if (args.regions or args.continuation or args.paste_back) and not args.inpaint:
        raise ValueError("--regions, --continue and --paste-back need --inpaint FILE (the audio to repair or extend)")
    if args.inpaint and not (args.regions or args.continuation):
        raise ValueError("--inpaint needs --regions '4.0-8.0, 16-20' (seconds to regenerate) or --continue")
    if args.init_audio and args.inpaint:
        raise ValueError("give --init-audio (audio-to-audio) or --inpaint, not both")
    if args.regions and args.continuation:
        raise ValueError("give --regions (repair parts) or --continue (extend the end), not both")
    check_numbers(args)
    if args.variant and Path(args.source).exists():
        raise ValueError(f"--variant {args.variant} picks a pack's variant; {args.source} is a model folder or file "
                         "itself (point at the variant's own folder, e.g. <pack>/arc)")
    loras = [{**parse_lora(spec), "skip_first_steps": args.lora_skip_first_steps,
              "interval": tuple(args.lora_interval)} for spec in args.lora]
    for spec, lora in zip(args.lora, loras):
        if Path(lora["path"]).is_dir():  # a run folder, or its checkpoints folder: name the newest file in it
            files = sorted(Path(lora["path"]).glob("*.safetensors")) or sorted(
                Path(lora["path"]).glob("checkpoints/*.safetensors"))
            newest = max(files, key=lambda f: f.stat().st_mtime) if files else None
            raise ValueError(f"--lora {lora['path']} is a folder; give a LoRA file"
                             + (f", e.g. its newest: {newest}" if newest else " (it holds no .safetensors)"))
        if not Path(lora["path"]).is_file():
            _, at, strength = spec.rpartition("@")
            if at and Path(spec.rpartition("@")[0]).is_file():
                raise ValueError(f"--lora {spec}: the strength after '@' must be a number, e.g. "
                                 f"{spec.rpartition('@')[0]}@0.8")
            raise ValueError(f"--lora {lora['path']}: no such file")
    try:
        regions = parse_regions(args.regions or "")
    except ValueError as e:
        raise ValueError(f"--regions: {e}") from None
    prompts = read_prompts(args.prompt, args.prompts_file)
    paths = output_paths(args.out, args.batch, len(prompts))
    for folder in dict.fromkeys(path.parent for group in paths for path in group):  # before the model and sampling
        problem = writable_folder_problem(folder)
        if problem:
            raise ValueError(f"--out {args.out}: {problem}")
    init = _source_audio(args.init_audio, "--init-audio")
    inpaint = _source_audio(args.inpaint, "--inpaint")
    source = init if init is not None else inpaint
    if args.continuation:
        try:
            output_seconds(args.duration, source, continuation=True)  # the length to extend to must be given
        except ValueError as e:
            raise ValueError(f"--continue: {e} (--duration)") from None
        regions = [continuation_region(inpaint, args.duration)]
    seed = resolve_seed(args.seed)

    model = load_model(args.source, dtype=args.dtype, device=usable_device(args.device), variant=args.variant,
                       text_encoder=args.text_encoder, models_dir=args.models_dir)
    duration = output_seconds(args.duration, source, max_seconds=max_output_seconds(model))
    if args.duration is None and source is not None:
        print(f"sa3-lora generate: no --duration: the source's length, {duration:.3f} s", file=sys.stderr)
    if regions and not args.continuation:
        try:
            check_regions_inside(regions, duration, from_source=args.duration is None)
        except ValueError as e:
            raise ValueError(f"--regions: {e} (--duration)") from None
    args.duration = duration
    sampler, steps, cfg = sampling_defaults(model)
    common = {"model": model.source, "negative_prompt": args.negative_prompt, "duration": args.duration, "seed": seed,
              "steps": args.steps or steps, "cfg": cfg if args.cfg is None else args.cfg,
              "sampler": args.sampler or sampler, "loras": loras}
    if init is not None:
        common |= {"init_audio": args.init_audio, "init_noise_level": args.init_noise_level}
    if inpaint is not None:
        common |= {"inpaint": args.inpaint, "regions": regions, "paste_back": args.paste_back}
    for p, (prompt, prompt_paths) in enumerate(zip(prompts, paths)):
        progress = StepPrinter(common["steps"])
        with model.residency.in_use(), notices.collected() as found:
            audio, rate = generate(model, prompt, negative_prompt=args.negative_prompt or None,
                                   duration=args.duration, seed=seed, steps=common["steps"], cfg_scale=common["cfg"],
                                   sampler=common["sampler"], batch_size=args.batch, init_audio=init,
                                   init_noise_level=args.init_noise_level, inpaint_audio=inpaint,
                                   inpaint_regions=regions or None, paste_back=args.paste_back, loras=loras or None,
                                   adapter_memory=args.lora_memory, callback=progress)
        progress.finish()
        for message in dict.fromkeys(found):  # e.g. a duration capped at the model's maximum: one plain line each
            print(f"sa3-lora generate: warning: {message}", file=sys.stderr)
        for i, path in enumerate(prompt_paths):
            path.parent.mkdir(parents=True, exist_ok=True)
            samples, level = audio[i].numpy(), {}
            if args.loudness is not None:  # takes compared by sound, not level (the demos' rule)
                samples, level = normalize_loudness(samples, rate, args.loudness)
            written = write_audio(path, samples, rate, path.suffix.lower()[1:])
            print(json.dumps({"file": str(written), "seconds": round(audio.shape[-1] / rate, 3), "batch_index": i,
                              **({"prompt_index": p} if len(prompts) > 1 else {}), "prompt": prompt, **common,
                              **level}), flush=True)
    return 0


def add_generate_parser(sub) -> None:
    from .cli import add_model_args

    p = sub.add_parser("generate", help="text-to-audio, audio-to-audio or inpainting, with LoRAs",
                       description=__doc__.split("\n\n")[0].removeprefix("`sa3-lora generate`: ").capitalize())
    add_model_args(p, device="auto")
    p.add_argument("--prompt", default=None, help="what to generate (an empty string: unconditional)")
    p.add_argument("--prompts-file", default=None, metavar="FILE",
                   help="instead of --prompt: one prompt per line, each rendered with the same seed and settings "
                        "(<out>_p0, <out>_p1, ...), e.g. to compare checkpoints on a fixed set")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--duration", type=float, default=None,
                   help="seconds (at most the model's maximum); default: the source's length with --init-audio or "
                        "--inpaint --regions, 10 without a source; --continue needs it (the extended length)")
    p.add_argument("--seed", type=int, default=-1, help="-1 = random (the JSON line names the seed used)")
    p.add_argument("--steps", type=int, default=0, help="0 = the model's default (ARC 8, base 50)")
    p.add_argument("--cfg", type=float, default=None, help="default: the model's (ARC 1, base 7)")
    p.add_argument("--sampler", default=None, help="euler, pingpong, dpmpp, rk4 (default: the model's)")
    p.add_argument("--batch", type=int, default=1, help="takes at once (one seed, different noise per take)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[@STRENGTH]",
                   help="an adapter file, strength 1 unless given; repeat to stack them in order")
    p.add_argument("--lora-skip-first-steps", type=int, default=0, metavar="N",
                   help="LoRAs off in the DiT for the first N sampling steps (e.g. 1 on an 8-step ARC model); "
                        "their seconds-conditioner layers act at every step, as in the official tools")
    p.add_argument("--lora-interval", type=float, nargs=2, default=(0.0, 1.0), metavar=("LO", "HI"),
                   help="noise levels where the LoRAs act in the DiT (1 = pure noise); HI < 1 keeps the base song "
                        "structure (seconds-conditioner layers act throughout)")
    p.add_argument("--lora-memory", default="fast", choices=["fast", "low"],
                   help="fast: adapted weights formed once; low: no weight copy, a little slower (tight VRAM)")
    p.add_argument("--init-audio", default=None, metavar="FILE", help="audio-to-audio: start from this audio")
    p.add_argument("--init-noise-level", type=float, default=0.8,
                   help="with --init-audio: how much of it is noised away (1 = ignore it)")
    p.add_argument("--inpaint", default=None, metavar="FILE", help="inpainting: the audio to repair or continue")
    p.add_argument("--regions", default=None, metavar="'4.0-8.0, 16-20'",
                   help="with --inpaint: seconds (or m:ss) to regenerate, the SA3 Inpaint node's syntax")
    p.add_argument("--continue", dest="continuation", action="store_true",
                   help="with --inpaint: extend the audio from its end up to --duration seconds")
    p.add_argument("--paste-back", action="store_true", help="with --inpaint: put the source's own audio back outside "
                   "the regions after sampling (20 ms crossfades just inside their edges)")
    p.add_argument("--loudness", type=float, default=None, metavar="LUFS",
                   help="bring each take to this loudness (EBU R128, e.g. -18; true peak at most -1 dBTP, gain at most "
                        "+20 dB), so takes "
                        "of different checkpoints compare by sound, not level; the JSON line keeps the level as "
                        "generated (loudness_lufs) and the gain")
    p.add_argument("--out", default="sa3-take.flac", help="output file; its extension picks the format "
                   "(.wav .flac .mp3 .opus); a batch writes <name>_<i>")
    p.set_defaults(func=run_generate)


__all__ = ["add_generate_parser", "check_numbers", "output_paths", "parse_lora", "read_prompts", "run_generate"]
