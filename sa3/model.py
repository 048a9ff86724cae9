"""The public model object: `load_model(source, dtype, device)` -> `SA3Model`.

`SA3Model.modules` mirrors the official `ConditionedDiffusionModelWrapper` key layout, so its `state_dict()` keys are
the checkpoint keys: `model.model.*` (DiT), `conditioner.conditioners.*`, `pretransform.model.*` (SAME).
The T5Gemma text encoder is held by the prompt conditioner but is not part of that state dict (as in the official
code); it loads from the pack's `t5gemma-b-b-ul2/` folder or ComfyUI's single `t5gemma_b_b_ul2.safetensors`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..adapters import notices
from .autoencoder import SAMEAutoencoder
from .conditioners import MultiConditioner
from .config import (
    AUTOENCODER_PREFIX,
    DIT_PREFIX,
    ConfigError,
    SA3Config,
    infer_config,
    read_config,
    with_prompt_projections,
)
from .dit import DiTWrapper
from .loading import (
    CheckpointError,
    SafetensorsFile,
    check_unexpected,
    load_into_meta_module,
    looks_like_adapter,
    resolve_dtype,
)
from .packs import TEXT_ENCODER_SUBFOLDER, PackError, find_text_encoder, get_pack, resolve_pack
from .residency import Residency
from .text import text_encoder_dtype


class AutoencoderPretransform(nn.Module):
    """Holds the SAME autoencoder as `.model` (official key prefix `pretransform.model.`)."""

    def __init__(self, autoencoder: nn.Module):
        super().__init__()
        self.model = autoencoder


class SA3Modules(nn.Module):
    """The module tree of one SA3 checkpoint: `.model` (DiTWrapper), `.conditioner`, `.pretransform`."""

    def __init__(self, config: SA3Config):
        super().__init__()
        self.model = DiTWrapper(**config.dit)
        self.conditioner = MultiConditioner(config.conditioning)
        self.pretransform = AutoencoderPretransform(SAMEAutoencoder.from_config(config.pretransform,
                                                                                config.sample_rate))


@dataclass
class Conditioning:
    """Text + duration conditioning for the DiT.

    cross_attn_cond: [B, L+1, cond_dim] = [prompt tokens ‖ seconds token]; cross_attn_mask: [B, L+1] bool
    (False at padded prompt positions; the DiT ignores it for the positive branch and zeroes those positions for a
    negative branch, as the official code does); global_cond: [B, cond_dim] (seconds embedding);
    seconds_total: [B] float seconds."""

    cross_attn_cond: Tensor
    cross_attn_mask: Tensor
    global_cond: Tensor
    seconds_total: Tensor

    def to(self, device=None, dtype=None) -> Conditioning:
        def move(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        return Conditioning(move(self.cross_attn_cond), self.cross_attn_mask.to(device), move(self.global_cond),
                            self.seconds_total.to(device))

    def __len__(self) -> int:
        return self.cross_attn_cond.shape[0]


def _keep_fp32(key: str, dtype: torch.dtype) -> bool:
    """RoPE frequencies stay fp32 always. The SAME autoencoder stays fp32 when fp16 is asked for: its differential
    attention cancels catastrophically in fp16 (reported by the official MLX port's authors)."""
    return key.endswith("inv_freq") or (dtype == torch.float16 and key.startswith(AUTOENCODER_PREFIX))


def loaded_dtype(key: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype a checkpoint tensor is loaded in when the model is asked for `dtype`."""
    return torch.float32 if _keep_fp32(key, dtype) else dtype


class SA3Model:
    """A loaded SA3 checkpoint (DiT + conditioners + SAME), plus its text encoder when one was found.

    Attributes: `config` (SA3Config), `modules` (SA3Modules), `dit` (the DiffusionTransformer), `conditioner`,
    `autoencoder`, `dtype`, `device`, `source` (where it was loaded from), `pack` and `variant` when known.
    Thread-safety: every method here is read-only on the weights; adapters are applied per call (see adapters/),
    so one loaded model can be shared by several nodes and a training run. Whoever computes with it holds
    `residency.in_use()`, which brings offloaded weights back and keeps them on the device meanwhile."""

    def __init__(self, config: SA3Config, modules: SA3Modules, dtype: torch.dtype, device: torch.device,
                 source: str = "", pack: str | None = None, variant: str | None = None):
        self.config, self.modules, self.dtype, self.device = config, modules, dtype, torch.device(device)
        self.source, self.pack, self.variant = source, pack, variant
        self.streams_dit = False  # DiT blocks lent from host memory per forward (`sa3.sibling`)
        self.shared_parts: tuple[str, ...] = ()  # parts shared with the model it was loaded beside
        self.residency = Residency(self)  # users, and whether the weights are offloaded (`sa3.residency`)

    # --- parts ---
    @property
    def dit(self) -> nn.Module:
        return self.modules.model.model

    @property
    def conditioner(self) -> MultiConditioner:
        return self.modules.conditioner

    @property
    def autoencoder(self) -> SAMEAutoencoder:
        return self.modules.pretransform.model

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    @property
    def downsampling_ratio(self) -> int:
        return self.config.downsampling_ratio

    @property
    def is_arc(self) -> bool:
        return self.config.is_arc

    def __repr__(self) -> str:
        kind = "ARC" if self.is_arc else "base"
        return f"SA3Model({self.config.family}, {kind}, {self.dtype}, {self.device}, from {self.source})"

    # --- audio ---
    @torch.no_grad()
    def encode_audio(self, waveform: Tensor, sample_rate: int, chunked: bool | None = None,
                     on_chunk: Callable[[int, int, Tensor], None] | None = None,
                     finished: dict[int, Tensor] | None = None) -> Tensor:
        """waveform: [B, C, N] or [C, N] float in [-1, 1] at `sample_rate` Hz (any rate, mono/stereo/multichannel)
        -> latents [B, latent_dim, T] at sample_rate / downsampling_ratio Hz (44100 / 4096 ≈ 10.77 Hz).
        on_chunk(done, total, kept) after each chunk of a chunked encode, and finished, its chunks from a stopped
        encode of the same audio: see `SAMEAutoencoder.encode_chunked`."""
        from .autoencoder import prepare_audio

        if waveform.dim() == 2:
            waveform = waveform[None]
        ae = self.autoencoder
        ae_dtype = next(ae.parameters()).dtype
        # padded to whole latents: a partial last frame is encoded, never dropped
        audio = prepare_audio(waveform.float(), sample_rate, self.sample_rate, ae.io_channels, self.downsampling_ratio)
        audio = audio.to(self.device, ae_dtype)
        chunked = self.config.pretransform.get("chunked", False) if chunked is None else chunked
        return ae.encode(audio, chunked=bool(chunked), on_chunk=on_chunk, finished=finished).float()

    @torch.no_grad()
    def decode_latents(self, latents: Tensor, chunked: bool | None = None, chunk_size: int = 128,
                       overlap: int = 32, generator: torch.Generator | None = None) -> Tensor:
        """latents: [B, latent_dim, T] -> waveform [B, 2, T * downsampling_ratio] float at `sample_rate` Hz.
        `chunked=None` follows the config (the real packs decode in 128-latent chunks with 32 overlap, which bounds
        memory for long outputs). The real SAMEs add tiny noise when decoding (`noise_regularize`, `mask_noise`);
        `generator` makes it reproducible."""
        ae = self.autoencoder
        ae_dtype = next(ae.parameters()).dtype
        latents = latents.to(self.device, ae_dtype)
        chunked = self.config.pretransform.get("chunked", False) if chunked is None else chunked
        audio = ae.decode(latents, chunked=bool(chunked), chunk_size=chunk_size, overlap=overlap, generator=generator)
        return audio.float()

    # --- text ---
    @torch.no_grad()
    def encode_text(self, prompts: str | Sequence[str], seconds_total: float | Sequence[float]) -> Conditioning:
        """prompts: B strings; seconds_total: B durations in seconds (clamped to 0..384 by the conditioner)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if isinstance(seconds_total, int | float):
            seconds_total = [float(seconds_total)] * len(prompts)
        if len(seconds_total) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(seconds_total)} durations")
        cond = self.conditioner
        prompt_emb, prompt_mask = cond.conditioners["prompt"](list(prompts), self.device)
        seconds = torch.tensor([float(s) for s in seconds_total], device=self.device)
        sec_emb, sec_mask = cond.conditioners["seconds_total"](seconds, self.device)
        cross = torch.cat([prompt_emb.to(self.dtype), sec_emb.to(self.dtype)], dim=1)
        mask = torch.cat([prompt_mask.bool(), sec_mask.bool()], dim=1)
        return Conditioning(cross, mask, sec_emb[:, 0].to(self.dtype), seconds)

    @property
    def text_encoder_parameters(self) -> int | None:
        """Parameters of the loaded T5Gemma encoder (it is not in the checkpoint), None when none is loaded."""
        encoder = getattr(self.conditioner.conditioners["prompt"], "text_encoder", None)
        return None if encoder is None else sum(p.numel() for p in encoder.parameters())

    def offload_text_encoder(self) -> None:
        """Move the T5Gemma encoder to CPU (it is needed once per prompt, the DiT at every step)."""
        self.conditioner.conditioners["prompt"].offload_text_encoder()

    # --- generation ---
    @property
    def default_steps(self) -> int:
        from .generate import sampling_defaults

        return sampling_defaults(self)[1]

    def generate(self, prompt, **kwargs):
        """Text-to-audio / audio-to-audio / inpainting; see `sa3.generate.generate` for every option.
        Returns (waveform [B, 2, N] float in [-1, 1], sample_rate)."""
        from .generate import generate

        return generate(self, prompt, **kwargs)

    # --- DiT ---
    def velocity(self, x: Tensor, t: Tensor | float, conditioning: Conditioning, local_cond: Tensor | None = None,
                 padding_mask: Tensor | None = None, cfg_scale: float = 1.0, negative: Conditioning | None = None,
                 apg_scale: float = 1.0, cfg_interval: tuple[float, float] = (0.0, 1.0), **dit_kwargs) -> Tensor:
        """One DiT evaluation (CFG/APG included when cfg_scale != 1).

        x: [B, latent_dim, T] noisy latents; t: [B] or scalar in [0, 1] (1 = noise), kept fp32;
        local_cond: [B, latent_dim + 1, T] = [inpaint mask ‖ masked latents], zeros for text-to-audio (the
        official model needs zeros, not None: its local MLP has biases); padding_mask: [B, T] bool, True = valid.
        Returns the velocity (noise - data) [B, latent_dim, T] in fp32."""
        b, _, n = x.shape
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device).reshape(-1).expand(b)
        if local_cond is None:
            local_cond = torch.zeros(b, self.latent_dim + 1, n, device=x.device, dtype=self.dtype)
        neg_cond = neg_mask = None
        if negative is not None:
            neg_cond, neg_mask = negative.cross_attn_cond.to(self.dtype), negative.cross_attn_mask
        v = self.dit(
            x.to(self.dtype), t, conditioning.cross_attn_cond.to(self.dtype), conditioning.global_cond.to(self.dtype),
            local_cond.to(self.dtype), padding_mask=padding_mask, cfg_scale=cfg_scale,
            negative_cross_attn_cond=neg_cond, negative_cross_attn_mask=neg_mask, apg_scale=apg_scale,
            cfg_interval=cfg_interval, **dit_kwargs,
        )
        return v.float()


