"""`generate`: text-to-audio, audio-to-audio, inpainting and continuation, with LoRA stacks, base and ARC models.

The flow mirrors the official `StableAudioModel.generate` so a seed gives the official result on CPU:
1. length: requested duration + 6 s headroom, rounded up to whole latents and to the autoencoder's latent alignment,
   capped at the model's native maximum (`sample_size` of its config: 120 s small, 380 s medium — NOT the official
   `generate()` default cap of 120 s for every model);
2. noise: `torch.randn([B, C, T])` from a CPU generator seeded with `seed` — the first draw, before anything else;
3. conditioning (prompt + seconds; negative prompt for CFG), local inpaint conditioning (mask ‖ masked latents,
   zeros for text-to-audio), padding mask (valid = the requested duration + 6 s);
4. schedule (the config's sampling shift, else LogSNR rate 0; first step re-anchored to sigma_max, an official quirk
   kept for parity) and sampler (base: Euler; ARC: ping-pong, one fresh noise draw per step);
5. decode (chunked for long outputs), zero the audio past the valid region, clamp to [-1, 1], trim to the duration.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from ..adapters import notices
from . import samplers as samplers_mod
from . import schedules

DEFAULTS = samplers_mod.DEFAULTS  # per model kind: sampler, steps, CFG
PADDING_SECONDS = 6.0


def sampling_defaults(model) -> tuple[str, int, float]:
    """(sampler, steps, CFG) a model samples with when the caller leaves them unset: the one rule for generation,
    training demos and progress bars."""
    return DEFAULTS["arc" if model.is_arc else "base"]


def parse_regions(text: str) -> list[tuple[float, float]]:
    """'4.0-8.0, 16-20' -> [(4.0, 8.0), (16.0, 20.0)] (seconds; each start < end).

    Times may be seconds ('4.5', '4.5s') or minutes:seconds ('1:04.5', and h:mm:ss); '-' or '–' between start and
    end. Regions are separated by ',' or ';'; with ';' a comma inside a time is a decimal comma ('1,5-2,5; 4-6')."""
    decimal_comma = ";" in text
    parts = [p.strip() for p in (text.split(";") if decimal_comma else text.split(",")) if p.strip()]
    regions = []
    for part in parts:
        bits = part.replace("–", "-").split("-")
        try:
            if len(bits) != 2:
                raise ValueError
            start, end = (_seconds(b.replace(",", ".") if decimal_comma else b) for b in bits)
        except ValueError:
            hint = ("; a decimal comma? separate regions with ';' then, e.g. '1,5-2,5; 4-6'"
                    if not decimal_comma and "-" not in part and part.replace(" ", "").isdigit() else "")
            raise ValueError(f"region {part!r} is not 'start-end' in seconds or m:ss (e.g. '4.0-8.0, 1:16-1:20')"
                             f"{hint}") from None
        if not 0 <= start < end < float("inf"):
            raise ValueError(f"region {part!r}: need 0 <= start < end, finite, in seconds")
        regions.append((start, end))
    return regions


def _seconds(text: str) -> float:
    """'4.5' / '4.5s' / '1:04.5' / '1:02:03' -> seconds; ValueError otherwise."""
    text = text.strip().lower().removesuffix("s").strip()
    fields = text.split(":")
    if len(fields) > 3 or any(not f.strip() for f in fields):
        raise ValueError(text)
    seconds = 0.0
    for field in fields:
        seconds = seconds * 60 + float(field)
    if len(fields) > 1 and not 0 <= float(fields[-1]) < 60:
        raise ValueError(text)
    return seconds


def continuation_region(source, duration: float) -> tuple[float, float]:
    """The inpainting region that continues `source` (any form `as_audio` takes) from its end up to `duration` s."""
    seconds = source_seconds(source)
    if duration <= seconds:
        raise ValueError(f"continuation needs duration > the source length ({seconds:.2f} s)")
    return seconds, float(duration)


def source_seconds(source, name: str = "source audio") -> float:
    """Length in seconds of a source clip in any form `as_audio` takes."""
    wav, rate = as_audio(source, name)
    return wav.shape[-1] / rate


TEXT_TO_AUDIO_SECONDS = 10.0  # the duration when none is given and there is no source to take it from


def max_output_seconds(model) -> float:
    """The longest output the model makes in one piece (its config's sample_size), in seconds; inf when unset."""
    cfg = model.config
    return cfg.sample_size / cfg.sample_rate if cfg.sample_size else float("inf")


def output_seconds(duration: float | None, source=None, continuation: bool = False,
                   max_seconds: float = float("inf")) -> float:
    """Seconds to generate: `duration` when given (None or 0: not given); else the source's own length, at most
    `max_seconds` (audio-to-audio, repairing regions), or TEXT_TO_AUDIO_SECONDS without a source. Continuing a clip
    needs it given: it is the length to extend to."""
    if duration:
        return float(duration)
    if continuation:
        raise ValueError(f"continuing a clip needs the length to extend to: give a duration longer than the "
                         f"source's {_up_to_ms(source_seconds(source))} s")
    if source is None:
        return TEXT_TO_AUDIO_SECONDS
    wav, rate = as_audio(source, "source audio")
    return min((wav.shape[-1] + 0.5) / rate, max_seconds)  # half a sample over: int(seconds · rate) is every sample


def _up_to_ms(seconds: float) -> str:
    return f"{math.ceil(seconds * 1000 - 1e-6) / 1000:g}"


def check_regions_inside(regions: Sequence[tuple[float, float]], duration: float, from_source: bool,
                         capped: bool = False) -> None:
    """ValueError for an inpainting region that starts at or after the output's end; from_source: the duration
    was taken from the source (none given), which the message says, since regions past it need one given; capped:
    the duration is the model's maximum (a longer one was asked), which no duration can go past."""
    for start, end in regions:
        if start >= duration:
            if capped:
                raise ValueError(f"region {start:g}-{end:g} s starts after the output's end, {round(duration, 3):g} s "
                                 "(the model's maximum length); set regions inside it")
            said = " (the source's length: no duration was given)" if from_source else ""
            raise ValueError(f"region {start:g}-{end:g} s starts after the output's end, {round(duration, 3):g} s"
                             f"{said}; set regions inside the clip, or a duration to regenerate past its end")


def warn_if_source_is_cut(source, name: str, durations: Sequence[float], max_seconds: float) -> None:
    """Warn when a source (init or inpaint audio) lasts longer than the output (its duration, capped at the
    model's maximum): only its start is used."""
    seconds = source_seconds(source, name)
    longest = min(max(durations), max_seconds)
    if seconds > longest + 0.001:  # a duration rounded to the millisecond does not cut a take
        fix = (f"a duration of {_up_to_ms(seconds)} s keeps all of it" if seconds <= max_seconds
               else f"the model makes at most {math.floor(max_seconds * 1000) / 1000:g} s: split the source")
        cut = f"{math.floor(longest * 1000) / 1000:g}"
        notices.warn(f"the {name} lasts {_up_to_ms(seconds)} s but the output {cut} s: only its first {cut} s are "
                      f"used ({fix})", stacklevel=3)


def as_audio(audio, name: str) -> tuple[Tensor, int]:
    """(waveform, rate) | {"waveform", "sample_rate"} | (rate, waveform) (official order) -> ([B, C, N] float, rate);
    a [C, N] or [N] waveform is one clip (B = 1)."""
    if isinstance(audio, dict):
        wav, rate = audio["waveform"], audio["sample_rate"]
    elif isinstance(audio, tuple | list) and len(audio) == 2:
        a, b = audio
        wav, rate = (b, a) if isinstance(a, int | float) and not torch.is_tensor(a) else (a, b)
    else:
        raise ValueError(f"{name}: give (waveform, sample_rate) or a ComfyUI AUDIO dict")
    wav = torch.as_tensor(np.asarray(wav) if not torch.is_tensor(wav) else wav).float()
    if wav.dim() == 1:
        wav = wav[None]
    if wav.dim() == 2:
        wav = wav[None]
    if wav.dim() != 3:
        raise ValueError(f"{name}: waveform of shape {tuple(wav.shape)}; give [N], [C, N] or [B, C, N] samples")
    if wav.numel() == 0:
        raise ValueError(f"{name}: the audio is empty")
    if not torch.isfinite(wav).all():
        raise ValueError(f"{name}: the audio contains NaN or infinite samples")
    return wav, int(rate)


def _broadcast(value, n: int, name: str) -> list:
    if isinstance(value, list | tuple):
        if len(value) != n:
            raise ValueError(f"{name}: {len(value)} values for a batch of {n}")
        return list(value)
    return [value] * n


def source_waveform(model, source: tuple[Tensor, int], audio_samples: int) -> tuple[Tensor, int]:
    """Source clips (`as_audio`'s ([B, C, N], rate)) resampled to the model's rate and channels, zero-padded or cropped
    to `audio_samples`: ([B, C, audio_samples], how many of those samples are the source's own)."""
    from .autoencoder import prepare_audio

    wav, rate = source
    wav = prepare_audio(list(wav), rate, model.sample_rate, model.autoencoder.io_channels)
    out = wav.new_zeros(wav.shape[0], wav.shape[1], audio_samples)
    k = min(audio_samples, wav.shape[-1])
    out[..., :k] = wav[..., :k]
    return out, k


def encode_source(model, source: tuple[Tensor, int], audio_samples: int, n: int,
                  wav: Tensor | None = None) -> Tensor:
    """`source_waveform`'s clips (or `wav`, already made by it) encoded -> [n, C, T]: one clip serves the whole batch,
    else clip i serves item i."""
    out = source_waveform(model, source, audio_samples)[0] if wav is None else wav
    z = torch.cat([model.encode_audio(clip[None], model.sample_rate, chunked=False) for clip in out])
    return z.repeat(n, 1, 1) if z.shape[0] == 1 else z


PASTE_FADE_SECONDS = 0.02  # the crossfade inside each regenerated region's edges, so no click where they meet


def paste_source_audio(audio: Tensor, source: Tensor, source_samples: int, regions: Sequence[tuple[float, float]],
                       sample_rate: int, fade_seconds: float = PASTE_FADE_SECONDS) -> Tensor:
    """The source's own samples outside the regenerated regions: audio [B, C, N] generated, source [1 or B, C, >= N]
    (`source_waveform`), of which the first `source_samples` are real. Inside each region the generated audio, with
    a linear crossfade of `fade_seconds` just inside its edges (the source outside stays untouched); past the
    source's end the generated audio, faded in likewise."""
    n = audio.shape[-1]
    keep = torch.ones(n)
    fade = max(1, int(fade_seconds * sample_rate))
    spans = [(int(a * sample_rate), int(b * sample_rate)) for a, b in regions] + [(source_samples, n)]
    for start, end in spans:
        start, end = max(0, min(start, n)), max(0, min(end, n))
        if end <= start:
            continue
        keep[start:end] = 0
        f = min(fade, (end - start) // 2)
        if f > 0:
            if start > 0:  # a region at the very start has nothing to fade from
                keep[start:start + f] = torch.minimum(keep[start:start + f], torch.linspace(1, 0, f + 2)[1:-1])
            if end < n:
                keep[end - f:end] = torch.maximum(keep[end - f:end], torch.linspace(0, 1, f + 2)[1:-1])
    keep = keep.to(audio.dtype)
    return keep * source[..., :n].to(audio.dtype) + (1 - keep) * audio


ADAPTER_MODES = {"fast": "merged", "low": "factored"}  # generate's adapter_memory -> the adapter view's mode


class SamplerSteps:
    """Which sampling step a model evaluation at noise level t belongs to, for `skip_first_steps`.

    Single-stage samplers (Euler, ping-pong, DPM++ 2M) evaluate once per step, at the step's first sigma. RK4 also
    evaluates between sigmas[i] and sigmas[i+1] and then AT sigmas[i+1], which is still step i although the next
    step starts there: an evaluation at a step's first sigma right after one strictly inside the previous step
    belongs to the previous step. sigmas: [steps + 1] (one item's schedule, falling to 0)."""

    def __init__(self, sigmas: Tensor):
        self.starts = [float(s) for s in sigmas[:-1]]
        self.last_inside: int | None = None  # the step of the last evaluation strictly between two sigmas

    def __call__(self, t: float) -> int:
        step = max(0, sum(1 for s in self.starts if s >= t) - 1)
        on_boundary = t in self.starts
        if on_boundary and self.last_inside == step - 1:
            step -= 1  # RK4's last stage of the previous step
        self.last_inside = None if on_boundary else step
        return step


def resolve_seed(seed: int | None) -> int:
    """The seed itself, or a random one for None / a negative seed (the caller reports which, to make it again)."""
    if seed is not None and seed >= 2**64:  # torch's generators take 0 .. 2^64 - 1 (ComfyUI's seed widget range)
        raise ValueError(f"seed {seed} is too large: use 0 to 2^64 - 1, or -1 for a random one")
    return int(torch.randint(0, 2**31 - 1, ()).item()) if seed is None or seed < 0 else int(seed)


def require_finite(**values) -> None:
    """ValueError naming the first setting that is NaN or infinite (ComfyUI's min/max checks let NaN through, and
    one NaN makes the whole output NaN). values: numbers or sequences of numbers."""
    for name, value in values.items():
        numbers = value if isinstance(value, (list, tuple)) else [value]
        if any(not math.isfinite(float(v)) for v in numbers):
            raise ValueError(f"{name}={value!r}: must be a finite number")


def generate(model, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None,
             duration: float | Sequence[float] = 10.0, seed: int | None = None, steps: int | None = None,
             cfg_scale: float | None = None, sampler: str | None = None, batch_size: int | None = None,
             init_audio=None, init_noise_level: float = 1.0, inpaint_audio=None,
             inpaint_regions: Sequence[tuple[float, float]] | None = None, paste_back: bool = False,
             loras=None, apg_scale: float = 1.0, cfg_interval: tuple[float, float] = (0.0, 1.0),
             padding_seconds: float = PADDING_SECONDS, chunked_decode: bool | None = None,
             callback: Callable[[dict], None] | None = None, return_latents: bool = False,
             truncate: bool = True, adapter_memory: str = "fast", inpaint_latents: Tensor | None = None,
             ) -> tuple[Tensor, int]:
    """Generate audio. Returns (waveform [B, 2, N] float in [-1, 1] on CPU, sample_rate) — or (latents, rate) with
    `return_latents`. Defaults follow the model kind: ARC = ping-pong, 8 steps, CFG 1; base = Euler, 50, CFG 7.

    prompt / negative_prompt / duration: one value or one per batch item (seconds, <= the model's maximum).
    init_audio: (waveform, rate) or AUDIO dict for audio-to-audio, noised to `init_noise_level` (1 = ignore it).
    inpaint_audio + inpaint_regions: regenerate [(start_s, end_s), ...] of the source; continuation is a region from
    the source's end to `duration`. paste_back puts the source back outside the regions after sampling: its latents
    before decoding, then its own samples (`paste_source_audio`, a short crossfade inside each region's edges; with
    inpaint_latents, which have no samples, the latents only).
    inpaint_latents: instead of inpaint_audio, the source's latents [latent_dim, T] (or [1, latent_dim, T]) at the
    model's latent rate, e.g. a dataset's: no encode (training demos inpaint what training sees).
    loras: [{"path", "strength", "interval": (lo, hi)}] or loaded adapters, applied in order (see adapters/).
    adapter_memory: "fast" forms each adapted weight once (a copy of the adapted layers' weights while sampling);
    "low" computes the adapter path beside the shared weights at every step (no copy, a little slower; training
    demos use it, and a model streaming its DiT from host memory always does)."""
    cfg = model.config
    default_sampler, default_steps, default_cfg = sampling_defaults(model)
    sampler = sampler or default_sampler
    steps = int(steps or default_steps)
    cfg_scale = float(default_cfg if cfg_scale is None else cfg_scale)
    if steps < 1:
        raise ValueError("steps must be >= 1")
    require_finite(cfg_scale=cfg_scale, init_noise_level=init_noise_level, apg_scale=apg_scale,
                   padding_seconds=padding_seconds, cfg_interval=cfg_interval,
                   duration=duration if isinstance(duration, (int, float)) else list(duration),
                   lora_strength=[e["strength"] for e in (loras or ()) if isinstance(e, dict) and "strength" in e])
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    n = batch_size or len(prompts)
    init_audio = None if init_audio is None else as_audio(init_audio, "init_audio")
    inpaint_audio = None if inpaint_audio is None else as_audio(inpaint_audio, "inpaint_audio")
    if inpaint_latents is not None:
        if inpaint_audio is not None:
            raise ValueError("give inpaint_audio or inpaint_latents, not both")
        inpaint_latents = inpaint_latents if inpaint_latents.dim() == 3 else inpaint_latents[None]
        if inpaint_latents.shape[:2] != (1, cfg.latent_dim):
            raise ValueError(f"inpaint_latents of shape {tuple(inpaint_latents.shape)}: give [{cfg.latent_dim}, T] "
                             "latents of this model's autoencoder")
    clips = max([1] + [a[0].shape[0] for a in (init_audio, inpaint_audio) if a is not None])
    if clips > 1:  # a batch of sources (e.g. a batch generated before): one output per clip
        if n not in (1, clips):
            raise ValueError(f"the source audio holds {clips} clips but batch_size is {n}: give one clip, or "
                             f"batch_size {clips} (one output per clip)")
        n = clips
    prompts = _broadcast(prompts[0] if len(prompts) == 1 else prompts, n, "prompt")
    durations = [float(d) for d in _broadcast(duration, n, "duration")]
    max_seconds = max_output_seconds(model)
    for d in durations:
        if d <= 0:
            raise ValueError(f"duration must be > 0 s (got {d:g})")
        if d > max_seconds:
            notices.warn(f"duration {d:g} s is longer than the model's native maximum {max_seconds:.4g} s; "
                          "the output is capped there", stacklevel=2)
    seed = resolve_seed(seed)
    if not 0 < init_noise_level <= 1:
        raise ValueError("init_noise_level must be in (0, 1]")

    device = model.device
    ratio = cfg.downsampling_ratio
    n_latents = schedules.generation_length(durations, cfg.sample_rate, ratio, cfg.latent_alignment, padding_seconds,
                                            max_latents=cfg.max_latents or None)
    audio_samples = n_latents * ratio
    generator = torch.Generator("cpu").manual_seed(seed)  # CPU draws, so a seed means the same audio on any device
    noise = samplers_mod.draw_noise((n, cfg.latent_dim, n_latents), generator, device)

    # The adapter stack is active for conditioning too: adapters also adapt the seconds conditioner's Linear.
    if adapter_memory not in ADAPTER_MODES:
        raise ValueError(f"adapter_memory={adapter_memory!r}; use one of {sorted(ADAPTER_MODES)}")
    session = _adapter_session(model, loras, ADAPTER_MODES[adapter_memory])  # a streamed model: always "low"
    with session:
        cond = model.encode_text(prompts, durations)
        negative = None
        if negative_prompt is not None:
            negative = model.encode_text(_broadcast(negative_prompt, n, "negative_prompt"), durations)

    z_init = None
    if init_audio is not None:
        z_init = encode_source(model, init_audio, audio_samples, n).to(device)
    mask = torch.zeros(n, 1, n_latents, device=device)
    masked_input = torch.zeros(n, cfg.latent_dim, n_latents, device=device)
    z_source = None
    if inpaint_audio is not None or inpaint_latents is not None:
        if not inpaint_regions:
            raise ValueError("inpaint_audio needs inpaint_regions [(start_s, end_s), ...]")
        if not cfg.dit.get("local_add_cond_dim"):
            raise ValueError(f"{model.source or 'this model'} has no inpainting input (its config has no "
                             "local_add_cond_dim; every SA3 pack has one): use init_audio (audio-to-audio) instead")
        if inpaint_latents is None:
            source_wav, source_samples = source_waveform(model, inpaint_audio, audio_samples)
            z_source = encode_source(model, inpaint_audio, audio_samples, n, wav=source_wav).to(device)
        else:  # zero-padded or cropped to the output's length, as encode_source does with the audio
            z_source = torch.zeros(n, cfg.latent_dim, n_latents, device=device)
            k = min(n_latents, inpaint_latents.shape[-1])
            z_source[..., :k] = inpaint_latents[..., :k].to(device, z_source.dtype)
        latent_mask = schedules.inpaint_latent_mask(inpaint_regions, n_latents, audio_samples, cfg.sample_rate,
                                                    seconds_total=durations)
        mask = latent_mask.to(device).expand(n, 1, n_latents).clone()
        masked_input = z_source * mask
    elif inpaint_regions:
        raise ValueError("inpaint_regions given without inpaint_audio")
    for source, name in ((init_audio, "init audio"), (inpaint_audio, "inpaint audio")):  # once the inputs are usable
        if source is not None:
            warn_if_source_is_cut(source, name, durations, max_seconds)
    local_cond = torch.cat([mask, masked_input], dim=1)

    effective = schedules.effective_seq_len(durations, cfg.sample_rate, ratio)
    padding_mask = schedules.padding_mask_for(durations, n_latents, cfg.sample_rate, ratio, padding_seconds).to(device)

    sigma_max = init_noise_level if z_init is not None else 1.0
    shift = schedules.sampling_shift_from_config(cfg.diffusion)
    sigmas = schedules.build_schedule(steps, sigma_max=sigma_max, shift=shift,
                                      effective_seq_len=effective if len(set(durations)) > 1 else int(effective[0]))
    x = noise if z_init is None else z_init * (1 - sigma_max) + noise * sigma_max

    step_of = SamplerSteps(sigmas if sigmas.dim() == 1 else sigmas[0])

    def model_fn(x_t: Tensor, sigma: Tensor) -> Tensor:
        t = float(sigma.reshape(-1)[0])
        with session.at_sigma(t, step_of(t)):
            return model.velocity(x_t, sigma, cond, local_cond, padding_mask, cfg_scale=cfg_scale,
                                  negative=negative, apg_scale=apg_scale, cfg_interval=cfg_interval)

    sample_fn = samplers_mod.get_sampler(sampler)
    with torch.inference_mode(), session:
        latents = sample_fn(model_fn, x, sigmas, callback=callback, generator=generator)
    if paste_back and z_source is not None:
        latents = mask * z_source + (1 - mask) * latents
    if return_latents:
        return latents, cfg.sample_rate
    audio = model.decode_latents(latents, chunked=chunked_decode, generator=generator).cpu()
    if not torch.isfinite(audio).all():  # no file format holds NaN, and a player would play it as noise or silence
        raise ValueError("the generated audio is not finite (NaN/inf samples)"
                         + ("; a LoRA applied makes it so: it has diverged in training (train again with a lower "
                            "learning rate) or its strength is far too high" if loras else
                            "; the model's weights hold NaN/inf, or its precision overflowed (try fp32)"))
    audio_mask = padding_mask.cpu()[:, None].repeat_interleave(ratio, dim=-1)
    audio = audio[..., : audio_mask.shape[-1]] * audio_mask[..., : audio.shape[-1]]
    if paste_back and inpaint_audio is not None:  # the source's own samples, not their autoencoder round trip
        audio = paste_source_audio(audio, source_wav, source_samples, inpaint_regions, cfg.sample_rate) * \
            audio_mask[..., : audio.shape[-1]]
    audio = audio.clamp(-1, 1)
    if truncate and len(set(durations)) == 1:
        audio = audio[..., : int(durations[0] * cfg.sample_rate)]
    return audio, cfg.sample_rate


class _NoAdapters:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def at_sigma(self, sigma: float, step: int | None = None):
        return self


def _adapter_session(model, loras, mode: str):
    if not loras:
        return _NoAdapters()
    from ..adapters import adapter_session  # the adapter stack applied per sampling step (see adapters/)

    return adapter_session(model, loras, mode=mode)
