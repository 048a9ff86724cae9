"""Run folders, path confinement, atomic index, event log and the background worker's per-run controls."""

import json
import os
import re
import socket
import threading
import time
from pathlib import Path

import pytest
from sa3_lora_studio.training.events import EventLog, loss_by_timestep, read_events
from sa3_lora_studio.training.runs import RunError, atomic_write_json, confine
from sa3_lora_studio.training.worker import RunControl, TrainingWorker


@pytest.mark.parametrize("attempt", ["../x", "a/../../x", "/etc/passwd", "..", "a\\..\\..\\x", "C:/x", "", "a\x00b"])
def test_paths_that_leave_the_run_folder_are_refused(tmp_path, attempt):
    with pytest.raises(RunError):
        confine(tmp_path, attempt)


def test_symlink_leaving_the_run_folder_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("x")
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(outside, run / "demos")
    with pytest.raises(RunError, match="outside"):
        confine(run, "demos/secret.txt")
    (run / "ok.txt").write_text("fine")
    assert confine(run, "ok.txt") == (run / "ok.txt").resolve()


def test_atomic_write_leaves_old_or_new_never_half(tmp_path):
    path = tmp_path / "index.json"
    atomic_write_json(path, {"v": 1})
    atomic_write_json(path, {"v": 2})
    assert json.loads(path.read_text()) == {"v": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["index.json"]


def test_event_log_reads_from_an_offset_and_skips_a_torn_last_line(tmp_path):
    log = EventLog(tmp_path / "events.jsonl", "r1")
    log.emit("step", step=1, loss=0.5, samples=[[0.1, 0.4], [0.9, 0.6]])
    log.emit("step", step=2, loss=0.4, samples=[[0.5, 0.3]])
    events, offset = read_events(tmp_path / "events.jsonl")
    assert [e["step"] for e in events] == [1, 2]
    with open(tmp_path / "events.jsonl", "a") as f:
        f.write('{"type": "step", "ste')  # a crash mid-write
    more, offset2 = read_events(tmp_path / "events.jsonl", offset)
    assert more == [] and offset2 == offset
    log.emit("status", status="done")
    _, offset3 = read_events(tmp_path / "events.jsonl", offset)
    assert offset3 > offset


def test_loss_by_timestep_bins_every_sample_by_its_noise_level():
    events = [{"type": "step", "step": 1, "samples": [[0.05, 1.0], [0.95, 3.0], [1.0, 5.0]]},
              {"type": "step", "step": 2, "samples": [[0.5, 2.0]]}]
    series = loss_by_timestep(events, bins=5)
    assert series[0]["loss"] == [1.0] and series[2]["loss"] == [2.0] and series[4]["loss"] == [3.0, 5.0]
    assert series[4]["steps"] == [1, 1]


def test_the_loss_by_noise_level_image_names_and_colours_every_bin_apart_up_to_twenty():
    import numpy as np
    from sa3_lora_studio.training.events import BIN_COLOURS, bin_colours, bin_label, loss_by_timestep_chart, oklab

    assert bin_colours(5) == BIN_COLOURS[:5]  # the web panel's palette and order
    panel = (Path(__file__).parents[1] / "web" / "panel" / "charts_view.js").read_text(encoding="utf-8")
    hexes = re.search(r"export const BIN_COLOURS = \[([^\]]*)\]", panel)[1]
    assert [tuple(int(h[i:i + 2], 16) for i in (1, 3, 5)) for h in re.findall(r"#[0-9a-f]{6}", hexes)] == BIN_COLOURS
    assert [bin_label(lo / 20, (lo + 1) / 20, 20) for lo in (0, 1, 19)] == ["t 0.00-0.05", "t 0.05-0.10",
                                                                           "t 0.95-1.00"]
    assert bin_label(0.2, 0.4, 5) == "t 0.2-0.4" and bin_label(1 / 3, 2 / 3, 3) == "t 0.33-0.67"
    rng = np.random.default_rng(0)
    events = [{"type": "step", "step": step, "samples": [[(i + 0.5) / 20, float(1 + i + rng.random())]
                                                          for i in range(20)]} for step in range(1, 30)]
    # OKLab's published values for sRGB red and white
    assert np.allclose(oklab([(255, 0, 0), (255, 255, 255)]), [(0.62796, 0.22486, 0.12585), (1, 0, 0)], atol=1e-4)
    for bins in (5, 8, 10, 12, 20):
        colours = bin_colours(bins)
        assert colours[:8] == BIN_COLOURS[:bins] and bin_colours(bins + 3)[:bins] == colours  # more bins add colours
        lab = oklab(colours)  # any two bins, not only neighbours: lines far apart in t cross mid-run
        closest = min(np.linalg.norm(lab[i] - lab[j]) for i in range(bins) for j in range(i))
        assert closest >= 0.1, (bins, closest)  # five just-noticeable differences (0.02) at least
        assert (lab[:, 0] > 0.6).all(), bins  # none too dark for the background
        image = loss_by_timestep_chart(events, bins)
        legend = image[22:22 + 60].reshape(-1, 3).astype(float) - (24, 24, 28)  # its rows, from the background
        for colour in colours:  # every bin's name is there in its colour (text is antialiased: blends count)
            towards = np.asarray(colour, float) - (24, 24, 28)
            alpha = legend @ towards / (towards @ towards)
            off = np.linalg.norm(legend - alpha[:, None] * towards, axis=1)
            assert ((alpha > 0.6) & (off < 10)).any(), (bins, colour)


def test_the_chart_legend_has_rows_of_its_own_and_leaves_out_bins_without_samples():
    """20 names take three rows: the plot starts below them, so no curve runs under a name; a bin the sampler has
    not reached yet (t near 0) is not named in a colour no line has."""
    import numpy as np
    from sa3_lora_studio.training.events import BIN_COLOURS, loss_by_timestep_chart

    def legend_has(image, colour, top, bottom):
        area = image[top:bottom].reshape(-1, 3).astype(float) - (24, 24, 28)
        towards = np.asarray(colour, float) - (24, 24, 28)
        alpha = area @ towards / (towards @ towards)
        return bool(((alpha > 0.6) & (np.linalg.norm(area - alpha[:, None] * towards, axis=1) < 10)).any())

    def frame_top(image):  # the plot's outline: the first row mostly in its colour
        return int(np.flatnonzero((image == (70, 70, 80)).all(2).sum(1) > image.shape[1] // 2)[0])

    many = [{"type": "step", "step": step, "samples": [[(i + 0.5) / 20, 1.0 + i + step] for i in range(20)]}
            for step in range(1, 10)]  # rising lines: the top one meets the frame's top row at its end only
    image = loss_by_timestep_chart(many, 20)
    assert frame_top(image) >= 20 + 3 * 13  # title, then three legend rows
    sparse = [{"type": "step", "step": step, "samples": [[0.5, 1.0 + step], [0.9, 2.0 + step]]} for step in range(1, 10)]
    image = loss_by_timestep_chart(sparse, 5)
    top = frame_top(image)
    assert top < 20 + 2 * 13  # one legend row
    assert legend_has(image, BIN_COLOURS[2], 18, top) and legend_has(image, BIN_COLOURS[4], 18, top)
    assert not legend_has(image, BIN_COLOURS[0], 18, top) and not legend_has(image, BIN_COLOURS[1], 18, top)


def test_worker_runs_jobs_in_the_background_one_at_a_time_per_device():
    order, running, overlap = [], set(), []
    gate = threading.Event()

    def job(run_id, control):
        running.add(run_id)
        if len(running) > 1:
            overlap.append(set(running))
        order.append(run_id)
        gate.wait(2)
        running.discard(run_id)

    worker = TrainingWorker(job)
    worker.submit("a")
    worker.submit("b")
    time.sleep(0.1)
    assert order == ["a"] and worker.queued() == ["b"]  # the caller was not blocked
    gate.set()
    assert worker.join("a", 2)
    deadline = time.time() + 2
    while "b" not in order and time.time() < deadline:
        time.sleep(0.01)
    assert worker.join("b", 2) and order == ["a", "b"] and not overlap


def test_run_control_stop_wakes_a_paused_run():
    control = RunControl()
    control.pause()
    assert control.paused
    t = threading.Thread(target=control.wait_while_paused)
    t.start()
    time.sleep(0.05)
    assert t.is_alive()
    control.request_stop()
    t.join(1)
    assert not t.is_alive() and control.stop.is_set()


@pytest.mark.parametrize("change, named", [
    ({"demo_format": "aiff"}, "RunConfig.demo_format='aiff' is not an audio output format"),
    ({"demos": [{"prompt": "x", "strength": 1}]}, r"RunConfig.demos\[0\]: unknown key\(s\) \['strength'\]"),
    ({"demos": ["a bell"]}, r"RunConfig.demos\[0\]: expected an object"),
    ({"demos": [{"steps": 0}]}, "DemoSpec.steps: 0"),
    ({"demos": [{}, {"duration": -2}]}, "DemoSpec.duration: -2"),
    ({"demos": [{"cfg": float("nan")}]}, "DemoSpec.cfg: nan"),
])
def test_bad_demo_settings_are_named(change, named):
    from sa3_lora_studio.training.runs import RunConfig

    with pytest.raises(RunError, match=named):
        RunConfig.from_dict({"dataset": "d", **change})
    assert RunConfig.from_dict({"dataset": "d", "demo_format": "opus", "demos": [{"prompt": ""}]}).demos[0].prompt == ""


class _GatedManager:
    """A real TrainingManager whose job trains nothing: it runs until its gate opens or its stop flag is set."""

    def __new__(cls, root):
        from sa3_lora_studio.training.manager import TrainingManager

        class Gated(TrainingManager):
            def _run_job(self, run_id, control):
                self.registry.update(run_id, status="training")
                while not (self.gate.is_set() or control.stop.is_set()):
                    time.sleep(0.01)
                self.registry.update(run_id, status="stopped" if control.stop.is_set() else "done")

        manager = Gated(root)
        manager.gate = threading.Event()
        return manager


def _run_config(name):
    from sa3_lora_studio.training.runs import RunConfig

    return RunConfig(dataset="datasets/x", name=name)


def test_a_queued_run_stops_at_once_and_waiting_for_a_queued_run_waits_for_its_end(tmp_path):
    manager = _GatedManager(tmp_path)
    events = []
    manager.listeners.append(events.append)
    first, second, third = (manager.submit(_run_config(n)) for n in ("a", "b", "c"))
    assert manager.worker.queued() == [second, third]
    assert manager.control(second, "stop")["status"] == "stopped"
    assert {"type": "status", "status": "stopped"}.items() <= events[-1].items() and events[-1]["run"] == second
    assert manager.worker.queued() == [third] and manager.worker.join(second, 0)
    with pytest.raises(RunError, match="nothing to save"):
        manager.control(third, "save")
    with pytest.raises(RunError, match="confirm=true"):
        manager.control(third, "delete")
    assert manager.worker.queued() == [third]  # an unconfirmed delete changes nothing
    assert not manager.worker.join(third, 0.2)  # queued behind the first: not finished, not returned early
    manager.gate.set()
    assert manager.wait(third, 10)["status"] == "done" and manager.registry.get(first)["status"] == "done"
    assert manager.registry.get(second)["status"] == "stopped"
    # restarts like any stopped run (the gate is open: its fake training may already be over when control returns)
    assert manager.control(second, "restart")["status"] in ("queued", "training", "done")
    assert manager.wait(second, 10)["status"] == "done"


def test_deleting_a_training_run_returns_at_once_and_removes_it_when_its_thread_ends(tmp_path):
    manager = _GatedManager(tmp_path)
    run = manager.submit(_run_config("a"))
    deadline = time.time() + 5
    while manager.registry.get(run)["status"] != "training" and time.time() < deadline:
        time.sleep(0.01)
    started = time.time()
    assert manager.control(run, "delete", confirm=True) == {"id": run, "deleted": False, "deleting": True}
    assert time.time() - started < 1
    assert manager.worker.join(run, 10)
    assert run not in [r["id"] for r in manager.registry.list()] and not (tmp_path / run).exists()


def _create_runs(root: str, n: int) -> None:
    from sa3_lora_studio.training.runs import RunRegistry

    registry = RunRegistry(root)
    for i in range(n):
        registry.create(_run_config(f"p{os.getpid()}-{i}"))


def test_processes_sharing_a_runs_folder_never_lose_each_others_runs(tmp_path):
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_create_runs, args=(str(tmp_path), 25)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    index = json.loads((tmp_path / "runs.json").read_text())
    assert len(index) == 50 == len([p for p in tmp_path.iterdir() if (p / "config.json").exists()])


def test_a_damaged_index_is_kept_aside_and_rebuilt_from_the_run_folders(tmp_path):
    from sa3_lora_studio.training.runs import RunRegistry

    registry = RunRegistry(tmp_path)
    runs = [registry.create(_run_config(n)) for n in ("a", "b", "c", "d")]
    registry.update(runs[0], status="training")  # still trained by this (live) process
    registry.update(runs[1], status="stopped")
    atomic_write_json(registry.run_dir(runs[1]) / "latest.json", {"step": 40, "path": "checkpoints/x.safetensors"})
    registry.update(runs[2], status="done")
    atomic_write_json(registry.run_dir(runs[2]) / "latest.json", {"step": 1000, "path": "checkpoints/y.safetensors"})
    registry.update(runs[3], status="training")
    dead_owner = {"pid": 2**22 + 1, "host": socket.gethostname(), "started": "1", "status": "training"}
    atomic_write_json(registry.run_dir(runs[3]) / "owner.json", dead_owner)  # its process has gone
    (tmp_path / "runs.json").write_bytes(b'[{"id": "' + runs[0].encode() + b'", "sta')  # torn by a crash
    listed = {r["id"]: r for r in registry.list()}
    assert set(listed) == set(runs) and listed[runs[1]]["step"] == 40
    assert [listed[r]["status"] for r in runs] == ["training", "interrupted", "done", "interrupted"]
    assert len(list(tmp_path.glob("runs.json.damaged-*"))) == 1
    assert registry.update(runs[1], status="queued")["status"] == "queued"
    assert len(json.loads((tmp_path / "runs.json").read_text())) == 4


def test_a_run_whose_training_process_died_lists_as_interrupted_without_a_restart(tmp_path):
    import subprocess
    import sys

    from sa3_lora_studio.training.runs import RunRegistry, process_owner

    registry = RunRegistry(tmp_path)
    mine, theirs = registry.create(_run_config("mine")), registry.create(_run_config("theirs"))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    registry.update(theirs, status="training")
    index = json.loads((tmp_path / "runs.json").read_text())
    for record in index:  # as a CLI trainer that has since died would have left it
        if record["id"] == theirs:
            record["owner"] = {**process_owner(), "pid": int(dead.stdout), "started": "1"}
    atomic_write_json(tmp_path / "runs.json", index)
    statuses = {r["id"]: r["status"] for r in registry.list()}
    assert statuses == {mine: "queued", theirs: "interrupted"}


def test_a_rebuilt_continued_run_counts_its_own_steps_not_the_files(tmp_path):
    from sa3_lora_studio.training.runs import RunConfig, RunRegistry

    registry = RunRegistry(tmp_path)
    run = registry.create(RunConfig(dataset="d", steps=200, continue_from="base.safetensors"))
    registry.update(run, status="interrupted")
    atomic_write_json(registry.run_dir(run) / "latest.json", {"step": 1050, "step_offset": 1000, "path": "x"})
    odd = tmp_path / "20260101-000000-odd-0000"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"dataset": "d", "crop_seconds": 1000}))  # refused by this version
    (tmp_path / "runs.json").unlink()
    record = registry.get(run)
    assert (record["status"], record["step"], record["total_steps"]) == ("interrupted", 1050, 1200)
    listed = registry.get(odd.name)  # listed with its reason, not dropped from the index
    assert listed["status"] == "failed" and "crop_seconds" in listed["error"]


