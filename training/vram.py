"""Training memory: an estimate per run config, calibrated against measured peaks, and a fits-the-device check.

    estimate = weights + text encoder + adapter (params, grads, 2 AdamW moments, all fp32) + activations + workspace

weights: every parameter of the checkpoint tree (DiT, conditioners, autoencoder; counted on the meta device, so any
config works) in the run's precision. text encoder: T5Gemma b-b encoder (~282 M parameters) in the run's precision.
adapter: counted from the targeted layers' shapes and the adapter type, 16 bytes per trainable value.
activations: what autograd keeps for the backward pass through the frozen DiT,

    no checkpointing:   K_ACT · B · (N + M) · D · depth · bytes
    with checkpointing: (K_GC · depth + K_ACT) · B · (N + M) · D · bytes    (block inputs + one block recomputed)
    plus cross-attention keys/values 2 · B · (L + 1) · D · bytes per block kept (all blocks, or one with checkpointing)

with B the batch, N the crop in latents, M the memory tokens, D embed_dim, L the prompt length and bytes 4 (fp32) or
2 (bf16/fp16). workspace: allocator slack and kernels' scratch, WORKSPACE_FRACTION of the rest plus a constant.

Calibration (method and numbers): `measure_training_peak` runs real training steps (DiT with random weights, the
adapter through `AdaptedModel(trainable=True)`, flow loss, backward, clipping, AdamW, as `Trainer.train_step` does)
in a fresh subprocess on CPU and reports the growth of the peak RSS (VmHWM, reset through /proc/self/clear_refs
after the model is built) over the RSS before the first step: that is adapter state + activations + workspace.
Measured on this machine (torch 2.13 CPU, fp32, dora-rows rank 16 on every DiT Linear/Conv1d, 2 threads):

    model        B  N    gc    measured peak growth   estimate (adapter + activations + workspace)
    tiny-small   1  41   off         16 MiB                22 MiB  (1.38x)
    tiny-small   4  138  off         55 MiB                60 MiB  (1.10x)
    tiny-small   4  138  on          50 MiB                58 MiB  (1.17x)
    tiny-small   8  276  off        181 MiB               184 MiB  (1.02x)
    tiny-small   8  276  on         135 MiB               175 MiB  (1.29x)
    small-music  1  108  off       1273 MiB              1246 MiB  (0.98x)
    small-music  1  108  on         723 MiB               692 MiB  (0.96x)

(tiny-small: embed_dim 128, depth 2, 4 memory tokens; small-music: 1024, 20, 64; N = crop latents. Per block the
activation part is 63-71 values per token·dim on tiny and 74.5 on small-music without checkpointing, hence K_ACT 72;
with checkpointing small-music gives K_GC 32 (tiny, depth 2, suggests 16: the estimate errs high there). The weights
were 2.24 GB of RSS before the first small-music step, matching 459 M fp32 DiT parameters.)

K_ACT and K_GC are rounded fits of these points (activation part = measured - adapter - workspace - cross K/V).
Not measured on a GPU (none on this machine): there the caching allocator's peak (torch.cuda.max_memory_allocated)
should follow the same formula, but recalibrate `measure_training_peak`-style when one is available.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import torch

from ..sa3.host_memory import available_host_memory
from ..sa3.loading import resolve_dtype
from ..sa3.text import text_encoder_dtype

K_ACT = 72.0  # saved activation values per token, embed_dim and block, fitted (see the table above)
K_GC = 32.0  # per block with gradient checkpointing (saved block inputs + backward buffers), fitted on small-music
WORKSPACE_FRACTION = 0.05
WORKSPACE_BYTES = 16 * 2**20  # the growth of a near-empty step on CPU (tiny model, 45 tokens): 13-16 MB
TEXT_ENCODER_PARAMS = 282_000_000  # T5Gemma b-b encoder: 256k x 768 embeddings + 12 layers
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def _count_parameters(model_config) -> tuple[int, list[tuple[str, int, int]]]:
    key = json.dumps(getattr(model_config, "raw", None) or model_config.dit, sort_keys=True, default=str)
    if key not in _COUNTS:
        _COUNTS[key] = _count_parameters_uncached(model_config)
    return _COUNTS[key]


_COUNTS: dict[str, tuple[int, list]] = {}


def _count_parameters_uncached(model_config) -> tuple[int, list[tuple[str, int, int]]]:
    """(all checkpoint parameters, [(name, in, out) of every DiT/conditioner Linear/Conv1d]) of the config, built
    on the meta device (no memory, no time)."""
    from ..sa3.model import SA3Modules

    with torch.device("meta"):
        modules = SA3Modules(model_config)
    total = sum(p.numel() for p in modules.parameters())
    layers = []
    for root in (modules.model, modules.conditioner):
        for name, m in root.named_modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d)):
                fan_in = m.weight[0].numel()
                layers.append((name, fan_in, m.weight.shape[0]))
    return total, layers


def adapter_parameter_count(layers: list[tuple[str, int, int]], adapter_type: str, rank: int,
                            include=None, exclude=None, preset: str | None = "all") -> int:
    """Trainable values of an adapter over `layers` [(name, in, out)]: low-rank r·(in + out) or -xs r², plus the
    magnitude vectors (rows: out, cols: in, both: in + out)."""
    from ..adapters.maths import ADAPTER_TYPES
    from ..adapters.targets import resolve_patterns

    delta, renorm = ADAPTER_TYPES[adapter_type]
    inc, exc = resolve_patterns(include, exclude, preset)
    from ..adapters.targets import matches_any

    total = 0
    for name, fan_in, fan_out in layers:
        if (inc is not None and not matches_any(name, inc)) or (exc and matches_any(name, exc)):
            continue
        if delta == "lowrank":  # trained at the full rank, even above the layer's size
            total += rank * (fan_in + fan_out)
        else:  # -xs ranks above a layer's size are refused
            total += min(rank, fan_in, fan_out) ** 2
        total += {"none": 0, "rows": fan_out, "cols": fan_in, "both": fan_in + fan_out}[renorm]
    return total


def continued_parameter_count(path) -> int | None:
    """Trainable values of the adapter file a run continues (its tensors' sizes, read from the safetensors header
    without the data), or None when that cannot be read that way (the run's own checks name a bad file)."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    except Exception:  # a Lightning .ckpt, a damaged file: the config's type and rank stand in
        return None


def estimate_training_memory(model_config, run_config, text_encoder_params: int | None = None) -> dict:
    """Bytes needed to train `run_config` (RunConfig) on a model with `model_config` (SA3Config); its text encoder
    has `text_encoder_params` parameters (None: the real packs' T5Gemma, which the config does not describe).

    Returns {"weights", "text_encoder", "adapter", "activations", "workspace", "total"} (ints, bytes) plus
    "crop_latents" and "tokens" (sequence length the DiT sees, latents + memory tokens)."""
    c, d = run_config, model_config.dit
    size = BYTES[c.precision]
    n_params, layers = _count_parameters(model_config)
    n_adapter = (continued_parameter_count(c.continue_from) if c.continue_from else None)  # the file decides
    if n_adapter is None:
        n_adapter = adapter_parameter_count(layers, c.adapter_type, c.rank, list(c.include) or None,
                                            list(c.exclude) or None, c.targets)
    crop = c.crop_latents(model_config)
    tokens = crop + int(d.get("num_memory_tokens", 0) or 0)
    width, depth, batch = int(d["embed_dim"]), int(d["depth"]), c.batch_size
    per_block = batch * tokens * width * size
    activations = (K_GC * depth + K_ACT) * per_block if c.gradient_checkpointing else K_ACT * depth * per_block
    kv_blocks = 1 if c.gradient_checkpointing else depth  # checkpointed blocks recompute their cross K/V
    activations += 2 * batch * (int(model_config.prompt_max_length) + 1) * width * kv_blocks * size
    text_size = torch.finfo(text_encoder_dtype(resolve_dtype(c.precision))).bits // 8  # fp16 keeps T5Gemma fp32
    out = {"weights": n_params * size, "text_encoder": (text_encoder_params or TEXT_ENCODER_PARAMS) * text_size,
           "adapter": n_adapter * 16, "activations": int(activations)}
    # scratch of the kernels and allocator slack grow with what is being computed, not with the frozen weights
    out["workspace"] = int(WORKSPACE_FRACTION * (out["activations"] + out["adapter"]) + WORKSPACE_BYTES)
    out["total"] = sum(out.values())
    out.update(crop_latents=crop, tokens=tokens)
    return {k: int(v) for k, v in out.items()}


def free_device_memory(device) -> int | None:
    """Free bytes on `device` ("cuda:0", "cpu", torch.device); None when unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # memory torch's caching allocator holds but no tensor uses (ComfyUI keeps a large cache) is free to us
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type == "cpu":
        return available_host_memory()
    if device.type == "mps":  # unified memory: what Metal recommends for this process, less what it holds
        try:
            return max(0, int(torch.mps.recommended_max_memory()) - int(torch.mps.driver_allocated_memory()))
        except (AttributeError, RuntimeError):
            return None
    return None


def check_fits(estimate: dict, device, loaded: bool = False) -> str | None:
    """A warning when the estimate exceeds the device's free memory (None when it fits or is unknown). loaded: the
    model's weights and text encoder already sit on the device (a node's input model), so free memory need only hold
    the rest."""
    free = free_device_memory(device)
    needed = estimate["total"] - (estimate["weights"] + estimate["text_encoder"] if loaded else 0)
    if free is None or needed <= free:
        return None
    gb = 2**30
    parts = ", ".join(f"{k} {estimate[k] / gb:.2f}" for k in ("weights", "text_encoder", "adapter", "activations"))
    beyond = " beyond the loaded model" if loaded else ""
    return (f"training needs about {needed / gb:.1f} GB{beyond} but {device} has {free / gb:.1f} GB free ({parts} "
            f"GB): {memory_advice(None)} (gradient checkpointing saves the most when activations dominate).")


def memory_advice(config) -> str:
    """What to change for a run that does not fit the device: 'lower batch_size or crop_seconds, turn on
    gradient_checkpointing or load the model in bf16', leaving out what `config` (a RunConfig, or None) already
    does. One rule for the estimate's warning and a failed run's message."""
    advice = ["lower batch_size or crop_seconds"]
    if config is None or not config.gradient_checkpointing:
        advice.append("turn on gradient_checkpointing")
    if config is None or config.precision == "fp32":
        advice.append("load the model in bf16")
    return ", ".join(advice[:-1]) + (" or " if len(advice) > 1 else "") + advice[-1]


# -------------------------------------------------------------------------------------------------------------------
# Measurement (calibration, tests and bench/train_step.py)

def _rss_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", open("/proc/self/status", encoding="ascii").read()).group(1))


def build_random_dit_tree(model_config, seed: int = 0) -> torch.nn.Module:
    """`tree.model` = the config's DiTWrapper with non-degenerate random weights, frozen (the adapter root layout of
    a loaded model's DiT)."""
    from ..sa3.dit import DiTWrapper
    from ..sa3.tiny import randomize_

    tree = torch.nn.Module()
    tree.model = DiTWrapper(**model_config.dit)
    randomize_(tree, torch.Generator().manual_seed(seed))
    return tree.eval().requires_grad_(False)


