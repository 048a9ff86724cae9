"""Timestep schedules, training-time timestep distributions, lengths and masks: pure functions on tensors.

Convention (rectified flow): t = 1 is noise, t = 0 is data, `x_t = (1 - t)·x0 + t·noise`, velocity `v = noise - x0`.

Contents, top to bottom:
- distribution shifts (warp t in [0, 1] monotonically, optionally by sequence length) and the factory that reads them
  from a model config: `LogSNRShift` (the default for sampling), `DistributionShift` (the SD3-style "full" shift used
  for training), `FluxDistributionShift`, `IdentityDistributionShift`;
- `build_schedule`: the sampling schedule, [steps + 1] or per item [B, steps + 1];
- training: `sample_training_t` (truncated logit-normal, flipped, then shifted by effective length),
  `ot_noise_permutation` (minibatch optimal-transport pairing of noise and data), `random_inpaint_mask` (the
  inpainting auxiliary task), `flow_pair` and `masked_flow_loss`;
- lengths and masks for generation: `generation_length`, `effective_seq_len`, `padding_mask_for`,
  `inpaint_latent_mask`.

Every formula follows the official implementation's op order, so results match it bit for bit in fp32 on CPU.
Randomness only comes in through an explicit `torch.Generator`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from ..adapters import notices

SeqLen = int | float | Tensor | None  # latent frames: one for all items, or [B] (one per item)


# ---------------------------------------------------------------------------------------------------------------------
# Distribution shifts. Each has `shift(t, seq_len) -> t'`, elementwise (t and a tensor seq_len broadcast together).
# A scalar seq_len is computed in Python floats and a tensor one in tensor ops, as the reference does, so the last
# bits agree with it in both cases.
# ---------------------------------------------------------------------------------------------------------------------


class Shift(Protocol):
    def shift(self, t: Tensor, seq_len: SeqLen) -> Tensor: ...


@dataclass(frozen=True)
class IdentityDistributionShift:
    """No warp (config type "none")."""

    def shift(self, t: Tensor, seq_len: SeqLen = None) -> Tensor:
        return t


@dataclass(frozen=True)
class LogSNRShift:
    """Steps spaced uniformly in log-SNR (config type "logsnr"; with rate 0, the default sampling shift).

    t maps to logsnr = logsnr_end - t·(logsnr_end - logsnr_start), then t' = sigmoid(-logsnr), with t = 0 and t = 1
    kept exactly. logsnr_start = anchor_logsnr - rate·log2(seq_len / anchor_length): longer sequences start at a lower
    SNR ("-rate per doubling"). With rate 0 (the default sampler schedule) the length is ignored and
    t' = sigmoid(8.2·t - 2). Field defaults are the official constructor's, so config kwargs read the same."""

    anchor_length: float = 2000
    anchor_logsnr: float = -6.2
    rate: float = 1.0
    logsnr_end: float = 2.0

    def logsnr_start(self, seq_len: SeqLen) -> float | Tensor:
        if isinstance(seq_len, Tensor):
            return self.anchor_logsnr - self.rate * torch.log2(seq_len.float() / self.anchor_length)
        if seq_len is None:
            if self.rate != 0:
                raise ValueError("LogSNRShift with rate != 0 needs a sequence length")
            return self.anchor_logsnr - self.rate * 0.0
        return self.anchor_logsnr - self.rate * math.log2(seq_len / self.anchor_length)

    def shift(self, t: Tensor, seq_len: SeqLen = None) -> Tensor:
        start = self.logsnr_start(seq_len)
        if isinstance(start, Tensor):
            start = start.to(t.device)
        logsnr = self.logsnr_end - t * (self.logsnr_end - start)
        out = torch.sigmoid(-logsnr)
        # sigmoid never reaches 0 or 1: pin the endpoints so the last step lands exactly on data
        out = torch.where(t <= 0, torch.zeros_like(out), out)
        return torch.where(t >= 1, torch.ones_like(out), out)


@dataclass(frozen=True)
class DistributionShift:
    """The "full" (SD3-style, length-dependent) shift, config type "full" and the training shift of SA3.

    t' = α·t / (1 + (α - 1)·t) with log α = base_shift + (max_shift - base_shift)·(L - min_length) /
    (max_length - min_length), L clamped to [min_length, max_length]: α runs from e^0.5 = 1.65 to e^1.15 = 3.16.
    Computed in the reference's odds form, which keeps t = 0 and t = 1 exact."""

    base_shift: float = 0.5
    max_shift: float = 1.15
    max_length: float = 4096
    min_length: float = 256
    use_sine: bool = False

    def shift(self, t: Tensor, seq_len: SeqLen) -> Tensor:
        if seq_len is None:
            raise ValueError("DistributionShift needs a sequence length (latent frames)")
        if isinstance(seq_len, Tensor):
            length = seq_len.to(t.device).float().clamp(self.min_length, self.max_length)
            exp = torch.exp
        else:
            length = min(max(seq_len, self.min_length), self.max_length)
            exp = math.exp
        mu = -(self.base_shift + (self.max_shift - self.base_shift) * (length - self.min_length)
               / (self.max_length - self.min_length))
        inv_alpha = exp(mu)
        odds = 1 / (1 - t) - 1  # t / (1 - t); inf at t = 1, which maps to exactly 1
        out = 1 - inv_alpha / (inv_alpha + odds)
        if self.use_sine:
            out = torch.sin(out * math.pi / 2)
        return out


