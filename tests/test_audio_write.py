"""Audio writing (demos): each output format decodes back to the same signal, whole files only, clear errors."""

import numpy as np
import pytest
from sa3_lora_studio.encoding.audio_io import decode_audio
from sa3_lora_studio.encoding.audio_write import OUTPUT_FORMATS, write_audio
from sa3_lora_studio.encoding.toy import tone


def _peak_hz(channel: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(channel * np.hanning(len(channel))))
    return float(np.argmax(spectrum) * rate / len(channel))


@pytest.mark.parametrize("fmt", sorted(OUTPUT_FORMATS))
def test_each_format_decodes_back_to_the_written_signal(tmp_path, fmt):
    rate = 44100
    source = tone(1.0, rate, freq=600.0)  # channel 1 at 900 Hz: a channel swap fails
    path = write_audio(tmp_path / "demo_0.any", source, rate, fmt)
    assert path == tmp_path / f"demo_0{OUTPUT_FORMATS[fmt][0]}" and sorted(tmp_path.iterdir()) == [path]
    decoded = decode_audio(path)
    assert decoded.channels == 2 and abs(decoded.seconds - 1.0) < 0.03
    assert decoded.sample_rate == (48000 if fmt == "opus" else rate)
    for channel, hz in zip(decoded.samples, (600.0, 900.0)):
        assert abs(_peak_hz(channel, decoded.sample_rate) - hz) < 3
        assert abs(np.sqrt(np.mean(channel ** 2)) - 0.3 / np.sqrt(2)) < 0.02  # level kept
    if fmt == "flac":
        assert np.abs(decoded.samples - source).max() < 1e-5  # lossless, 24-bit


def test_unknown_format_and_channel_count_are_named(tmp_path):
    with pytest.raises(ValueError, match="'aiff'.*flac"):
        write_audio(tmp_path / "a", tone(0.1, 44100), 44100, "aiff")
    with pytest.raises(ValueError, match="3 channels"):
        write_audio(tmp_path / "a", tone(0.1, 44100, channels=3), 44100, "mp3")
    assert not list(tmp_path.iterdir())  # no half-written file is left behind
