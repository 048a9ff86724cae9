"""Time our SAME encode/decode against the official implementation on the same machine, random weights, fp32 CPU.

    python bench/autoencoder_vs_reference.py --seconds 30 --threads 2
    python bench/autoencoder_vs_reference.py --config /path/to/sa3-medium.json --seconds 10 --no-reference

The official code is imported from a read-only checkout (`--reference`, default /work/ref) with `torchaudio` and
`wandb` replaced by empty stand-ins in sys.modules (neither is used by SAME inference); nothing of it is copied here.
Both models get the same random weights, and their outputs are compared before timing.
"""

import argparse
import json
import math
import os
import resource
import statistics
import sys
import time
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO.parent / "shared" / "fixtures" / "sa3-real-configs" / "sa3-sm-music.json"


def import_reference(root: Path):
    """The official factory, importable without torchaudio/wandb and without the package's heavy __init__."""
    torchaudio = types.ModuleType("torchaudio")
    torchaudio.transforms = types.ModuleType("torchaudio.transforms")
    torchaudio.transforms.Resample = torchaudio.transforms.Loudness = object
    sys.modules.setdefault("torchaudio", torchaudio)
    sys.modules.setdefault("torchaudio.transforms", torchaudio.transforms)
    sys.modules.setdefault("wandb", types.ModuleType("wandb"))
    package = types.ModuleType("stable_audio_3")  # skip stable_audio_3/__init__.py (transformers, hub, ...)
    package.__path__ = [str(root / "stable_audio_3")]
    sys.modules.setdefault("stable_audio_3", package)
    from stable_audio_3.models.autoencoders import AudioAutoencoder, SAMEDecoder, SAMEEncoder
    from stable_audio_3.models.bottleneck import SoftNormBottleneck
    from stable_audio_3.models.pretransforms import PatchedPretransform

    def build(config: dict, sample_rate: int):
        cfg = config["model"]["pretransform"]["config"]
        return AudioAutoencoder(
            SAMEEncoder(**cfg["encoder"]["config"]), SAMEDecoder(**cfg["decoder"]["config"]),
            latent_dim=cfg["latent_dim"], downsampling_ratio=cfg["downsampling_ratio"], sample_rate=sample_rate,
            io_channels=cfg["io_channels"], bottleneck=SoftNormBottleneck(**cfg["bottleneck"]["config"]),
            pretransform=PatchedPretransform(**cfg["pretransform"]["config"]),
            soft_clip=cfg["decoder"].get("soft_clip", False))

    return build


def randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Non-degenerate random weights (the official init zeroes every output layer)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.numel() == 0:
                continue
            if name.endswith(("alpha", "running_std")):
                p.fill_(4.0 if name.endswith("alpha") else 1.0)
            elif name.endswith(("gamma", "scaling_factor")):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1 or name.endswith("bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
            elif name.endswith("weight_g"):
                continue  # set from weight_v below
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
        for name, p in module.named_parameters():
            if name.endswith("weight_g"):
                v = dict(module.named_parameters())[name[:-1] + "v"]
                p.copy_(0.5 * v.norm(dim=(1, 2), keepdim=True))


def test_signal(seconds: float, sample_rate: int, ratio: int) -> torch.Tensor:
    n = math.ceil(seconds * sample_rate / ratio) * ratio
    t = torch.arange(n) / sample_rate
    g = torch.Generator().manual_seed(0)
    left = 0.3 * torch.sin(2 * math.pi * 220 * t) + 0.05 * torch.randn(n, generator=g)
    right = 0.3 * torch.sin(2 * math.pi * 330 * t) + 0.05 * torch.randn(n, generator=g)
    return torch.stack([left, right])[None]


def timed(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds). CPU time is the steadier figure on a shared, loaded machine."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def summary(times: list[tuple[float, float]]) -> str:
    wall, cpu = [t[0] for t in times], [t[1] for t in times]
    return f"{statistics.median(wall):6.2f} s (min {min(wall):.2f}, cpu {statistics.median(cpu):.2f})"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="a full SA3 model_config.json")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3, help="timed runs each, after one warm-up (median, min shown)")
    parser.add_argument("--chunked", action="store_true", help="also time chunked encode/decode (128/32 latents)")
    parser.add_argument("--reference", type=Path, default=Path("/work/ref"))
    parser.add_argument("--no-reference", action="store_true")
    args = parser.parse_args()

    from sa3_lora_studio.sa3.autoencoder import SAMEAutoencoder  # pip install -e . (the repo root is the package)

    torch.set_num_threads(args.threads)
    config = json.loads(args.config.read_text())
    sample_rate = config.get("sample_rate", 44100)
    ours = SAMEAutoencoder.from_config(config["model"]["pretransform"], sample_rate).eval().requires_grad_(False)
    randomise(ours)
    audio = test_signal(args.seconds, sample_rate, ours.downsampling_ratio)

    ref = None
    if not args.no_reference:
        build = import_reference(args.reference)
        ref = build(config, sample_rate).eval().requires_grad_(False)
        ref.load_state_dict(ours.state_dict(), strict=True)
        with torch.inference_mode():  # parity on 4 s first (same weights, same global-RNG noise draws)
            clip = audio[..., : ours.downsampling_ratio * 44]
            z_ours, z_ref = ours.encode(clip, chunked=False), ref.encode(clip)
            torch.manual_seed(0)
            a_ours = ours.decode(z_ours, chunked=False)
            torch.manual_seed(0)
            a_ref = ref.decode(z_ours)
        print(f"parity on 44 latents: latents max|diff| {(z_ours - z_ref).abs().max():.2e}  "
              f"audio max|diff| {(a_ours - a_ref).abs().max():.2e}")

    runs = {"encode": (lambda: ours.encode(audio, chunked=False), lambda: ref.encode(audio))}
    with torch.inference_mode():
        latents = ours.encode(audio, chunked=False)
    runs["decode"] = (lambda: ours.decode(latents, chunked=False), lambda: ref.decode(latents))
    if args.chunked:
        runs["encode chunked"] = (lambda: ours.encode_chunked(audio), lambda: ref.encode_audio(audio, chunked=True))
        runs["decode chunked"] = (lambda: ours.decode_chunked(latents), lambda: ref.decode_audio(latents, chunked=True))

    width = sum(p.numel() for p in ours.parameters()) / 1e6
    print(f"torch {torch.__version__} threads={args.threads} {args.config.name} SAME {width:.1f} M params, "
          f"{args.seconds:g} s audio = {latents.shape[-1]} latents, fp32, inference_mode")
    with torch.inference_mode():
        for what, (ours_fn, ref_fn) in runs.items():
            ours_fn()  # warm-up
            if ref is not None:
                ref_fn()
            ours_times, ref_times = [], []
            for _ in range(args.reps):  # interleaved, so load changes hit both alike
                ours_times.append(timed(ours_fn))
                if ref is not None:
                    ref_times.append(timed(ref_fn))
            line = f"{what:15s} ours {summary(ours_times)}"
            if ref is not None:
                ratio = statistics.median(t[0] for t in ours_times) / statistics.median(t[0] for t in ref_times)
                cpu_ratio = statistics.median(t[1] for t in ours_times) / statistics.median(t[1] for t in ref_times)
                line += f"   official {summary(ref_times)}   ours/official wall {ratio:.2f} cpu {cpu_ratio:.2f}"
            print(line, flush=True)
    load = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"
    print(f"peak_rss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB (whole process, both models), "
          f"load average {load} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
