"""Reading real-world audio files: decode (soundfile first, PyAV/FFmpeg as the fallback), check, resample, channel map.

Everything returns numpy float32 `[C, N]` arrays in [-1, 1] (channels first, as torch audio code expects).
Bad files raise `AudioFileError` whose `reason` is a short phrase for the dataset report ("zero bytes", ...).
"""

from __future__ import annotations

import errno
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Extensions a folder scan treats as audio. Anything else the decoders understand also decodes when asked directly.
AUDIO_EXTENSIONS = frozenset({
    ".wav", ".wave", ".flac", ".aif", ".aiff", ".aifc", ".mp3", ".ogg", ".oga", ".opus", ".m4a", ".mp4", ".aac",
    ".alac", ".caf", ".w64", ".rf64", ".wma", ".webm", ".mka", ".ac3", ".au",
})

# A decoder that returns less than this fraction of the container's declared length "stopped early": try the other.
SHORT_DECODE_FRACTION = 0.98


class AudioFileError(Exception):
    """A file that cannot be used. `reason` is the short phrase shown in the dataset report."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass
class DecodedAudio:
    """samples: [C, N] float32 at `sample_rate` Hz, exactly what a decoder produced.
    declared_frames: the container's claim (None when it makes none); never used as the duration."""

    samples: np.ndarray
    sample_rate: int
    decoder: str
    declared_frames: int | None = None

    @property
    def channels(self) -> int:
        return self.samples.shape[0]

    @property
    def frames(self) -> int:
        return self.samples.shape[1]

    @property
    def seconds(self) -> float:
        """Duration actually decoded, in seconds."""
        return self.frames / self.sample_rate


def check_readable(path: str | Path) -> int:
    """Raise AudioFileError for files we cannot even open; return the size in bytes."""
    path = os.fspath(path)
    try:
        st = os.stat(path)  # follows symlinks: a loop raises ELOOP here
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise AudioFileError("symlink loop", path) from None
        if e.errno == errno.ENOENT:
            raise AudioFileError("missing (dangling symlink?)", path) from None
        raise AudioFileError("unreadable", str(e)) from None
    if not os.path.isfile(path):
        raise AudioFileError("not a regular file", path)
    if st.st_size == 0:
        raise AudioFileError("zero bytes")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except PermissionError:
        raise AudioFileError("unreadable (permission denied)") from None
    except OSError as e:
        raise AudioFileError("unreadable", str(e)) from None
    return st.st_size


def _decode_soundfile(path: str) -> DecodedAudio:
    import soundfile as sf

    with sf.SoundFile(path) as f:
        declared = f.frames if 0 < f.frames < 2**62 else None  # libsndfile reports a huge number for unknown
        data = f.read(dtype="float32", always_2d=True)  # [N, C]
        rate = f.samplerate
    return DecodedAudio(np.ascontiguousarray(data.T), int(rate), "soundfile", declared)


def _decode_pyav(path: str) -> DecodedAudio:
    import av

    with av.open(path, metadata_errors="ignore") as container:
        if not container.streams.audio:
            raise AudioFileError("not audio", "no audio stream")
        stream = container.streams.audio[0]
        rate = stream.codec_context.sample_rate or stream.rate
        channels = stream.codec_context.channels
        declared = None
        if stream.duration is not None and stream.time_base is not None:
            declared = round(float(stream.duration * stream.time_base) * rate)
        elif container.duration:
            declared = round(container.duration / 1_000_000 * rate)
        # Convert every frame to planar float at the stream's own rate and layout (no resampling here).
        resampler = av.AudioResampler(format="fltp", layout=stream.layout.name if stream.layout else None, rate=rate)
        chunks = []
        try:
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray())
        except av.error.FFmpegError as e:
            if not chunks:
                raise
            # A damaged tail: keep what decoded; the caller compares against the other decoder.
            _ = e
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray())
    if not chunks:
        raise AudioFileError("no audio decoded")
    data = np.concatenate(chunks, axis=1).astype(np.float32, copy=False)
    if channels and data.shape[0] != channels and data.shape[0] == 1:
        data = data.reshape(channels, -1)  # packed layouts come back as one interleaved row
    return DecodedAudio(np.ascontiguousarray(data), int(rate), "pyav", declared)


def _short(d: DecodedAudio) -> bool:
    return d.declared_frames is not None and d.frames < SHORT_DECODE_FRACTION * d.declared_frames


