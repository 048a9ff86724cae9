"""The README's main command: `sa3-lora quickstart --out DIR` runs the whole loop on the tiny built-in model."""

import json
import shlex
from pathlib import Path

import soundfile as sf
from sa3_lora_studio.adapters import read_adapter_file
from sa3_lora_studio.cli import main
from sa3_lora_studio.training.runs import RunRegistry


def test_quickstart_trains_resumes_and_generates_and_its_summary_says_how_to_go_on(tmp_path, capsys, monkeypatch):
    out = tmp_path / "qs"
    monkeypatch.chdir(tmp_path)
    assert main(["quickstart", "--out", "qs"]) == 0  # a relative --out: everything it says is absolute
    said = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    paths = [v for k, v in summary.items() if k not in ("try", "seconds") and v is not None]
    assert all(Path(p).is_absolute() and Path(p).exists() for p in paths), summary
    assert f"training run {Path(summary['run']).name} in {summary['run']}" in said
    assert Path(summary["spectrogram"]).suffix == ".png"
    lora = read_adapter_file(summary["lora"])
    assert lora.adapter_type == "dora-rows" and lora.layers
    audio, rate = sf.read(summary["generated"])
    assert rate == 44100 and audio.shape[1] == 2 and abs(audio).max() > 0
    (run,) = RunRegistry(summary["runs_dir"]).list()
    assert run["status"] == "done" and run["step"] == int(lora.metadata["step"])
    events = [json.loads(line) for line in open(f"{summary['run']}/events.jsonl")]
    assert any(e["type"] == "demo" for e in events) and any(e.get("status") == "stopped" for e in events)
    assert [e["step"] for e in events if e["type"] == "validation"] == [0, 6, 12]  # one file held out, scored
    assert read_adapter_file(summary["best_lora"]).layers  # at each checkpoint; the best of them named
    capsys.readouterr()
    assert main(shlex.split(summary["try"])[1:]) == 0  # the printed next step works as written
    assert sf.read(out / "again.wav")[0].shape[1] == 2
