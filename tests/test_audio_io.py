"""Decoding real files of every listed format (written by the real encoders), channel mapping, resampling, and
each kind of bad file."""

import os

import numpy as np
import pytest
from sa3_lora_studio.encoding import audio_io
from sa3_lora_studio.encoding.audio_io import AudioFileError, decode_audio, downmix, load_audio, resample
from sa3_lora_studio.encoding.toy import tone, write_audio_file
from sa3_lora_studio.sa3.channels import SPEAKER_LAYOUTS

SECONDS = 0.75

# fmt -> (sample rate, duration tolerance in seconds). Lossless formats decode exactly; lossy codecs add
# encoder delay/padding (AAC priming, Opus pre-skip, MP3 frames) that decoders trim to different extents.
FORMATS = {
    "wav16": (22050, 0), "wav24": (32000, 0), "wav32": (44100, 0), "wavf": (48000, 0), "flac": (44100, 0),
    "aiff": (16000, 0), "mp3": (44100, 0.06), "ogg": (22050, 0.06), "opus": (48000, 0.06), "m4a": (44100, 0.1),
    "mp3-ffmpeg": (32000, 0.1), "opus-ffmpeg": (48000, 0.06),
}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_format_decodes_with_its_rate_channels_and_decoded_duration(tmp_path, fmt):
    rate, tol = FORMATS[fmt]
    x = tone(SECONDS, rate)
    d = decode_audio(write_audio_file(tmp_path / "x", x, rate, fmt))
    assert d.sample_rate == rate and d.channels == 2 and d.samples.dtype == np.float32
    assert abs(d.seconds - x.shape[1] / rate) <= tol + 1e-9
    if tol == 0:
        np.testing.assert_allclose(d.samples, x, atol=1e-4)
    else:
        assert 0.1 < np.abs(d.samples).max() < 0.6  # the tone is there, not silence or garbage


def test_load_audio_gives_stereo_at_44100_with_the_true_length(tmp_path):
    path = write_audio_file(tmp_path / "m", tone(SECONDS, 22050, channels=1), 22050, "flac")
    audio, info = load_audio(path)
    assert info.channels == 1 and info.sample_rate == 22050
    assert audio.shape == (2, 2 * info.frames)  # exactly twice the source rate
    np.testing.assert_array_equal(audio[0], audio[1])  # mono duplicated


def test_soxr_resampling_keeps_a_tone_in_band_and_its_level():
    x = tone(1.0, 22050, channels=1, freq=1000.0)
    y = resample(x, 22050, 44100)
    assert y.shape == (1, 44100)
    ref = tone(1.0, 44100, channels=1, freq=1000.0)[0]
    core = slice(2000, -2000)  # ignore filter edges
    corr = np.dot(y[0, core], ref[core]) / np.linalg.norm(y[0, core]) / np.linalg.norm(ref[core])
    assert corr > 0.999
    assert abs(np.abs(y[0, core]).max() - 0.3) < 0.01


def test_downmix_follows_the_documented_rules():
    n = 16
    rng = np.random.default_rng(0)
    x6 = rng.uniform(-1, 1, (6, n)).astype(np.float32)  # L R C LFE Ls Rs
    y = downmix(x6)
    c = np.sqrt(0.5)
    left = (x6[0] + c * x6[2] + c * x6[4]) / (1 + 2 * c)  # ITU-R BS.775: centre and surrounds at -3 dB
    right = (x6[1] + c * x6[2] + c * x6[5]) / (1 + 2 * c)
    np.testing.assert_allclose(y, np.stack([left, right]), rtol=1e-5, atol=1e-6)  # LFE dropped
    assert np.abs(downmix(np.ones((8, n), np.float32))).max() <= 1 + 1e-6  # never clips
    x3 = rng.uniform(-1, 1, (3, n)).astype(np.float32)
    np.testing.assert_allclose(downmix(x3)[0], (x3[0] + c * x3[2]) / (1 + c), rtol=1e-5, atol=1e-6)
    assert downmix(x3[:1]).shape == (2, n)
    np.testing.assert_array_equal(downmix(x3[:2]), x3[:2])


MIRROR = {"FL": "FR", "FR": "FL", "BL": "BR", "BR": "BL", "SL": "SR", "SR": "SL"}


