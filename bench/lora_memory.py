"""Generation with a LoRA: `adapter_memory` "fast" (merged weights) against "low" (the adapter path beside the
shared weights, no copy; what training demos use), per adapter type, on a real-size DiT with random weights.

    python bench/lora_memory.py                                    # small-music, dora-rows + bora + lora, 10 s
    python bench/lora_memory.py --adapters dora-rows --seconds 30 --model medium

Each (type, mode) runs in its own process: build the DiT, make a trained-looking adapter (rank 16 on every DiT layer),
reset the peak RSS (/proc/self/clear_refs), then run DiT evaluations at CFG batch 2 as a sampler does. Printed: the
first evaluation (which merges, in fast mode), the best of the following ones, and the peak RSS above the loaded
model and adapter: the memory a generation adds (on a GPU: the VRAM).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(args) -> None:
    import torch
    from sa3_lora_studio.adapters import AdaptedModel, AdapterUse, Root, new_adapter
    from sa3_lora_studio.sa3.config import family_defaults, read_config
    from sa3_lora_studio.sa3.generate import ADAPTER_MODES
    from sa3_lora_studio.training.vram import build_random_dit_tree

    torch.set_num_threads(args.threads)
    config = read_config(family_defaults(args.model))
    tree = build_random_dit_tree(config)
    roots = (Root("model", gated=True, filter_strip="model."),)
    g = torch.Generator().manual_seed(0)
    adapter = new_adapter(tree, args.adapter, args.rank, roots=roots, preset="all", generator=g)
    for tensors in adapter.layers.values():  # a trained-looking adapter: every path does real work
        for name, t in tensors.items():
            tensors[name] = t + 0.01 * torch.randn(t.shape, generator=g)
    d = config.dit
    n = round(args.seconds * config.latent_rate)
    x = torch.randn(2, d["io_channels"], n, generator=g)  # CFG: conditional + unconditional in one batch
    t = torch.full((2,), 0.5)
    cross = torch.randn(2, int(config.prompt_max_length) + 1, d["cond_token_dim"], generator=g)
    glob = torch.randn(2, d["global_cond_dim"], generator=g)
    local = torch.zeros(2, d["local_add_cond_dim"], n)
    before = _rss_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    session = AdaptedModel(tree, [AdapterUse(adapter)], roots, mode=ADAPTER_MODES[args.mode])
    times = []
    with torch.inference_mode(), session:
        for _ in range(args.evaluations):
            start = time.perf_counter()
            tree.model(x, t, cross, glob, local)
            times.append(time.perf_counter() - start)
    print(json.dumps({"first": times[0], "best": min(times[1:]), "added_mb": _rss_mb("VmHWM") - before}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small-music", help="a family (small-music, medium) or a config JSON")
    p.add_argument("--adapters", nargs="+", default=["lora", "dora-rows", "bora"])
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--evaluations", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", action="store_true")
    p.add_argument("--adapter")
    p.add_argument("--mode")
    args = p.parse_args()
    if args.evaluations < 2:
        p.error("--evaluations must be at least 2 (the first one also forms the merged weights)")
    if args.child:
        child(args)
        return
    print(f"{args.model}, {args.seconds:g} s (CFG batch 2), rank {args.rank} on every DiT layer, fp32, "
          f"{args.threads} threads; per DiT evaluation", flush=True)
    for adapter in args.adapters:
        for mode in ("fast", "low"):
            out = subprocess.run([sys.executable, __file__, "--child", "--model", args.model, "--adapter", adapter,
                                  "--mode", mode, "--seconds", str(args.seconds), "--rank", str(args.rank),
                                  "--evaluations", str(args.evaluations), "--threads", str(args.threads)],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                print(f"  {adapter:10s} {mode:4s} failed: {out.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"  {adapter:10s} {mode:4s}  first {r['first']:6.2f} s  then {r['best']:6.2f} s  "
                  f"memory added {r['added_mb']:7.0f} MB", flush=True)


if __name__ == "__main__":
    main()
