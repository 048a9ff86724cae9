"""Reading real-world audio files: decode (soundfile first, PyAV/FFmpeg as the fallback), check, resample, channel map.

Everything returns numpy float32 `[C, N]` arrays in [-1, 1] (channels first, as torch audio code expects).
Bad files raise `AudioFileError` whose `reason` is a short phrase for the dataset report ("zero bytes", ...).
Files that can be used with a caveat decode with `DecodedAudio.warnings`, which the dataset records per file.

Damaged files: the decoders skip damaged packets and go on (as ffmpeg does), so damage in the middle costs that
part, not the rest of the file; whatever decodes is kept, with a warning when packets were dropped or when the
decoded length is clearly shorter (below SHORT_DECODE_FRACTION) than the container declares (truncated files).
An MP4 (AAC) decoded a little longer than its exact declared duration is trimmed to it: the rest is the
encoder's padding of the last frame.

Sample levels (the autoencoder expects [-1, 1]): integer PCM always decodes within it. Peaks above MAX_PEAK
(+40 dBFS) are not audio a person made (corrupt data, or integer values stored as floats): the file is skipped.
Float files (WAV/AIFF/CAF float) peaking above 1 are peak-normalised to 1, which keeps the waveform, only
quieter; other decoders' samples beyond 1 (lossy decoder overshoot, damaged frames) are clipped to [-1, 1].
Both record a warning.
"""

from __future__ import annotations

import errno
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..sa3.channels import stereo_weights

# Extensions a folder scan treats as audio. Anything else the decoders understand also decodes when asked directly.
AUDIO_EXTENSIONS = frozenset({
    ".wav", ".wave", ".flac", ".aif", ".aiff", ".aifc", ".mp3", ".ogg", ".oga", ".opus", ".m4a", ".mp4", ".aac",
    ".alac", ".caf", ".w64", ".rf64", ".wma", ".webm", ".mka", ".ac3", ".au",
})

# A decoder that returns less than this fraction of the container's declared length "stopped early": try the other.
SHORT_DECODE_FRACTION = 0.98
# float32 copies of a file's 44.1 kHz stereo samples alive at once while it is decoded and encoded: bench/encode.py
# measured 2.4 (44.1 kHz FLAC), 2.7 (48 kHz FLAC, MP3) and 2.9 (48 kHz M4A) with the SAME encoder; plus a margin
DECODE_COPIES = 3.5
ENCODE_RESERVE_BYTES = 768 << 20  # the encoder's working memory for one 128-latent chunk, whatever the file's length:
# bench/same_encoder.py measured 560-680 MB for SAME-L (sa3-medium), 110-165 MB for SAME-S (random weights, real sizes)
READ_BLOCK_FRAMES = 1 << 16  # frames per soundfile read
MAX_PEAK = 100.0  # |sample| above this (+40 dBFS) is garbage, not a hot mix: the file is skipped
MAX_PADDING_FRAMES = 2048  # decoded beyond an MP4's declared duration by at most this: encoder padding, trimmed


class AudioFileError(Exception):
    """A file that cannot be used. `reason` is the short phrase shown in the dataset report."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass
class DecodedAudio:
    """samples: [C, N] float32 at `sample_rate` Hz, what a decoder produced (levels fitted, module docstring).
    declared_frames: the container's claim (None when it makes none); never used as the duration.
    float_samples: the file stores float samples (which may legitimately exceed 1). warnings: caveats for the
    dataset report (damaged packets, truncation, levels)."""

    samples: np.ndarray | None  # None once released (`release_samples`)
    sample_rate: int
    decoder: str
    declared_frames: int | None = None
    float_samples: bool = False
    warnings: list[str] = field(default_factory=list)
    released_shape: tuple[int, int] = (0, 0)

    @property
    def channels(self) -> int:
        return self._shape()[0]

    @property
    def frames(self) -> int:
        return self._shape()[1]

    def _shape(self) -> tuple[int, int]:
        return self.samples.shape if self.samples is not None else self.released_shape

    def release_samples(self) -> None:
        """Drop the samples, keep the facts (channels, frames, seconds): `load_audio`'s caller holds the converted
        audio, and a long file's source samples would otherwise stay alive through its encoding."""
        self.released_shape, self.samples = self.samples.shape, None

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
            why = "dangling symlink" if os.path.islink(path) else "no such file"
            raise AudioFileError(why, path) from None
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


