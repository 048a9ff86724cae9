"""The products with W one training step makes, summed over every DiT layer, on the CPU.

    python bench/step_products.py                      # small-music, 10 s crop, rank 16
    python bench/step_products.py --models medium --rank 32

Where DoRA/BoRA steps spend their time beyond a LoRA step (README, "Training speed"). A no-grad forward of the
random-weight DiT records each Linear/Conv1d's weight and input rows; then each kind of product is timed over all
layers in turn, with their own weights, so W comes from memory as in a step (best of --repeats passes), in seconds
per step:
- `main x·Wᵀ`: the layers' own forward products (rows as in the step; the backward's g·W costs about the same);
- `rank-r W·rowsᵀ` (oneDNN with W as its source, as adapters/fused.py computes it; torch.mm and oneDNN with W as
  its weight, for comparison) and `rank-r rows·W` (oneDNN with the view Wᵀ): one product of r rows with every W,
  as P = W·Aᵀ and Q = Bᵀ·W are (DoRA-cols makes one of each per step, BoRA four, BoRA-xs two);
- `(W∘W)ᵀ·v`: the column-norm product with W∘W formed in row blocks (BoRA and BoRA-xs make two per step);
- `bora fwd`: P, Q and the W∘W product as three passes over W, as BoRA's forward makes them, beside the same
  products made for each row block in turn (each block read from memory once; the products are slower on blocks);
- `read W (sum)`: one plain read of every W, the memory's speed for scale.
Each line also gives the multiply-adds per second the kernels reached (GFMA/s; the W∘W line counts the square and
the weighted sum as one each); the no-grad forward is printed beside them for scale.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from sa3_lora_studio.adapters.fused import row_blocks, squares_product
from sa3_lora_studio.sa3.config import family_defaults, read_config
from sa3_lora_studio.sa3.fast_linear import rows_times_wt, w_times_rows_t
from sa3_lora_studio.training.cpu_heap import keep_heap
from sa3_lora_studio.training.vram import build_random_dit_tree, random_step_inputs

REAL_LATENT_RATE = 44100 / 4096


def recorded_layers(dit, inputs) -> list[tuple[torch.Tensor, int]]:
    """(weight [out, in], input rows) of every Linear/Conv1d the DiT's forward runs, in order: plain Linears go
    through `sa3.dit.frozen_linear` (recorded there), the SwiGLU input half through oneDNN from `GLU.forward` (a
    hook on the GLU), others through their module call (a forward hook)."""
    from sa3_lora_studio.sa3 import dit as dit_module

    layers, hooks = [], []

    def add(weight, x):
        w = weight.reshape(weight.shape[0], -1)
        layers.append((w, x.numel() // w.shape[1]))

    def glu_hook(mod, args, out):  # the fused SwiGLU calls oneDNN itself, past both other records
        if dit_module.use_onednn(mod.proj, args[0]):
            add(mod.proj.weight, args[0])

    for module in dit.modules():
        if isinstance(module, torch.nn.Linear | torch.nn.Conv1d):
            hooks.append(module.register_forward_hook(lambda mod, args, out: add(mod.weight, args[0])))
        elif isinstance(module, dit_module.GLU):
            hooks.append(module.register_forward_hook(glu_hook))
    original = dit_module.frozen_linear

    def recording_linear(x, w, bias=None):
        add(w, x)
        return original(x, w, bias)

    dit_module.frozen_linear = recording_linear
    try:
        with torch.inference_mode():
            dit(*inputs)
    finally:
        dit_module.frozen_linear = original
        for h in hooks:
            h.remove()
    return layers


def seconds_over_layers(layers, product, repeats: int) -> float:
    """Best of `repeats` passes of product(w, rows) over all layers, in seconds."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for w, rows in layers:
            product(w, rows)
        best = min(best, time.perf_counter() - t0)
    return best


