"""A run killed without warning (SIGKILL) loses at most one checkpoint interval; gated downloads explain themselves."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf
from sa3_lora_studio.training.runs import RunRegistry


@pytest.fixture(scope="module")
def tiny_dataset(fixtures_dir, tmp_path_factory):
    from sa3_lora_studio import load_model
    from sa3_lora_studio.encoding import encode_folder

    root = tmp_path_factory.mktemp("clips")
    for i in range(2):
        t = np.arange(2000) / 44100
        sf.write(root / f"c{i}.wav", 0.3 * np.sin(2 * np.pi * (300 + 200 * i) * t)[:, None].repeat(2, 1), 44100)
        (root / f"c{i}.txt").write_text(f"clip {i}")
    out = tmp_path_factory.mktemp("ds")
    encode_folder(root, out, encoder=load_model(fixtures_dir / "tiny-small"))
    return out


def test_sigkill_loses_at_most_one_checkpoint_interval_and_resume_finishes(tmp_path, fixtures_dir, tiny_dataset):
    config = {"dataset": str(tiny_dataset), "model": str(fixtures_dir / "tiny-small"), "name": "crash", "rank": 2,
              "adapter_type": "lora", "steps": 400, "batch_size": 1, "crop_seconds": 0.02, "checkpoint_every": 2,
              "demo_every": 0, "seed": 1}
    (tmp_path / "run.json").write_text(json.dumps(config))
    runs = tmp_path / "runs"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "sa3_lora_studio", "train", "--config", str(tmp_path / "run.json"), "--runs-dir",
           str(runs)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    registry = RunRegistry(runs)
    deadline = time.time() + 240
    latest = None
    while time.time() < deadline:
        ids = [r["id"] for r in registry.list()]
        latest = registry.latest_checkpoint(ids[0]) if ids else None
        if latest and latest["step"] >= 4:
            break
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.2)
    assert latest, "no checkpoint appeared"
    events_before = (registry.run_dir(ids[0]) / "events.jsonl").read_text().count('"type": "step"')
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    run_id = ids[0]
    record = registry.get(run_id)  # the index is still valid JSON
    assert record["status"] == "training"
    saved = registry.latest_checkpoint(run_id)["step"]
    assert events_before - saved <= 2 + 1  # at most one checkpoint interval (+ the step in flight) is lost
    registry2 = RunRegistry(runs)
    assert registry2.mark_interrupted_after_restart() == [run_id]  # what a ComfyUI restart shows
    assert registry2.get(run_id)["step"] == saved  # listed where it resumes, not at the steps lost with it
    cfg = json.loads((registry.run_dir(run_id) / "config.json").read_text())
    cfg["steps"] = saved + 2
    (registry.run_dir(run_id) / "config.json").write_text(json.dumps(cfg))
    done = subprocess.run([sys.executable, "-m", "sa3_lora_studio", "runs", "--runs-dir", str(runs), "resume", run_id],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert registry.get(run_id)["status"] == "done" and registry.latest_checkpoint(run_id)["step"] == saved + 2


def test_gated_repo_error_says_to_accept_the_licence(monkeypatch, tmp_path):
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError
    from sa3_lora_studio.sa3 import packs

    def refuse(*args, **kwargs):
        error = GatedRepoError.__new__(GatedRepoError)  # what the Hub client raises on 401/403 for a gated repo
        Exception.__init__(error, "403 Client Error: Cannot access gated repo")
        raise error

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    with pytest.raises(packs.GatedModelError, match="stable-audio-3-medium-base.*accept the licence.*login"):
        packs.download_pack("sa3-medium", "base", tmp_path)
    with pytest.raises(packs.PackError, match="sa3-lora download sa3-small-sfx"):
        packs.resolve_pack("sa3-small-sfx", "arc", tmp_path)
    monkeypatch.delenv("SA3_MODELS_DIR", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    with pytest.raises(packs.PackError, match=f"is not in the Hugging Face cache \\({tmp_path / 'hub-cache'}\\)"):
        packs.resolve_pack("sa3-small-sfx", "arc")  # no models folder: the cache, named where it is


def test_packs_already_on_disk_are_used_offline(monkeypatch, tmp_path, fixtures_dir, capsys):
    import shutil

    import huggingface_hub
    from sa3_lora_studio import load_model
    from sa3_lora_studio.sa3 import packs

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("no network"))
    shutil.copytree(fixtures_dir / "tiny-small", tmp_path / "sa3-small-music" / "base")
    assert packs.download_pack("sa3-small-music", "base", tmp_path) == tmp_path / "sa3-small-music" / "base"
    assert [(p, v) for p, v, _ in packs.local_packs(tmp_path)] == [("sa3-small-music", "base")]
    model = load_model("sa3-small-music", variant="base", models_dir=tmp_path)
    assert model.pack == "sa3-small-music" and model.conditioner.conditioners["prompt"].has_text_encoder

    # a model folder in the same layout under another name (the quickstart's tiny model) is listed, by its path
    shutil.copytree(fixtures_dir / "tiny-small-arc", tmp_path / "my-tiny" / "arc")
    (tmp_path / "my-tiny" / "base").mkdir()  # incomplete: not listed
    assert packs.other_model_folders(tmp_path) == [("my-tiny", "arc", tmp_path / "my-tiny" / "arc")]
    from sa3_lora_studio.cli import main

    assert main(["packs", "--models-dir", str(tmp_path)]) == 0
    listed = capsys.readouterr().out
    assert "my-tiny          arc   (a model folder: load it by its path)" in listed and str(tmp_path / "my-tiny") in listed
