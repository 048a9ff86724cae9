"""Writing audio files: FLAC and WAV through libsndfile (soundfile), MP3 and Opus through FFmpeg (PyAV).

Used for training demos (`RunConfig.demo_format`), `sa3-lora generate` and the test-signal writers of `toy.py`. Samples are numpy
float32 `[C, N]` in [-1, 1], channels first, like everything in `audio_io.py`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

# format -> (extension, PyAV codec, container, bitrate in bit/s); FLAC and WAV have no codec: libsndfile writes them
OUTPUT_FORMATS = {
    "flac": (".flac", None, None, None),
    "wav": (".wav", None, None, None),
    "mp3": (".mp3", "libmp3lame", "mp3", 256_000),
    "opus": (".opus", "libopus", "ogg", 160_000),
}
OPUS_RATE = 48000  # the only input rate libopus takes that every SA3 rate resamples to without loss of band


def check_output_format(fmt: str, field: str = "format") -> str:
    """fmt when it is one of OUTPUT_FORMATS, else a ValueError naming `field`."""
    if fmt not in OUTPUT_FORMATS:
        raise ValueError(f"{field}={fmt!r} is not an audio output format; use one of {sorted(OUTPUT_FORMATS)}")
    return fmt


def encode_with_pyav(path: str | os.PathLike, samples: np.ndarray, sample_rate: int, codec: str, container: str,
                     bitrate: int | None = None) -> None:
    """Encode [C, N] float32 (C = 1 or 2) with an FFmpeg codec into `container` at path. PyAV splits the one frame
    into the codec's frame size and converts the sample format."""
    import av

    layout = {1: "mono", 2: "stereo"}.get(samples.shape[0])
    if layout is None:
        raise ValueError(f"{path}: {samples.shape[0]} channels; writing takes mono or stereo")
    with av.open(os.fspath(path), "w", format=container) as out:
        stream = out.add_stream(codec, rate=sample_rate)
        stream.layout = layout
        if bitrate:
            stream.bit_rate = bitrate
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples, dtype=np.float32), format="fltp",
                                           layout=layout)
        frame.sample_rate = sample_rate
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


def write_audio(path: str | os.PathLike, samples: np.ndarray, sample_rate: int, fmt: str = "flac") -> Path:
    """Write [C, N] float32 at sample_rate Hz as `fmt` ("flac" and "wav" 24-bit, "mp3" 256 kbit/s, "opus" 160 kbit/s
    at 48 kHz) to path with the format's extension (any suffix of path is replaced). Returns the written path; the
    file appears whole (written beside it, then renamed), so a reader never sees half a demo."""
    ext, codec, container, bitrate = OUTPUT_FORMATS[check_output_format(fmt)]
    path = Path(path).with_suffix(ext)
    partial = path.with_name(path.name + ".partial")
    samples = np.ascontiguousarray(samples, dtype=np.float32)
    try:
        if codec is None:
            import soundfile as sf

            sf.write(str(partial), samples.T, sample_rate, format=fmt.upper(), subtype="PCM_24")
        else:
            if fmt == "opus" and sample_rate != OPUS_RATE:
                from .audio_io import resample

                samples, sample_rate = resample(samples, sample_rate, OPUS_RATE), OPUS_RATE
            encode_with_pyav(partial, samples, sample_rate, codec, container, bitrate)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, path)
    return path


__all__ = ["OUTPUT_FORMATS", "check_output_format", "encode_with_pyav", "write_audio"]