# ------------------------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------------------------

def build_modules(config: SA3Config) -> SA3Modules:
    """The module tree on the meta device (no memory, no init cost); `load_weights` fills it."""
    with torch.device("meta"):
        return SA3Modules(config)


def load_weights(modules: SA3Modules, file: SafetensorsFile, dtype: torch.dtype, device,
                 shared: frozenset[str] = frozenset()) -> None:
    """Strictly fill `modules` from a full SA3 checkpoint. RoPE `inv_freq` buffers may be absent (re-saved files
    drop them); they are recomputed then. Any other missing or extra tensor is an error naming it.
    shared: keys already filled with another model's equal tensors (`sa3.sibling`); the file has them, unread."""
    keys = set(file.keys())
    expected = {k: v for k, v in modules.state_dict(keep_vars=True).items() if k not in shared}
    computed = frozenset(k for k in expected if k.endswith("inv_freq") and k not in keys)
    for name in computed:
        owner = modules.get_submodule(name.rsplit(".", 1)[0])
        owner.inv_freq = owner.compute_inv_freq(device="cpu")

    def dtype_for(key: str):
        return loaded_dtype(key, dtype)

    key_map = {k: k for k in expected if k not in computed}
    load_into_meta_module(modules, file, key_map, dtype_for, device, what="SA3 model", computed=computed | shared)
    allowed = {"text_encoders.", "cond_stage_model."}  # ComfyUI files may bundle other parts we load separately
    check_unexpected(file, set(key_map.values()) | shared, lambda k: any(k.startswith(p) for p in allowed),
                     what="SA3 model")
    if str(device) != "cpu":
        modules.to(device)