def _wav_declared_frames(path: str) -> int | None:
    """Frames the data chunk of a RIFF WAV (PCM or float) declares, or None for other files and unknown sizes.
    libsndfile silently trims a truncated file's frame count to what is there, so the header is read here."""
    with open(path, "rb") as f:
        head = f.read(12)
        if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        block_align = None
        while len(chunk := f.read(8)) == 8:
            cid, size = chunk[:4], int.from_bytes(chunk[4:], "little")
            if cid == b"fmt ":
                fmt = f.read(size + size % 2)
                tag, block_align = int.from_bytes(fmt[0:2], "little"), int.from_bytes(fmt[12:14], "little")
                if tag not in (1, 3, 0xFFFE):  # compressed WAV: frames are not bytes / block_align
                    return None
            elif cid == b"data":
                unknown = size in (0, 0xFFFFFFFF)  # streaming writers leave the size unset
                return None if unknown or not block_align else size // block_align
            else:
                f.seek(size + size % 2, 1)
    return None


def _known_frames(frames: int) -> int | None:
    """libsndfile's frame count, None when unknown (it reports a huge number then)."""
    return int(frames) if 0 < frames < 2**62 else None


def _pyav_declared_frames(container, stream, rate: int) -> int | None:
    """Frames an FFmpeg container declares for its audio stream (the stream's duration, else the container's)."""
    if stream.duration is not None and stream.time_base is not None:
        return round(float(stream.duration * stream.time_base) * rate)
    if container.duration:
        return round(container.duration / 1_000_000 * rate)
    return None


def _decode_soundfile(path: str) -> DecodedAudio:
    import soundfile as sf

    with sf.SoundFile(path) as f:
        known = _known_frames(f.frames)
        declared = known
        if f.format in ("WAV", "WAVEX"):
            declared = max(declared or 0, _wav_declared_frames(path) or 0) or None
        rate = f.samplerate
        is_float = f.subtype in ("FLOAT", "DOUBLE")
        if known:  # block by block into [C, N]: no whole interleaved [N, C] copy beside it
            samples = np.empty((f.channels, known), dtype=np.float32)
            done = 0
            while done < known:
                block = f.read(frames=min(READ_BLOCK_FRAMES, known - done), dtype="float32", always_2d=True)
                if not len(block):
                    break  # shorter than its header says: what was read is kept (the caller warns)
                samples[:, done:done + len(block)] = block.T
                done += len(block)
            samples = first_columns(samples, done)
        else:
            samples = np.ascontiguousarray(f.read(dtype="float32", always_2d=True).T)
    return DecodedAudio(samples, int(rate), "soundfile", declared, is_float)


def first_columns(samples: np.ndarray, n: int, start: int = 0) -> np.ndarray:
    """Columns [start, start + n) of a C-contiguous [C, cap] array as a C-contiguous [C, n] array in the SAME
    memory (rows moved left in place): trimming a long decode without a second copy of it."""
    channels, cap = samples.shape
    if n == cap and start == 0:
        return samples
    flat = samples.reshape(-1)
    for c in range(channels):  # each row moves left of its old place; numpy buffers an overlapping copy
        if c or start:
            flat[c * n:(c + 1) * n] = samples[c, start:start + n]
    return flat[:channels * n].reshape(channels, n)


def itunes_gapless(tags: dict) -> tuple[int, int] | None:
    """(encoder delay, original frames) from an iTunSMPB tag (" 00000000 DELAY PADDING LENGTH ..." in hex, written
    by Apple's and other AAC encoders), or None when absent or unreadable."""
    value = next((v for k, v in tags.items() if k.lower() == "itunsmpb"), None)
    try:
        fields = str(value).split()
        delay, length = int(fields[1], 16), int(fields[3], 16)
    except (IndexError, ValueError, TypeError):
        return None
    return (delay, length) if 0 < delay <= 8192 and length > 0 else None