def decode_audio(path: str | Path) -> DecodedAudio:
    """Decode a whole file to [C, N] float32 at its own sample rate.

    soundfile (libsndfile) goes first; PyAV (FFmpeg) is tried when soundfile refuses the file or returns clearly
    less than the container declares, and the longer result wins. The duration is what was decoded, not the
    header's claim. Raises AudioFileError (zero bytes, unreadable, symlink loop, not audio, NaN/inf samples)."""
    path = os.fspath(path)
    check_readable(path)
    errors = []
    best: DecodedAudio | None = None
    for decode in (_decode_soundfile, _decode_pyav):
        try:
            got = decode(path)
        except AudioFileError as e:
            errors.append(f"{decode.__name__[8:]}: {e}")
            continue
        except Exception as e:  # decoders raise many types; any failure means "try the other one"
            errors.append(f"{decode.__name__[8:]}: {type(e).__name__}: {str(e).strip()[:200]}")
            continue
        if got.frames == 0:
            errors.append(f"{got.decoder}: no samples")
            continue
        if best is None or got.frames > best.frames:
            best = got
        if not _short(best):
            break
    if best is None:
        raise AudioFileError("not audio or undecodable", "; ".join(errors))
    if not np.isfinite(best.samples).all():
        raise AudioFileError("NaN/inf samples")
    return best


def downmix(samples: np.ndarray, channels: int = 2) -> np.ndarray:
    """[C, N] -> [channels, N] (channels 1 or 2).

    Mono is duplicated to both sides. More than two channels, in the usual order (L, R, C, LFE, Ls, Rs, ...):
    the centre goes to both sides at -3 dB, the LFE is dropped, other channels alternate left/right at full
    weight, and each side is divided by its total weight so the mix cannot clip (ITU-R BS.775 for 5.1, up to
    the normalisation). To stereo from more channels, 3-channel files are taken as L, R, C."""
    c = samples.shape[0]
    if channels == 1:
        return samples.mean(axis=0, keepdims=True)
    if channels != 2:
        raise ValueError(f"channels={channels}: only mono or stereo output is supported")
    if c == 1:
        return np.repeat(samples, 2, axis=0)
    if c == 2:
        return samples
    weights = np.zeros((2, c), dtype=np.float32)
    weights[0, 0] = weights[1, 1] = 1.0
    centre = math.sqrt(0.5)
    weights[:, 2] = centre
    lfe = 3 if c >= 6 else None  # 5.1 / 7.1 put the LFE fourth; quad and 5.0 have none
    side = 0
    for ch in range(3, c):
        if ch == lfe:
            continue
        weights[side, ch] = 1.0 if c >= 6 else centre
        side = 1 - side
    weights /= weights.sum(axis=1, keepdims=True)
    return weights @ samples


def resample(samples: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """[C, N] float32 at rate_in -> [C, round(N * rate_out / rate_in)] with soxr's band-limited 'HQ' filter."""
    if rate_in == rate_out:
        return samples
    import soxr

    out = soxr.resample(np.ascontiguousarray(samples.T), rate_in, rate_out, quality="HQ")  # soxr wants [N, C]
    return np.ascontiguousarray(out.T, dtype=np.float32)


def load_audio(path: str | Path, sample_rate: int = 44100, channels: int = 2) -> tuple[np.ndarray, DecodedAudio]:
    """Decode, channel-map and resample a file for the autoencoder.
    Returns ([channels, N'] float32 at `sample_rate`, the DecodedAudio record with the source rate and length)."""
    decoded = decode_audio(path)
    audio = resample(downmix(decoded.samples, channels), decoded.sample_rate, sample_rate)
    return audio, decoded


def audio_info(path: str | Path) -> dict:
    """Cheap header facts for a scan (no decoding): {'sample_rate', 'channels', 'seconds'} or {} when unknown.
    The seconds are the header's claim, for display only."""
    path = os.fspath(path)
    try:
        import soundfile as sf

        info = sf.info(path)
        return {"sample_rate": info.samplerate, "channels": info.channels, "seconds": info.duration}
    except Exception:
        pass
    try:
        import av

        with av.open(path, metadata_errors="ignore") as c:
            s = c.streams.audio[0]
            secs = float(s.duration * s.time_base) if s.duration else (c.duration or 0) / 1e6
            return {"sample_rate": s.codec_context.sample_rate, "channels": s.codec_context.channels, "seconds": secs}
    except Exception:
        return {}