def _find_text_encoder_for(folder: Path, config: SA3Config) -> Path | None:
    """T5Gemma location for a Hub-layout folder: its own subfolder, a sibling variant's, or the config's
    `repo_id`/`subfolder` read as a folder relative to the model folder's parent (how the fixtures and a local
    mirror of several repos are laid out)."""
    found = find_text_encoder(folder)
    if found:
        return found
    for entry in config.conditioning.get("configs", []):
        if entry.get("type") == "t5gemma":
            c = entry["config"]
            sub = c.get("subfolder", TEXT_ENCODER_SUBFOLDER)
            for base in (folder / sub, folder.parent / str(c.get("repo_id", "")) / sub):
                if (base / "config.json").is_file():
                    return base
    return None


@dataclass
class CheckpointLocation:
    """Where a model's parts are: `path` (the folder or checkpoint file the source names), `file` (its weights,
    opened), its `config`, its text encoder folder or file (None when none was found), its pack (when a pack name
    was given) and variant."""
    path: Path
    file: SafetensorsFile
    config: SA3Config
    text_encoder: Path | None
    pack: str | None
    variant: str | None


def sidecar_config(path: Path) -> SA3Config | None:
    """The model_config.json saved beside a single file as `<name>.json`, or None (with a warning) when that JSON is
    something else: other UIs keep their own per-checkpoint notes under the same name."""
    try:
        return read_config(path)
    except (ConfigError, OSError, ValueError) as e:
        notices.warn(f"{path.name} beside the checkpoint is not its model_config.json ({e}); ignored", stacklevel=3)
        return None


