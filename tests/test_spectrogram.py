"""The tinted stereo spectrogram (demos, the Spectrogram node, the panel): layout, tints, and level."""

import math

import numpy as np
import torch
from sa3_lora_studio.sa3.spectrogram import tinted_spectrogram


def _tone(hz: float, db: float, seconds: float = 1.0, rate: int = 44100) -> torch.Tensor:
    t = torch.arange(int(seconds * rate)) / rate
    return (10 ** (db / 20) * torch.sin(2 * math.pi * hz * t))[None].repeat(2, 1)


def test_silence_is_black_and_a_quieter_take_is_darker():
    """Compared side by side, a take that collapsed to silence must not look like the loudest one."""
    silent = tinted_spectrogram(torch.zeros(2, 44100), 44100, 200, 60)
    assert silent.shape == (60, 200, 3) and silent.max() == 0
    means = [tinted_spectrogram(_tone(1000, db), 44100, 200, 60).mean() for db in (-6, -30, -50, -80)]
    assert means[0] > means[1] > means[2] > means[3] and means[3] < 1.0, means
    assert means[0] > 2.5 * means[2]  # the image dims with the level on its own dB scale (gamma 0.6)


def test_left_channel_on_top_with_the_bass_towards_the_centre_and_bass_tinted_red():
    left_bass = torch.stack([_tone(80, -6)[0], torch.zeros(44100)])  # bass in the left channel only
    image = tinted_spectrogram(left_bass, 44100, 200, 120).astype(float)
    top, bottom = image[:60], image[60:]
    assert top.mean() > 10 * max(bottom[4:].mean(), 0.1)  # the right channel is silent (rows at the seam blend)
    rows = top.sum(axis=(1, 2))
    assert rows[40:].sum() > 5 * rows[:20].sum()  # low frequencies near the centre line, not the top edge
    red, green, blue = (top[..., k].sum() for k in range(3))
    assert red > green and red > blue  # 0-200 Hz energy reads red
    high = tinted_spectrogram(_tone(6000, -6), 44100, 200, 120).astype(float)[:60]
    assert high[..., 2].sum() > high[..., 0].sum()  # 1.5-16 kHz reads blue
    assert np.isfinite(image).all()
