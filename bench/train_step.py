"""Training-step cost per adapter type, with and without gradient checkpointing, against our no-grad DiT forward.

    python bench/train_step.py                                   # tiny fixture + small-music, all 8 types, gc off/on
    python bench/train_step.py --models small-music --adapters dora-rows --gc off --repeats 3
    python bench/train_step.py --models small-music --adapters bora --gc off --norm-grad exact detached

Per model (random weights, the config's DiT; fp32, batch 1, 10 s crop, rank 16 on every DiT Linear/Conv1d) and per
(adapter type, checkpointing): the no-grad forward of the base DiT and the training step as `Trainer.train_step` does
it (adapter view, forward, flow loss, backward, clip, AdamW, update; see `training.vram.make_training_step`), timed
alternately --repeats times. The ratio step / forward (target <= 2.6x without checkpointing, which recomputes the
forward by design) is taken on the best (least disturbed) time of each: on a shared VM the same step varies by
+-15 % from minute to minute, which the minimum filters and a median of a few does not; the median ratio is printed
beside it. Also steps/s and the peak RSS during that configuration (VmHWM reset through /proc/self/clear_refs;
target with checkpointing: at most the official trainer's peak, 3.85 GB for the small-music config, measured on the
official code). Side by side with the official step itself: bench/train_step_vs_reference.py. --norm-grad detached times the
`RunConfig.detach_norm` option (DoRA/BoRA norms without gradient; lora types compute the same either way).
The tiny fixture's latent rate is an artefact of its toy autoencoder, so it gets the latent count of a 10 s crop of
the real models.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
from sa3_lora_studio.adapters import ADAPTER_TYPES
from sa3_lora_studio.adapters.maths import check_adapter_type
from sa3_lora_studio.sa3.config import family_defaults, read_config
from sa3_lora_studio.training.cpu_heap import trim_heap
from sa3_lora_studio.training.vram import build_random_dit_tree, make_floor_step, make_training_step

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "sa3" / "tiny-small"
REAL_LATENT_RATE = 44100 / 4096
OFFICIAL_SMALL_PEAK_GB = 3.85  # the official trainer's step, small config, dora-rows r16, 10 s, fp32 (issue #6)


def _config(spec: str):
    path = Path(spec)
    if path.is_dir():
        return read_config(path / "model_config.json")
    return read_config(path if path.exists() else family_defaults(spec))


def _rss_gb(field: str) -> float:
    for line in open("/proc/self/status", encoding="ascii"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_model(spec: str, label: str, args) -> None:
    config = _config(spec)
    rate = config.latent_rate if config.latent_rate < 100 else REAL_LATENT_RATE  # see the module docstring
    n = max(1, round(args.seconds * rate))
    n += (-n) % config.latent_alignment
    t0 = time.perf_counter()
    tree = build_random_dit_tree(config)
    params = sum(p.numel() for p in tree.parameters()) / 1e6
    build = time.perf_counter() - t0
    d = config.dit
    real_size = params >= 100  # M parameters; the targets are stated for the small-music config
    prompt = "distinct context tokens" if args.prompt_tokens is None else f"{args.prompt_tokens}-token prompt"
    print(f"{label}: embed_dim={d['embed_dim']} depth={d['depth']} params={params:.1f}M latents={n} {prompt} "
          f"(+{d.get('num_memory_tokens', 0)} memory) batch={args.batch} rank={args.rank} fp32  "
          f"built in {build:.1f} s, rss {_rss_gb('VmRSS'):.2f} GB", flush=True)
    configurations = [(t, gc, norm_grad) for t in args.adapters for gc in args.gc for norm_grad in args.norm_grad
                      if norm_grad == "exact" or check_adapter_type(t)[1] != "none"]  # detaching needs a norm
    for adapter_type, gc, norm_grad in configurations:
        detached = norm_grad == "detached"
        step, fwd = make_training_step(tree, config, adapter_type, args.rank, args.batch, n, gc == "on",
                                       detach_norm=detached, prompt_tokens=args.prompt_tokens)
        floor = make_floor_step(tree, config, args.batch, n, prompt_tokens=args.prompt_tokens)
        trim_heap()  # the previous configuration's kept heap (training/cpu_heap.py) must not count as this peak
        _reset_peak()
        fwd()
        step()  # warm-up (creates the AdamW state)
        fwd_times, step_times, floor_times = [], [], []
        for _ in range(args.repeats):  # interleaved: a busy machine slows all alike
            fwd_times.append(_seconds(fwd))
            step_times.append(_seconds(step))
            if args.floor:
                floor_times.append(_seconds(floor))
        forward, sec = min(fwd_times), min(step_times)
        ratio = sec / forward
        floor_text = f"  floor {min(floor_times) / forward:4.2f}x" if floor_times else ""
        median_ratio = statistics.median(step_times) / statistics.median(fwd_times)
        peak = _rss_gb("VmHWM")
        verdict = (("ok " if peak <= OFFICIAL_SMALL_PEAK_GB else "MISS") + " (peak)") if gc == "on" else \
            ("ok " if ratio <= 2.6 else "MISS") + " (time)"
        if not real_size:  # per-call overhead dominates a toy model's tiny products: the targets do not apply
            verdict = "   (toy)"
        name = adapter_type + (" detached" if detached else "")
        print(f"  {name:22s} gc={gc:3s}  forward {forward:7.3f} s  step {sec:7.3f} s  {ratio:5.2f}x fwd "
              f"{verdict}  (median {median_ratio:4.2f}x){floor_text}  {1 / sec:7.3f} steps/s  "
              f"peak_rss {peak:.2f} GB", flush=True)
        del step, fwd
    tree.model.model.gradient_checkpointing = False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=[str(FIXTURE), "small-music"],
                    help="model folders, config JSONs or families")
    ap.add_argument("--adapters", nargs="+", default=list(ADAPTER_TYPES), choices=list(ADAPTER_TYPES))
    ap.add_argument("--gc", nargs="+", default=["off", "on"], choices=["off", "on"])
    ap.add_argument("--norm-grad", nargs="+", default=["exact"], choices=["exact", "detached"],
                    help="DoRA/BoRA norm gradients: exact (official) and/or detached (RunConfig.detach_norm)")
    ap.add_argument("--prompt-tokens", type=int, default=None,
                    help="a prompt of this many tokens, padded (the DiT attends the padding run once); "
                         "default: every context token distinct, the most cross-attention work")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--floor", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the floor: the frozen DiT's forward + input-gradient backward, no adapter "
                         "(`training.vram.make_floor_step`); a step cannot cost less")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__} threads={torch.get_num_threads()} load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} (cpus {os.cpu_count()})", flush=True)
    for spec in args.models:
        bench_model(spec, Path(spec).name, args)


if __name__ == "__main__":
    main()