def guessed_fields_message(weights: Path, cfg: SA3Config, objective: str | None, stride: int | None,
                           given: set[str]) -> str | None:
    """What loading a single file of a custom (not a real pack's) architecture had to guess, and how to say it;
    None when the caller gave it all. given: the config fields the caller set (`load_model`'s overrides)."""
    enc = cfg.pretransform["config"]["encoder"]["config"]
    candidates = [
        (objective is None, f"{'base' if cfg.objective == 'rectified_flow' else 'ARC'} (from the file name)"),
        (stride is None, f"SAME stride {enc['strides'][0]} (downsampling ratio {cfg.downsampling_ratio})"),
        ("sample_rate" not in given, f"sample rate {cfg.sample_rate} Hz"),
        ("sample_size" not in given, f"maximum length {cfg.sample_size / cfg.sample_rate:.0f} s"),
        ("prompt_max_length" not in given, f"prompt length {cfg.prompt_max_length} tokens"),
    ]
    guesses = [text for guessed, text in candidates if guessed]
    if not guesses:
        return None
    return (f"{weights.name} is not one of the SA3 packs' architectures, and its weights do not hold: "
            f"{', '.join(guesses)}. These were guessed; if any is wrong the audio will be, so put the model's "
            f"model_config.json beside it as {weights.with_suffix('.json').name} (or load its folder).")