def bench_model(spec: str, args) -> None:
    config = read_config(spec if os.path.exists(spec) else family_defaults(spec))
    n = max(1, round(args.seconds * REAL_LATENT_RATE))
    n += (-n) % config.latent_alignment
    dit = build_random_dit_tree(config).model.model
    x, _, t, cross, glob, local = random_step_inputs(config, 1, n, torch.Generator().manual_seed(0))
    inputs = (x, t, cross, glob, local)
    layers = recorded_layers(dit, inputs)
    seen = {w.data_ptr() for w, _ in layers}
    missed = [name for name, m in dit.named_modules()
              if isinstance(m, torch.nn.Linear | torch.nn.Conv1d) and m.weight.data_ptr() not in seen]
    if missed:  # the sums below would leave these layers' products out
        raise SystemExit(f"{len(missed)} DiT layers were not recorded, e.g. {missed[:3]}: update recorded_layers")
    r = args.rank
    down = {w.shape[1]: torch.randn(r, w.shape[1]) for w, _ in layers}  # A-like [r, in]
    up_t = {w.shape[0]: torch.randn(r, w.shape[0]) for w, _ in layers}  # Bᵀ-like [r, out]
    rows_in = {(rows, w.shape[1]): torch.randn(rows, w.shape[1]) for w, rows in layers}
    row_weights = {w.shape[0]: torch.rand(w.shape[0]) for w, _ in layers}

    walk, passes = "bora fwd, row-block walk", "bora fwd (W·Aᵀ, Bᵀ·W, W∘W)"

    def bora_forward(w, together: bool):
        """BoRA's forward products with W: P, Q and the W∘W product as three passes, as fused.py makes them, or all
        three per row block in turn (together: each block read from memory once, as fused.py did before)."""
        a, b, d2 = down[w.shape[1]], up_t[w.shape[0]].T, row_weights[w.shape[0]]
        if not together:
            w_times_rows_t(w, a)
            rows_times_wt((b * d2[:, None]).T, w.t())
            squares_product(w, d2, transposed=True)
            return
        p, q, out = torch.empty(w.shape[0], r), torch.zeros(r, w.shape[1]), torch.zeros(w.shape[1])
        for block in row_blocks(w):
            p[block] = w_times_rows_t(w[block], a)
            q.add_(rows_times_wt((b[block] * d2[block, None]).T, w[block].t()))
            out.addmv_((w[block] * w[block]).T, d2[block])

    products = {
        "read W (sum)": lambda w, rows: w.sum(),
        "main x·Wᵀ": lambda w, rows: rows_times_wt(rows_in[rows, w.shape[1]], w),
        f"rank-{r} W·rowsᵀ (W src)": lambda w, rows: w_times_rows_t(w, down[w.shape[1]]),  # as fused.py takes it
        f"rank-{r} W·rowsᵀ (mm)": lambda w, rows: torch.mm(w, down[w.shape[1]].T),  # as fused.py took it before
        f"rank-{r} W·rowsᵀ (oneDNN)": lambda w, rows: rows_times_wt(down[w.shape[1]], w),  # W as oneDNN's weight
        f"rank-{r} rows·W (oneDNN)": lambda w, rows: rows_times_wt(up_t[w.shape[0]], w.t()),
        "(W∘W)ᵀ·v in row blocks": lambda w, rows: squares_product(w, row_weights[w.shape[0]], transposed=True),
        passes: lambda w, rows: bora_forward(w, together=False),
        walk: lambda w, rows: bora_forward(w, together=True),
    }
    weight_count = sum(w.numel() for w, _ in layers)
    multiply_adds = {name: weight_count * r for name in products}  # per weight: r for a rank-r product
    multiply_adds["main x·Wᵀ"] = sum(w.numel() * rows for w, rows in layers)
    multiply_adds["(W∘W)ᵀ·v in row blocks"] = 2 * weight_count  # the square, then the weighted sum
    multiply_adds[walk] = multiply_adds[passes] = (2 * r + 2) * weight_count
    weights_gb = sum(w.numel() * w.element_size() for w, _ in layers) / 2**30
    print(f"{spec}: {len(layers)} layers, {weights_gb:.2f} GB of weights, {n} latents, rank {r}", flush=True)

    def forward():
        with torch.inference_mode():
            dit(*inputs)

    forward()
    best_forward = min(_timed(forward) for _ in range(args.repeats))
    print(f"  {'no-grad forward':28s} {best_forward:6.3f} s", flush=True)
    weights_bytes = sum(w.numel() * w.element_size() for w, _ in layers)
    for name, product in products.items():
        seconds = seconds_over_layers(layers, product, args.repeats)
        rate = (f"{weights_bytes / seconds / 1e9:5.1f} GB/s" if name.startswith("read") else
                f"{multiply_adds[name] / seconds / 1e9:5.1f} GFMA/s")
        print(f"  {name:30s} {seconds:6.3f} s  ({seconds / best_forward:4.2f}x the forward)  {rate}", flush=True)

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["small-music"], help="model config JSONs or families")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    keep_heap()  # as a training step runs on the CPU
    print(f"torch {torch.__version__} threads={torch.get_num_threads()} load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
    for spec in args.models:
        bench_model(spec, args)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
