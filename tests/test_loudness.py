"""Loudness: the BS.1770 filter table, the EBU Tech 3341 test signals, and normalisation with a peak ceiling."""

import math

import numpy as np
import pytest
from sa3_lora_studio.encoding.loudness import integrated_loudness, k_weighting, normalize_loudness, true_peak


def _sine(dbfs: float, seconds: float, rate: int, freq: float = 1000.0, channels: int = 2) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return np.repeat((10 ** (dbfs / 20) * np.sin(2 * np.pi * freq * t))[None], channels, axis=0)


def test_the_filters_at_48_khz_are_the_standards_table():
    (b1, a1), (b2, a2) = k_weighting(48000)
    assert b1 == pytest.approx([1.53512485958697, -2.69169618940638, 1.19839281085285], abs=1e-10)
    assert a1 == pytest.approx([1.0, -1.69065929318241, 0.73248077421585], abs=1e-10)
    assert b2 == pytest.approx([1.0, -2.0, 1.0]) and a2 == pytest.approx([1.0, -1.99004745483398, 0.99007225036621],
                                                                          abs=1e-10)


@pytest.mark.parametrize("rate", [44100, 48000, 32000])
def test_ebu_tech_3341_signals_read_their_loudness_at_any_rate(rate):
    assert integrated_loudness(_sine(-23, 20, rate), rate) == pytest.approx(-23.0, abs=0.1)  # case 1
    assert integrated_loudness(_sine(-33, 20, rate), rate) == pytest.approx(-33.0, abs=0.1)  # case 2
    gated = np.concatenate([_sine(-36, 10, rate), _sine(-23, 60, rate), _sine(-36, 10, rate)], axis=1)
    assert integrated_loudness(gated, rate) == pytest.approx(-23.0, abs=0.1)  # case 3: the relative gate
    quiet = np.concatenate([_sine(-72, 10, rate), gated, _sine(-72, 10, rate)], axis=1)
    assert integrated_loudness(quiet, rate) == pytest.approx(-23.0, abs=0.1)  # case 4: the absolute gate too
    steps = np.concatenate([_sine(-26, 20, rate), _sine(-20, 20.1, rate), _sine(-26, 20, rate)], axis=1)
    assert integrated_loudness(steps, rate) == pytest.approx(-23.0, abs=0.1)  # case 5


def test_a_full_scale_sine_in_one_channel_reads_minus_3_lufs_and_silence_reads_minus_infinity():
    one = _sine(0, 5, 48000, freq=997)
    one[1] = 0
    assert integrated_loudness(one, 48000) == pytest.approx(-3.01, abs=0.02)
    assert integrated_loudness(_sine(0, 5, 48000, freq=997, channels=1)[0], 48000) == pytest.approx(-3.01, abs=0.02)
    assert integrated_loudness(np.zeros((2, 48000)), 48000) == -math.inf
    short = _sine(-23, 0.3, 48000)  # a one-shot under one block: measured as one block of its own length
    assert integrated_loudness(short, 48000) == pytest.approx(-23.0, abs=0.3)
    assert integrated_loudness(np.zeros((2, 0)), 48000) == -math.inf


def test_the_relative_gate_comes_from_the_blocks_above_the_absolute_gate_and_noise_reads_as_another_meter_does():
    rate = 8000  # 320 s of audio: a low rate keeps it small
    loud = _sine(-20, 10, rate)
    mixed = np.concatenate([loud, _sine(-40, 10, rate), _sine(-80, 300, rate)], axis=1)
    # gating relative to all blocks (the -80 dB ones too) would let the -40 dB part in: about 3 LU lower
    assert integrated_loudness(mixed, rate) == pytest.approx(integrated_loudness(loud, rate), abs=0.1)

    rng = np.random.default_rng(1234)  # a decaying bass note, a high tone and noise; values from pyloudnorm's
    for rate, other_meter in ((44100, -6.880541595263307), (32000, -6.864798148688917)):  # "DeMan" meter
        noise = rng.standard_normal((int(rate * 5), 2)) * 0.1
        t = np.arange(noise.shape[0]) / rate
        mix = (0.3 * np.sin(2 * np.pi * 110 * t) * np.exp(-t % 1))[:, None] + \
            0.05 * np.sin(2 * np.pi * 5000 * t)[:, None] + noise * 0.3
        assert integrated_loudness(mix.T, rate) == pytest.approx(other_meter, abs=0.01), rate


def test_normalisation_reaches_the_target_within_a_true_peak_ceiling_and_a_gain_limit():
    rate = 44100
    quiet = _sine(-30, 5, rate)
    out, info = normalize_loudness(quiet, rate, -20.0)
    assert integrated_loudness(out, rate) == pytest.approx(-20.0, abs=0.05) and out.dtype == np.float32
    assert info["loudness_lufs"] == pytest.approx(-30.0, abs=0.1) and info["gain_db"] == pytest.approx(10.0, abs=0.1)
    assert "limited_by" not in info

    clicks = np.zeros((2, rate * 5))
    clicks[:, ::rate // 2] = 0.5  # sparse transients: quiet overall, loud peaks
    clicks += _sine(-40, 5, rate)
    out, info = normalize_loudness(clicks, rate, -14.0, peak_ceiling_db=-1.0)
    assert 20 * math.log10(true_peak(out)) == pytest.approx(-1.0, abs=1e-3) and info["limited_by"] == "peak"
    assert integrated_loudness(out, rate) < -14.5 and true_peak(clicks) >= np.abs(clicks).max()
    between = np.sin(2 * np.pi * (np.arange(4000) / 4 + 1 / 8))[None]  # fs/4, sampled 45 degrees off its peaks
    assert np.abs(between).max() == pytest.approx(0.7071, abs=1e-4) and true_peak(between) > 0.99  # found between

    room_tone = _sine(-66, 5, rate)  # a near-silent start: lifted by at most MAX_GAIN_DB, not into hiss at -18
    out, info = normalize_loudness(room_tone, rate, -18.0)
    assert info["gain_db"] == 20.0 and info["limited_by"] == "max gain"

    loud = _sine(0, 1, rate)  # 0 LUFS asked for -0.5: its peak would pass the ceiling, so it is turned down to it
    out, info = normalize_loudness(loud, rate, -0.5, peak_ceiling_db=-1.0)
    assert info["gain_db"] < -0.5 and info["limited_by"] == "peak"
    assert 20 * math.log10(true_peak(out)) == pytest.approx(-1.0, abs=1e-3)

    silent, info = normalize_loudness(np.zeros((2, rate)), rate, -20.0)
    assert not silent.any() and info == {"loudness_lufs": None, "gain_db": 0.0}
    broken = quiet.copy()
    broken[0, -10] = np.nan  # a diverged adapter's demo is not "silence"
    kept, info = normalize_loudness(broken, rate, -20.0)
    assert info == {"loudness_lufs": None, "gain_db": 0.0, "nonfinite": True} and np.isnan(kept).any()


def test_integer_pcm_and_a_transposed_array_are_refused():
    with pytest.raises(ValueError, match="floating point"):
        integrated_loudness((_sine(-20, 1, 8000) * 32767).astype(np.int16), 8000)
    with pytest.raises(ValueError, match=r"\[channels, samples\], got shape \(8000, 2\)"):
        integrated_loudness(_sine(-20, 1, 8000).T, 8000)