def locate_checkpoint(source: str | Path, *, variant: str | None = None, text_encoder: str | Path | None = None,
                      config: str | Path | dict | None = None, objective: str | None = None,
                      models_dir: str | Path | None = None, download: bool = False,
                      **config_overrides) -> CheckpointLocation:
    """Resolve a model source (see `load_model`) to its files and config without loading any weight."""
    pack = None
    path = Path(source)
    if not path.exists() and isinstance(source, str) and not any(c in source for c in "/\\"):
        try:
            pack = get_pack(source).name
        except PackError:
            raise CheckpointError(f"{source!r} is neither an existing file or folder nor a pack name "
                                  f"(sa3-medium, sa3-small-music, sa3-small-sfx)") from None
        variant = variant or "base"
        path = resolve_pack(pack, variant, models_dir, download=download)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")

    if path.is_dir():
        weights = path / "model.safetensors"
        if not weights.is_file():
            raise CheckpointError(f"{path}: no model.safetensors in this folder")
        cfg = read_config(config if config is not None else path)
        te = Path(text_encoder) if text_encoder else _find_text_encoder_for(path, cfg)
    else:
        weights = path
        cfg = None
        te = Path(text_encoder) if text_encoder else None
    guessed = False
    file = SafetensorsFile(weights)
    if looks_like_adapter(file.keys(), file.metadata):
        raise CheckpointError(f"{weights.name} is a LoRA/adapter file, not a model. Load a model (pack, folder or "
                              "checkpoint) and apply this file with SA3 Load LoRA / loras=[...].")
    if cfg is None:
        sidecar = weights.with_suffix(".json")  # a single file's own model_config.json, for what weights cannot say
        if config is None and sidecar.is_file():
            cfg = sidecar_config(sidecar)
        if config is not None:
            cfg = read_config(config)
        elif cfg is None:
            if not any(k.startswith(DIT_PREFIX) for k in file.keys()):
                raise CheckpointError(f"{weights.name} has no '{DIT_PREFIX}*' tensors: it is not a full SA3 checkpoint "
                                      "(a SAME-only autoencoder file loads with load_autoencoder()).")
            stride = config_overrides.pop("same_stride", None)
            try:
                cfg = infer_config(file.shapes, objective=objective, source=str(weights), same_stride=stride)
            except ConfigError as e:
                raise ConfigError(f"{weights.name}: {e} (or put that model's model_config.json beside it as "
                                  f"{sidecar.name})") from None
            guessed = cfg.family == "custom"
    config_overrides.pop("same_stride", None)
    if objective is not None or config_overrides:
        cfg = cfg.with_overrides(objective=objective, **config_overrides)
    if guessed:
        message = guessed_fields_message(weights, cfg, objective, stride, set(config_overrides))
        if message:
            notices.warn(message, stacklevel=2)
    cfg = with_prompt_projections(cfg, file.shapes)
    if cfg.objective not in ("rectified_flow", "rf_denoiser"):
        raise ConfigError(f"objective={cfg.objective!r}")
    return CheckpointLocation(path, file, cfg, te, pack, variant if pack else ("arc" if cfg.is_arc else "base"))


