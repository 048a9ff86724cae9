"""A tiny deterministic stand-in for the SA3 autoencoder's encoder side, for tests and benchmarks.

It follows the encoder protocol `encoding/` is written against: `encode_audio(waveform [B, C, N], sample_rate)
-> [B, latent_dim, ceil(N / downsampling_ratio)]`, plus `latent_dim`, `sample_rate` and `downsampling_ratio`.
Each latent frame depends only on its own block of samples (mean-pooled |x| and x per channel times a fixed
projection), so chunked encoding equals whole-file encoding exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


class ToyEncoder:
    def __init__(self, latent_dim: int = 8, downsampling_ratio: int = 64, sample_rate: int = 44100, seed: int = 0):
        self.latent_dim, self.downsampling_ratio, self.sample_rate = latent_dim, downsampling_ratio, sample_rate
        g = torch.Generator().manual_seed(seed)
        self.projection = torch.randn(latent_dim, 4, generator=g)  # features: mean L, mean R, mean |L|, mean |R|
        self.calls = 0  # number of encode_audio calls (tests count re-encodes)
        self.fingerprint = f"toy-{latent_dim}-{downsampling_ratio}-{seed}"

    @torch.no_grad()
    def encode_audio(self, waveform: Tensor, sample_rate: int) -> Tensor:
        """waveform: [B, 2, N] float at self.sample_rate -> [B, latent_dim, ceil(N / downsampling_ratio)]."""
        if sample_rate != self.sample_rate or waveform.shape[1] != 2:
            raise ValueError(f"ToyEncoder wants 2-channel audio at {self.sample_rate} Hz, got "
                             f"{waveform.shape[1]} channels at {sample_rate} Hz")
        self.calls += 1
        r = self.downsampling_ratio
        n_latents = math.ceil(waveform.shape[-1] / r)
        x = F.pad(waveform.float(), (0, n_latents * r - waveform.shape[-1]))
        feats = torch.cat([F.avg_pool1d(x, r), F.avg_pool1d(x.abs(), r)], dim=1)  # [B, 4, T]
        return torch.einsum("dc,bct->bdt", self.projection, feats)


def make_toy_encoder(device: str = "cpu", latent_dim: int = 8, downsampling_ratio: int = 64) -> ToyEncoder:
    """Picklable factory for multi-process encoding (the device is ignored)."""
    return ToyEncoder(latent_dim=latent_dim, downsampling_ratio=downsampling_ratio)


def tone(seconds: float, sample_rate: int, channels: int = 2, freq: float = 440.0, amp: float = 0.3):
    """[channels, N] float32 test signal: a sine per channel (channel k at freq * (1 + k / 2))."""
    import numpy as np

    t = np.arange(round(seconds * sample_rate)) / sample_rate
    return np.stack([amp * np.sin(2 * np.pi * freq * (1 + k / 2) * t) for k in range(channels)]).astype(np.float32)


# format name -> (writer, extension); writers are the real encoders: libsndfile via soundfile, FFmpeg via PyAV.
SOUNDFILE_FORMATS = {
    "wav16": (".wav", dict(format="WAV", subtype="PCM_16")), "wav24": (".wav", dict(format="WAV", subtype="PCM_24")),
    "wav32": (".wav", dict(format="WAV", subtype="PCM_32")), "wavf": (".wav", dict(format="WAV", subtype="FLOAT")),
    "flac": (".flac", dict(format="FLAC")), "aiff": (".aiff", dict(format="AIFF", subtype="PCM_16")),
    "mp3": (".mp3", dict(format="MP3")), "ogg": (".ogg", dict(format="OGG", subtype="VORBIS")),
    "opus": (".opus", dict(format="OGG", subtype="OPUS")),
}
PYAV_FORMATS = {"m4a": (".m4a", "aac", "mp4"), "mp3-ffmpeg": (".mp3", "libmp3lame", "mp3"),
                "opus-ffmpeg": (".opus", "libopus", "ogg")}


def write_audio_file(path, samples, sample_rate: int, fmt: str):
    """Write [C, N] float32 samples as `fmt` (a key of SOUNDFILE_FORMATS or PYAV_FORMATS) to path (its suffix is
    replaced by the format's). Returns the written Path. Opus is always 48 kHz: give samples at 48000."""
    from pathlib import Path

    import numpy as np

    path = Path(path)
    if fmt in SOUNDFILE_FORMATS:
        import soundfile as sf

        ext, kw = SOUNDFILE_FORMATS[fmt]
        path = path.with_suffix(ext)
        sf.write(str(path), np.ascontiguousarray(samples.T), sample_rate, **kw)
        return path
    from .audio_write import encode_with_pyav

    ext, codec, container_fmt = PYAV_FORMATS[fmt]
    path = path.with_suffix(ext)
    encode_with_pyav(path, samples, sample_rate, codec, container_fmt)
    return path
