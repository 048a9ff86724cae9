"""TensorBoard event files of training runs, read back with TensorBoard's own reader (EventAccumulator)."""

import json
import random
import struct

import numpy as np
import pytest
import soundfile as sf
from sa3_lora_studio.training import crc32c as crc32c_module
from sa3_lora_studio.training.crc32c import CHUNKED_FROM, N_CHUNKS, advance_register, advance_register_chunked
from sa3_lora_studio.training.manager import TrainingManager
from sa3_lora_studio.training.runs import RunConfig
from sa3_lora_studio.training.tensorboard import TB_FOLDER, TensorBoardSink, attempt_start_step, crc32c, tfrecord
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c


def _config(dataset, fixtures_dir, **kw):
    base = dict(dataset=str(dataset), model=str(fixtures_dir / "tiny-small"), adapter_type="lora", rank=2, steps=4,
                batch_size=2, crop_seconds=0.017, checkpoint_every=2, demo_every=0, seed=3, lr=1e-3)
    base.update(kw)
    return RunConfig.from_dict(base)


def _read(folder):
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "audio": 0})
    acc.Reload()
    return acc


def _events(folder):
    return [json.loads(line) for line in (folder / "events.jsonl").read_text().splitlines()]


def test_crc32c_and_record_framing_follow_tfrecord():
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    record = tfrecord(b"abc")
    assert len(record) == 8 + 4 + 3 + 4 and record[:8] == (3).to_bytes(8, "little") and record[12:15] == b"abc"


@pytest.mark.parametrize("length", [0, 1, 4095, 4096, 4097, 2 * 4096 - 1, 32767, 32768, 32769, 65536 + 4095,
                                    65536 * 3 + 17, 1_764_000])
def test_long_inputs_take_the_chunked_crc_with_the_same_value(length, monkeypatch):
    """The chunked numpy CRC (from 32 KB: a demo WAV) equals the byte loop, at every chunk boundary, from any
    starting register, and TensorBoard's own masked CRC of the record."""
    data = random.Random(length).randbytes(length)
    if length >= N_CHUNKS:
        for start in (0, 0xFFFFFFFF, 0x1234ABCD):
            assert advance_register_chunked(data, start) == advance_register(data, start)
    expected = advance_register(data, 0xFFFFFFFF) ^ 0xFFFFFFFF
    chunked_calls = []
    monkeypatch.setattr(crc32c_module, "advance_register_chunked",
                        lambda *a: chunked_calls.append(1) or advance_register_chunked(*a))
    assert crc32c(data) == expected
    assert chunked_calls == ([1] if length >= CHUNKED_FROM else [])
    assert tfrecord(data)[-4:] == struct.pack("<I", masked_crc32c(data))


@pytest.mark.parametrize("length", [100, 200_000])
def test_the_crc_takes_any_bytes_like_object_by_its_bytes(length):
    data = random.Random(length).randbytes(length)
    whole = np.frombuffer(data, dtype=np.uint8)
    for same in (bytearray(data), memoryview(data), whole, memoryview(data).cast("h"), whole.reshape(-1, 4)):
        assert crc32c(same) == crc32c(data)
    assert crc32c(memoryview(data)[::2]) == crc32c(data[::2])  # strided: its own bytes, in order
    assert crc32c(whole.reshape(-1, 4)[:, 1:3]) == crc32c(whole.reshape(-1, 4)[:, 1:3].tobytes())


def test_a_run_logs_its_curves_validation_and_demos_for_tensorboard(tmp_path, tiny, dataset, fixtures_dir):
    manager = TrainingManager(tmp_path / "runs", model_provider=lambda *a: tiny)
    demo = {"prompt": "warm bass drone", "steps": 2, "duration": 0.05, "cfg": 3.0}
    run = manager.submit(_config(dataset, fixtures_dir, demo_every=4, demos=[demo], validation_items=1))
    assert manager.wait(run, 300)["status"] == "done"
    folder = manager.registry.run_dir(run)
    acc = _read(folder / TB_FOLDER)
    scalars = set(acc.Tags()["scalars"])
    assert {"loss", "learning_rate", "grad_norm", "adapter_size", "steps_per_second", "validation/loss"} <= scalars
    events = _events(folder)
    steps = [e for e in events if e["type"] == "step"]
    assert [s.step for s in acc.Scalars("loss")] == [1, 2, 3, 4]
    assert [s.value for s in acc.Scalars("loss")] == pytest.approx([e["loss"] for e in steps], rel=1e-6)
    assert [s.value for s in acc.Scalars("learning_rate")] == pytest.approx([e["lr"] for e in steps], rel=1e-6)
    # loss by noise level: each step's samples, averaged per bin of the chart
    bins = [t for t in scalars if t.startswith("loss_by_noise/")]
    assert bins and all(t in {f"loss_by_noise/{i / 5:.2f}-{(i + 1) / 5:.2f}" for i in range(5)} for t in bins)
    first = steps[0]["samples"]
    for tag in bins:
        lo, hi = (float(x) for x in tag.split("/")[1].split("-"))
        mine = [loss for t, loss in first if lo <= t < hi or (hi == 1.0 and t == 1.0)]
        points = {s.step: s.value for s in acc.Scalars(tag)}
        assert (1 in points) == bool(mine)
        if mine:
            assert points[1] == pytest.approx(sum(mine) / len(mine), rel=1e-6)
    validations = [e for e in events if e["type"] == "validation"]
    assert [s.step for s in acc.Scalars("validation/loss")] == [e["step"] for e in validations] == [0, 2, 4]
    assert [s.value for s in acc.Scalars("validation/loss")] == pytest.approx([e["loss"] for e in validations])
    # the demos at step 0 and 4, playable: the WAV holds the demo's audio
    (tag,) = acc.Tags()["audio"]
    assert tag == "demo_0_base_cfg3.0"
    audio = acc.Audio(tag)
    assert [a.step for a in audio] == [0, 4] and all(a.content_type == "audio/wav" for a in audio)
    import io

    wav, rate = sf.read(io.BytesIO(audio[-1].encoded_audio_string), dtype="float32")
    flac, flac_rate = sf.read(folder / "demos" / "step_000004" / "demo_0.flac", dtype="float32")
    assert rate == flac_rate == audio[-1].sample_rate == 44100 and wav.shape == flac.shape
    assert np.abs(wav - flac).max() < 1 / 16000  # 16-bit


