"""A tiny built-in SA3 model of the real architecture, with random weights, written in the official Hub layout.

Used by `sa3-lora smoke`/`quickstart` on a fresh machine (no downloads) and by tests that must not depend on the
reference fixtures' particular sizes. Every part is real: the same module code, config schema, key names, T5Gemma
folder (config.json, weights, a BPE tokenizer.json with byte fallback built here) that `load_model` reads for the
real packs. The weights are random but not degenerate (the official zero-initialised output layers are randomised),
so outputs depend on every input.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import read_config

TINY_T5 = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "head_dim": 16,
           "intermediate_size": 64, "query_pre_attn_scalar": 16}

TINY_CONFIG = {
    "model_type": "diffusion_cond",
    "sample_rate": 44100,
    "sample_size": 32 * 4096,  # 4096 latents ≈ 2.97 s, like medium's 4096-latent maximum
    "model": {
        "io_channels": 8,
        "pretransform": {
            "type": "autoencoder", "chunked": True, "iterate_batch": False,
            "config": {
                "encoder": {"type": "same", "config": {
                    "in_channels": 16, "channels": 16, "c_mults": [1], "strides": [4], "latent_dim": 8,
                    "transformer_depths": [2], "differential": True, "dyt": True, "dim_heads": 8,
                    "variable_stride": True, "conv_mapping": False, "chunk_size": 8, "chunk_midpoint_shift": True}},
                "decoder": {"type": "same", "config": {
                    "out_channels": 16, "channels": 16, "c_mults": [1], "strides": [4], "latent_dim": 8,
                    "transformer_depths": [2], "sinusoidal_blocks": [1], "differential": True, "dyt": True,
                    "dim_heads": 8, "variable_stride": True, "conv_mapping": True, "chunk_size": 8,
                    "chunk_midpoint_shift": True, "mask_noise": 0.0}},
                "bottleneck": {"type": "softnorm", "config": {"dim": 8, "auto_scale": True, "noise_regularize": False}},
                "pretransform": {"type": "patched", "config": {"channels": 2, "patch_size": 8}},
                "latent_dim": 8, "downsampling_ratio": 32, "io_channels": 2,
            },
        },
        "conditioning": {
            "cond_dim": 32, "default_keys": {}, "pre_encoded_keys": [],
            "configs": [
                {"id": "prompt", "type": "t5gemma", "config": {
                    "model_name": "google/t5gemma-b-b-ul2", "max_length": 16, "padding_mode": "learned",
                    "subfolder": "t5gemma-b-b-ul2"}},
                {"id": "seconds_total", "type": "number",
                 "config": {"min_val": 0, "max_val": 384, "fourier_features_type": "expo"}},
            ],
        },
        "diffusion": {
            "diffusion_objective": "rectified_flow",
            "cross_attention_cond_ids": ["prompt", "seconds_total"],
            "global_cond_ids": ["seconds_total"],
            "input_concat_ids": [],
            "local_add_cond_ids": ["inpaint_mask", "inpaint_masked_input"],
            "prepend_cond_ids": [],
            "distribution_shift_options": {"min_length": 256, "max_length": 4096},
            "mask_padding_attention": True,
            "use_effective_length_for_schedule": True,
            "config": {
                "io_channels": 8, "patch_size": 1, "embed_dim": 64, "depth": 2, "num_heads": 1,
                "cond_token_dim": 32, "global_cond_dim": 32, "local_add_cond_dim": 9, "num_memory_tokens": 2,
                "global_cond_type": "adaLN", "timestep_features_type": "expo", "norm_type": "rms_norm",
                "attn_kwargs": {"qk_norm": "rms"}, "ff_kwargs": {"mult": 2},
            },
        },
    },
}

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
_CHARS = "▁abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789,.:;-'()/&!?"
_MERGES = [("▁", "a"), ("i", "n"), ("t", "h"), ("e", "r"), ("▁", "s"), ("▁", "th"), ("o", "n"), ("a", "n"),
           ("in", "g"), ("▁", "b"), ("▁", "d"), ("e", "n"), ("o", "r"), ("▁", "p"), ("a", "r"), ("▁", "m")]


def tiny_tokenizer_json() -> dict:
    """A Gemma-style BPE tokenizer: spaces become ▁, no dummy prefix, byte fallback for everything else."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for ch in _CHARS:
        vocab.setdefault(ch, len(vocab))
    for a, b in _MERGES:
        vocab.setdefault(a + b, len(vocab))
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for i, t in enumerate(SPECIAL_TOKENS)]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        "pre_tokenizer": {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": False},
        "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                                                     {"type": "ByteFallback"}, {"type": "Fuse"}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": [[a, b] for a, b in _MERGES]},
    }


def tiny_t5_config(vocab_size: int) -> dict:
    module = {"attention_bias": False, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
              "hidden_activation": "gelu_pytorch_tanh", "layer_types": ["sliding_attention", "full_attention"],
              "max_position_embeddings": 8192, "model_type": "t5_gemma_module", "num_key_value_heads":
              TINY_T5["num_attention_heads"], "pad_token_id": 0, "rms_norm_eps": 1e-6,
              "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}, "sliding_window": 4096,
              "vocab_size": vocab_size, **TINY_T5}
    return {"model_type": "t5gemma", "is_encoder_decoder": True, "encoder": {**module, "is_decoder": False},
            "decoder": {**module, "is_decoder": True}, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2,
            "vocab_size": vocab_size}


