"""Channel layouts: how a multichannel signal (3-8 channels in the standard WAV/FLAC speaker order of its count)
is mixed to stereo. One rule for the dataset encoder (numpy) and the engine's audio inputs (torch)."""

from __future__ import annotations

import math

import numpy as np

# Speaker order of multichannel files by channel count: the WAVE_FORMAT_EXTENSIBLE default masks and FLAC's
# fixed orders (which agree). Counts without a standard layout are mixed as unknown (equally to both sides).
SPEAKER_LAYOUTS = {
    3: ("FL", "FR", "FC"),
    4: ("FL", "FR", "BL", "BR"),  # quad
    5: ("FL", "FR", "FC", "BL", "BR"),  # 5.0
    6: ("FL", "FR", "FC", "LFE", "BL", "BR"),  # 5.1
    7: ("FL", "FR", "FC", "LFE", "BC", "SL", "SR"),  # 6.1
    8: ("FL", "FR", "FC", "LFE", "BL", "BR", "SL", "SR"),  # 7.1
}
_MINUS_3DB = math.sqrt(0.5)
# (to left, to right) per speaker: ITU-R BS.775 Lo/Ro, centre and surrounds at -3 dB, LFE dropped; a back centre
# is a surround split over both sides.
STEREO_WEIGHTS = {
    "FL": (1.0, 0.0), "FR": (0.0, 1.0), "FC": (_MINUS_3DB, _MINUS_3DB), "LFE": (0.0, 0.0),
    "BL": (_MINUS_3DB, 0.0), "BR": (0.0, _MINUS_3DB), "SL": (_MINUS_3DB, 0.0), "SR": (0.0, _MINUS_3DB),
    "BC": (0.5, 0.5),
}


def stereo_weights(n_channels: int) -> np.ndarray:
    """[2, n_channels] float32 downmix matrix for n_channels >= 3 (SPEAKER_LAYOUTS order), each row summing to 1
    so the mix cannot clip; left and right are mirror images."""
    layout = SPEAKER_LAYOUTS.get(n_channels)
    if layout is None:  # no standard order: every channel to both sides
        weights = np.full((2, n_channels), _MINUS_3DB, dtype=np.float32)
    else:
        weights = np.array([STEREO_WEIGHTS[s] for s in layout], dtype=np.float32).T
    return weights / weights.sum(axis=1, keepdims=True)