def test_runs_queue_per_resolved_device_so_auto_and_its_named_device_are_one_queue(monkeypatch):
    import torch
    from sa3_lora_studio.training import trainer
    from sa3_lora_studio.training.manager import device_key
    from sa3_lora_studio.training.runs import RunConfig

    assert device_key(RunConfig(dataset="d", device="auto")) == device_key(RunConfig(dataset="d", device="cpu")) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a one-GPU machine: "auto", "cuda", "cuda:0"
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    keys = {device_key(RunConfig(dataset="d", device=d)) for d in ("auto", "cuda", "cuda:0")}
    assert keys == {"cuda:0"} and trainer.pick_device("cuda:1") == torch.device("cuda", 1)
    assert device_key(RunConfig(dataset="d", device="mps")) == "mps:0"


def test_a_restart_that_cannot_be_queued_leaves_the_run_as_it_was(tmp_path):
    manager = _GatedManager(tmp_path)
    manager.gate.set()
    run = manager.submit(_run_config("a"))
    assert manager.wait(run, 10)["status"] == "done"
    manager.registry.update(run, status="stopped")
    before = manager.registry.config(run), manager.registry.get(run)["total_steps"]

    def broken_submit(*args, **kwargs):
        raise OSError("no space left on device")

    manager.worker.submit = broken_submit
    with pytest.raises(OSError):
        manager.control(run, "restart", changes={"lr": 5e-5}, more_steps=100)
    record = manager.registry.get(run)
    assert record["status"] == "stopped" and (manager.registry.config(run), record["total_steps"]) == before


