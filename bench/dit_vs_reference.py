"""DiT forward time: ours against the official implementation, same random weights, same inputs (CPU, fp32).

$ python bench/dit_vs_reference.py --config ../shared/fixtures/sa3-real-configs/sa3-sm-music.json --seconds 10
prints one line per implementation and the ratio, plus the max abs difference of the two outputs.
The reference is imported from a read-only checkout (--ref, default /work/ref) with `torchaudio`/`wandb` stand-ins;
nothing of it is copied here. Without the checkout only our time is printed.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def import_ours():
    try:
        from sa3_lora_studio.sa3.dit import DiTWrapper
    except ImportError:  # not installed: import the checkout as the package
        sys.path.insert(0, str(REPO.parent))
        import importlib
        DiTWrapper = importlib.import_module(f"{REPO.name}.sa3.dit").DiTWrapper
    return DiTWrapper


def import_reference(ref: Path):
    """The official DiTWrapper, or None. Its audio/logging dependencies are not needed for the DiT: stand-ins."""
    if not (ref / "stable_audio_3").is_dir():
        return None

    class Stub(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return type(name, (), {})

    for name in ("torchaudio", "torchaudio.transforms", "torchaudio.functional", "wandb"):
        sys.modules.setdefault(name, Stub(name))
    sys.path.insert(0, str(ref))
    from stable_audio_3.models.diffusion import DiTWrapper
    return DiTWrapper


def median_times(fns: list, repeats: int) -> list[float]:
    """Median wall time of each function; runs alternate, so a busy machine slows all of them alike."""
    for fn in fns:
        fn()  # warm-up
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            start = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - start)
    return [statistics.median(ts) for ts in times]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO.parent / "shared/fixtures/sa3-real-configs/sa3-sm-music.json"))
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--cfg-scale", type=float, default=1.0)
    parser.add_argument("--ref", default="/work/ref")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    raw = json.loads(Path(args.config).read_text())
    diffusion = raw["model"]["diffusion"]
    config = dict(diffusion["config"])
    objective = diffusion.get("diffusion_objective", "rectified_flow")

    torch.manual_seed(0)
    ours = import_ours()(diffusion_objective=objective, **config).eval()
    with torch.no_grad():  # the official init zeroes several outputs; random everywhere keeps the comparison honest
        for p in ours.parameters():
            p.normal_(0, p.shape[-1] ** -0.5 if p.dim() >= 2 else 0.1)
    reference_cls = import_reference(Path(args.ref))
    reference = None
    if reference_cls is not None:
        reference = reference_cls(diffusion_objective=objective, **config).eval()
        reference.load_state_dict(ours.state_dict(), strict=True)

    b, c = args.batch, config["io_channels"]
    n = math.ceil(args.seconds * 44100 / 4096)
    x = torch.randn(b, c, n)
    t = torch.full((b,), 0.6)
    cross = torch.randn(b, args.prompt_tokens + 1, config["cond_token_dim"])
    glob = torch.randn(b, config["global_cond_dim"])
    local = torch.zeros(b, config["local_add_cond_dim"], n)
    mask = torch.ones(b, n, dtype=torch.bool)
    kwargs = dict(cfg_scale=args.cfg_scale)

    def run_ours():
        return ours(x, t, cross, glob, local, padding_mask=mask, **kwargs)

    def run_reference():
        return reference(x, t, cross_attn_cond=cross, global_cond=glob, local_add_cond=local, padding_mask=mask,
                         **kwargs)

    with torch.inference_mode():
        fns = [run_ours] if reference is None else [run_ours, run_reference]
        times = median_times(fns, args.repeats)
        line = (f"torch {torch.__version__} threads={torch.get_num_threads()} config={Path(args.config).name} "
                f"batch={b} latents={n} ({args.seconds:g} s) cfg={args.cfg_scale:g}  ours {times[0]:.3f} s")
        if reference is not None:
            v_ours, v_ref = run_ours(), run_reference()
            err = ((v_ours - v_ref).abs().max() / v_ref.abs().max()).item()
            line += f"  reference {times[1]:.3f} s  ratio {times[0] / times[1]:.2f}x  max|diff|/max|v| {err:.1e}"
    print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
