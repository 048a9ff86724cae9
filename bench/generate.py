"""Generation figures: real-time factor on the tiny built-in model, and peak memory of decoding a long output with and
without chunking on a real-size SAME-S (random weights), each in its own process; the kernel's peak RSS is reset
(/proc/self/clear_refs) right before the measured call.

    python bench/generate.py [--seconds 10] [--decode-seconds 120] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def child(args) -> None:
    import torch
    from sa3_lora_studio import load_model

    torch.set_num_threads(args.threads)
    if args.what == "rtf":
        model = load_model(args.model)
        model.generate("warm pad", duration=0.5, steps=2, seed=0)  # warm-up
        start = time.perf_counter()
        audio, rate = model.generate("warm pad", duration=args.seconds, seed=0)
        elapsed = time.perf_counter() - start
        print(json.dumps({"seconds_audio": audio.shape[-1] / rate, "elapsed": elapsed, "steps": model.default_steps}))
        return
    from sa3_lora_studio.sa3.autoencoder import SAMEAutoencoder
    from sa3_lora_studio.sa3.config import family_defaults, read_config

    cfg = read_config(family_defaults("small-music"))
    ae = SAMEAutoencoder.from_config(cfg.pretransform).eval()
    n = round(args.decode_seconds * cfg.latent_rate)
    n += (-n) % cfg.latent_alignment
    z = torch.randn(1, cfg.latent_dim, n, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        reset_peak()
        base = vm_hwm_mb()
        start = time.perf_counter()
        audio = ae.decode(z, chunked=args.what == "chunked")  # the real configs chunk by default
        elapsed = time.perf_counter() - start
        peak = vm_hwm_mb()
    print(json.dumps({"latents": n, "seconds": audio.shape[-1] / cfg.sample_rate, "elapsed": elapsed,
                      "peak_mb": peak, "before_mb": base}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--decode-seconds", type=float, default=120.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", choices=["rtf", "chunked", "unchunked"])
    p.add_argument("--model")
    args = p.parse_args()
    if args.child:
        args.what = args.child
        child(args)
        return
    import torch
    from sa3_lora_studio.sa3.tiny import write_tiny_pack

    folder = Path(tempfile.mkdtemp(prefix="sa3-bench-"))
    base, arc = write_tiny_pack(folder)
    results = {}
    for what, model in (("rtf", arc), ("chunked", base), ("unchunked", base)):
        out = subprocess.run([sys.executable, __file__, "--child", what, "--model", str(model), "--seconds",
                              str(args.seconds), "--decode-seconds", str(args.decode_seconds), "--threads",
                              str(args.threads)], capture_output=True, text=True, check=True)
        results[what] = json.loads(out.stdout.strip().splitlines()[-1])
    r = results["rtf"]
    print(f"torch {torch.__version__} threads={args.threads} tiny ARC model ({r['steps']} ping-pong steps): "
          f"{r['seconds_audio']:.1f} s of audio in {r['elapsed']:.2f} s = real-time factor "
          f"{r['seconds_audio'] / r['elapsed']:.1f}x")
    c, u = results["chunked"], results["unchunked"]
    print(f"decode {c['seconds']:.0f} s ({c['latents']} latents, real-size SAME-S, random weights): "
          f"peak RSS chunked {c['peak_mb']:.0f} MB "
          f"(+{c['peak_mb'] - c['before_mb']:.0f} MB, {c['elapsed']:.1f} s) vs unchunked {u['peak_mb']:.0f} MB "
          f"(+{u['peak_mb'] - u['before_mb']:.0f} MB, {u['elapsed']:.1f} s): chunked/unchunked growth = "
          f"{(c['peak_mb'] - c['before_mb']) / max(1e-9, u['peak_mb'] - u['before_mb']):.2f}")


if __name__ == "__main__":
    main()
