"""One adapted Linear's training cost (forward + backward), per layer shape of the real DiT, on the CPU.

    python bench/adapter_layers.py                     # small-music shapes, 172 rows (10 s + memory tokens), rank 16
    python bench/adapter_layers.py --rows 400 --repeats 20

Prints the best-of-N milliseconds of a forward and backward of one layer for: the frozen layer through torch's
default `F.linear` and through `frozen_linear` (oneDNN both ways, sa3/fast_linear.py); every adapter type through
the hand-written node of adapters/fused.py ("node") and through plain autograd ("autograd", the GPU/half path);
and BoRA's node at several row-block sizes (`fused.BLOCK_BYTES`). The whole-step view is bench/train_step.py.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from sa3_lora_studio.adapters import ADAPTER_TYPES, fused
from sa3_lora_studio.adapters import maths as M
from sa3_lora_studio.sa3.fast_linear import frozen_linear

SMALL_MUSIC_SHAPES = [(3072, 1024), (1024, 1024), (8192, 1024), (1024, 4096)]  # qkv, out / cross q, ff in, ff out


def best_ms(fn, repeats: int, warm_up: bool = True) -> float:
    """Best of `repeats` timed calls of fn, in milliseconds (after one untimed call unless warm_up is False)."""
    if warm_up:
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def layer_case(out_f: int, in_f: int, rows: int, rank: int, repeats: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(out_f, in_f, generator=g) / in_f**0.5
    bias = torch.randn(out_f, generator=g)
    x = torch.randn(rows, in_f, generator=g, requires_grad=True)
    upstream = torch.randn(rows, out_f, generator=g)
    res = {"F.linear": best_ms(lambda: F.linear(x, w, bias).backward(upstream), repeats),
           "frozen": best_ms(lambda: frozen_linear(x, w, bias).backward(upstream), repeats)}
    for adapter_type in ADAPTER_TYPES:
        t = M.init_tensors(adapter_type, w, rank, generator=g)
        t = {k: (v + 0.01 * torch.randn(v.shape, generator=g)).requires_grad_(k in M.TRAINABLE_NAMES)
             for k, v in t.items()}
        scale = M.adapter_scale(rank, rank, 1.0)
        products = M.base_products(w.detach(), adapter_type, t)  # cached per layer, as the adapter view does

        def step(adapter_type=adapter_type, t=t, scale=scale, products=products):
            M.factored_linear(x, w, bias, adapter_type, t, scale, products).backward(upstream)

        res[f"{adapter_type} node"] = best_ms(step, repeats)
        original = M.fused_applies
        M.fused_applies = lambda *args: False
        try:
            res[f"{adapter_type} autograd"] = best_ms(step, repeats)
        finally:
            M.fused_applies = original
        if adapter_type == "bora":
            default = fused.BLOCK_BYTES
            try:
                for mb in (1, 4, 16, 1024):
                    fused.BLOCK_BYTES = mb << 20
                    res[f"bora node {mb}MB blocks"] = best_ms(step, repeats)
            finally:
                fused.BLOCK_BYTES = default
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=172, help="input rows (batch x sequence)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__} threads={torch.get_num_threads()} rows={args.rows} rank={args.rank}; "
          "ms per forward+backward (best of repeats); ratio to the frozen oneDNN layer in brackets", flush=True)
    for out_f, in_f in SMALL_MUSIC_SHAPES:
        res = layer_case(out_f, in_f, args.rows, args.rank, args.repeats)
        frozen = res["frozen"]
        print(f"W [{out_f}, {in_f}]", flush=True)
        for name, ms in res.items():
            print(f"  {name:26s} {ms:8.2f} ms  ({ms / frozen:4.2f}x)", flush=True)


if __name__ == "__main__":
    main()