def tiny_t5_weights(vocab_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    h, inter = TINY_T5["hidden_size"], TINY_T5["intermediate_size"]
    qkv = TINY_T5["num_attention_heads"] * TINY_T5["head_dim"]

    def w(out_f, in_f, scale=1.0):
        return torch.randn(out_f, in_f, generator=generator) * scale * in_f**-0.5

    def gain():
        return torch.randn(h, generator=generator) * 0.2

    sd = {"encoder.embed_tokens.weight": torch.randn(vocab_size, h, generator=generator) * 0.5,
          "encoder.norm.weight": gain()}
    for i in range(TINY_T5["num_hidden_layers"]):
        p = f"encoder.layers.{i}."
        sd.update({
            p + "self_attn.q_proj.weight": w(qkv, h, 3.0), p + "self_attn.k_proj.weight": w(qkv, h, 3.0),
            p + "self_attn.v_proj.weight": w(qkv, h), p + "self_attn.o_proj.weight": w(h, qkv),
            p + "mlp.gate_proj.weight": w(inter, h), p + "mlp.up_proj.weight": w(inter, h),
            p + "mlp.down_proj.weight": w(h, inter),
            p + "pre_self_attn_layernorm.weight": gain(), p + "post_self_attn_layernorm.weight": gain(),
            p + "pre_feedforward_layernorm.weight": gain(), p + "post_feedforward_layernorm.weight": gain(),
        })
    return sd


def randomize_(modules: torch.nn.Module, generator: torch.Generator) -> None:
    """Non-degenerate random weights: N(0, 1/fan_in) matrices, small biases, gains near 1, DyT alpha near 4."""
    with torch.no_grad():
        for name, p in modules.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if p.numel() == 0:
                continue
            if leaf in ("gamma",) or leaf.endswith("weight_g"):
                p.copy_(p.abs().mean().clamp(min=1e-3) * (1 + 0.2 * torch.randn(p.shape, generator=generator)))
            elif leaf == "alpha":
                p.copy_(4 * (1 + 0.1 * torch.randn(p.shape, generator=generator)))
            elif leaf in ("beta", "bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=generator))
            elif leaf in ("running_std",):
                p.fill_(1.5)
            elif p.dim() >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=generator) * fan_in**-0.5)
            else:
                p.copy_(0.5 * torch.randn(p.shape, generator=generator))


def write_tiny_pack(folder: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """A tiny pack: `<folder>/base` (rectified_flow) and `<folder>/arc` (rf_denoiser) with different DiT weights and
    the same SAME autoencoder and text encoder, like a real pack's two variants. Returns (base, arc) folders."""
    from safetensors.torch import load_file

    folder = Path(folder)
    base = write_tiny_model(folder / "base", seed=seed, objective="rectified_flow")
    arc = write_tiny_model(folder / "arc", seed=seed + 100, objective="rf_denoiser", text_encoder=False)
    base_sd, arc_sd = load_file(str(base / "model.safetensors")), load_file(str(arc / "model.safetensors"))
    arc_sd.update({k: v for k, v in base_sd.items() if k.startswith("pretransform.")})
    save_file(arc_sd, str(arc / "model.safetensors"), metadata={"format": "pt"})
    return base, arc


def write_tiny_model(folder: str | Path, seed: int = 0, objective: str = "rectified_flow",
                     config: dict | None = None, text_encoder: bool = True) -> Path:
    """Write a complete tiny SA3 model folder (model_config.json, model.safetensors, t5gemma-b-b-ul2/)."""
    from .model import SA3Modules

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    raw = copy.deepcopy(config or TINY_CONFIG)
    raw["model"]["diffusion"]["diffusion_objective"] = objective
    cfg = read_config(raw)
    generator = torch.Generator().manual_seed(seed)
    modules = SA3Modules(cfg)
    randomize_(modules, generator)
    (folder / "model_config.json").write_text(json.dumps(raw, indent=1))
    save_file({k: v.contiguous() for k, v in modules.state_dict().items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})

    if not text_encoder:  # a pack's sibling variant shares the other folder's text encoder
        return folder
    t5 = folder / "t5gemma-b-b-ul2"
    t5.mkdir(exist_ok=True)
    tok = tiny_tokenizer_json()
    vocab_size = len(tok["model"]["vocab"])
    (t5 / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    (t5 / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": False, "add_eos_token": False, "tokenizer_class": "GemmaTokenizer",
        "pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>", "unk_token": "<unk>"}, indent=1))
    (t5 / "config.json").write_text(json.dumps(tiny_t5_config(vocab_size), indent=1))
    t5_generator = torch.Generator().manual_seed(seed + 1)
    save_file(tiny_t5_weights(vocab_size, t5_generator), str(t5 / "model.safetensors"), metadata={"format": "pt"})
    return folder
