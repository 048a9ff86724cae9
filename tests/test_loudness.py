"""Loudness: the BS.1770 filter table, the EBU Tech 3341 test signals, and normalisation with a peak ceiling."""

import math

import numpy as np
import pytest
from sa3_lora_studio.encoding.loudness import integrated_loudness, k_weighting, normalize_loudness


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


def test_normalisation_reaches_the_target_unless_a_peak_would_pass_the_ceiling():
    rate = 44100
    quiet = _sine(-30, 5, rate)
    out, info = normalize_loudness(quiet, rate, -20.0)
    assert integrated_loudness(out, rate) == pytest.approx(-20.0, abs=0.05) and out.dtype == np.float32
    assert info["loudness_lufs"] == pytest.approx(-30.0, abs=0.1) and info["gain_db"] == pytest.approx(10.0, abs=0.1)

    clicks = np.zeros((2, rate * 5))
    clicks[:, ::rate // 2] = 0.5  # sparse transients: quiet overall, loud peaks
    clicks += _sine(-40, 5, rate)
    out, info = normalize_loudness(clicks, rate, -14.0, peak_ceiling_db=-1.0)
    assert 20 * math.log10(np.abs(out).max()) == pytest.approx(-1.0, abs=1e-3)  # stopped at the ceiling
    assert integrated_loudness(out, rate) < -14.5

    silent, info = normalize_loudness(np.zeros((2, rate)), rate, -20.0)
    assert not silent.any() and info == {"loudness_lufs": None, "gain_db": 0.0}