class PlanarBuffer:
    """Decoded [C, n] blocks appended into one [C, N] float32 array, allocated once at the expected length (its
    pages are touched only as they are written) and grown only when a file decodes longer than that."""

    def __init__(self, channels: int, capacity: int):
        self.channels, self.capacity, self.frames = channels, max(1, capacity), 0
        self.data: np.ndarray | None = None

    def append(self, block: np.ndarray) -> None:
        if self.channels and block.shape[0] == 1 != self.channels:  # a packed (interleaved) frame: PyAV gives one row
            block = block.reshape(-1, self.channels).T
        if self.data is None:
            self.channels = block.shape[0]
            self.data = np.empty((self.channels, self.capacity), dtype=np.float32)
        end = self.frames + block.shape[1]
        if end > self.data.shape[1]:
            grown = np.empty((self.channels, max(end, self.data.shape[1] * 3 // 2)), dtype=np.float32)
            grown[:, :self.frames] = self.data[:, :self.frames]
            self.data = grown
        self.data[:, self.frames:end] = block
        self.frames = end

    def take(self, n: int, start: int = 0) -> np.ndarray:
        """n decoded frames from `start`, [C, n] C-contiguous (the buffer is handed over, not copied)."""
        data, self.data = self.data, None
        return first_columns(data, min(n, self.frames - start), start)


def _decode_pyav(path: str) -> DecodedAudio:
    import av

    with av.open(path, metadata_errors="ignore") as container:
        if not container.streams.audio:
            raise AudioFileError("not audio", "no audio stream")
        stream = container.streams.audio[0]
        rate = stream.codec_context.sample_rate or stream.rate
        channels = stream.codec_context.channels
        declared = _pyav_declared_frames(container, stream, rate)
        # Convert every frame to planar float at the stream's own rate and layout (no resampling here).
        resampler = av.AudioResampler(format="fltp", layout=stream.layout.name if stream.layout else None, rate=rate)
        exact_duration = "mp4" in container.format.name.split(",")
        # room for the declared length and a decoder's usual overshoot; an undeclared length starts at 30 s and grows
        expected = declared + max(MAX_PADDING_FRAMES, declared // 100) if declared else 30 * (rate or 48000)
        buffer = PlanarBuffer(channels, expected)
        damaged, warnings = 0, []
        try:
            for packet in container.demux(stream):  # ends with an empty packet that flushes the decoder
                try:
                    frames = packet.decode()
                except av.error.FFmpegError:
                    damaged += 1  # drop the damaged packet and go on, as ffmpeg does
                    continue
                for frame in frames:
                    for out in resampler.resample(frame):
                        buffer.append(out.to_ndarray())
        except av.error.FFmpegError as e:
            if not buffer.frames:
                raise
            warnings.append(f"the container is damaged after {buffer.frames / rate:.2f} s; "
                            f"the rest is lost ({str(e).strip()[:120]})")
        for out in resampler.resample(None):
            buffer.append(out.to_ndarray())
        is_float = stream.codec_context.name.startswith("pcm_f")
        gapless = itunes_gapless({**container.metadata, **stream.metadata}) if exact_duration else None
    if not buffer.frames:
        raise AudioFileError("no audio decoded")
    if damaged:
        warnings.append(f"{damaged} damaged packet(s) skipped: the audio has gaps there")
    keep, start = buffer.frames, 0
    if gapless is not None and sum(gapless) <= keep <= sum(gapless) + 2 * MAX_PADDING_FRAMES:
        start, keep = gapless  # no edit list applied: the encoder's priming is still there, iTunSMPB says how long
    elif exact_duration and declared is not None and 0 < keep - declared <= MAX_PADDING_FRAMES:
        keep = declared  # the AAC encoder's padding of the last frame: MP4 durations are exact
    data = buffer.take(keep, start)
    return DecodedAudio(data, int(rate), "pyav", declared, is_float, warnings)


def _short(d: DecodedAudio) -> bool:
    return d.declared_frames is not None and d.frames < SHORT_DECODE_FRACTION * d.declared_frames


def sample_peak(samples: np.ndarray) -> float:
    """max |sample| (NaN when a sample is NaN, inf when one is infinite), without an |x| copy of a long file."""
    if not samples.size:
        return 0.0
    hi, lo = abs(float(samples.max())), abs(float(samples.min()))  # numpy's max/min are NaN when any sample is
    return math.nan if math.isnan(hi) or math.isnan(lo) else max(hi, lo)


NEARLY_SILENT_DBFS = -60.0  # a take whose loudest sample is below this is noise floor, not a sound
CHANNEL_NAMES = {0: "left", 1: "right"}


def level_warnings(samples: np.ndarray, peak: float) -> list[str]:
    """What a sound designer would want to know about a take's level before training on it (it is encoded all the
    same: silence and quiet room tone are sounds too): digital silence, a peak below NEARLY_SILENT_DBFS, and a
    silent channel beside a sounding one (it trains as sound panned hard to one side). samples: [C, N]."""
    if peak == 0.0:
        return ["digital silence: every sample is 0 (an empty export or a muted track?)"]
    found = []
    peak_dbfs = 20 * math.log10(peak)
    if peak_dbfs < NEARLY_SILENT_DBFS:
        found.append(f"nearly silent: the loudest sample is at {peak_dbfs:.0f} dBFS (a level problem, or only the "
                     "noise floor?)")
    if samples.ndim == 2 and samples.shape[0] == 2:
        silent = [c for c in range(2) if not samples[c].any()]
        if len(silent) == 1:
            other = CHANNEL_NAMES[1 - silent[0]]
            found.append(f"the {CHANNEL_NAMES[silent[0]]} channel is silent: it trains as sound panned hard "
                         f"{other} (a mono recording on one track? save it as mono to hear it in the middle)")
    return found


def fit_level(d: DecodedAudio, peak: float | None = None) -> None:
    """Bring d.samples into [-1, 1] in place by the module's level policy, noting what was done in d.warnings.
    Raises AudioFileError when the peak is above MAX_PEAK. peak: `sample_peak(d.samples)` when the caller has it."""
    peak = sample_peak(d.samples) if peak is None else peak
    if peak <= 1.0:
        return
    level = f"peak {peak:.3g} ({20 * math.log10(peak):+.1f} dBFS)"
    if peak > MAX_PEAK:
        raise AudioFileError("samples out of range", f"{level}: corrupt data or integer values stored as "
                             "floats; re-export the file with samples in [-1, 1]")
    if d.float_samples:
        d.samples *= np.float32(1.0 / peak)
        d.warnings.append(f"float samples at {level}: scaled by {1 / peak:.3g} to fit [-1, 1]")
    else:
        over = int(np.count_nonzero(d.samples > 1.0)) + int(np.count_nonzero(d.samples < -1.0))  # no |x| copy
        np.clip(d.samples, -1.0, 1.0, out=d.samples)
        d.warnings.append(f"{over} sample(s) beyond [-1, 1] clipped ({level}; decoder overshoot or damaged data)")


def declared_length(path: str) -> tuple[int, int, int] | None:
    """(frames, channels, sample rate) a file's header declares, read without decoding; None when unknown."""
    try:
        import soundfile as sf

        info = sf.info(path)
        if _known_frames(info.frames):
            return int(info.frames), int(info.channels), int(info.samplerate)
    except Exception:  # not a libsndfile format: ask FFmpeg
        pass
    try:
        import av

        with av.open(path, metadata_errors="ignore") as container:
            stream = container.streams.audio[0]
            rate = stream.codec_context.sample_rate or stream.rate
            frames = _pyav_declared_frames(container, stream, rate) if rate else None
            if frames:
                return frames, int(stream.codec_context.channels or 2), int(rate)
    except Exception:
        pass
    return None


def check_fits_in_memory(path: str) -> None:
    """AudioFileError when the whole file cannot be decoded, resampled and encoded in the free host memory (about
    DECODE_COPIES float32 copies at 44.1 kHz or its own rate, plus the encoder's working memory), so a very long
    file is skipped with a reason instead of the system killing the whole encode."""
    from ..sa3.host_memory import available_host_memory

    declared, free = declared_length(path), available_host_memory()
    if declared is None or free is None:
        return
    frames, channels, rate = declared
    need = DECODE_COPIES * 4 * max(channels, 2) * frames * max(1.0, 44100 / rate) + ENCODE_RESERVE_BYTES
    if need > free:
        raise AudioFileError("too long for the free memory", f"{frames / rate / 60:.0f} min of audio needs about "
                             f"{need / 2**30:.1f} GB to decode and encode, {free / 2**30:.1f} GB is free: split the "
                             "file into parts, or free memory and run again")


def decode_audio(path: str | Path) -> DecodedAudio:
    """Decode a whole file to [C, N] float32 at its own sample rate.

    soundfile (libsndfile) goes first; PyAV (FFmpeg) is tried when soundfile refuses the file or returns clearly
    less than the container declares, and the longer result wins. The duration is what was decoded, not the
    header's claim; when it is clearly shorter, a warning says so. Levels are fitted into [-1, 1] (`fit_level`).
    Raises AudioFileError (zero bytes, unreadable, symlink loop, not audio, NaN/inf samples, out of range)."""
    path = os.fspath(path)
    check_readable(path)
    check_fits_in_memory(path)
    errors = []
    best: DecodedAudio | None = None
    empty = False  # a decoder read the file as audio holding no samples (a valid header and nothing after it)
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
            empty = True
            continue
        if best is None or got.frames > best.frames:
            best = got
        if not _short(best):
            break
    if best is None:
        raise AudioFileError("no samples (an empty recording)" if empty else "not audio or undecodable",
                             "; ".join(errors))
    peak = sample_peak(best.samples)
    if not math.isfinite(peak):
        raise AudioFileError("NaN/inf samples")
    if _short(best):
        best.warnings.append(f"decoded {best.seconds:.2f} s of the {best.declared_frames / best.sample_rate:.2f} s "
                             "the file declares: truncated or damaged, the rest is lost")
    best.warnings += level_warnings(best.samples, peak)
    fit_level(best, peak)
    return best


def downmix(samples: np.ndarray, channels: int = 2) -> np.ndarray:
    """[C, N] -> [channels, N] (channels 1 or 2).

    Mono is duplicated to both sides. More than two channels are taken in the standard WAV/FLAC speaker order for
    their count (`sa3.channels.SPEAKER_LAYOUTS`: 3 = L R C, 4 = quad, 5 = 5.0, 6 = 5.1, 7 = 6.1, 8 = 7.1) and mixed by ITU-R
    BS.775 (centre and surrounds at -3 dB, LFE dropped), each side divided by its total weight so the mix cannot
    clip; other counts go equally to both sides."""
    c = samples.shape[0]
    if channels == 1:
        return samples.mean(axis=0, keepdims=True)
    if channels != 2:
        raise ValueError(f"channels={channels}: only mono or stereo output is supported")
    if c == 1:
        return np.repeat(samples, 2, axis=0)
    if c == 2:
        return samples
    return stereo_weights(c) @ samples


def resample(samples: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """[C, N] float32 at rate_in -> [C, round(N * rate_out / rate_in)] with soxr's band-limited 'HQ' filter.
    Channel by channel into one output array: soxr filters channels independently (the same samples as one
    interleaved call), and no transposed [N, C] copies of a long file are made."""
    if rate_in == rate_out:
        return samples
    import soxr

    out = None
    for c, channel in enumerate(samples):
        y = soxr.resample(np.ascontiguousarray(channel, dtype=np.float32), rate_in, rate_out, quality="HQ")
        if out is None:
            out = np.empty((samples.shape[0], y.shape[0]), dtype=np.float32)
        out[c] = y
    return out


def load_audio(path: str | Path, sample_rate: int = 44100, channels: int = 2) -> tuple[np.ndarray, DecodedAudio]:
    """Decode, channel-map and resample a file for the autoencoder.
    Returns ([channels, N'] float32 at `sample_rate`, the DecodedAudio record with the source rate and length; its
    samples released)."""
    decoded = decode_audio(path)
    audio = resample(downmix(decoded.samples, channels), decoded.sample_rate, sample_rate)
    decoded.release_samples()
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