@pytest.mark.parametrize("n_channels", [3, 4, 5, 6, 7, 8, 10])
def test_every_channel_count_downmixes_left_and_right_as_mirror_images(n_channels):
    w = downmix(np.eye(n_channels, dtype=np.float32))  # column k: where channel k lands, [2, C]
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-6)  # each side's weights sum to 1: no clipping
    layout = SPEAKER_LAYOUTS.get(n_channels, ())
    for k, speaker in enumerate(layout):
        twin = layout.index(MIRROR.get(speaker, speaker))
        np.testing.assert_allclose(w[:, k], w[::-1, twin], rtol=1e-6)  # its mirror speaker, sides swapped
        if speaker in ("FL", "BL", "SL"):
            assert w[0, k] > 0 and w[1, k] == 0  # a left speaker stays on the left
    if not layout:  # no standard order for this count: every channel to both sides alike
        np.testing.assert_allclose(w[0], w[1])


def test_quad_back_speakers_go_to_their_own_side_at_minus_3_db():
    w = downmix(np.eye(4, dtype=np.float32))  # FL FR BL BR
    front, back = w[0, 0], w[0, 2]
    assert w[1, 2] == 0 and w[0, 3] == 0 and w[1, 3] == back and w[1, 1] == front
    assert back / front == pytest.approx(np.sqrt(0.5))


def test_multichannel_wav_is_downmixed_to_stereo(tmp_path):
    x = np.concatenate([tone(0.2, 44100)] * 3)  # 6 channels
    path = write_audio_file(tmp_path / "surround", x, 44100, "wavf")
    audio, info = load_audio(path)
    assert info.channels == 6 and audio.shape == (2, x.shape[1])


def _reason(path) -> str:
    with pytest.raises(AudioFileError) as e:
        decode_audio(path)
    return e.value.reason


def test_zero_byte_file_is_rejected(tmp_path):
    (tmp_path / "z.wav").write_bytes(b"")
    assert _reason(tmp_path / "z.wav") == "zero bytes"


@pytest.mark.parametrize("fmt", ["WAV", "AIFF"])  # (libsndfile writes an empty FLAC as zero bytes)
def test_a_recording_with_no_samples_is_named_as_empty_not_as_undecodable(tmp_path, fmt):
    import soundfile as sf

    path = tmp_path / f"armed-but-never-recorded.{fmt.lower()}"
    sf.write(path, np.zeros((0, 2), dtype=np.float32), 44100, format=fmt)
    assert _reason(path) == "no samples (an empty recording)"


def test_text_file_with_an_audio_extension_is_not_audio(tmp_path):
    (tmp_path / "t.mp3").write_text("this is not audio\n" * 20)
    assert "not audio" in _reason(tmp_path / "t.mp3")


def test_header_only_truncated_file_is_rejected(tmp_path):
    path = write_audio_file(tmp_path / "h", tone(0.5, 44100), 44100, "flac")
    path.write_bytes(path.read_bytes()[:60])
    assert "not audio" in _reason(path)


