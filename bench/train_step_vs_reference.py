"""Training step side by side: ours against the official trainer's LoRA path, per adapter type (CPU, fp32).

    python bench/train_step_vs_reference.py                          # small-music, 10 s, rank 16, all 8 types
    python bench/train_step_vs_reference.py --adapters dora-rows bora --repeats 3

Same config, same random DiT weights, same inputs, same machine. Official: its `LoRAParametrization` registered on
every Linear/Conv1d of the DiT with `add_lora` (as its `train_lora.py` does through the training wrapper), base
weights frozen, then velocity -> MSE -> backward -> clip 1.0 -> AdamW (1e-4, (0.9, 0.95), 0.01; torch's looped form,
as the official trainer makes it). Ours: the step of bench/train_step.py (`training.vram.make_training_step`: adapter
view, the same loss, backward, clip, AdamW in torch's fused form as the trainer makes it, update). Each figure is
the best of --repeats interleaved rounds (on a shared VM the same step varies by +-15 %). Prints per type both
steps, ours / official, and each one's step / its own no-grad forward.
The reference is imported from a read-only checkout (--ref, default /work/ref); nothing of it is copied here.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from dit_vs_reference import import_reference
from sa3_lora_studio.adapters import ADAPTER_TYPES
from sa3_lora_studio.sa3.config import family_defaults, read_config
from sa3_lora_studio.training.vram import build_random_dit_tree, make_training_step
from torch import nn

TRAINABLE = ("lora_A", "lora_B", "M_xs", "magnitude")


def reference_step(reference: nn.Module, adapter_type: str, rank: int, inputs: dict, generator: torch.Generator):
    """(step(), forward(), remove()) for the official DiT with its adapters registered on every Linear/Conv1d."""
    from functools import partial

    from stable_audio_3.models.lora import LoRAParametrization, add_lora

    config = {nn.Linear: {"weight": partial(LoRAParametrization.from_linear, rank=rank, lora_alpha=rank,
                                            adapter_type=adapter_type)},
              nn.Conv1d: {"weight": partial(LoRAParametrization.from_conv1d, rank=rank, lora_alpha=rank,
                                            adapter_type=adapter_type)}}
    add_lora(reference.model, config)
    params = []
    for name, p in reference.named_parameters():
        p.requires_grad_(any(key in name.rsplit(".", 1)[-1] for key in TRAINABLE))
        if p.requires_grad:
            params.append(p)
    with torch.no_grad():  # a trained-looking adapter (B / M_xs away from zero), as bench/train_step.py does for ours
        for p in params:
            p.add_(0.01 * torch.randn(p.shape, generator=generator))
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01)
    i = inputs

    def velocity():
        return reference(i["x"], i["t"], cross_attn_cond=i["cross"], global_cond=i["glob"], local_add_cond=i["local"])

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = F.mse_loss(velocity().float(), i["target"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        return float(loss.detach())

    def forward() -> None:
        with torch.inference_mode():
            velocity()

    def remove() -> None:  # the base weights back (the official remove_lora mutates a dict while iterating it)
        for module in reference.model.modules():
            for name in list(getattr(module, "parametrizations", {}).keys()):
                torch.nn.utils.parametrize.remove_parametrizations(module, name, leave_parametrized=False)

    return step, forward, remove


def _best(fn, results: list) -> None:
    t0 = time.perf_counter()
    fn()
    results.append(time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small-music", help="a family name or config JSON")
    ap.add_argument("--adapters", nargs="+", default=list(ADAPTER_TYPES), choices=list(ADAPTER_TYPES))
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ref", default="/work/ref")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    reference_cls = import_reference(Path(args.ref))
    if reference_cls is None:
        raise SystemExit(f"no official checkout at {args.ref} (stable_audio_3/ missing): nothing to compare against")
    config = read_config(args.model if Path(args.model).exists() else family_defaults(args.model))
    d = config.dit
    n = max(1, round(args.seconds * 44100 / 4096))
    n += (-n) % config.latent_alignment
    tree = build_random_dit_tree(config)
    reference = reference_cls(diffusion_objective="rectified_flow", **d).eval()
    reference.load_state_dict(tree.model.state_dict(), strict=True)
    g = torch.Generator().manual_seed(1)
    inputs = {"x": torch.randn(1, d["io_channels"], n, generator=g), "t": torch.rand(1, generator=g),
              "cross": torch.randn(1, int(config.prompt_max_length) + 1, d["cond_token_dim"], generator=g),
              "glob": torch.randn(1, d["global_cond_dim"], generator=g),
              "local": torch.randn(1, d["local_add_cond_dim"], n, generator=g)}
    inputs["target"] = torch.randn(inputs["x"].shape, generator=g)
    print(f"torch {torch.__version__} threads={torch.get_num_threads()} load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}; {args.model}: embed_dim={d['embed_dim']} "
          f"depth={d['depth']} latents={n} ({args.seconds:g} s) batch=1 rank={args.rank} fp32, gc off; "
          f"best of {args.repeats}", flush=True)
    for adapter_type in args.adapters:
        ref_step, ref_fwd, remove = reference_step(reference, adapter_type, args.rank, inputs, g)
        our_step, our_fwd = make_training_step(tree, config, adapter_type, args.rank, 1, n)
        try:
            for fn in (ref_fwd, ref_step, our_fwd, our_step):
                fn()  # warm-up (AdamW state, caches)
            times: dict[str, list] = {"ref_fwd": [], "ref_step": [], "our_fwd": [], "our_step": []}
            for _ in range(args.repeats):
                for name, fn in (("ref_fwd", ref_fwd), ("ref_step", ref_step), ("our_fwd", our_fwd),
                                 ("our_step", our_step)):
                    _best(fn, times[name])
        finally:
            remove()
        best = {k: min(v) for k, v in times.items()}
        print(f"  {adapter_type:13s} official step {best['ref_step']:7.2f} s ({best['ref_step'] / best['ref_fwd']:5.2f}x "
              f"its forward)  ours {best['our_step']:6.2f} s ({best['our_step'] / best['our_fwd']:4.2f}x our "
              f"forward)  ours / official {best['our_step'] / best['ref_step']:4.2f}x", flush=True)
        del our_step, our_fwd


if __name__ == "__main__":
    main()