def test_a_resumed_run_replaces_the_replayed_steps_instead_of_doubling_them(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    first = TensorBoardSink(run, wall_time=1000.0)
    for step in (1, 2, 3, 4):  # a crash after step 4; the last checkpoint was step 2
        first({"type": "step", "step": step, "loss": float(step), "time": 1000.0 + step})
    second = TensorBoardSink(run, start_step=3, wall_time=2000.0)
    for step in (3, 4, 5):
        second({"type": "step", "step": step, "loss": 10.0 + step, "time": 2000.0 + step})
    loss = _read(run / TB_FOLDER).Scalars("loss")
    assert [(s.step, s.value) for s in loss] == [(1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0), (5, 15.0)]
    # a run killed before its first checkpoint starts over at its step 0 baseline: all of it is replaced
    assert attempt_start_step(run, 0, resumed=False) == 0 and attempt_start_step(run, 2, resumed=True) == 3
    assert attempt_start_step(tmp_path / "fresh", 0, resumed=False) is None
    third = TensorBoardSink(run, start_step=0, wall_time=3000.0)
    third({"type": "validation", "step": 0, "loss": 0.5, "levels": [], "time": 3000.0})
    for step in (1, 2):
        third({"type": "step", "step": step, "loss": 20.0 + step, "time": 3000.0 + step})
    accumulator = _read(run / TB_FOLDER)
    assert [(s.step, s.value) for s in accumulator.Scalars("loss")] == [(1, 21.0), (2, 22.0)]
    assert [s.step for s in accumulator.Scalars("validation/loss")] == [0]


def test_runs_tensorboard_rebuilds_the_folder_from_the_event_log(tmp_path, tiny, dataset, fixtures_dir, capsys):
    from sa3_lora_studio.cli import main

    manager = TrainingManager(tmp_path / "runs", model_provider=lambda *a: tiny)
    run = manager.submit(_config(dataset, fixtures_dir, tensorboard=False))
    assert manager.wait(run, 300)["status"] == "done"
    folder = manager.registry.run_dir(run)
    assert not (folder / TB_FOLDER).exists()
    log = folder / "events.jsonl"
    lines = log.read_text().splitlines()
    replay = [json.loads(x) for x in lines if json.loads(x)["type"] == "step" and json.loads(x)["step"] >= 3]
    for e in replay:  # as a run killed after step 4 and resumed from its step-2 checkpoint logs it
        e["loss"] += 100.0
    log.write_text("\n".join(lines + [json.dumps(e) for e in replay]) + "\n")
    assert main(["runs", "--runs-dir", str(tmp_path / "runs"), "tensorboard", run]) == 0
    assert f"{folder / TB_FOLDER}" in capsys.readouterr().out
    loss = _read(folder / TB_FOLDER).Scalars("loss")
    steps = [json.loads(x) for x in lines if json.loads(x)["type"] == "step"]
    assert [s.step for s in loss] == [1, 2, 3, 4]
    assert [s.value for s in loss] == pytest.approx([steps[0]["loss"], steps[1]["loss"], replay[0]["loss"],
                                                     replay[1]["loss"]], rel=1e-6)
    assert main(["runs", "--runs-dir", str(tmp_path / "runs"), "tensorboard", run]) == 0  # again: rebuilt, not added
    assert len(list((folder / TB_FOLDER).iterdir())) == 1
    assert main(["runs", "--runs-dir", str(tmp_path / "runs"), "tensorboard", "no-such-run"]) == 2
    assert "no-such-run" in capsys.readouterr().err
    manager.registry.update(run, status="training")  # a live trainer writes the folder itself
    assert main(["runs", "--runs-dir", str(tmp_path / "runs"), "tensorboard", run]) == 2
    assert "writes its TensorBoard folder itself" in capsys.readouterr().err
