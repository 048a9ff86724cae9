"""AdamW's step over a whole adapter's tensors: torch's looped form against the fused form the trainer uses.

    python bench/optimizer_step.py                        # small-music, rank 16, every adapter type
    python bench/optimizer_step.py --adapters bora lora --repeats 20

Per adapter type (its tensors on every DiT Linear/Conv1d of the config's model, random weights, fp32): the best-of-N
milliseconds of one `optimizer.step()` with gradients in place, through `torch.optim.AdamW` as torch makes it by
default on the CPU (a Python loop over the tensors, ~10 small ops each) and through `training.optimizer.adamw`
(fused where torch has the kernel), and the largest difference in the parameters after 3 steps of each from the
same start (the same maths; the fused kernel rounds differently).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from adapter_layers import best_ms
from sa3_lora_studio.adapters import ADAPTER_TYPES, AdaptedModel, Root, new_adapter
from sa3_lora_studio.sa3.config import family_defaults, read_config
from sa3_lora_studio.training.optimizer import adamw
from sa3_lora_studio.training.vram import build_random_dit_tree


def adapter_tensors(tree, adapter_type: str, rank: int) -> list[torch.Tensor]:
    """Trainable copies of the adapter's tensors on every DiT layer, each with a random gradient."""
    roots = (Root("model", gated=True, filter_strip="model."),)
    g = torch.Generator().manual_seed(0)
    stack = AdaptedModel(tree, [new_adapter(tree, adapter_type, rank, roots=roots, preset="all", generator=g)], roots,
                         trainable=True)
    tensors = [torch.nn.Parameter(p.detach().clone()) for p in stack.parameters()]
    for p in tensors:
        p.grad = torch.randn(p.shape, generator=g)
    return tensors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small-music", help="a model config JSON or family")
    ap.add_argument("--adapters", nargs="+", default=list(ADAPTER_TYPES), choices=list(ADAPTER_TYPES))
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    spec = Path(args.model)
    tree = build_random_dit_tree(read_config(spec if spec.is_file() else family_defaults(args.model)))
    print(f"{args.model}, rank {args.rank}, fp32, threads={torch.get_num_threads()}: AdamW step, best of "
          f"{args.repeats}", flush=True)
    for adapter_type in args.adapters:
        looped_params = adapter_tensors(tree, adapter_type, args.rank)
        fused_params = [torch.nn.Parameter(p.detach().clone()) for p in looped_params]
        for p, q in zip(fused_params, looped_params):
            p.grad = q.grad.clone()
        looped = torch.optim.AdamW(looped_params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01)
        fused = adamw(fused_params, lr=1e-4, betas=(0.9, 0.95))
        for _ in range(3):  # the same start, the same gradients
            looped.step()
            fused.step()
        differ = max(float((p - q).detach().abs().max()) for p, q in zip(fused_params, looped_params))
        looped_ms, fused_ms = best_ms(looped.step, args.repeats), best_ms(fused.step, args.repeats)
        print(f"  {adapter_type:14s} {len(looped_params):5d} tensors  looped {looped_ms:6.1f} ms  "
              f"{'fused' if fused.defaults['fused'] else 'default'} {fused_ms:6.1f} ms  "
              f"({looped_ms / fused_ms:4.1f}x)  max |difference| after 3 steps {differ:.1e}", flush=True)


if __name__ == "__main__":
    main()
