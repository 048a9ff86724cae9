"""SA3 model configuration: the official `model_config.json` schema, and inference of it from a bare state dict.

A config is kept as the official nested dict (so component constructors take their official kwargs) inside a frozen
`SA3Config` that adds typed accessors. Two ways to get one:
- `read_config(path_or_dict)`: the JSON that ships beside `model.safetensors` in a Hugging Face folder;
- `infer_config(shapes, ...)`: ComfyUI ships single `.safetensors` files without JSON. Everything the weights
  determine is read from tensor shapes and names; the rest comes from the real packs' defaults for the detected
  family (`configs/*.json`), overridable by the caller. See `WEIGHT_DETERMINED` and `FAMILY_DEFAULTS` below.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

DIT_PREFIX = "model.model."
CONDITIONER_PREFIX = "conditioner.conditioners."
AUTOENCODER_PREFIX = "pretransform.model."

OBJECTIVES = ("rectified_flow", "rf_denoiser")

# What the weights determine (and `infer_config` therefore recovers exactly), as paths into the config dict.
WEIGHT_DETERMINED = (
    "model.io_channels",
    "model.conditioning.cond_dim",
    "model.diffusion.config.io_channels",
    "model.diffusion.config.embed_dim",
    "model.diffusion.config.depth",
    "model.diffusion.config.num_heads",
    "model.diffusion.config.cond_token_dim",
    "model.diffusion.config.global_cond_dim",
    "model.diffusion.config.local_add_cond_dim",
    "model.diffusion.config.num_memory_tokens",
    "model.diffusion.config.attn_kwargs.differential",
    "model.diffusion.config.ff_kwargs.mult",
    "model.pretransform.config.latent_dim",
    "model.pretransform.config.pretransform.config.patch_size",
    "model.pretransform.config.encoder.config.in_channels",
    "model.pretransform.config.encoder.config.latent_dim",
    "model.pretransform.config.encoder.config.transformer_depths",
    "model.pretransform.config.encoder.config.dim_heads",
    "model.pretransform.config.encoder.config.differential",
    "model.pretransform.config.encoder.config.dyt",
    "model.pretransform.config.decoder.config.out_channels",
    "model.pretransform.config.decoder.config.transformer_depths",
    "model.pretransform.config.decoder.config.conv_mapping",
    "model.pretransform.config.bottleneck.config.dim",
)
# Fields the weights do not determine, filled from the detected family and open to overrides:
# objective (base = rectified_flow / ARC = rf_denoiser), sample_size, SAME stride, attention chunking (SAME-S) or
# sliding window (SAME-L), decoder sinusoidal blocks, bottleneck/decoder noise flags, T5 max length, shift options.


class ConfigError(ValueError):
    """A model config (given or inferred) is unusable; the message names the field and the fix."""


def consistency_problems(raw: Mapping) -> list[str]:
    """Fields of one model_config.json that must agree with each other (each mismatch loads, then fails deep in a
    forward): the DiT's conditioning widths with `cond_dim`, its inpaint width with the latent size, the
    autoencoder's latent size, channels and downsampling ratio with its parts. Fields that are absent are skipped."""
    model = raw["model"]
    dit = get_path(model, "diffusion.config", {}) or {}
    diffusion = model["diffusion"]
    cond_dim = get_path(model, "conditioning.cond_dim")
    latent = model.get("io_channels")
    problems = []

    def differ(name: str, value, expected, why: str) -> None:
        if value is not None and expected is not None and value != expected:
            problems.append(f"{name}={value} but {why} is {expected}")

    if dit.get("embed_dim") and dit.get("num_heads") and dit["embed_dim"] % dit["num_heads"]:
        problems.append(f"diffusion.config.embed_dim={dit['embed_dim']} is not a multiple of num_heads={dit['num_heads']}")
    if diffusion.get("cross_attention_cond_ids"):
        differ("diffusion.config.cond_token_dim", dit.get("cond_token_dim"), cond_dim, "conditioning.cond_dim")
    if diffusion.get("global_cond_ids"):
        differ("diffusion.config.global_cond_dim", dit.get("global_cond_dim"), cond_dim, "conditioning.cond_dim")
    if diffusion.get("local_add_cond_ids") and dit.get("local_add_cond_dim"):
        differ("diffusion.config.local_add_cond_dim", dit["local_add_cond_dim"], None if latent is None else latent + 1,
               "the inpaint mask plus the latent size (io_channels + 1)")
    differ("diffusion.config.io_channels", dit.get("io_channels"), latent, "model.io_channels")
    ids = [e.get("id") for e in get_path(model, "conditioning.configs", []) or []]
    if "seconds_total" in (diffusion.get("cross_attention_cond_ids") or []) and "seconds_total" not in ids:
        problems.append("diffusion uses 'seconds_total' but conditioning.configs has no such conditioner")
    ae = get_path(model, "pretransform.config", {}) or {}
    enc = get_path(ae, "encoder.config", {}) or {}
    patch = get_path(ae, "pretransform.config.patch_size")
    differ("pretransform.config.latent_dim", ae.get("latent_dim"), latent, "model.io_channels")
    differ("pretransform encoder latent_dim", enc.get("latent_dim"), ae.get("latent_dim"), "pretransform.config.latent_dim")
    differ("pretransform bottleneck dim", get_path(ae, "bottleneck.config.dim"), ae.get("latent_dim"),
           "pretransform.config.latent_dim")
    if patch and get_path(ae, "pretransform.config.channels") and enc.get("in_channels"):
        differ("pretransform encoder in_channels", enc["in_channels"], patch * get_path(ae, "pretransform.config.channels"),
               "the patch size times the audio channels")
    if patch and enc.get("strides") and ae.get("downsampling_ratio"):
        differ("pretransform.config.downsampling_ratio", ae["downsampling_ratio"], patch * math.prod(enc["strides"]),
               "the patch size times the encoder strides")
    width = enc.get("channels")
    # a head is min(dim_heads, width) wide (the official SAME transformer block)
    if width and enc.get("dim_heads") and any(width * m % min(enc["dim_heads"], width * m)
                                              for m in enc.get("c_mults", [1])):
        problems.append(f"pretransform encoder dim_heads={enc['dim_heads']} does not divide its widths "
                        f"{[width * m for m in enc.get('c_mults', [1])]}")
    return problems


