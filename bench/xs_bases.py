"""What the -xs bases cache saves, per layer shape of the real DiT, on the CPU.

    python bench/xs_bases.py                       # small-music shapes, rank 16
    python bench/xs_bases.py --shapes 1536x1536 6144x1536 --repeats 3

Prints, per [out, in] weight: the uncached SVD (`adapters.xs_bases.compute_svd_bases`, what every generation,
training start and ARC demo round paid before the cache), the cache's content digest (paid when a weight is met as
a new tensor with known content, e.g. an ARC model loaded anew) and a cache hit by the same tensor; best of N, ms.
The figures quoted in adapters/xs_bases.py's docstring come from here.
"""

from __future__ import annotations

import argparse

import torch
from adapter_layers import best_ms  # this folder's timing helper
from sa3_lora_studio.adapters import xs_bases

SMALL_MUSIC_SHAPES = ["3072x1024", "1024x1024", "8192x1024", "1024x4096"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=SMALL_MUSIC_SHAPES, metavar="OUTxIN")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{'weight':>12} {'MB':>6} {'SVD (uncached)':>15} {'content digest':>15} {'hit by tensor':>14}")
    for spec in args.shapes:
        out_f, in_f = (int(x) for x in spec.lower().split("x"))
        w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(0)) / in_f**0.5
        svd = best_ms(lambda w=w: xs_bases.compute_svd_bases(w, args.rank), args.repeats, warm_up=False)
        digest = best_ms(lambda w=w: xs_bases._content_key(w, args.rank), args.repeats, warm_up=False)
        xs_bases.clear_cache()
        xs_bases.svd_bases(w, args.rank)
        hit = best_ms(lambda w=w: xs_bases.svd_bases(w, args.rank), max(args.repeats, 5), warm_up=False)
        print(f"{spec:>12} {w.numel() * 4 / 2**20:6.1f} {svd:12.0f} ms {digest:12.1f} ms {hit:11.2f} ms")


if __name__ == "__main__":
    main()
