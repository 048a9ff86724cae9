"""Multi-process training: 2 CPU processes (gloo, torchrun) equal 1 process with the doubled batch."""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import torch
from sa3_lora_studio.training.distributed import rank_rows
from sa3_lora_studio.training.manager import TrainingManager
from sa3_lora_studio.training.runs import RunConfig, RunRegistry

TOLERANCE = 1e-5  # fp32 sums of per-rank gradient shares vs one full-batch backward: rounding only




def _config(dataset, fixtures_dir, **kw) -> dict:
    base = dict(dataset=str(dataset), model=str(fixtures_dir / "tiny-small"), adapter_type="dora-rows", rank=4,
                steps=2, batch_size=2, crop_seconds=0.03, checkpoint_every=1, demo_every=0, seed=11, lr=1e-4,
                device="cpu")
    base.update(kw)
    return base


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_command(config_path, runs_dir, nproc=2, steps=None) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), "-m", "sa3_lora_studio", "train", "--config",
           str(config_path), "--runs-dir", str(runs_dir)]
    return cmd + (["--steps", str(steps)] if steps is not None else [])


def _torchrun(config_path, runs_dir, nproc=2, steps=None, run_id=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if run_id:
        env["SA3_RUN_ID"] = run_id
    done = subprocess.run(_torchrun_command(config_path, runs_dir, nproc, steps), env=env, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _state(registry: RunRegistry, run_id: str):
    latest = registry.latest_checkpoint(run_id)
    return latest, torch.load(registry.run_dir(run_id) / latest["state_path"], weights_only=True)


def test_rank_rows_split_the_global_batch_into_contiguous_shares():
    for batch, world in [(2, 2), (4, 2), (5, 2), (7, 3)]:
        rows = [rank_rows(batch, r, world) for r in range(world)]
        assert rows[0].start == 0 and rows[-1].stop == batch
        assert all(a.stop == b.start for a, b in zip(rows, rows[1:]))
        assert max(r.stop - r.start for r in rows) - min(r.stop - r.start for r in rows) <= 1


def test_two_processes_equal_one_process_with_the_doubled_batch_and_resume(tmp_path, tiny, dataset, fixtures_dir):
    # 1 process, global batch 2, five steps straight. With seed 11, step 5 drops the prompt context (CFG dropout) of
    # row 0 only, so rank 0's DiT skips cross-attention and those adapters have no gradient on that rank alone.
    manager = TrainingManager(tmp_path / "single", model_provider=lambda *a: tiny)
    single = manager.submit(RunConfig.from_dict(_config(dataset, fixtures_dir, batch_size=2, steps=5)))
    assert manager.wait(single, 120)["status"] == "done", manager.registry.get(single)["error"]
    single_info, single_state = _state(manager.registry, single)

    # 2 processes × batch 1: step 1, then the run is resumed by both ranks and extended to step 5.
    config_path = tmp_path / "run.json"
    config_path.write_text(json.dumps(_config(dataset, fixtures_dir, batch_size=1, steps=1)))
    runs = tmp_path / "ddp"
    _torchrun(config_path, runs)
    registry = RunRegistry(runs)
    (record,) = registry.list()
    assert record["status"] == "done" and record["step"] == 1 and record["world_size"] == 2
    resumed = _torchrun(config_path, runs, steps=5, run_id=record["id"])
    assert "warning: it trained on" not in resumed.stdout  # the same 2 processes: its global batch is unchanged
    ddp_info, ddp_state = _state(registry, record["id"])

    assert single_info["step"] == ddp_info["step"] == 5
    assert len(single_state["adapter"]) == len(ddp_state["adapter"])
    worst = max(float((a - b).abs().max()) for a, b in zip(single_state["adapter"], ddp_state["adapter"]))
    print(f"max abs difference single vs 2 processes: {worst:.2e}")
    assert worst <= TOLERANCE, worst
    moved = max(float((a - b).abs().max()) for a, b in zip(single_state["adapter"], _initial_adapter(tiny, dataset,
                                                                                                  fixtures_dir)))
    assert moved > 10 * TOLERANCE  # the comparison is not trivially between two untrained adapters

    events = [json.loads(x) for x in (registry.run_dir(record["id"]) / "events.jsonl").read_text().splitlines()]
    steps = [e for e in events if e["type"] == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3, 4, 5] and all(len(e["samples"]) == 2 for e in steps)
    single_events = [json.loads(x) for x in manager.events_path(single).read_text().splitlines()]
    single_losses = [e["loss"] for e in single_events if e["type"] == "step"]
    assert np.allclose([e["loss"] for e in steps], single_losses, rtol=1e-4)  # the logged loss is the global one
    # AdamW and clipping hide a gradient scale error in the adapter; the gradient norm does not.
    single_norms = [e["grad_norm"] for e in single_events if e["type"] == "step"]
    assert np.allclose([e["grad_norm"] for e in steps], single_norms, rtol=1e-4)


def _initial_adapter(tiny, dataset, fixtures_dir):
    from sa3_lora_studio.training.events import EventLog
    from sa3_lora_studio.training.trainer import Trainer

    config = RunConfig.from_dict(_config(dataset, fixtures_dir))
    folder = fixtures_dir.parent / "__no_run__"  # no latest.json there: a fresh adapter, nothing written
    trainer = Trainer(config, folder, "init", EventLog(os.devnull, "init"), model_provider=lambda *a: tiny)
    trainer.setup()
    return [p.detach().clone() for p in trainer.params]


# ------------------------------------------------------------------------------------------ run control
# Shared with tests/test_training_cli.py (a single-process `sa3-lora train` driven the same way).

def runs_cli(runs_dir, *args) -> int:
    """`sa3-lora runs --runs-dir DIR ARGS…` in this process (the control commands start nothing here)."""
    from sa3_lora_studio.cli import main

    return main(["runs", "--runs-dir", str(runs_dir), *args])


def wait_until(predicate, proc, what: str, timeout: float = 120.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        assert proc.poll() is None, f"the training process ended (code {proc.returncode}) while waiting for {what}"
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def run_events(registry: RunRegistry, run_id: str) -> list[dict]:
    path = registry.run_dir(run_id) / "events.jsonl"
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text.splitlines() if line.endswith("}")]


def last_step(registry: RunRegistry, run_id: str) -> int:
    return max((e["step"] for e in run_events(registry, run_id) if e["type"] == "step"), default=0)


def drive_pause_save_continue_stop(proc, runs_dir, total_steps: int) -> tuple[str, int]:
    """pause → paused, no progress → save (a checkpoint at the paused step, still paused) → continue → progress →
    pause → stop (a paused run wakes to stop). Returns (run id, the step it stopped at)."""
    registry = RunRegistry(runs_dir)
    run_id = wait_until(lambda: [r["id"] for r in registry.list()], proc, "the run to be registered")[0]
    wait_until(lambda: last_step(registry, run_id) >= 1, proc, "the first step")

    assert runs_cli(runs_dir, "pause", run_id) == 0
    wait_until(lambda: registry.get(run_id)["status"] == "paused", proc, "status paused")
    paused_at = last_step(registry, run_id)
    time.sleep(1.5)  # three polls of the request files: a paused run makes no progress
    assert last_step(registry, run_id) == paused_at and registry.get(run_id)["status"] == "paused"
    assert any(e["type"] == "status" and e["status"] == "paused" for e in run_events(registry, run_id))

    assert runs_cli(runs_dir, "save", run_id) == 0
    latest = wait_until(lambda: (registry.latest_checkpoint(run_id) or {}).get("step") == paused_at
                        and registry.latest_checkpoint(run_id), proc, "the saved checkpoint")
    assert (registry.run_dir(run_id) / latest["path"]).is_file()
    assert registry.get(run_id)["status"] == "paused" and last_step(registry, run_id) == paused_at  # not stopped

    assert runs_cli(runs_dir, "continue", run_id) == 0
    wait_until(lambda: last_step(registry, run_id) > paused_at, proc, "progress after continue")
    assert runs_cli(runs_dir, "pause", run_id) == 0
    wait_until(lambda: registry.get(run_id)["status"] == "paused", proc, "the second pause")
    stopped_at = last_step(registry, run_id)
    assert stopped_at < total_steps, "the run finished before it could be paused again; raise its steps"
    assert runs_cli(runs_dir, "stop", run_id) == 0
    assert proc.wait(120) == 0
    record = registry.get(run_id)
    assert record["status"] == "stopped" and registry.latest_checkpoint(run_id)["step"] == stopped_at
    assert not list(registry.run_dir(run_id).glob("*.request"))  # every request was taken
    return run_id, stopped_at


def test_a_distributed_run_pauses_saves_continues_stops_and_resumes_like_an_uninterrupted_one(
        tmp_path, dataset, fixtures_dir):
    steps = 20
    config_path = tmp_path / "run.json"
    config_path.write_text(json.dumps(_config(dataset, fixtures_dir, batch_size=1, steps=steps,
                                              checkpoint_every=1000)))
    runs = tmp_path / "controlled"
    log = open(tmp_path / "torchrun.log", "w")
    proc = subprocess.Popen(_torchrun_command(config_path, runs), env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        run_id, stopped_at = drive_pause_save_continue_stop(proc, runs, steps)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    print((tmp_path / "torchrun.log").read_text()[-2000:])

    # `runs resume` relaunches the stopped run under torchrun on the 2 processes it ran on.
    resumed = subprocess.run([sys.executable, "-m", "sa3_lora_studio", "runs", "--runs-dir", str(runs), "resume",
                              run_id], env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                             timeout=240)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "on 2 processes" in resumed.stdout
    registry = RunRegistry(runs)
    record = registry.get(run_id)
    assert record["status"] == "done" and record["step"] == steps and record["world_size"] == 2
    steps_logged = [e["step"] for e in run_events(registry, run_id) if e["type"] == "step"]
    assert steps_logged == list(range(1, steps + 1))  # each step once: nothing lost or repeated across the stop

    # The same run uninterrupted: bit-exact on CPU (the per-step seeds, the saved optimiser state and the
    # two-operand gloo sum make the resumed run the same computation).
    _torchrun(config_path, tmp_path / "straight")
    straight = RunRegistry(tmp_path / "straight")
    (other,) = straight.list()
    (_, a), (_, b) = _state(registry, run_id), _state(straight, other["id"])
    assert a["step"] == b["step"] == steps
    assert all(torch.equal(x, y) for x, y in zip(a["adapter"], b["adapter"])), f"stopped at {stopped_at}"


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for proc in os.listdir("/proc"):
        if proc.isdigit():
            try:
                cmdline = open(f"/proc/{proc}/cmdline", "rb").read().decode(errors="replace")
            except OSError:
                continue
            if text in cmdline and int(proc) != os.getpid():
                pids.append(int(proc))
    return pids


def test_killing_torchrun_itself_stops_its_ranks_with_a_checkpoint(tmp_path, dataset, fixtures_dir):
    config_path = tmp_path / "run.json"
    config_path.write_text(json.dumps(_config(dataset, fixtures_dir, batch_size=1, steps=500, checkpoint_every=1000)))
    runs = tmp_path / "orphaned"
    log = open(tmp_path / "torchrun.log", "w")
    proc = subprocess.Popen(_torchrun_command(config_path, runs), env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        registry = RunRegistry(runs)
        run_id = wait_until(lambda: [r["id"] for r in registry.list()], proc, "the run to be registered")[0]
        wait_until(lambda: last_step(registry, run_id) >= 1, proc, "the first step")
        proc.kill()  # the agent only, as an OOM killer would: its ranks live in their own sessions
        proc.wait(30)
        deadline = time.time() + 90
        while _processes_mentioning(str(runs)) and time.time() < deadline:
            time.sleep(0.2)
        assert not _processes_mentioning(str(runs)), "ranks kept training after torchrun was killed"
        record, latest = registry.get(run_id), registry.latest_checkpoint(run_id)
        assert record["status"] == "stopped" and latest and latest["step"] >= 1
    finally:
        for pid in _processes_mentioning(str(runs)):
            os.kill(pid, 9)
        log.close()


def test_a_distributed_run_scores_its_held_out_files_on_rank_0_as_one_process_does(tmp_path, tiny, dataset,
                                                                                  fixtures_dir):
    manager = TrainingManager(tmp_path / "single", model_provider=lambda *a: tiny)
    single = manager.submit(RunConfig.from_dict(_config(dataset, fixtures_dir, validation_items=1)))
    assert manager.wait(single, 120)["status"] == "done", manager.registry.get(single)["error"]
    config_path = tmp_path / "run.json"
    config_path.write_text(json.dumps(_config(dataset, fixtures_dir, batch_size=1, validation_items=1)))
    _torchrun(config_path, tmp_path / "ddp")
    registry = RunRegistry(tmp_path / "ddp")
    (record,) = registry.list()
    assert record["status"] == "done" and record["world_size"] == 2
    scored = [json.loads(x) for x in (registry.run_dir(record["id"]) / "events.jsonl").read_text().splitlines()]
    scored = [e for e in scored if e["type"] == "validation"]
    assert [e["step"] for e in scored] == [0, 1, 2]  # once each: rank 0 alone scores
    alone = [json.loads(x) for x in manager.events_path(single).read_text().splitlines()]
    alone = [e for e in alone if e["type"] == "validation"]
    assert json.loads((registry.run_dir(record["id"]) / "validation.json").read_text()) == \
        json.loads((manager.registry.run_dir(single) / "validation.json").read_text())  # the same file held out
    assert np.allclose([e["loss"] for e in scored], [e["loss"] for e in alone], rtol=1e-4)