@dataclass(frozen=True)
class SA3Config:
    """A parsed SA3 model config. `raw` is the official nested dict (`model_type`, `sample_rate`, `sample_size`,
    `model.{io_channels, pretransform, conditioning, diffusion}`)."""

    raw: Mapping[str, Any]
    source: str = ""  # where it came from, for messages
    family: str = "custom"  # "small-music" | "small-sfx" | "medium" | "custom"
    inferred: bool = False

    def __post_init__(self):
        model = self.raw.get("model")
        if not isinstance(model, Mapping):
            raise ConfigError(f"{self.source or 'config'}: no 'model' section; is this an SA3 model_config.json?")
        for section in ("diffusion", "pretransform", "conditioning"):
            if section not in model:
                raise ConfigError(f"{self.source or 'config'}: 'model.{section}' is missing")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"{self.source}: model.diffusion.diffusion_objective={self.objective!r}; "
                              f"SA3 uses one of {OBJECTIVES}")
        try:
            problems = consistency_problems(self.raw)
        except (TypeError, AttributeError, KeyError, ValueError) as e:  # a field of the wrong type
            raise ConfigError(f"{self.source or 'config'}: a field has the wrong type ({type(e).__name__}: {e}); "
                              "check the model_config.json") from None
        if problems:
            raise ConfigError(f"{self.source or 'config'}: the sections disagree: {'; '.join(problems)}. The "
                              "official code could not build this model either; check the model_config.json")

    # --- sections (official kwargs dicts) ---
    @property
    def dit(self) -> dict:
        return dict(self.raw["model"]["diffusion"]["config"])

    @property
    def diffusion(self) -> Mapping[str, Any]:
        return self.raw["model"]["diffusion"]

    @property
    def pretransform(self) -> dict:
        return dict(self.raw["model"]["pretransform"])

    @property
    def conditioning(self) -> dict:
        return dict(self.raw["model"]["conditioning"])

    # --- scalars ---
    @property
    def sample_rate(self) -> int:
        return int(self.raw.get("sample_rate", 44100))

    @property
    def sample_size(self) -> int:
        """Native maximum length in audio samples (the model's training crop)."""
        return int(self.raw.get("sample_size", 0))

    @property
    def objective(self) -> str:
        return self.raw["model"]["diffusion"].get("diffusion_objective", "rectified_flow")

    @property
    def is_arc(self) -> bool:
        """Post-trained (ARC, `rf_denoiser`): ping-pong, 8 steps, CFG 1. Otherwise base: Euler, 50 steps, CFG 7."""
        return self.objective == "rf_denoiser"

    @property
    def latent_dim(self) -> int:
        return int(self.raw["model"]["io_channels"])

    @property
    def downsampling_ratio(self) -> int:
        return int(self.raw["model"]["pretransform"]["config"]["downsampling_ratio"])

    @property
    def latent_rate(self) -> float:
        """Latent frames per second (44100 / 4096 ≈ 10.77 for the real models)."""
        return self.sample_rate / self.downsampling_ratio

    @property
    def max_latents(self) -> int:
        return max(1, self.sample_size // self.downsampling_ratio) if self.sample_size else 0

    @property
    def latent_alignment(self) -> int:
        """Generated latent lengths are rounded up to multiples of this, as the official `generate` does:
        encoder `chunk_size` (default 32) // stride — 2 for every real pack (SAME-S attends in 2-latent chunks; the
        rule is applied to sliding-window SAME-L too, which does not need it)."""
        enc = self.raw["model"]["pretransform"]["config"]["encoder"]["config"]
        stride = int(enc.get("strides", [1])[0])
        return max(1, int(enc.get("chunk_size", 32)) // stride)

    @property
    def prompt_max_length(self) -> int:
        for entry in self.conditioning.get("configs", []):
            if entry.get("type") == "t5gemma":
                return int(entry["config"].get("max_length", 256))
        return 0

    def with_overrides(self, **overrides) -> SA3Config:
        """A copy with top-level or dotted-path fields replaced: `objective=`, `sample_size=`, or
        `{"model.diffusion.config.depth": 20}`-style keys given as `**{...}`."""
        raw = copy.deepcopy(dict(self.raw))
        for key, value in overrides.items():
            if value is None:
                continue
            path = _OVERRIDE_ALIASES.get(key, key)
            set_path(raw, path, value)
        return SA3Config(raw, source=self.source, family=self.family, inferred=self.inferred)

    def to_json(self) -> str:
        return json.dumps(self.raw, indent=1)


_OVERRIDE_ALIASES = {
    "objective": "model.diffusion.diffusion_objective",
    "sample_size": "sample_size",
    "prompt_max_length": "model.conditioning.configs.0.config.max_length",
}


def with_prompt_projections(config: SA3Config, shapes: Mapping[str, tuple[int, ...]]) -> SA3Config:
    """The config with each T5Gemma conditioner's `text_dim` taken from the checkpoint's `proj_out` weight [cond_dim,
    text_dim] when the config leaves it out (official configs do: the official conditioner builds `proj_out` when the
    T5 width differs from cond_dim, or when `project_out` asks for it). Without `proj_out` the config is unchanged
    (text_dim = cond_dim, the real packs). shapes: tensor name -> shape of the checkpoint."""
    overrides = {}
    for i, entry in enumerate(config.conditioning.get("configs", [])):
        if entry.get("type") != "t5gemma" or "text_dim" in (entry.get("config") or {}):
            continue
        weight = shapes.get(f"{CONDITIONER_PREFIX}{entry['id']}.proj_out.weight")
        if weight is not None:
            overrides[f"model.conditioning.configs.{i}.config.text_dim"] = int(weight[1])
            overrides[f"model.conditioning.configs.{i}.config.project_out"] = True
    return config.with_overrides(**overrides) if overrides else config


def get_path(d: Mapping, path: str, default=None):
    node: Any = d
    for part in path.split("."):
        if isinstance(node, list) and part.isdigit():
            node = node[int(part)] if int(part) < len(node) else default
        elif isinstance(node, Mapping) and part in node:
            node = node[part]
        else:
            return default
    return node


def set_path(d: dict, path: str, value) -> None:
    parts = path.split(".")
    node: Any = d
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    if isinstance(node, list):
        node[int(parts[-1])] = value
    else:
        node[parts[-1]] = value


def read_config(source: str | Path | Mapping) -> SA3Config:
    """Parse an official `model_config.json` (a file, a folder holding one, or an already-loaded dict)."""
    if isinstance(source, Mapping):
        return SA3Config(copy.deepcopy(dict(source)), source="<dict>", family=detect_family_from_config(source))
    path = Path(source)
    if path.is_dir():
        path = path / "model_config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found; an SA3 folder holds model_config.json beside model.safetensors") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    return SA3Config(raw, source=str(path), family=detect_family_from_config(raw))


def family_defaults(family: str) -> dict:
    """The real pack's published config for a family (`small-music`, `small-sfx`, `medium`)."""
    path = CONFIG_DIR / f"{family}.json"
    if not path.exists():
        raise ConfigError(f"no defaults for model family {family!r}; known: {sorted(p.stem for p in CONFIG_DIR.glob('*.json'))}")
    return json.loads(path.read_text())


def detect_family_from_config(raw: Mapping) -> str:
    dit = get_path(raw, "model.diffusion.config", {}) or {}
    if dit.get("embed_dim") == 1536 and dit.get("depth") == 24:
        return "medium"
    if dit.get("embed_dim") == 1024 and dit.get("depth") == 20:
        repo = get_path(raw, "model.conditioning.configs.0.config.repo_id", "") or ""
        return "small-sfx" if "sfx" in repo else "small-music"
    return "custom"


# ----------------------------------------------------------------------------------------------------------------
# Inference from a bare state dict
# ----------------------------------------------------------------------------------------------------------------

def _count_indexed(shapes: Mapping[str, tuple], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in shapes if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def _require(shapes: Mapping[str, tuple], key: str, what: str) -> tuple:
    if key not in shapes:
        raise ConfigError(f"cannot infer the {what}: tensor {key!r} is missing from the checkpoint; "
                          "is this a full SA3 checkpoint? Pass a model_config.json instead.")
    return tuple(shapes[key])


def infer_dit_config(shapes: Mapping[str, tuple], prefix: str = DIT_PREFIX) -> dict:
    """DiT kwargs from tensor shapes (keys under `prefix`)."""
    embed_dim, io_channels = _require(shapes, prefix + "transformer.project_in.weight", "DiT width")
    depth = _count_indexed(shapes, prefix + "transformer.layers.")
    block = prefix + "transformer.layers.0."
    head_dim = _require(shapes, block + "self_attn.q_norm.gamma", "DiT head size")[0]
    qkv_rows = _require(shapes, block + "self_attn.to_qkv.weight", "DiT attention")[0]
    if qkv_rows not in (3 * embed_dim, 5 * embed_dim):
        raise ConfigError(f"{block}self_attn.to_qkv.weight has {qkv_rows} rows; expected 3x or 5x embed_dim {embed_dim}")
    ff_inner = _require(shapes, block + "ff.ff.2.weight", "DiT feed-forward")[1]
    memory = shapes.get(prefix + "transformer.memory_tokens", (0,))[0]
    mult = ff_inner / embed_dim
    return {
        "io_channels": io_channels,
        "patch_size": 1,
        "embed_dim": embed_dim,
        "depth": depth,
        "num_heads": embed_dim // head_dim,
        "cond_token_dim": _require(shapes, prefix + "to_cond_embed.0.weight", "text width")[1],
        "global_cond_dim": _require(shapes, prefix + "to_global_embed.0.weight", "global width")[1],
        "local_add_cond_dim": _require(shapes, block + "to_local_embed.0.weight", "inpaint width")[1],
        "num_memory_tokens": memory,
        "global_cond_type": "adaLN",
        "timestep_features_type": "expo",
        "timestep_features_dim": _require(shapes, prefix + "to_timestep_embed.0.weight", "timestep features")[1],
        "norm_type": "rms_norm",
        "attn_kwargs": {"qk_norm": "rms", "differential": qkv_rows == 5 * embed_dim},
        "ff_kwargs": {"mult": int(mult) if float(mult).is_integer() else mult},
    }


def infer_autoencoder_config(shapes: Mapping[str, tuple], family: Mapping | None, prefix: str = AUTOENCODER_PREFIX,
                             io_channels: int = 2, stride: int | None = None) -> dict:
    """`model.pretransform` section from SAME tensor shapes. The stride, chunking/sliding window, sinusoidal blocks
    and noise flags are not in the weights: they come from `family` (a real pack's config) when given."""
    enc, dec = prefix + "encoder.layers.", prefix + "decoder.layers."
    dim, in_channels, _ = _require(shapes, enc + "0.mapping.weight_v", "SAME encoder width")
    latent_dim = _require(shapes, enc + "2.weight", "latent size")[0]
    dec_mapping_index = _count_indexed(shapes, dec) - 1
    out_channels, _, dec_kernel = _require(shapes, f"{dec}{dec_mapping_index}.mapping.weight_v", "SAME decoder output")
    head_dim = _require(shapes, enc + "0.transformers.0.self_attn.q_norm.gamma", "SAME head size")[0]
    qkv_rows = _require(shapes, enc + "0.transformers.0.self_attn.to_qkv.weight", "SAME attention")[0]
    enc_depth = _count_indexed(shapes, enc + "0.transformers.")
    dec_depth = _count_indexed(shapes, f"{dec}{dec_mapping_index}.transformers.")
    dyt = (enc + "0.transformers.0.pre_norm.alpha") in shapes
    patch_size = in_channels // io_channels

    fam = get_path(family, "model.pretransform.config", {}) if family else {}
    fam_enc = dict(get_path(fam, "encoder.config", {}) or {})
    fam_dec = dict(get_path(fam, "decoder.config", {}) or {})
    stride = int(stride or (fam_enc.get("strides") or [16])[0])
    sliding = dec_kernel == 1  # SAME-L: 1x1 output mapping and sliding-window attention; SAME-S: k=3, chunked
    attention = {"sliding_window": [1, 1]} if sliding else {"chunk_size": 2 * stride, "chunk_midpoint_shift": True}
    common = {"channels": dim, "c_mults": [1], "strides": [stride], "latent_dim": latent_dim,
              "differential": qkv_rows == 5 * dim, "dyt": dyt, "dim_heads": head_dim, "variable_stride": True,
              **attention}
    encoder = {**common, "in_channels": in_channels, "transformer_depths": [enc_depth], "conv_mapping": False,
               "mask_noise": fam_enc.get("mask_noise", 0.0)}
    decoder = {**common, "out_channels": out_channels, "transformer_depths": [dec_depth], "conv_mapping": dec_kernel == 3,
               "sinusoidal_blocks": fam_dec.get("sinusoidal_blocks", [0 if not sliding else max(0, dec_depth - 4)]),
               "mask_noise": fam_dec.get("mask_noise", 0.0)}
    bottleneck = {"dim": latent_dim, "auto_scale": True,
                  "noise_regularize": get_path(fam, "bottleneck.config.noise_regularize", False)}
    return {
        "type": "autoencoder",
        "chunked": True,
        "iterate_batch": False,
        "config": {
            "encoder": {"type": "same", "config": encoder},
            "decoder": {"type": "same", "config": decoder},
            "bottleneck": {"type": "softnorm", "config": bottleneck},
            "pretransform": {"type": "patched", "config": {"channels": io_channels, "patch_size": patch_size}},
            "latent_dim": latent_dim,
            "downsampling_ratio": patch_size * stride,
            "io_channels": io_channels,
        },
    }


def detect_family(dit: Mapping, autoencoder_dim: int) -> str:
    """Which real pack a checkpoint's shapes belong to ("custom" when none fits)."""
    if dit["embed_dim"] == 1536 and dit["depth"] == 24 and dit["attn_kwargs"]["differential"]:
        return "medium"
    if dit["embed_dim"] == 1024 and dit["depth"] == 20:
        return "small-music"  # small-music and small-sfx share every shape; they differ only by weights
    return "custom"


def infer_config(shapes: Mapping[str, tuple], *, objective: str | None = None, family: str | None = None,
                 source: str = "", same_stride: int | None = None, **overrides) -> SA3Config:
    """Build an `SA3Config` from `{key: shape}` of a full SA3 checkpoint (DiT + conditioner + SAME).

    `objective` ("rectified_flow" for base, "rf_denoiser" for ARC) is not in the weights; by default it is guessed
    from `source` (a file name containing "base" means base) and otherwise ARC, as ComfyUI names
    `stable_audio_3_medium.safetensors` (ARC) and `stable_audio_3_medium_base.safetensors` (base).
    `family` forces the defaults used for the remaining fields; `same_stride` is the SAME resampling stride (latent
    frames per patch token group; 16 in every real pack) for non-standard models; other `overrides` are dotted
    config paths (or `sample_size=`)."""
    dit = infer_dit_config(shapes)
    ae_dim = _require(shapes, AUTOENCODER_PREFIX + "encoder.layers.0.mapping.weight_v", "SAME encoder width")[0]
    family = family or detect_family(dit, ae_dim)
    fam = family_defaults(family) if family != "custom" else None
    cond_dim = _require(shapes, CONDITIONER_PREFIX + "seconds_total.embedder.embedding.1.weight", "conditioning width")[0]
    pretransform = infer_autoencoder_config(shapes, fam, stride=same_stride)
    if objective is None:
        objective = "rectified_flow" if "base" in Path(source).name.lower() else "rf_denoiser"
    if objective not in OBJECTIVES:
        raise ConfigError(f"objective={objective!r}; use 'rectified_flow' (base) or 'rf_denoiser' (ARC)")

    if fam is not None:
        raw = copy.deepcopy(fam)
        raw["model"]["diffusion"]["config"].update(dit)
        raw["model"]["pretransform"] = pretransform
        raw["model"]["conditioning"]["cond_dim"] = cond_dim
    else:
        sample_latents = 4096  # the medium models' native maximum; small models use 1300
        raw = {
            "model_type": "diffusion_cond",
            "sample_rate": 44100,
            "sample_size": sample_latents * pretransform["config"]["downsampling_ratio"],
            "model": {
                "conditioning": {"cond_dim": cond_dim, "configs": [
                    {"id": "prompt", "type": "t5gemma", "config": {"max_length": 256, "padding_mode": "learned",
                                                                   "subfolder": "t5gemma-b-b-ul2"}},
                    {"id": "seconds_total", "type": "number",
                     "config": {"min_val": 0, "max_val": 384, "fourier_features_type": "expo"}}]},
                "diffusion": {
                    "cross_attention_cond_ids": ["prompt", "seconds_total"],
                    "global_cond_ids": ["seconds_total"],
                    "local_add_cond_ids": ["inpaint_mask", "inpaint_masked_input"],
                    "distribution_shift_options": {"min_length": 256, "max_length": 4096},
                    "mask_padding_attention": True,
                    "use_effective_length_for_schedule": True,
                    "config": dit,
                },
            },
        }
        raw["model"]["pretransform"] = pretransform
    raw["model"]["io_channels"] = dit["io_channels"]
    raw["model"]["diffusion"]["diffusion_objective"] = objective
    for path, value in overrides.items():
        set_path(raw, _OVERRIDE_ALIASES.get(path, path), value)
    return SA3Config(raw, source=source, family=family, inferred=True)
