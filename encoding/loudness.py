"""Integrated loudness (ITU-R BS.1770-4 / EBU R128, in LUFS) and loudness normalisation.

Demos of different checkpoints are compared by ear, and a louder take sounds better: normalised to one loudness
(`RunConfig.demo_loudness`), the comparison is of the sound, not the level. The raw level stays on record in each
demo's settings.

Measurement: K-weighting (a +4 dB high shelf near 1.7 kHz, then a high-pass near 38 Hz: two biquads whose
coefficients follow from the analog prototypes at any sample rate, reproducing the standard's 48 kHz table), mean
square per channel over 400 ms blocks with 75 % overlap, channels summed (weight 1: mono or stereo, no surround
here), an absolute gate at -70 LUFS and a relative gate 10 LU below the loudness of the blocks that passed it.
A clip shorter than a block is one block (see `integrated_loudness`).
"""

from __future__ import annotations

import math

import numpy as np

BLOCK_SECONDS = 0.4
BLOCK_OVERLAP = 0.75
ABSOLUTE_GATE = -70.0  # LUFS
RELATIVE_GATE = -10.0  # LU below the absolutely gated loudness
OFFSET = -0.691  # so that a 997 Hz full-scale sine in one channel reads -3.01 LUFS


def k_weighting(rate: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The two K-weighting biquads at `rate` Hz as (b, a) pairs: the high shelf, then the high-pass."""
    shelf_hz, shelf_db, shelf_q = 1681.974450955533, 3.999843853973347, 0.7071752369554196
    k = math.tan(math.pi * shelf_hz / rate)
    vh = 10 ** (shelf_db / 20)
    vb = vh ** 0.4996667741545416
    a0 = 1 + k / shelf_q + k * k
    shelf = (np.array([vh + vb * k / shelf_q + k * k, 2 * (k * k - vh), vh - vb * k / shelf_q + k * k]) / a0,
             np.array([1.0, 2 * (k * k - 1) / a0, (1 - k / shelf_q + k * k) / a0]))
    pass_hz, pass_q = 38.13547087602444, 0.5003270373238773
    k = math.tan(math.pi * pass_hz / rate)
    a0 = 1 + k / pass_q + k * k
    high_pass = (np.array([1.0, -2.0, 1.0]), np.array([1.0, 2 * (k * k - 1) / a0, (1 - k / pass_q + k * k) / a0]))
    return [shelf, high_pass]


def _as_channels(samples: np.ndarray) -> np.ndarray:
    """float64 [C, N] from [C, N] or mono [N] floating-point samples; a ValueError for integer PCM (full scale is
    1.0 here) or an array that looks like [N, C] (more channels than samples)."""
    x = np.asarray(samples)
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"loudness: samples must be floating point at full scale 1.0, not {x.dtype}")
    x = x.astype(np.float64)[None] if x.ndim == 1 else x.astype(np.float64)
    if x.ndim != 2 or (x.shape[0] > 16 and x.shape[0] > x.shape[1]):
        raise ValueError(f"loudness: samples must be [channels, samples], got shape {tuple(x.shape)}")
    return x


def integrated_loudness(samples: np.ndarray, rate: int) -> float:
    """Integrated loudness in LUFS of samples [C, N] (float, full scale 1.0) at `rate` Hz; -inf for silence (nothing
    passes the gates), NaN when a sample is NaN or infinite. A clip shorter than one 400 ms block is measured as
    one block of its own length (the standard leaves it unmeasured; a drum one-shot still deserves a level)."""
    from scipy.signal import lfilter

    x = _as_channels(samples)
    if not np.isfinite(x).all():
        return math.nan
    if x.shape[1] == 0:
        return -math.inf
    for b, a in k_weighting(rate):
        x = lfilter(b, a, x, axis=1)
    block = min(x.shape[1], int(round(BLOCK_SECONDS * rate)))  # a clip under 400 ms (a one-shot) is one block
    hop = max(1, int(round(block * (1 - BLOCK_OVERLAP))))
    squares = np.concatenate([np.zeros((x.shape[0], 1)), np.cumsum(x * x, axis=1)], axis=1)
    starts = np.arange(0, x.shape[1] - block + 1, hop)
    power = ((squares[:, starts + block] - squares[:, starts]) / block).sum(0)  # [blocks], channels summed
    with np.errstate(divide="ignore"):
        block_loudness = OFFSET + 10 * np.log10(power)
    gated = power[block_loudness > ABSOLUTE_GATE]
    if gated.size == 0:
        return -math.inf
    relative = OFFSET + 10 * math.log10(gated.mean()) + RELATIVE_GATE
    kept = power[(block_loudness > ABSOLUTE_GATE) & (block_loudness > relative)]
    return OFFSET + 10 * math.log10(kept.mean())


def true_peak(samples: np.ndarray) -> float:
    """The largest absolute value of samples [C, N] 4x oversampled (BS.1770's true-peak estimate, linear): the peak
    a resampler or decoder can reconstruct between samples, which a sample peak misses."""
    from scipy.signal import resample_poly

    x = _as_channels(samples)
    if x.shape[1] == 0:
        return 0.0
    return float(max(np.abs(x).max(), np.abs(resample_poly(x, 4, 1, axis=1)).max()))


TARGET_RANGE = (-70.0, -1.0)  # LUFS a demo or take may be brought to (the gate's floor, the true-peak ceiling)


def target_problem(target: float) -> str | None:
    """Why `target` LUFS cannot be a loudness to normalise to, or None when it can (NaN cannot)."""
    lo, hi = TARGET_RANGE
    return None if lo <= target <= hi else f"must be in [{lo:g}, {hi:g}] LUFS (-18 is a comfortable listening level)"


MAX_GAIN_DB = 20.0  # a near-silent clip (room tone, a fade-in) is not lifted into hiss at listening level


def normalize_loudness(samples: np.ndarray, rate: int, target_lufs: float, peak_ceiling_db: float = -1.0,
                       max_gain_db: float = MAX_GAIN_DB) -> tuple[np.ndarray, dict]:
    """samples [C, N] scaled to `target_lufs`, within two limits: the true peak (`true_peak`) stays at or below
    `peak_ceiling_db` dBTP, which also turns down a clip that already peaks above it, and the gain is at most
    `max_gain_db`. No limiter reshapes the sound. Returns (scaled samples float32, {"loudness_lufs": measured
    before, "gain_db": applied, "limited_by": "peak" or "max gain" when short of the target}). Silence comes back
    as it is ({"loudness_lufs": None, "gain_db": 0.0}); so do samples with NaN or inf ({"nonfinite": True} too)."""
    loudness = integrated_loudness(samples, rate)
    if not math.isfinite(loudness):
        level = {"loudness_lufs": None, "gain_db": 0.0}
        return np.asarray(samples, dtype=np.float32), level | ({"nonfinite": True} if math.isnan(loudness) else {})
    wanted = target_lufs - loudness
    gain_db, limited_by = wanted, None
    if gain_db > max_gain_db:
        gain_db, limited_by = max_gain_db, "max gain"
    peak = true_peak(samples)
    if peak > 0 and gain_db > peak_ceiling_db - 20 * math.log10(peak):
        gain_db, limited_by = peak_ceiling_db - 20 * math.log10(peak), "peak"
    scaled = (np.asarray(samples, dtype=np.float64) * 10 ** (gain_db / 20)).astype(np.float32)
    level = {"loudness_lufs": round(loudness, 2), "gain_db": gain_db}  # the gain exact: it undoes the scaling
    return scaled, level | ({"limited_by": limited_by} if limited_by else {})


__all__ = ["MAX_GAIN_DB", "TARGET_RANGE", "integrated_loudness", "k_weighting", "normalize_loudness", "target_problem",
           "true_peak"]
