"""The tinted stereo spectrogram musicians know from underfit: low/mid/high energy tints, left channel mirrored above
the right one (bass meets in the middle). One implementation, used by demos, the spectrogram node and the panel.

Pipeline (per channel): resample to 32 kHz, STFT (n_fft 2048, hop `hop`, Hann, centred), 30-band Slaney mel up to
16 kHz, power in dB (top 80 dB) clipped to [-60, 0] dB, scaled to [0, 1] and gamma 0.6. Each frame gets a colour from
its energy in 0–200 Hz (red), 200–1500 Hz (green) and 1.5–16 kHz (blue). Unlike underfit's, the whole image is then
dimmed by the clip's peak level on the same scale (0 dBFS full brightness, -60 dBFS and silence black), so a quiet or
silent take looks quiet when takes are compared side by side.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

SPEC_RATE = 32000
N_FFT = 2048
N_MELS = 30
F_MAX = 16000.0
BANDS_HZ = ((0.0, 200.0), (200.0, 1500.0), (1500.0, 16000.0))


def _hz_to_mel_slaney(f: np.ndarray) -> np.ndarray:
    f = np.asarray(f, dtype=np.float64)
    f_sp = 200.0 / 3
    mels = f / f_sp
    min_log_hz, logstep = 1000.0, math.log(6.4) / 27.0
    min_log_mel = min_log_hz / f_sp
    return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, mels)


def _mel_to_hz_slaney(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    f_sp = 200.0 / 3
    min_log_hz, logstep = 1000.0, math.log(6.4) / 27.0
    min_log_mel = min_log_hz / f_sp
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


def mel_filterbank(sample_rate: int = SPEC_RATE, n_fft: int = N_FFT, n_mels: int = N_MELS,
                   f_max: float = F_MAX) -> np.ndarray:
    """Slaney-normalised triangular filters [n_mels, n_fft // 2 + 1] (the librosa default)."""
    fft_freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    mel_points = _mel_to_hz_slaney(np.linspace(_hz_to_mel_slaney(0.0), _hz_to_mel_slaney(f_max), n_mels + 2))
    weights = np.zeros((n_mels, len(fft_freqs)))
    diffs = np.diff(mel_points)
    ramps = mel_points[:, None] - fft_freqs[None, :]
    for i in range(n_mels):
        lower = -ramps[i] / diffs[i]
        upper = ramps[i + 2] / diffs[i + 1]
        weights[i] = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_points[2:] - mel_points[:-2]))[:, None]
    return weights.astype(np.float32)


def _resample_linear(x: Tensor, rate: int, target: int) -> Tensor:
    if rate == target:
        return x
    n_out = max(1, round(x.shape[-1] * target / rate))
    return torch.nn.functional.interpolate(x[None], size=n_out, mode="linear", align_corners=False)[0]


def tinted_spectrogram(waveform: Tensor, sample_rate: int, width: int = 600, height: int = 120,
                       hop: int | None = None) -> np.ndarray:
    """waveform: [C, N] (mono is duplicated; channels beyond 2 ignored) -> RGB uint8 image [height, width, 3].

    Top half: left channel with bass at the bottom (towards the centre); bottom half: right channel, bass on top."""
    from PIL import Image

    wav = waveform.detach().float().cpu()
    if wav.dim() == 1:
        wav = wav[None]
    if wav.shape[0] == 1:
        wav = wav.repeat(2, 1)
    wav = _resample_linear(wav[:2], sample_rate, SPEC_RATE)
    hop = hop or max(128, min(N_FFT, wav.shape[-1] // max(1, width)))
    if wav.shape[-1] < N_FFT:
        wav = torch.nn.functional.pad(wav, (0, N_FFT - wav.shape[-1]))
    window = torch.hann_window(N_FFT)
    spec = torch.stft(wav, N_FFT, hop_length=hop, window=window, center=True, pad_mode="reflect",
                      return_complex=True).abs().pow(2).numpy()  # [2, F, frames]
    fb = mel_filterbank()
    mel = np.einsum("mf,cft->cmt", fb, spec)
    ref = max(mel.max(), 1e-10)
    db = 10 * np.log10(np.maximum(mel, 1e-10) / ref)
    db = np.clip(np.maximum(db, db.max() - 80.0), -60.0, 0.0)
    intensity = ((db + 60.0) / 60.0) ** 0.6  # [2, mels, frames]

    freqs = np.linspace(0, SPEC_RATE / 2, spec.shape[1])
    band_energy = np.stack([spec[:, (freqs >= lo) & (freqs < hi)].sum(axis=1) for lo, hi in BANDS_HZ], axis=1)
    band_db = 10 * np.log10(np.maximum(band_energy, 1e-10) / max(band_energy.max(), 1e-10))
    band_w = np.clip(band_db, -20.0, 0.0) / 20.0 + 1.0  # [2, 3, frames] in [0, 1]
    band_w = band_w / np.maximum(band_w.max(axis=2, keepdims=True), 1e-6)
    colours = np.array([[1.0, 0.35, 0.25], [0.35, 1.0, 0.4], [0.3, 0.55, 1.0]])  # red, green, blue tints
    rgb = np.einsum("cbt,bk->ctk", band_w, colours)
    # one scale for all three colours (per-colour normalisation would turn a steady tone white)
    rgb = rgb / np.maximum(rgb.max(axis=(1, 2), keepdims=True), 1e-6)
    # the clip's own level dims the whole image, with the same dB mapping: the dB above are relative to the clip's
    # loudest bin (underfit's look), which alone drew silence white and a -80 dB tone as bright as a -6 dB one
    peak_db = 20 * math.log10(max(float(wav.abs().max()), 1e-10))  # dBFS
    level = min(max((peak_db + 60.0) / 60.0, 0.0), 1.0) ** 0.6
    pixels = level * intensity[..., None] * rgb[:, None, :, :]  # [2, mels, frames, 3]
    left = pixels[0][::-1]  # high frequencies at the top edge, bass towards the centre
    right = pixels[1]
    image = np.concatenate([left, right], axis=0)
    image = (np.clip(image, 0, 1) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(image).resize((width, height), Image.LANCZOS))


def spectrogram_png(waveform: Tensor, sample_rate: int, path, width: int = 600, height: int = 120) -> None:
    from PIL import Image

    Image.fromarray(tinted_spectrogram(waveform, sample_rate, width, height)).save(path)