def random_step_inputs(model_config, batch: int, crop_latents: int, g: torch.Generator,
                       prompt_tokens: int | None = None) -> tuple[torch.Tensor, ...]:
    """(x [B, C, T], target [B, C, T], t [B], cross [B, L + 1, D], global [B, G], local [B, C + 1, T]) of random
    values, shaped as the DiT's training inputs; prompt_tokens: see `make_training_step`."""
    d = model_config.dit
    x = torch.randn(batch, d["io_channels"], crop_latents, generator=g)
    target = torch.randn(x.shape, generator=g)
    t = torch.rand(batch, generator=g)
    cross = torch.randn(batch, int(model_config.prompt_max_length) + 1, d["cond_token_dim"], generator=g)
    if prompt_tokens is not None and prompt_tokens < cross.shape[1] - 1:
        n_pad = cross.shape[1] - 1 - prompt_tokens
        cross[:, :n_pad] = torch.randn(d["cond_token_dim"], generator=g)  # the learned padding embedding
    glob = torch.randn(batch, d["global_cond_dim"], generator=g)
    local = torch.randn(batch, d["local_add_cond_dim"], crop_latents, generator=g)
    return x, target, t, cross, glob, local


def make_floor_step(tree, model_config, batch: int, crop_latents: int, seed: int = 0,
                    prompt_tokens: int | None = None):
    """floor() closure: the frozen DiT's forward and the backward of its INPUT gradient alone, the same loss. Every
    adapter step contains this work (the adapters' own products and the chain rule through the conditioning
    layers come on top), so step / forward cannot go below floor / forward."""
    from ..sa3.schedules import masked_flow_loss

    g = torch.Generator().manual_seed(seed)
    x, target, t, cross, glob, local = random_step_inputs(model_config, batch, crop_latents, g, prompt_tokens)
    dit = tree.model.model

    def floor() -> None:
        v = dit(x.clone().requires_grad_(True), t, cross, glob, local)
        masked_flow_loss(v.float(), target).loss.backward()

    return floor