def load_model(source: str | Path, dtype: str | torch.dtype = "fp32", device: str | torch.device = "cpu", *,
               variant: str | None = None, text_encoder: str | Path | None = None, config: str | Path | dict | None = None,
               objective: str | None = None, models_dir: str | Path | None = None, download: bool = False,
               **config_overrides) -> SA3Model:
    """Load an SA3 model.

    source: a folder in the official Hub layout (model_config.json + model.safetensors [+ t5gemma-b-b-ul2/]);
      a pack name (`sa3-medium`, `sa3-small-music`, `sa3-small-sfx`, with `variant` "base" or "arc"; resolved in
      `models_dir`, downloaded when `download=True`); or a single ComfyUI checkpoint `.safetensors` file, whose
      config is inferred from its tensors (`objective`, `config_overrides` and `config=` fill what the weights do
      not say) — give its text encoder with `text_encoder=` (ComfyUI's `t5gemma_b_b_ul2.safetensors` or a folder).
    dtype: "fp32" | "bf16" | "fp16" for the DiT and conditioners (the SAME autoencoder and T5Gemma stay fp32 under fp16).
    Peak RAM while loading is about the model's size in `dtype` plus its largest tensor.
    A second model of the same pack (its ARC variant beside the base) loads with `sa3.sibling.load_sibling`,
    which shares the parts both have in common."""
    torch_dtype = resolve_dtype(dtype)
    device = torch.device(device)
    loc = locate_checkpoint(source, variant=variant, text_encoder=text_encoder, config=config, objective=objective,
                            models_dir=models_dir, download=download, **config_overrides)
    modules = build_modules(loc.config)
    load_weights(modules, loc.file, torch_dtype, device)
    modules.eval().requires_grad_(False)
    model = SA3Model(loc.config, modules, torch_dtype, device, source=str(loc.path), pack=loc.pack,
                     variant=loc.variant)
    if loc.text_encoder is not None:
        model.conditioner.conditioners["prompt"].load_text_encoder(loc.text_encoder, dtype=text_encoder_dtype(torch_dtype),
                                                                   device=device)
    return model


def load_autoencoder(source: str | Path, config: str | Path | dict | None = None, dtype="fp32",
                     device="cpu") -> SAMEAutoencoder:
    """A SAME autoencoder alone: from a full SA3 checkpoint (keys `pretransform.model.*`) or a standalone SAME repo
    (bare `encoder.*`/`decoder.*`/`bottleneck.*`). `config` is the model_config.json (or folder); without one the
    autoencoder config is inferred from the weights with the real SAME-S/SAME-L defaults."""
    from .config import family_defaults, infer_autoencoder_config

    path = Path(source)
    weights = path / "model.safetensors" if path.is_dir() else path
    file = SafetensorsFile(weights)
    prefix = AUTOENCODER_PREFIX if any(k.startswith(AUTOENCODER_PREFIX) for k in file.keys()) else ""
    if config is None and path.is_dir() and (path / "model_config.json").exists():
        config = path
    sample_rate = 44100  # every SA3 model's; a model_config.json may say otherwise
    if config is not None:
        raw = read_config(config).raw
        pt = raw["model"]["pretransform"] if "model" in raw else raw
        sample_rate = int(raw.get("sample_rate", sample_rate))
    else:
        shapes = {prefix + k[len(prefix):]: s for k, s in file.shapes.items()}
        probe = infer_autoencoder_config(shapes, None, prefix=prefix)
        family = "medium" if probe["config"]["decoder"]["config"].get("sliding_window") else "small-music"
        pt = infer_autoencoder_config(shapes, family_defaults(family), prefix=prefix)
    torch_dtype = resolve_dtype(dtype)
    with torch.device("meta"):
        ae = SAMEAutoencoder.from_config(pt, sample_rate)
    key_map = {k: prefix + k for k in ae.state_dict()}
    load_into_meta_module(ae, file, key_map, lambda k: torch.float32 if k.endswith("inv_freq") else torch_dtype,
                          device, what="SAME autoencoder")
    check_unexpected(file, set(key_map.values()), lambda k: not k.startswith(prefix), what="SAME autoencoder")
    return ae.eval().requires_grad_(False)


__all__ = ["SA3Model", "Conditioning", "load_model", "load_autoencoder"]