def test_a_run_folder_copied_into_the_runs_folder_joins_the_list_at_the_next_start(tmp_path):
    import shutil

    from sa3_lora_studio.training.runs import RunConfig, RunRegistry

    here, elsewhere = RunRegistry(tmp_path / "here"), RunRegistry(tmp_path / "elsewhere")
    kept = here.create(RunConfig(dataset="-", name="already here", steps=3))
    brought = elsewhere.create(RunConfig(dataset="-", name="from the other machine", steps=3))
    shutil.copytree(elsewhere.run_dir(brought), tmp_path / "here" / brought)
    (tmp_path / "here" / brought / "owner.json").unlink(missing_ok=True)  # no process of this machine trains it
    assert [r["id"] for r in here.list()] == [kept]  # the index is the list while the process runs
    assert RunRegistry(tmp_path / "here").mark_interrupted_after_restart() == []  # none was cut off
    listed = {r["id"]: r for r in here.list()}
    assert sorted(listed) == sorted([kept, brought])
    assert listed[brought]["name"] == "from the other machine" and listed[brought]["status"] == "interrupted"
    assert listed[kept]["status"] == "queued"  # the known run as it was


def test_a_run_id_that_links_outside_the_runs_folder_is_refused_as_a_run_id(tmp_path):
    from sa3_lora_studio.training.runs import PathOutsideRun, RunRegistry

    (tmp_path / "runs").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "runs" / "fake").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    registry = RunRegistry(tmp_path / "runs")
    for run_id in ("fake", "../elsewhere", "/etc"):
        with pytest.raises(PathOutsideRun, match=rf"run id '{re.escape(run_id)}' is not a run folder of "
                                                 rf"{re.escape(str(tmp_path / 'runs'))} \(a run id is a folder name"):
            registry.run_dir(run_id)