def make_training_step(tree, model_config, adapter_type: str, rank: int, batch: int, crop_latents: int,
                       gradient_checkpointing: bool = False, seed: int = 0, detach_norm: bool = False,
                       prompt_tokens: int | None = None):
    """(step(), forward()) closures over random inputs: one training step as Trainer.train_step does it (adapter
    view, DiT forward, flow loss, backward, clip 1.0, AdamW, update), and the no-grad base DiT forward alone.
    prompt_tokens: one padding token repeated, then that many distinct prompt tokens (a real prompt's layout: SA3
    pads on the left), then the seconds token; None: every context token distinct (the most cross-attention work)."""
    from ..adapters import AdaptedModel, Root, new_adapter
    from ..sa3.schedules import masked_flow_loss
    from .cpu_heap import keep_heap
    from .optimizer import adamw

    keep_heap()  # as Trainer.train does on the CPU; this process exists to measure steps, so it is never released

    roots = (Root("model", gated=True, filter_strip="model."),)
    g = torch.Generator().manual_seed(seed)
    adapter = new_adapter(tree, adapter_type, rank, roots=roots, preset="all", generator=g)
    stack = AdaptedModel(tree, [adapter], roots, trainable=True, detach_norm=detach_norm)
    params = stack.parameters()
    with torch.no_grad():  # a trained-looking adapter: B / M_xs away from zero so every path does real work
        for p in params:
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    optimizer = adamw(params, lr=1e-4, betas=(0.9, 0.95))
    dit, view_dit = tree.model.model, stack.module.model.model
    dit.gradient_checkpointing = view_dit.gradient_checkpointing = gradient_checkpointing
    x, target, t, cross, glob, local = random_step_inputs(model_config, batch, crop_latents, g, prompt_tokens)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        v = view_dit(x, t, cross, glob, local)  # the adapter view, as the trainer runs it (checkpointing-safe)
        loss = masked_flow_loss(v.float(), target).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        stack.update()
        return float(loss.detach())

    def forward() -> None:
        with torch.inference_mode():
            dit(x, t, cross, glob, local)

    return step, forward