def test_truncated_file_records_the_decoded_duration_not_the_header(tmp_path):
    path = write_audio_file(tmp_path / "half", tone(1.0, 44100), 44100, "wav16")
    data = path.read_bytes()
    path.write_bytes(data[:44 + (len(data) - 44) // 2])  # header still claims 1 s
    d = decode_audio(path)
    assert abs(d.seconds - 0.5) < 0.01
    assert len(d.warnings) == 1 and "decoded 0.50 s of the 1.00 s" in d.warnings[0]


def test_damage_in_the_middle_of_a_file_keeps_the_audio_after_it_with_a_warning(tmp_path):
    x = tone(2.0, 44100)
    path = write_audio_file(tmp_path / "damaged", x, 44100, "flac")
    data = bytearray(path.read_bytes())
    for pos in np.random.default_rng(0).integers(len(data) // 3, 2 * len(data) // 3, 30):
        data[pos] ^= 0xFF  # 30 flipped bytes in the middle third (the decoder used to stop at the first)
    path.write_bytes(bytes(data))
    d = decode_audio(path)
    assert 1.2 < d.seconds < 2.0
    np.testing.assert_allclose(d.samples[:, -4096:], x[:, -4096:], atol=1e-4)  # the file's real end is there
    assert any("damaged packet" in w for w in d.warnings) and any("of the 2.00 s" in w for w in d.warnings)


def test_a_clean_file_decodes_without_warnings(tmp_path):
    assert decode_audio(write_audio_file(tmp_path / "clean", tone(0.3, 44100), 44100, "flac")).warnings == []


def test_a_digitally_silent_file_decodes_with_a_warning(tmp_path):
    d = decode_audio(write_audio_file(tmp_path / "muted", 0.0 * tone(0.3, 44100), 44100, "flac"))
    assert d.frames > 0 and d.warnings == ["digital silence: every sample is 0 (an empty export or a muted track?)"]


def test_a_nearly_silent_take_and_a_silent_channel_are_named(tmp_path):
    def at_dbfs(dbfs):
        x = tone(0.3, 44100)
        return x * (10 ** (dbfs / 20) / np.abs(x).max())

    quiet = write_audio_file(tmp_path / "room", at_dbfs(-70), 44100, "wavf")
    assert decode_audio(quiet).warnings == ["nearly silent: the loudest sample is at -70 dBFS (a level problem, or "
                                            "only the noise floor?)"]
    x = tone(0.3, 44100)
    x[1] = 0.0  # a mono recording on the left track of a stereo file
    assert decode_audio(write_audio_file(tmp_path / "left", x, 44100, "wav24")).warnings == [
        "the right channel is silent: it trains as sound panned hard left (a mono recording on one track? save it "
        "as mono to hear it in the middle)"]
    soft = write_audio_file(tmp_path / "soft", at_dbfs(-50), 44100, "wavf")
    assert decode_audio(soft).warnings == []  # -50 dBFS is a quiet sound, not silence


def test_hot_float_file_is_peak_normalised_with_a_warning(tmp_path):
    x = 18.0 * tone(0.2, 44100) / 0.3  # peak 18: a float mix far above full scale
    d = decode_audio(write_audio_file(tmp_path / "hot", x, 44100, "wavf"))
    assert np.abs(d.samples).max() == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(d.samples, x / 18.0, atol=1e-5)  # same waveform, only quieter
    assert len(d.warnings) == 1 and "peak 18" in d.warnings[0] and "scaled" in d.warnings[0]


def test_absurd_sample_values_are_rejected(tmp_path):
    x = tone(0.2, 44100)
    x[0, 10] = 1e30
    assert _reason(write_audio_file(tmp_path / "huge", x, 44100, "wavf")) == "samples out of range"


def test_lossy_decoder_overshoot_is_clipped_with_a_warning():
    x = tone(0.1, 44100)
    x[1, 5:8] = [1.5, -12.7, 1.2]  # what a damaged MP3 frame decodes to
    d = audio_io.DecodedAudio(x.copy(), 44100, "soundfile", float_samples=False)
    audio_io.fit_level(d)
    assert np.abs(d.samples).max() == 1.0 and d.samples[1, 6] == -1.0
    np.testing.assert_array_equal(d.samples[0], x[0])  # the rest untouched
    assert len(d.warnings) == 1 and "3 sample(s)" in d.warnings[0] and "clipped" in d.warnings[0]


def test_aac_encoder_padding_is_trimmed_to_the_mp4_duration(tmp_path):
    d = decode_audio(write_audio_file(tmp_path / "pad", tone(0.75, 44100), 44100, "m4a"))
    assert d.declared_frames is not None and d.frames == d.declared_frames  # not the whole last 1024-frame block


def test_nan_and_inf_samples_are_rejected(tmp_path):
    x = tone(0.2, 44100)
    x[0, 100] = np.nan
    assert _reason(write_audio_file(tmp_path / "nan", x, 44100, "wavf")) == "NaN/inf samples"
    x[0, 100] = np.inf
    assert _reason(write_audio_file(tmp_path / "inf", x, 44100, "wavf")) == "NaN/inf samples"


def test_unreadable_file_is_rejected(tmp_path, monkeypatch):
    path = write_audio_file(tmp_path / "locked", tone(0.2, 44100), 44100, "wav16")
    os.chmod(path, 0)
    if os.geteuid() == 0:  # root reads anything: make open() refuse as it would for a normal user
        real_open = open

        def refusing_open(p, *a, **k):
            if os.fspath(p) == os.fspath(path):
                raise PermissionError(13, "Permission denied", os.fspath(p))
            return real_open(p, *a, **k)
        monkeypatch.setattr(audio_io, "open", refusing_open, raising=False)
    try:
        assert _reason(path).startswith("unreadable")
    finally:
        os.chmod(path, 0o644)


def test_symlink_loop_is_rejected(tmp_path):
    os.symlink("loop.wav", tmp_path / "loop.wav")
    assert _reason(tmp_path / "loop.wav") == "symlink loop"


def test_pyav_is_tried_when_soundfile_stops_early(tmp_path, monkeypatch):
    path = write_audio_file(tmp_path / "x", tone(0.5, 44100), 44100, "flac")
    real = audio_io._decode_soundfile

    def stops_early(p):
        d = real(p)
        d.samples = d.samples[:, : d.frames // 3]
        return d
    monkeypatch.setattr(audio_io, "_decode_soundfile", stops_early)
    d = decode_audio(path)
    assert d.decoder == "pyav" and d.frames == round(0.5 * 44100)


def test_pyav_is_tried_when_soundfile_refuses(tmp_path, monkeypatch):
    path = write_audio_file(tmp_path / "x", tone(0.5, 44100), 44100, "flac")

    def refuses(p):
        raise RuntimeError("Error opening: Format not recognised")
    monkeypatch.setattr(audio_io, "_decode_soundfile", refuses)
    d = decode_audio(path)
    assert d.decoder == "pyav" and d.frames == round(0.5 * 44100)


def test_a_long_file_is_read_in_blocks_resampled_per_channel_and_released_with_the_same_samples(tmp_path,
                                                                                                monkeypatch):
    """Long files are read block by block into [C, N], resampled channel by channel (soxr's interleaved result
    exactly), and load_audio lets go of the source samples: fewer copies alive (bench/encode.py measures them)."""
    import soundfile as sf
    import soxr

    rate = 48000
    x = (0.5 * np.random.default_rng(0).standard_normal((3, 25_000))).clip(-1, 1).astype(np.float32)
    path = tmp_path / "three.wav"
    sf.write(path, x.T, rate, subtype="FLOAT")
    monkeypatch.setattr(audio_io, "READ_BLOCK_FRAMES", 4096)  # several blocks and a partial last one
    reads, real_read = [], sf.SoundFile.read

    def read(self, frames=-1, *args, **kwargs):
        reads.append(frames)
        return real_read(self, frames, *args, **kwargs)

    monkeypatch.setattr(sf.SoundFile, "read", read)
    d = decode_audio(path)
    assert reads == [4096] * 6 + [25_000 - 6 * 4096]  # never the whole file at once
    monkeypatch.setattr(sf.SoundFile, "read", real_read)
    assert d.decoder == "soundfile" and d.samples.flags.c_contiguous and np.array_equal(d.samples, x)
    stereo = downmix(x)
    expected = soxr.resample(np.ascontiguousarray(stereo.T), rate, 44100, quality="HQ").T
    assert np.array_equal(resample(stereo, rate, 44100), expected)
    audio, info = load_audio(path)
    assert np.array_equal(audio, expected) and info.samples is None  # released: the caller holds `audio`
    assert (info.channels, info.frames, info.sample_rate, info.seconds) == (3, 25_000, rate, 25_000 / rate)
    # a header that claims more frames than the file holds: what is there is kept (decode_audio warns)
    data = path.read_bytes()
    (tmp_path / "cut.wav").write_bytes(data[:len(data) - 4 * 3 * 5000])
    cut = decode_audio(tmp_path / "cut.wav")
    assert cut.frames == 20_000 and np.array_equal(cut.samples, x[:, :20_000])


def test_sample_peak_sees_nan_and_inf_wherever_they_are():
    for bad, expected in ((np.nan, "nan"), (np.inf, "inf"), (-np.inf, "inf")):
        for position in (0, 3, 7):
            x = np.full((2, 4), 0.25, dtype=np.float32)
            x.flat[position] = bad
            assert str(audio_io.sample_peak(x)) == expected
    assert audio_io.sample_peak(np.array([[0.5, -0.75]], dtype=np.float32)) == 0.75
    assert audio_io.sample_peak(np.zeros((2, 0), dtype=np.float32)) == 0.0


def test_a_decode_is_trimmed_and_grown_in_its_own_memory():
    """PyAV decodes into one buffer sized from the declared length: trimming it (MP4 padding, a short decode) moves
    rows in place instead of copying the whole file, and a longer decode than declared grows it."""
    x = np.arange(3 * 10, dtype=np.float32).reshape(3, 10)
    kept = audio_io.first_columns(x.copy(), 7)
    assert np.array_equal(kept, x[:, :7]) and kept.flags.c_contiguous
    buf = x.copy()
    assert np.shares_memory(audio_io.first_columns(buf, 4), buf)
    assert audio_io.first_columns(buf, 10) is buf
    buffer = audio_io.PlanarBuffer(2, capacity=5)
    blocks = [np.full((2, 3), float(i), dtype=np.float32) for i in range(4)]
    for block in blocks:
        buffer.append(block)
    assert buffer.frames == 12
    assert np.array_equal(buffer.take(11), np.concatenate(blocks, axis=1)[:, :11])
    packed = audio_io.PlanarBuffer(2, capacity=4)
    packed.append(np.array([[1, 2, 3, 4, 5, 6]], dtype=np.float32))  # one row: a packed layout, L R L R ...
    assert np.array_equal(packed.take(3), [[1, 3, 5], [2, 4, 6]])


def _aac_without_edit_list(path, x: np.ndarray, rate: int, itunsmpb: str | None):
    import av

    container = av.open(str(path), "w", options={"use_editlist": "0", "movflags": "use_metadata_tags"})
    if itunsmpb:
        container.metadata["iTunSMPB"] = itunsmpb
    stream = container.add_stream("aac", rate=rate)
    stream.layout = "stereo"
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(x), format="fltp", layout="stereo")
    frame.sample_rate = rate
    for packet in [*stream.encode(frame), *stream.encode(None)]:
        container.mux(packet)
    container.close()
    return path


def _lag(decoded: np.ndarray, original: np.ndarray) -> int:
    """Samples by which `decoded` is late against `original` (cross-correlation peak of the left channels)."""
    n = min(decoded.shape[1], original.shape[1])
    corr = np.correlate(decoded[0, :n], original[0, :n], mode="full")
    return int(np.argmax(corr)) - (n - 1)


def test_aac_priming_is_removed_by_the_itunsmpb_tag_when_no_edit_list_did(tmp_path):
    """An MP4 without an edit list keeps the AAC encoder's priming (1024 samples for FFmpeg's, 2112 for Apple's) at
    the start; the iTunSMPB tag names it and the original length, so the decode lines up with the source."""
    rate = 44100
    rng = np.random.default_rng(1)
    x = np.zeros((2, rate), dtype=np.float32)
    for start in (5000, 20000, 31000):
        x[:, start:start + 300] = 0.5 * rng.standard_normal(300)
    tag = f" 00000000 00000400 00000000 {rate:016X} 00000000 00000000"  # delay 1024, padding, 44100 frames
    tagged = decode_audio(_aac_without_edit_list(tmp_path / "tagged.m4a", x, rate, tag))
    assert tagged.frames == rate and abs(_lag(tagged.samples, x)) <= 2
    untagged = decode_audio(_aac_without_edit_list(tmp_path / "plain.m4a", x, rate, None))
    assert abs(_lag(untagged.samples, x) - 1024) <= 2  # nothing says how long the priming is: kept
    wrong = f" 00000000 00000400 00000000 {10 * rate:016X} 00000000 00000000"  # a length the file cannot hold
    assert decode_audio(_aac_without_edit_list(tmp_path / "wrong.m4a", x, rate, wrong)).frames == untagged.frames
    assert audio_io.itunes_gapless({"iTunSMPB": "garbage"}) is None
    assert audio_io.itunes_gapless({"itunsmpb": " 00000000 00000840 000001CA 00000000003F31F6"}) == (2112, 0x3F31F6)
