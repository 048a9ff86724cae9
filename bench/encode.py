"""Dataset encoding speed: decode+resample (x real time per core) for FLAC and MP3, and encode throughput (audio
seconds per second) with peak memory for one long file, through `encode_folder`.

$ python bench/encode.py --seconds 300 --model ../shared/fixtures/sa3/tiny-small --threads 1
prints one line per measurement. Without --model a stand-in encoder (average-pool + projection) is used, which
measures the pipeline (decode, resample, hashing, writing) rather than the autoencoder. The source files are
synthesised at 48 kHz so the resampler does real work.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
try:
    import sa3_lora_studio  # noqa: F401
except ImportError:  # not installed: import the checkout as the package
    sys.path.insert(0, str(REPO.parent))


def peak_rss_mb() -> float:
    """VmHWM: the peak since the last `reset_peak_rss_mb` (ru_maxrss cannot be reset)."""
    for line in open("/proc/self/status", encoding="ascii"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def reset_peak_rss_mb() -> float:
    """Reset VmHWM to the current RSS (Linux clear_refs 5); returns that RSS in MB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return peak_rss_mb()


def main() -> None:
    from sa3_lora_studio.encoding.audio_io import DECODE_COPIES, load_audio
    from sa3_lora_studio.encoding.dataset import encode_folder, encode_waveform, load_encoder
    from sa3_lora_studio.encoding.toy import ToyEncoder, write_audio_file
    from sa3_lora_studio.training.cpu_heap import trim_heap

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=120.0, help="length of the long test file")
    ap.add_argument("--model", default=None, help="model folder / pack for the real SAME encoder")
    ap.add_argument("--chunk-latents", type=int, default=None,
                    help="outer chunk size in latents (default: whole file; the SA3 model chunks internally)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)  # a benchmark script owns its process
    rate = 48000
    t = np.arange(int(args.seconds * rate)) / rate
    rng = np.random.default_rng(0)
    audio = np.stack([0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(t.size),
                      0.3 * np.sin(2 * np.pi * 330 * t) + 0.05 * rng.standard_normal(t.size)]).astype(np.float32)
    ctx = f"torch {torch.__version__} threads={args.threads} file={args.seconds:.0f}s@{rate}Hz"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for fmt in ("flac", "mp3"):
            path = write_audio_file(src / f"long-{fmt}", audio, rate, fmt)
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                out, _ = load_audio(path)
                times.append(time.perf_counter() - t0)
            med = statistics.median(times)
            print(f"{ctx}  decode+resample {fmt:4s} -> 44.1k stereo  {med:.2f} s  {args.seconds / med:.0f}x real time")
        (src / "long-mp3.mp3").unlink()

        encoder = load_encoder(args.model) if args.model else ToyEncoder(latent_dim=256, downsampling_ratio=4096)
        name = args.model or "stand-in"
        enc_times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            encode_waveform(encoder, out, args.chunk_latents)
            enc_times.append(time.perf_counter() - t0)
        model_only = statistics.median(enc_times)
        rss_before = peak_rss_mb()
        del out
        trim_heap()
        base = reset_peak_rss_mb()  # from here the peak is this encode_folder's
        t0 = time.perf_counter()
        report = encode_folder(src, Path(tmp) / "out", encoder, force=True, chunk_latents=args.chunk_latents)
        total = time.perf_counter() - t0
        assert report.encoded == ["long-flac.flac"], report.summary()
        chunk = args.chunk_latents or "model"
        copies = (peak_rss_mb() - base) / (args.seconds * 44100 * 2 * 4 / 2**20)
        verdict = "ok" if copies <= DECODE_COPIES else "MORE than"
        print(f"{ctx}  encoder={name} ratio={encoder.downsampling_ratio} chunk={chunk}  model encode {model_only:.2f} s "
              f"({args.seconds / model_only:.1f} audio s/s)  encode_folder {total:.2f} s "
              f"({args.seconds / total:.1f} audio s/s, {total / model_only:.2f}x model)  "
              f"peak_rss {max(rss_before, peak_rss_mb()):.0f} MB; the file's encode peaked at {copies:.2f} copies of its "
              f"44.1 kHz stereo float32 samples ({verdict} DECODE_COPIES={DECODE_COPIES}, the skip rule's figure)")


if __name__ == "__main__":
    main()