def _measure_main(spec: dict) -> dict:
    from ..sa3.config import family_defaults, read_config

    torch.set_num_threads(spec.get("threads", 2))
    path = spec["model"]
    config = read_config(path if os.path.exists(path) else family_defaults(path))
    if os.path.isdir(path):
        config = read_config(os.path.join(path, "model_config.json"))
    tree = build_random_dit_tree(config)
    crop = max(1, round(spec["crop_seconds"] * config.latent_rate))
    step, _ = make_training_step(tree, config, spec["adapter_type"], spec["rank"], spec["batch_size"], crop,
                                 spec["gradient_checkpointing"])
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM: the peak from here on is the training's
        f.write("5")
    before = _rss_kib("VmRSS")
    for _ in range(spec.get("steps", 2)):
        step()
    return {"before": before * 1024, "peak": _rss_kib("VmHWM") * 1024,
            "growth": (_rss_kib("VmHWM") - before) * 1024, "crop_latents": crop}


def measure_training_peak(model: str, adapter_type: str = "dora-rows", rank: int = 16, batch_size: int = 1,
                          crop_seconds: float = 10.0, gradient_checkpointing: bool = False, steps: int = 2,
                          threads: int = 2) -> dict:
    """Run `steps` real training steps in a fresh process (CPU, fp32, random weights) and return {"before", "peak",
    "growth", "crop_latents"} in bytes: RSS before the first step, peak RSS during the steps, and their difference.
    model: a model folder, config JSON or family name (small-music, ...). Linux only (/proc)."""
    spec = dict(model=str(model), adapter_type=adapter_type, rank=rank, batch_size=batch_size,
                crop_seconds=crop_seconds, gradient_checkpointing=gradient_checkpointing, steps=steps,
                threads=threads)
    code = ("import json, sys; from sa3_lora_studio.training.vram import _measure_main; "
            "print('RESULT', json.dumps(_measure_main(json.loads(sys.argv[1]))))")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    done = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True, env=env)
    lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"measuring {spec} failed: {done.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


__all__ = ["estimate_training_memory", "free_device_memory", "check_fits", "memory_advice", "measure_training_peak",
           "adapter_parameter_count", "build_random_dit_tree", "make_floor_step", "make_training_step",
           "random_step_inputs"]


def vram_table(packs=("small-music", "medium"), precisions=("bf16", "fp32"), crops=(30.0, 120.0),
               batches=(1, 4)) -> str:
    """A markdown table of estimated training memory (dora-rows rank 16, every DiT layer) for the real packs."""
    from ..sa3.config import family_defaults, read_config
    from .runs import RunConfig

    rows = ["| pack | precision | crop | batch | estimate | with gradient checkpointing |", "|---|---|---|---|---|---|"]
    for pack in packs:
        cfg = read_config(family_defaults(pack))
        for precision in precisions:
            for crop in crops:
                for batch in batches:
                    est = [estimate_training_memory(cfg, RunConfig(dataset="-", precision=precision, crop_seconds=crop,
                                                                   batch_size=batch, gradient_checkpointing=gc))
                           for gc in (False, True)]
                    rows.append(f"| {pack} | {precision} | {crop:g} s | {batch} | {est[0]['total'] / 2**30:.1f} GB "
                                f"| {est[1]['total'] / 2**30:.1f} GB |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(vram_table())
