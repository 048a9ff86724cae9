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
