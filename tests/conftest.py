"""Shared test fixtures: paths to the tiny reference-parity checkpoints and their goldens."""

import json
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("SA3_FIXTURES", REPO.parent / "shared" / "fixtures" / "sa3"))
REAL_CONFIGS = FIXTURES.parent / "sa3-real-configs"

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.exists():
        pytest.skip(f"fixtures not found at {FIXTURES}")
    return FIXTURES


@pytest.fixture(scope="session")
def golden_cases(fixtures_dir) -> dict:
    cases = json.loads((fixtures_dir / "golden" / "cases.json").read_text())
    return {case["id"]: case for case in cases["cases"]}


def load_golden(fixtures_dir: Path, name: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(fixtures_dir / "golden" / name))


@pytest.fixture(scope="session")
def tiny(fixtures_dir):
    """The tiny-small fixture model through the public loader (shared by the training tests)."""
    from sa3_lora_studio import load_model

    return load_model(fixtures_dir / "tiny-small")


@pytest.fixture(scope="session")
def dataset(tiny, tmp_path_factory):
    """Three short captioned WAV files encoded by the tiny model's own SAME encoder."""
    import numpy as np
    import soundfile as sf
    from sa3_lora_studio.encoding import encode_folder

    root = tmp_path_factory.mktemp("audio")
    rng = np.random.default_rng(0)
    for i, (freq, caption) in enumerate([(220, "warm bass drone"), (880, "bright bell tone"), (440, "noisy snare")]):
        t = np.arange(int(44100 * 0.06)) / 44100
        wav = 0.4 * np.sin(2 * np.pi * freq * t)[:, None] * np.ones((1, 2)) + 0.05 * rng.standard_normal((len(t), 2))
        sf.write(root / f"clip{i}.wav", wav.astype(np.float32), 44100)
        (root / f"clip{i}.txt").write_text(caption)
    out = tmp_path_factory.mktemp("dataset")
    assert encode_folder(root, out, encoder=tiny).complete
    return out