@dataclass(frozen=True)
class FluxDistributionShift:
    """Flux/SD3 shift with α interpolated log-linearly in sequence length between (min_length, alpha_min) and
    (max_length, alpha_max); equal alphas give a constant shift (config type "flux")."""

    min_length: float = 256
    max_length: float = 4096
    alpha_min: float = 1.0
    alpha_max: float = 1.0

    def alpha(self, seq_len: SeqLen) -> float | Tensor:
        log_a0, log_a1 = math.log(max(self.alpha_min, 1e-8)), math.log(max(self.alpha_max, 1e-8))
        log_l0, log_l1 = math.log(self.min_length), math.log(self.max_length)
        if log_l1 == log_l0:
            log_l1 += 1e-8  # constant alpha: avoid 0 / 0
        if isinstance(seq_len, Tensor):
            frac = (torch.log(seq_len.float().clamp(self.min_length, self.max_length)) - log_l0) / (log_l1 - log_l0)
            return torch.exp(log_a0 + frac * (log_a1 - log_a0))
        length = self.min_length if seq_len is None else max(min(seq_len, self.max_length), self.min_length)
        if seq_len is None and self.alpha_min != self.alpha_max:
            raise ValueError("FluxDistributionShift with alpha_min != alpha_max needs a sequence length")
        frac = (math.log(length) - log_l0) / (log_l1 - log_l0)
        return math.exp(log_a0 + frac * (log_a1 - log_a0))

    def shift(self, t: Tensor, seq_len: SeqLen = None) -> Tensor:
        alpha = self.alpha(seq_len)
        if isinstance(alpha, Tensor):
            alpha = alpha.to(t.device)
        return alpha * t / (1 + (alpha - 1.0) * t)


SHIFT_TYPES = {  # config "type" string -> class (the official names; "full" when the type is absent)
    "none": IdentityDistributionShift,
    "flux": FluxDistributionShift,
    "full": DistributionShift,
    "logsnr": LogSNRShift,
}

# Sampling default when a config has no `sampling_distribution_shift_options`: length-invariant log-SNR spacing.
DEFAULT_SAMPLING_SHIFT = LogSNRShift(rate=0.0, anchor_logsnr=-6.2, logsnr_end=2.0)


def shift_from_options(options: Mapping | None) -> Shift | None:
    """A config's `*distribution_shift_options` dict -> shift object ({"type": ..., **kwargs}; type defaults to
    "full"). None -> None."""
    if options is None:
        return None
    kind = options.get("type", "full")
    if kind not in SHIFT_TYPES:
        raise ValueError(f"distribution shift type {kind!r} is unknown; use one of {sorted(SHIFT_TYPES)}")
    kwargs = {k: v for k, v in options.items() if k != "type"}
    try:
        return SHIFT_TYPES[kind](**kwargs)
    except TypeError as e:
        raise ValueError(f"distribution shift options {dict(options)}: {e}") from None


def _diffusion_section(config) -> Mapping:
    """Accept an SA3Config, a full model_config dict or its `model.diffusion` section."""
    if hasattr(config, "diffusion"):
        return config.diffusion
    if "model" in config:
        return config["model"]["diffusion"]
    return config


