"""`sa3-lora bench engine`: DiT forward time and peak memory for a config, length and dtype (random weights)."""

from __future__ import annotations

import resource
import statistics
import time
from pathlib import Path

import torch

from .config import family_defaults, read_config


def peak_rss_gb() -> float:
    """Peak resident set size of this process so far, in GB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def random_dit(config, dtype: torch.dtype, device: str, seed: int = 0):
    """The config's DiT with random weights (outputs zero-initialised officially are randomised too)."""
    from .dit import DiTWrapper
    from .model import loaded_dtype

    torch.manual_seed(seed)
    wrapper = DiTWrapper(**config.dit)
    with torch.no_grad():
        for p in wrapper.parameters():
            if p.dim() >= 2:
                p.normal_(0, p.shape[1] ** -0.5)
    dit = wrapper.model.to(device=device)
    for name, p in list(dit.named_parameters()) + list(dit.named_buffers()):
        if p.is_floating_point():  # in the dtypes load_model gives each tensor (RoPE frequencies stay fp32)
            p.data = p.data.to(loaded_dtype(f"model.model.{name}", dtype))
    return dit.eval().requires_grad_(False)


def synchronize(device) -> None:
    """Wait for the device's queued work: GPU kernels run asynchronously, so a timer must not stop before them."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def load_bench_config(spec: str):
    path = Path(spec)
    if path.exists():
        return read_config(path)
    return read_config(family_defaults(spec))


def run_bench(args) -> int:
    for name in ("seconds", "batch", "repeats"):
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name} must be > 0, not {getattr(args, name)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_bench_config(args.config)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    dit = random_dit(config, dtype, args.device)
    n = max(1, round(args.seconds * config.latent_rate))
    n += (-n) % config.latent_alignment
    b, c = args.batch, config.latent_dim
    d = config.dit
    x = torch.randn(b, c, n, device=args.device, dtype=dtype)
    t = torch.full((b,), 0.5, device=args.device)
    cross = torch.randn(b, config.prompt_max_length + 1, d["cond_token_dim"], device=args.device, dtype=dtype)
    glob = torch.randn(b, d["global_cond_dim"], device=args.device, dtype=dtype)
    local = torch.zeros(b, d["local_add_cond_dim"], n, device=args.device, dtype=dtype)
    rss_before = peak_rss_gb()
    cuda = torch.device(args.device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(args.device)
    times = []
    with torch.inference_mode():
        dit(x, t, cross, glob, local)  # warm-up
        synchronize(args.device)
        for _ in range(args.repeats):
            start = time.perf_counter()
            dit(x, t, cross, glob, local)
            synchronize(args.device)
            times.append(time.perf_counter() - start)
    params = sum(p.numel() for p in dit.parameters()) / 1e6
    vram = f"  peak VRAM {torch.cuda.max_memory_allocated(args.device) / 2**30:.2f} GB" if cuda else ""
    print(f"torch {torch.__version__} threads={torch.get_num_threads()} config={args.config} params={params:.0f}M "
          f"dtype={args.dtype} batch={b} latents={n} ({args.seconds:g} s)  forward median {statistics.median(times):.3f} s "
          f"(min {min(times):.3f})  peak_rss {peak_rss_gb():.2f} GB (after model build {rss_before:.2f} GB){vram}")
    return 0
