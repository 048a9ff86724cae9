"""Dataset encoding speed: decode+resample (x real time per core) for FLAC and MP3, and encode throughput (audio
seconds per second) with peak memory for one long file, through `encode_folder`.

$ python bench/encode.py --seconds 300 --model ../shared/fixtures/sa3/tiny-small --threads 1
prints one line per measurement. Without --model a stand-in encoder (average-pool + projection) is used, which
measures the pipeline (decode, resample, hashing, writing) rather than the autoencoder. The source files are
synthesised at 48 kHz so the resampler does real work. Then, each in a fresh process (--memory FMT@RATE ...), the
peak memory of one file's encode in copies of its 44.1 kHz stereo float32 samples, against `DECODE_COPIES`, the
figure the skip rule for files too long for the free memory counts.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
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


def _synth(seconds: float, rate: int) -> np.ndarray:
    """[2, N] float32: two tones with a little noise (the resampler and the codecs do real work)."""
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(0)
    return np.stack([0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(t.size),
                     0.3 * np.sin(2 * np.pi * 330 * t) + 0.05 * rng.standard_normal(t.size)]).astype(np.float32)


def memory_copies(fmt: str, rate: int, seconds: float, model: str | None) -> None:
    """In a fresh process (`--memory-only`): one file of `fmt` at `rate` through encode_folder, and the peak RSS
    above the start in copies of its 44.1 kHz stereo float32 samples (the unit of `DECODE_COPIES`)."""
    from sa3_lora_studio.encoding.audio_io import DECODE_COPIES
    from sa3_lora_studio.encoding.encode import encode_folder, load_encoder
    from sa3_lora_studio.encoding.toy import ToyEncoder, write_audio_file
    from sa3_lora_studio.training.cpu_heap import trim_heap

    encoder = load_encoder(model) if model else ToyEncoder(latent_dim=256, downsampling_ratio=4096)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        write_audio_file(src / "long", _synth(seconds, rate), rate, fmt)
        trim_heap()
        base = reset_peak_rss_mb()
        report = encode_folder(src, Path(tmp) / "out", encoder, force=True)
        assert len(report.encoded) == 1, report.summary()
        copies = (peak_rss_mb() - base) / (seconds * 44100 * 2 * 4 / 2**20)
    verdict = "ok" if copies <= DECODE_COPIES else "MORE than"
    print(f"memory: {seconds:.0f} s of {fmt} at {rate} Hz, encoder={model or 'stand-in'}: the encode peaked at "
          f"{copies:.2f} copies of its 44.1 kHz stereo float32 samples ({verdict} DECODE_COPIES={DECODE_COPIES})",
          flush=True)


def main() -> None:
    from sa3_lora_studio.encoding.audio_io import DECODE_COPIES, load_audio
    from sa3_lora_studio.encoding.encode import encode_folder, encode_waveform, load_encoder
    from sa3_lora_studio.encoding.toy import ToyEncoder, write_audio_file
    from sa3_lora_studio.training.cpu_heap import trim_heap

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=120.0, help="length of the long test file")
    ap.add_argument("--model", default=None, help="model folder / pack for the real SAME encoder")
    ap.add_argument("--chunk-latents", type=int, default=None,
                    help="outer chunk size in latents (default: whole file; the SA3 model chunks internally)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--memory", nargs="*", default=["flac@48000", "flac@44100", "m4a@48000", "mp3@48000"],
                    metavar="FMT@RATE", help="files whose encode memory is measured, each in its own process")
    ap.add_argument("--memory-only", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)  # a benchmark script owns its process
    if args.memory_only:
        fmt, rate = args.memory_only.split("@")
        return memory_copies(fmt, int(rate), args.seconds, args.model)
    rate = 48000
    audio = _synth(args.seconds, rate)
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
    for spec in args.memory:  # a fresh process each: a heap freed by the previous file would hide this one's peak
        subprocess.run([sys.executable, __file__, "--memory-only", spec, "--seconds", str(args.seconds),
                        "--threads", str(args.threads)] + (["--model", args.model] if args.model else []), check=True)


if __name__ == "__main__":
    main()
