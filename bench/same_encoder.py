"""The SAME encoder at the real sizes, random weights: time and working memory for one 128-latent chunk on the CPU.

    python bench/same_encoder.py                       # every real pack config in ../shared/fixtures/sa3-real-configs
    python bench/same_encoder.py --configs path/to/model_config.json --threads 4

Per config: one chunk of the official chunked encode (128 latents, 128 x 4096 samples, 11.9 s of 44.1 kHz audio)
through `SAMEAutoencoder.encode_unchunked`, best of --repeats; its speed against real time, and against real time
once the chunks' overlap is counted (32 of every 128 latents are encoded twice); and the peak RSS above the loaded
encoder during the chunk (VmHWM reset before it), which `encoding.audio_io.ENCODE_RESERVE_BYTES` must cover.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from sa3_lora_studio.encoding.audio_io import ENCODE_RESERVE_BYTES
from sa3_lora_studio.sa3.autoencoder import SAMEAutoencoder

CONFIGS = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "sa3-real-configs"
CHUNK, OVERLAP = 128, 32  # latents: the official chunked encode


def _status_mb(field: str) -> float:
    for line in open("/proc/self/status", encoding="ascii"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def bench_config(path: Path, repeats: int) -> None:
    config = json.loads(path.read_text())
    ae = SAMEAutoencoder.from_config(config["model"]["pretransform"], config.get("sample_rate", 44100))
    ae = ae.eval().requires_grad_(False)
    ratio, rate = ae.downsampling_ratio, config.get("sample_rate", 44100)
    audio = 0.1 * torch.randn(1, ae.io_channels, CHUNK * ratio, generator=torch.Generator().manual_seed(0))
    seconds = audio.shape[-1] / rate
    times = []
    with torch.inference_mode():
        ae.encode_unchunked(audio[..., :16 * ratio])  # warm-up
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM from here: the chunk's working memory
        base = _status_mb("VmRSS")
        for _ in range(repeats):
            t0 = time.perf_counter()
            ae.encode_unchunked(audio)
            times.append(time.perf_counter() - t0)
    peak = _status_mb("VmHWM") - base
    best = min(times)
    params = sum(p.numel() for p in ae.parameters()) / 1e6
    overlap_speed = seconds * (CHUNK - OVERLAP) / CHUNK / best
    verdict = "within" if peak * 2**20 <= ENCODE_RESERVE_BYTES else "ABOVE"
    print(f"{path.stem}: SAME {params:.0f}M params, one {CHUNK}-latent chunk ({seconds:.1f} s of audio) {best:.2f} s = "
          f"{seconds / best:.1f}x real time ({overlap_speed:.1f}x with the chunks' overlap); working memory "
          f"+{peak:.0f} MB ({verdict} ENCODE_RESERVE_BYTES = {ENCODE_RESERVE_BYTES / 2**20:.0f} MB)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=None, help="model_config.json files (default: the real packs)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    paths = [Path(p) for p in args.configs] if args.configs else sorted(CONFIGS.glob("*.json"))
    if len(paths) > 1:  # one process per config: a freed heap reused by the next would hide its working memory
        print(f"torch {torch.__version__} threads={args.threads}", flush=True)
        for path in paths:
            subprocess.run([sys.executable, __file__, "--configs", str(path), "--threads", str(args.threads),
                            "--repeats", str(args.repeats), "--quiet"], check=True)
        return
    if not args.quiet:
        print(f"torch {torch.__version__} threads={torch.get_num_threads()}", flush=True)
    bench_config(paths[0], args.repeats)


if __name__ == "__main__":
    main()