def sampling_shift_from_config(config) -> Shift:
    """The sampling shift: the config's `sampling_distribution_shift_options` when present (it wins), else the
    default LogSNR (rate 0, anchor -6.2, end 2.0), as the official model wrapper does."""
    shift = shift_from_options(_diffusion_section(config).get("sampling_distribution_shift_options"))
    return DEFAULT_SAMPLING_SHIFT if shift is None else shift


def training_shift_from_config(config) -> Shift | None:
    """The training shift from `distribution_shift_options` (SA3: {min_length 256, max_length 4096} -> "full"), or
    None when the config has none (then training t is used unshifted, as officially)."""
    return shift_from_options(_diffusion_section(config).get("distribution_shift_options"))


# ---------------------------------------------------------------------------------------------------------------------
# Sampling schedule
# ---------------------------------------------------------------------------------------------------------------------


def build_schedule(steps: int, sigma_max: float = 1.0, shift: Shift | None = DEFAULT_SAMPLING_SHIFT,
                   effective_seq_len: SeqLen = None, fallback_seq_len: int | None = None,
                   device: torch.device | str = "cpu") -> Tensor:
    """Noise levels for `steps` sampler steps: [steps + 1] fp32 from sigma_max down to exactly 0, or [B, steps + 1]
    when `effective_seq_len` is a [B] tensor (one schedule per item; length-dependent shifts differ per item).

    linspace(sigma_max, 0) is warped by `shift` at `effective_seq_len` (latent frames; `fallback_seq_len`, usually
    the latent length T, when it is None). Then t[..., 0] is set back to sigma_max: an official quirk kept for parity
    (the initial mix `x = z·(1 - sigma_max) + noise·sigma_max` uses the unshifted sigma_max). For sigma_max < 1 the
    schedule therefore rises after the first step (0.8 -> 0.977 with the default shift) and is not monotone.

    Unlike the reference, a [B] length is always an outer product with the steps, also when B == steps + 1 (the
    reference would combine those element-wise)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    t = torch.linspace(sigma_max, 0, steps + 1, device=device)
    if shift is None:
        return t
    seq_len = effective_seq_len if effective_seq_len is not None else fallback_seq_len
    if isinstance(seq_len, Tensor):
        seq_len = torch.clamp(seq_len.to(device).reshape(-1, 1), min=1)  # [B, 1], >= 1 to avoid log(0)
        t = shift.shift(t[None], seq_len).expand(seq_len.shape[0], -1).clone()  # [B, steps + 1]
    else:
        t = shift.shift(t, None if seq_len is None else max(int(seq_len), 1))
    t[..., 0] = sigma_max  # re-anchor (see above)
    return t


# ---------------------------------------------------------------------------------------------------------------------
# Training: timesteps, noise pairing, inpainting masks, loss
# ---------------------------------------------------------------------------------------------------------------------

TRAINING_T_SAMPLERS = ("trunc_logit_normal", "logit_normal", "uniform")


def _normal_cdf(x: Tensor) -> Tensor:
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))  # erf form (not ndtr): bit parity with the reference


def _normal_icdf(p: Tensor) -> Tensor:
    return math.sqrt(2) * torch.erfinv(2 * p - 1)


def truncated_logit_normal(z: Tensor, left_trunc: float = 0.075, right_trunc: float = 1.0) -> Tensor:
    """Map standard-normal draws z to the official truncated logit-normal in [0, 1): the normal CDF of z is squeezed
    into the CDF range whose sigmoid lies in [left_trunc, right_trunc], mapped back, then rescaled so left_trunc -> 0.
    Returns u (the trainer uses t = 1 - u: mass near t = 1, never exactly 0)."""
    lower = _normal_cdf(torch.logit(torch.tensor(left_trunc)))
    upper = _normal_cdf(torch.logit(torch.tensor(right_trunc)))
    samples = torch.sigmoid(_normal_icdf(lower + (upper - lower) * _normal_cdf(z)))
    return (samples - left_trunc) / (right_trunc - left_trunc)


def sample_training_t(batch: int, sampler: str = "trunc_logit_normal", generator: torch.Generator | None = None,
                      shift: Shift | None = None, seq_len: SeqLen = None) -> Tensor:
    """Training noise levels t [batch] fp32 in [0, 1] (1 = noise), then `shift` at `seq_len` if given (SA3:
    `DistributionShift` at `effective_seq_len(seconds_total, ...)`).

    "trunc_logit_normal" (official default): one randn(batch) draw -> t = 1 - truncated_logit_normal(z).
    "logit_normal": sigmoid(randn(batch)). "uniform": rand(batch) (the reference uses a scrambled Sobol sequence;
    plain uniform draws keep the generator the only source of randomness)."""
    device = generator.device if generator is not None else None  # draw where the generator lives
    if sampler == "trunc_logit_normal":
        t = 1 - truncated_logit_normal(torch.randn(batch, generator=generator, device=device))
    elif sampler == "logit_normal":
        t = torch.sigmoid(torch.randn(batch, generator=generator, device=device))
    elif sampler == "uniform":
        t = torch.rand(batch, generator=generator, device=device)
    else:
        raise ValueError(f"timestep sampler {sampler!r} is unknown; use one of {TRAINING_T_SAMPLERS}")
    return t if shift is None else shift.shift(t, seq_len)


@torch.no_grad()
def ot_noise_permutation(x0: Tensor, noise: Tensor, iterations: int = 20) -> Tensor:
    """Minibatch optimal-transport pairing (MelodyFlow §2.5.2, as the official trainer does it): a permutation
    `perm` [B] such that `noise[perm]` pairs each data item with a nearby noise item, straightening the flow.

    Squared-L2 costs -> 20 Sinkhorn normalisations of exp(-cost / mean cost) -> greedy rows-in-order assignment
    (each row takes its most likely unused column). Identity for B = 1."""
    b = x0.shape[0]
    if b == 1:
        return torch.zeros(1, dtype=torch.long, device=x0.device)
    data, eps = x0.reshape(b, -1), noise.reshape(b, -1)
    sq_data = (data * data).sum(dim=1, keepdim=True)  # [B, 1]
    sq_noise = (eps * eps).sum(dim=1, keepdim=True)
    cost = sq_data + sq_noise.T - 2.0 * (data @ eps.T)  # [B data, B noise]
    log_p = -cost / cost.mean()  # scale-free temperature
    for _ in range(iterations):
        log_p = log_p - torch.logsumexp(log_p, dim=1, keepdim=True)
        log_p = log_p - torch.logsumexp(log_p, dim=0, keepdim=True)
    p = log_p.exp()
    perm = torch.empty(b, dtype=torch.long, device=x0.device)
    taken = torch.zeros(b, dtype=torch.bool, device=x0.device)
    for i in range(b):
        p[i, taken] = -1  # below any probability
        perm[i] = p[i].argmax()
        taken[perm[i]] = True
    return perm


def flow_pair(x0: Tensor, noise: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """x0, noise [B, C, T], t [B] -> (x_t = (1 - t)·x0 + t·noise, target velocity noise - x0)."""
    t = t.reshape(-1, *([1] * (x0.dim() - 1)))
    return x0 * (1 - t) + noise * t, noise - x0


MASK_KINDS = ("segments", "full", "causal")  # order of the probabilities, as officially
DEFAULT_MASK_PROBABILITIES = (0.1, 0.8, 0.1)  # official train_lora: 10 % segments, 80 % full generation, 10 % prefix


def random_inpaint_mask(padding_mask: Tensor, generator: torch.Generator | None = None,
                        probabilities: Sequence[float] = DEFAULT_MASK_PROBABILITIES, max_segments: int = 10,
                        mask_padding: bool = True) -> Tensor:
    """Inpainting masks for the training auxiliary task: [B, 1, T] float, 1 = keep (given as context), 0 = generate.

    padding_mask [B, T] bool (True = real latents; its count is the item's real length L). Per item one kind, drawn
    with `probabilities` over MASK_KINDS:
    - "segments": n ~ U{1..max_segments} segments, each of length U{1..max(1, L // n)} at a uniform start inside the
      real part (they may overlap) are set to 0;
    - "full": all 0, plain text-to-audio;
    - "causal": keep a prefix of length U{0..L}, generate the rest of the real part.
    With `mask_padding` (training with padding-masked attention) positions past L are 0 too for "segments" and
    "causal", so padding never looks like provided context. An item with L = 0 keeps all ones unless "full".
    The masked input is x0 * mask. Draws come from `generator` (a CPU generator), one kind per item in order; the
    reference uses Python's `random`, so only the distribution, not the exact masks, matches it."""
    if len(probabilities) != len(MASK_KINDS):
        raise ValueError(f"probabilities must give {MASK_KINDS} in that order; got {list(probabilities)}")
    if not math.isclose(sum(probabilities), 1.0, rel_tol=1e-6, abs_tol=1e-6):
        raise ValueError(f"mask probabilities must sum to 1; got {list(probabilities)} (sum {sum(probabilities)})")
    b, n = padding_mask.shape
    weights = torch.tensor([float(p) for p in probabilities])
    mask = torch.ones(b, 1, n)

    def randint(lo: int, hi: int) -> int:  # inclusive bounds, like random.randint
        return int(torch.randint(lo, hi + 1, (1,), generator=generator))

    for i in range(b):
        length = int(padding_mask[i].sum())
        kind = MASK_KINDS[int(torch.multinomial(weights, 1, generator=generator))]
        if kind == "full":
            mask[i] = 0
            continue
        if length == 0:
            continue
        if kind == "segments":
            count = randint(1, max_segments)
            for _ in range(count):
                seg = randint(1, max(1, length // count))
                start = randint(0, length - seg)
                mask[i, :, start:start + seg] = 0
        else:  # causal
            mask[i, :, randint(0, length):length] = 0
        if mask_padding:
            mask[i, :, length:] = 0
    return mask.to(padding_mask.device)


class FlowLoss(NamedTuple):
    """loss = main + context_weight·context (scalars); per_item [B] = the same split per item (for loss-by-t)."""

    loss: Tensor
    main: Tensor
    context: Tensor
    per_item: Tensor


def masked_flow_loss(v_pred: Tensor, target: Tensor, padding_mask: Tensor | None = None,
                     inpaint_mask: Tensor | None = None, context_weight: float = 1.0) -> FlowLoss:
    """The official training loss with padding-masked attention and the inpainting task (loss_normalization "none").

    v_pred, target [B, C, T]; padding_mask [B, T] bool (True = real, incl. the silence extension; None = all real);
    inpaint_mask [B, 1, T] or [B, T] (1 = context given, 0 = generated; None = generate everything).
    main: per item, mean squared error over real & generated positions (all channels), averaged over items.
    context: per item, mean squared error over real & context positions, averaged over items; an item with no
    context counts as 0 in that mean. Padding never contributes."""
    b, _, n = v_pred.shape
    sq = (v_pred - target) ** 2  # [B, C, T]
    real = torch.ones(b, n, dtype=torch.bool, device=sq.device) if padding_mask is None else padding_mask.bool()
    given = torch.zeros_like(real) if inpaint_mask is None else inpaint_mask.reshape(b, n).bool()
    channels = sq.shape[1]

    def region_mean(region: Tensor) -> Tensor:  # [B]: masked mean; 0 for an empty region
        total = torch.where(region[:, None], sq, 0.0).sum(dim=(1, 2))
        return total / (region.sum(dim=1) * channels + 1e-8)

    main_items = region_mean(real & ~given)
    main = main_items.mean()
    context = sq.new_zeros(())
    context_items = torch.zeros_like(main_items)
    if inpaint_mask is not None and context_weight > 0 and (real & given).any():
        context_items = region_mean(real & given)
        context = context_items.mean()
    return FlowLoss(main + context * context_weight, main, context, main_items + context_weight * context_items)


# ---------------------------------------------------------------------------------------------------------------------
# Lengths and masks for generation
# ---------------------------------------------------------------------------------------------------------------------


def _seconds_list(seconds: float | Sequence[float] | Tensor) -> list[float]:
    if isinstance(seconds, Tensor):
        return [float(s) for s in seconds.reshape(-1).tolist()]
    if isinstance(seconds, int | float):
        return [float(seconds)]
    return [float(s) for s in seconds]


def _ceil_to(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


def generation_length(duration_s: float | Sequence[float], sample_rate: int, downsampling_ratio: int,
                      latent_alignment: int = 1, padding_s: float = 6.0, *, max_latents: int | None = None) -> int:
    """Latent frames T to generate for the longest requested duration, as the official `generate` sizes it:
    int((s + padding_s)·sample_rate) samples, rounded up to whole latents, then to a multiple of `latent_alignment`
    latents (SAME-S attends in 2-latent chunks; officially chunk_size // stride of the encoder config, default
    chunk_size 32), then capped at `max_latents` floored to the alignment: pass the model's native maximum
    (sample_size // downsampling_ratio), not the official generate() default of 120 s, so medium reaches 380 s.
    (The reference caps in samples without re-aligning; the real sample sizes are aligned, so they agree.)
    A duration <= 0 gives the cap."""
    align = max(1, int(latent_alignment))
    cap = None if max_latents is None else max(align, int(max_latents) // align * align)  # the cap stays aligned
    longest = max(_seconds_list(duration_s), default=0.0)
    if longest <= 0:
        if cap is None:
            raise ValueError("duration must be > 0 when no max_latents is given")
        return cap
    samples = _ceil_to(int((longest + padding_s) * sample_rate), downsampling_ratio)
    n_latents = _ceil_to(samples, downsampling_ratio * align) // downsampling_ratio
    return n_latents if cap is None else min(n_latents, cap)


def effective_seq_len(seconds_total: float | Sequence[float] | Tensor, sample_rate: int,
                      downsampling_ratio: int) -> Tensor:
    """Latent frames covering each item's real audio, ceil(int(seconds·sample_rate) / downsampling_ratio): [B] int64.
    The length the shifts see at inference and in training (`use_effective_length_for_schedule`)."""
    return torch.tensor([math.ceil(int(s * sample_rate) / downsampling_ratio) for s in _seconds_list(seconds_total)],
                        dtype=torch.long)


effective_length = effective_seq_len  # the training-side name for the same rule


def padding_mask_for(durations: float | Sequence[float] | Tensor, n_latents: int, sample_rate: int,
                     downsampling_ratio: int, padding_s: float = 6.0) -> Tensor:
    """[B, n_latents] bool, True = valid: each item's effective length plus int(padding_s · latent rate) frames of
    headroom (64 for SA3), clamped to n_latents. Attention ignores the rest; decoded audio there is zeroed."""
    headroom = int(padding_s * sample_rate / downsampling_ratio)
    valid = (effective_seq_len(durations, sample_rate, downsampling_ratio) + headroom).clamp(max=n_latents)
    return torch.arange(n_latents)[None] < valid[:, None]


def inpaint_latent_mask(regions: Sequence[tuple[float, float]], n_latents: int, audio_samples: int,
                        sample_rate: int, seconds_total: float | Sequence[float] | None = None) -> Tensor:
    """Inpainting mask from regions in seconds: [1, 1, n_latents] float, 1 = keep the source, 0 = generate.

    As officially: an audio-rate mask of `audio_samples` ones, [int(start·sr), int(end·sr)) set to 0 per region
    (clipped to the length), zeroed past max(seconds_total)·sr (the model was trained with a mask that is 0 over
    padding), then nearest-resampled to n_latents (each latent takes the value at its first sample). Continuation is
    the region (source length, new duration)."""
    mask = torch.ones(1, 1, audio_samples)
    longest = max(_seconds_list(seconds_total), default=0.0) if seconds_total is not None else 0.0
    output_end = min(audio_samples, int(longest * sample_rate)) if longest > 0 else audio_samples
    for start_s, end_s in regions:
        if not (math.isfinite(end_s) and end_s > start_s >= 0):
            raise ValueError(f"inpaint region ({start_s}, {end_s}) s: need 0 <= start < end, both finite")
        if start_s * sample_rate >= output_end:
            raise ValueError(f"inpaint region ({start_s}, {end_s}) s starts after the output's end "
                             f"({output_end / sample_rate:.2f} s): nothing would be regenerated")
        if int(end_s * sample_rate) > output_end:  # what the user asked is not what happens: say so
            notices.warn(f"inpaint region ({start_s:g}, {end_s:g}) s runs past the output's end "
                          f"({output_end / sample_rate:.2f} s): regenerated up to there", stacklevel=3)
        start = min(int(start_s * sample_rate), audio_samples)
        end = min(int(end_s * sample_rate), audio_samples)
        mask[..., start:end] = 0
    if longest > 0:
        mask[..., int(longest * sample_rate):] = 0
    return F.interpolate(mask, size=n_latents, mode="nearest")
