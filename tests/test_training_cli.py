"""Run control from another process: the request files of `sa3-lora runs stop|save|pause|continue`, process
ownership in the registry, and a `sa3-lora train` process driven from the command line."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from sa3_lora_studio.training.cli import torchrun_command
from sa3_lora_studio.training.requests import apply_requests, take_request, write_request
from sa3_lora_studio.training.runs import (
    RunConfig,
    RunConflict,
    RunError,
    RunNotFound,
    RunRegistry,
    describe_changes,
    process_owner,
)
from sa3_lora_studio.training.worker import RunControl
from test_distributed import drive_pause_save_continue_stop, last_step, run_events, runs_cli, wait_until
from unprivileged import unprivileged


def _registry_with_run(tmp_path, status="training") -> tuple[RunRegistry, str]:
    registry = RunRegistry(tmp_path / "runs")
    run_id = registry.create(RunConfig(dataset="somewhere", steps=5))
    registry.update(run_id, status=status)
    return registry, run_id


def test_a_request_is_taken_once_and_pause_and_continue_replace_each_other(tmp_path):
    registry, run_id = _registry_with_run(tmp_path)
    folder = registry.run_dir(run_id)
    write_request(registry, run_id, "pause")
    write_request(registry, run_id, "continue")  # the last one asked wins
    assert sorted(p.name for p in folder.glob("*.request")) == ["continue.request"]
    assert take_request(folder, "continue") and not take_request(folder, "continue")

    control = RunControl()
    for kind in ("save", "pause"):
        write_request(registry, run_id, kind)
    apply_requests(folder, control)
    assert control.paused and control.take_save() and not control.take_save() and not control.stop.is_set()
    write_request(registry, run_id, "stop")
    apply_requests(folder, control)
    assert control.stop.is_set() and not control.paused  # a stop wakes a paused run (it saves, then ends)
    assert not list(folder.glob("*.request"))


def test_requests_are_refused_for_runs_that_are_not_running_or_outside_the_runs_folder(tmp_path):
    registry, run_id = _registry_with_run(tmp_path, status="stopped")
    with pytest.raises(RunError, match="runs resume"):
        write_request(registry, run_id, "pause")
    with pytest.raises(RunError):
        write_request(registry, "../elsewhere", "stop")
    with pytest.raises(RunError):
        write_request(registry, run_id, "explode")
    assert runs_cli(registry.root, "save", run_id) == 2  # the CLI prints the reason instead of a traceback
    (registry.run_dir(run_id) / "stop.request").write_text("{}")  # left for a process that died
    registry.update(run_id, status="queued")  # the run starts again: it must not stop at once
    assert not list(registry.run_dir(run_id).glob("*.request"))
    write_request(registry, run_id, "pause")  # asked while queued: kept through loading
    registry.update(run_id, status="loading")
    assert take_request(registry.run_dir(run_id), "pause")


def test_only_runs_whose_process_is_gone_are_marked_interrupted(tmp_path):
    registry, mine = _registry_with_run(tmp_path)
    assert registry.get(mine)["owner"] == process_owner()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        _, alive = _registry_with_run(tmp_path)
        _, dead = _registry_with_run(tmp_path)
        _, legacy = _registry_with_run(tmp_path)
        registry.update(alive, owner=dict(process_owner(), pid=child.pid, started=_start(child.pid)))
        registry.update(dead, owner=dict(process_owner(), started="0"))  # this pid, another process lifetime
        runs = json.loads(registry.index_path.read_text())
        for r in runs:
            if r["id"] == legacy:
                del r["owner"]  # written before owners were recorded
        registry.index_path.write_text(json.dumps(runs))
        assert sorted(registry.mark_interrupted_after_restart()) == sorted([dead, legacy])
        assert registry.get(mine)["status"] == registry.get(alive)["status"] == "training"
    finally:
        child.kill()
        child.wait()


def _start(pid):
    from sa3_lora_studio.training.runs import _process_start

    return _process_start(pid)


def test_resume_relaunches_a_distributed_run_under_torchrun_with_its_process_count(tmp_path):
    registry, run_id = _registry_with_run(tmp_path, status="stopped")
    command = torchrun_command(registry.root, run_id, 3)
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert command[command.index("--nproc_per_node") + 1] == "3"
    assert command[command.index("--config") + 1] == str(registry.run_dir(run_id) / "config.json")
    assert command[command.index("-m", 3) + 1:command.index("-m", 3) + 3] == ["sa3_lora_studio", "train"]
    assert "--quiet" not in command and "--log-every" not in command
    from sa3_lora_studio.cli import build_parser

    told = torchrun_command(registry.root, run_id, 2, quiet=True, log_every=10)  # runs resume --quiet --log-every
    train = build_parser().parse_args(told[told.index("-m", 3) + 2:])  # what each rank's `train` reads of it
    assert (train.quiet, train.log_every) == (True, 10)


def test_a_train_process_is_paused_saved_continued_and_stopped_from_the_command_line_then_resumed(
        tmp_path, dataset, fixtures_dir):
    steps = 40
    config = dict(dataset=str(dataset), model=str(fixtures_dir / "tiny-small"), adapter_type="lora", rank=2,
                  steps=steps, batch_size=1, crop_seconds=0.017, checkpoint_every=1000, demo_every=0, seed=3,
                  device="cpu")
    (tmp_path / "run.json").write_text(json.dumps(config))
    runs = tmp_path / "runs"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("SA3_RUN_ID", None)
    command = [sys.executable, "-m", "sa3_lora_studio", "train", "--config", str(tmp_path / "run.json"),
               "--runs-dir", str(runs)]
    with open(tmp_path / "train.log", "w") as log:
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            run_id, stopped_at = drive_pause_save_continue_stop(proc, runs, steps)
        finally:
            if proc.poll() is None:
                proc.kill()
    output = (tmp_path / "train.log").read_text()
    assert "status: paused" in output and f"stopped at step {stopped_at}" in output

    # `sa3-lora train` with SA3_RUN_ID resumes that run (no new run) and finishes it.
    done = subprocess.run(command, env=dict(env, SA3_RUN_ID=run_id), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    registry = RunRegistry(runs)
    assert [r["id"] for r in registry.list()] == [run_id]
    assert registry.get(run_id)["status"] == "done" and registry.latest_checkpoint(run_id)["step"] == steps
    logged = [e["step"] for e in run_events(registry, run_id) if e["type"] == "step"]
    assert logged == list(range(1, steps + 1))
    # fewer steps than it has trained would leave it "done 40/10": refused, the config kept
    shorter = subprocess.run(command + ["--steps", "10"], env=dict(env, SA3_RUN_ID=run_id), capture_output=True,
                             text=True, timeout=240)
    assert shorter.returncode != 0 and "below the 40 steps" in shorter.stderr
    assert registry.config(run_id).steps == steps


def test_ctrl_c_stops_a_train_process_after_saving_exits_130_and_says_how_to_resume(tmp_path, dataset, fixtures_dir):
    config = dict(dataset=str(dataset), model=str(fixtures_dir / "tiny-small"), adapter_type="lora", rank=2,
                  steps=500, batch_size=1, crop_seconds=0.017, checkpoint_every=1000, demo_every=0, seed=3,
                  device="cpu")
    (tmp_path / "run.json").write_text(json.dumps(config))
    runs = tmp_path / "my runs"
    env = {k: v for k, v in os.environ.items() if k != "SA3_RUN_ID"} | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "sa3_lora_studio", "train", "--config", str(tmp_path / "run.json"),
                             "--runs-dir", str(runs)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        registry = RunRegistry(runs)
        run_id = wait_until(lambda: [r["id"] for r in registry.list()], proc, "the run to be registered")[0]
        wait_until(lambda: last_step(registry, run_id) >= 1, proc, "the first step")
        proc.send_signal(signal.SIGINT)  # as a terminal's Ctrl-C
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGINT, out + err  # `train && generate` does not go on
    assert err.count("stopping after the current step") == 1
    record = registry.get(run_id)
    assert record["status"] == "stopped" and registry.latest_checkpoint(run_id)["step"] == record["step"] < 500
    assert f"resume it with: sa3-lora runs --runs-dir '{runs}' resume {run_id}" in out


def test_a_read_only_runs_folder_is_listed_and_read_and_train_refuses_it_by_name(tmp_path):
    registry = RunRegistry(tmp_path / "archive")
    run_id = registry.create(RunConfig(dataset="somewhere", steps=5, name="old"))
    registry.update(run_id, status="training", owner={"host": "elsewhere", "pid": 1})  # would be marked interrupted
    (tmp_path / "run.json").write_text(json.dumps({"dataset": "somewhere", "steps": 5}))
    for path in [tmp_path / "archive", *(tmp_path / "archive").rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        def cli(*argv):
            return subprocess.run(unprivileged([sys.executable, "-m", "sa3_lora_studio", *argv]), capture_output=True,
                                  text=True, timeout=120)

        listed = cli("runs", "--runs-dir", str(tmp_path / "archive"), "list")
        assert listed.returncode == 0 and run_id in listed.stdout and "Traceback" not in listed.stderr, listed.stderr
        shown = cli("runs", "--runs-dir", str(tmp_path / "archive"), "show", "old")
        assert shown.returncode == 0 and json.loads(shown.stdout)["run"]["id"] == run_id
        train = cli("train", "--config", str(tmp_path / "run.json"), "--runs-dir", str(tmp_path / "archive"))
        assert train.returncode == 2 and "Traceback" not in train.stderr
        assert f"--runs-dir {tmp_path / 'archive'}: cannot write into {tmp_path / 'archive'}: Permission denied; give " \
               "a runs folder you can write to" in train.stderr
        for argv in (("resume", "old"), ("tensorboard", "old")):
            refused = cli("runs", "--runs-dir", str(tmp_path / "archive"), *argv)
            assert refused.returncode == 2 and "Traceback" not in refused.stderr, (argv, refused.stderr)
    finally:
        for path in [tmp_path / "archive", *(tmp_path / "archive").rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)


def test_a_run_trained_by_a_live_process_is_neither_deleted_nor_resumed_twice(tmp_path):
    registry, run_id = _registry_with_run(tmp_path)  # "training", owned by this (live) process
    assert runs_cli(registry.root, "list") == 0 and registry.get(run_id)["status"] == "training"
    assert runs_cli(registry.root, "delete", run_id) == 2 and registry.run_dir(run_id).is_dir()
    assert runs_cli(registry.root, "resume", run_id, "--nproc", "2") == 2


def test_the_manager_controls_a_run_that_another_live_process_trains_through_request_files(tmp_path):
    """The panel, the SA3 Run Control node and the routes go through TrainingManager.control: for a run trained by
    `sa3-lora train` or torchrun elsewhere, pause/resume/save/stop become request files; restart and delete, which
    would start a second trainer or pull the folder from under a live one, are refused."""
    from sa3_lora_studio.training.manager import TrainingManager

    registry, run_id = _registry_with_run(tmp_path)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        registry.update(run_id, owner=dict(process_owner(), pid=child.pid, started=_start(child.pid)))
        manager = TrainingManager(registry.root)
        folder = registry.run_dir(run_id)
        for action, kind in (("pause", "pause"), ("resume", "continue"), ("save", "save"), ("stop", "stop")):
            assert manager.control(run_id, action)["requested"] == action
            assert take_request(folder, kind), action
        for action in ("restart", "delete"):
            with pytest.raises(RunError, match="another process"):
                manager.control(run_id, action, confirm=True)
        assert folder.exists() and registry.get(run_id)["status"] == "training"
    finally:
        child.kill()
        child.wait()
    with pytest.raises(RunError, match="not running"):  # its process is gone: the old, in-process rules apply
        TrainingManager(registry.root).control(run_id, "pause")


def test_runs_list_json_is_json_alone(tmp_path, capsys):
    registry, run_id = _registry_with_run(tmp_path, status="done")
    capsys.readouterr()
    assert runs_cli(registry.root, "list", "--json") == 0
    assert [r["id"] for r in json.loads(capsys.readouterr().out)] == [run_id]


def test_a_run_config_file_that_is_not_a_json_object_is_named(tmp_path, capsys):
    from sa3_lora_studio.cli import main

    for text, why in (("{not json", "not valid JSON"), ("[1, 2]", "JSON object")):
        (tmp_path / "run.json").write_text(text)
        assert main(["train", "--config", str(tmp_path / "run.json"), "--runs-dir", str(tmp_path / "runs")]) != 0
        err = capsys.readouterr().err
        assert "run.json" in err and why in err


def test_an_adapter_type_is_read_whatever_its_case():
    assert RunConfig.from_dict({"dataset": "d", "adapter_type": "DoRA"}).adapter_type == "dora-rows"
    assert RunConfig.from_dict({"dataset": "d", "adapter_type": " BoRA-XS "}).adapter_type == "bora-xs"


@pytest.mark.parametrize("change, named", [
    ({"crop_seconds": float("inf")}, "crop_seconds"), ({"crop_seconds": 1e6}, "crop_seconds"),
    ({"adapter_type": "dora_rows"}, r"RunConfig.adapter_type: 'dora_rows' is unknown \(did you mean 'dora-rows'\?\)"),
    ({"adapter_type": "doraa"}, r"'doraa' is unknown \(did you mean 'dora'\?\)"),
    ({"device": "cudax"}, "RunConfig.device: 'cudax'"), ({"include": ["", "attn"]}, "include"),
    ({"exclude": 3}, "RunConfig.exclude: 3 must be a list"),
    ({"betas": ["a", "b"]}, r"RunConfig.betas: \['a', 'b'\] holds a str \('a'\); expected tuple\[float, float\]"),
    ({"inpaint_probabilities": [0.5, True, 0.5]}, r"inpaint_probabilities: .* holds a bool"),
    ({"demos": 5}, "RunConfig.demos: 5 must be a list of demo objects"),
    ({"demos": "warm pad"}, "RunConfig.demos: 'warm pad' must be a list"),
    ({"demos": {"prompt": "x"}}, r"RunConfig.demos: \{'prompt': 'x'\} must be a list"),
    ({"rank": 4.5}, "RunConfig.rank: 4.5 is a float; expected int"),
    ({"seed": "7"}, "RunConfig.seed: '7' is a str"), ({"steps": []}, "RunConfig.steps: \\[\\] is a list"),
    ({"demo_every": -3}, "RunConfig.demo_every: -3 must be >= 0"), ({"checkpoint_every": 0}, "checkpoint_every: 0"),
    ({"step": 5, "lerning_rate": 1}, "did you mean: 'lerning_rate' → 'lr'\\?, 'step' → 'steps'\\?"),
    ({"max_steps": 10, "lora_rank": 8}, "did you mean: 'lora_rank' → 'rank'\\?, 'max_steps' → 'steps'\\?"),
])
def test_settings_that_would_fail_a_run_later_are_refused_by_name(change, named):
    with pytest.raises(RunError, match=named):
        RunConfig.from_dict({"dataset": "d", **change})


def test_whole_number_floats_are_the_ints_they_stand_for():
    """JSON has one number type: `"steps": 1e3` is 1000.0 to a parser, and a spreadsheet writes 2.0."""
    config = RunConfig.from_dict({"dataset": "d", "steps": 1e3, "rank": 8.0, "seed": 7.0})
    assert (config.steps, config.rank, config.seed) == (1000, 8, 7)
    assert all(type(v) is int for v in (config.steps, config.rank, config.seed))
    assert RunConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_a_typo_in_a_config_file_names_the_file_and_the_field_it_meant(tmp_path, capsys):
    from sa3_lora_studio.cli import main

    (tmp_path / "run.json").write_text(json.dumps({"dataset": "d", "learning_rate": 1e-4}))
    assert main(["train", "--config", str(tmp_path / "run.json"), "--runs-dir", str(tmp_path / "runs")]) == 2
    assert (f"sa3-lora train: {tmp_path / 'run.json'}: unknown run config field(s) ['learning_rate'] (did you mean: "
            "'learning_rate' → 'lr'?)") in capsys.readouterr().err


def test_a_device_this_machine_lacks_is_refused_before_a_run_or_a_model_load(tmp_path, dataset, fixtures_dir, capsys,
                                                                              monkeypatch):
    import torch
    from sa3_lora_studio.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = dict(dataset=str(dataset), model=str(fixtures_dir / "tiny-small"), steps=1, device="cuda")
    (tmp_path / "run.json").write_text(json.dumps(config))
    assert main(["train", "--config", str(tmp_path / "run.json"), "--runs-dir", str(tmp_path / "runs")]) == 2
    assert "RunConfig.device: cuda: this PyTorch sees no CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() or RunRegistry(tmp_path / "runs").list() == []
    for device, said in (("cuda:1", "cuda:1: this PyTorch sees no CUDA GPU"), ("mps", "mps: Apple Metal (MPS)")):
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
        assert main(["generate", str(fixtures_dir / "tiny-small"), "--prompt", "x", "--device", device,
                     "--out", str(tmp_path / "x.wav")]) == 2
        err = capsys.readouterr().err
        assert f"sa3-lora generate: device {said}" in err and "Traceback" not in err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    from sa3_lora_studio.training.trainer import device_problem

    assert device_problem("cuda:1") == "cuda:1: this machine has 1 CUDA GPU(s), numbered from 0"
    assert device_problem("cuda:0") is None and device_problem("auto") is None and device_problem("cpu") is None


def test_a_pattern_given_as_a_string_is_one_pattern_and_names_keep_their_letters():
    from sa3_lora_studio.training.runs import slugify

    assert RunConfig.from_dict({"dataset": "d", "include": "attn", "exclude": "project_in"}).include == ("attn",)
    assert RunConfig.from_dict({"dataset": "d", "exclude": "project_in"}).exclude == ("project_in",)
    assert slugify("音楽 / piano..") == "音楽-piano" and slugify("../..") == "run"


def test_an_event_after_a_torn_line_starts_on_its_own_line_and_bad_bytes_are_skipped(tmp_path):
    from sa3_lora_studio.training.events import EventLog, read_events

    path = tmp_path / "events.jsonl"
    EventLog(path, "r").emit("step", step=1, loss=0.5)
    with open(path, "ab") as f:
        f.write(b'{"type": "step", "step": 2, "lo')  # the process died mid-write
    EventLog(path, "r").emit("status", status="queued")  # the resume's first event
    with open(path, "ab") as f:
        f.write(b'\xff\xfe{"type": "x"}\n')
    log = EventLog(path, "r")
    log.emit("step", step=2, loss=float("nan"), samples=[[0.5, float("inf")]])
    events, _ = read_events(path)
    assert [(e["type"], e.get("step")) for e in events] == [("step", 1), ("status", None), ("step", 2)]
    assert events[2]["loss"] is None and events[2]["samples"] == [[0.5, None]]


def test_the_command_line_starts_without_importing_torch():
    """`sa3-lora --help` (and the argument parsing of every command) imports no torch: it takes about 2 s."""
    import subprocess
    import sys

    code = "import sys; from sa3_lora_studio.cli import main; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_a_run_is_found_by_its_id_name_start_of_id_or_latest_and_an_unclear_one_is_refused(tmp_path, capsys,
                                                                                             monkeypatch):
    from sa3_lora_studio.cli import main

    registry = RunRegistry(tmp_path / "runs")
    stamps = iter(["20261201-100000", "20261202-100000", "20261203-100000", "20261203-100000"])
    monkeypatch.setattr("sa3_lora_studio.training.runs.time.strftime", lambda fmt: next(stamps))
    pads = registry.create(RunConfig(dataset="d", name="Long Pads", steps=5))
    bass = registry.create(RunConfig(dataset="d", name="bass", steps=5))
    bass2 = registry.create(RunConfig(dataset="d", name="bass", steps=5))
    assert registry.find(pads) == pads and registry.find("long-pads") == pads and registry.find("Long Pads") == pads
    assert registry.find("20261201") == pads and registry.find("latest") == bass2 and registry.find(bass[:17]) == bass
    for nothing in ("", "  ", "2026"):  # too little to say which run: never the only one by chance
        with pytest.raises(RunError, match="give a run|no run"):
            registry.find(nothing)
    with pytest.raises(RunNotFound, match="give its whole id or its name"):
        registry.find("20261201", exact=True)  # deleting takes no start of an id
    dated = registry.create(RunConfig(dataset="d", name="20261202", steps=5))  # a name that looks like a date
    assert registry.find("20261202") == dated and registry.find("latest") == dated
    with pytest.raises(RunError, match=f"'bass' could be any of 2 runs .*: {bass}, {bass2}; give the whole id"):
        registry.find("bass")
    with pytest.raises(RunNotFound, match=f"no run 'long-pad' .*did you mean: {pads}\\?"):
        registry.find("long-pad")
    runs = ["runs", "--runs-dir", str(tmp_path / "runs")]
    assert main([*runs, "show", "long-pads"]) == 0
    assert json.loads(capsys.readouterr().out)["run"]["id"] == pads
    assert main([*runs, "metrics", "latest"]) == 0 and capsys.readouterr().out.startswith("step,")
    assert main([*runs, "delete", "latest"]) == 2
    assert "not latest: it removes the run without asking" in capsys.readouterr().err
    registry.update(pads, status="stopped")
    assert main([*runs, "delete", "long-pads"]) == 0 and f"deleted {pads}" in capsys.readouterr().out
    assert sorted(r["id"] for r in registry.list()) == sorted([bass, bass2, dated])
    assert main([*runs, "delete", ""]) == 2 and "give a run" in capsys.readouterr().err
    assert main([*runs, "delete", "2026"]) == 2 and main([*runs, "delete", bass[:20]]) == 2
    assert len(registry.list()) == 3
    empty = RunRegistry(tmp_path / "none")
    with pytest.raises(RunNotFound, match="no runs yet"):
        empty.find("latest")


def test_a_stopped_runs_settings_change_within_what_a_resume_may_change(tmp_path):
    registry, run_id = _registry_with_run(tmp_path, status="stopped")
    config, changed = registry.amend(run_id, {"lr": 3e-4, "demos": [{"prompt": "pad"}]}, more_steps=7)
    assert (config.steps, config.lr, config.demos[0].prompt) == (12, 3e-4, "pad")
    assert set(changed) == {"steps", "lr", "demos"} and changed["steps"] == (5, 12)
    assert registry.config(run_id) == config and registry.get(run_id)["total_steps"] == 12
    assert registry.amend(run_id, {"lr": 3e-4}) == (config, {})  # nothing new: nothing written
    assert "steps 5 → 12" in describe_changes(changed) and "1 demo(s) instead of 0" in describe_changes(changed)
    for changes, named in (({"rank": 4, "seed": 2}, "rank, seed cannot change"), ({"lr": -1}, "RunConfig.lr"),
                           ({"steps": 0}, "RunConfig.steps"), ({"batch_size": "2"}, "batch_size"),
                           ([("lr", 1)], "must be an object"),
                           ({"learnig_rate": 0.1}, r"unknown run config field\(s\) \['learnig_rate'\] \(did you mean: "
                                                   r"'learnig_rate' → 'lr'\?\)")):
        with pytest.raises(RunError, match=named):
            registry.amend(run_id, changes)
    with pytest.raises(RunError, match="more_steps"):
        registry.amend(run_id, more_steps=-3)
    assert registry.config(run_id) == config  # a refused change leaves the config as it was
    registry.update(run_id, status="training")  # this (live) process trains it
    with pytest.raises(RunConflict, match="stop it"):
        registry.amend(run_id, {"lr": 1e-4})


def test_runs_resume_options_become_settings_changes():
    from sa3_lora_studio.cli import build_parser
    from sa3_lora_studio.training.cli import resume_changes

    args = build_parser().parse_args(["runs", "resume", "RUN", "--more-steps", "300", "--lr", "5e-5", "--set",
                                      "demo_every=50", "--set", "demo_format=opus", "--set", "betas=[0.9, 0.99]"])
    assert args.more_steps == 300
    assert resume_changes(args) == {"demo_every": 50, "demo_format": "opus", "betas": [0.9, 0.99], "lr": 5e-5}
    with pytest.raises(RunError, match="FIELD=VALUE"):
        resume_changes(build_parser().parse_args(["runs", "resume", "RUN", "--set", "demo_every"]))
    with pytest.raises(RunError, match="--lr 0.001 and --set lr=0.002 disagree"):  # no silent winner
        resume_changes(build_parser().parse_args(["runs", "resume", "RUN", "--lr", "1e-3", "--set", "lr=2e-3"]))
    with pytest.raises(RunError, match="--steps 50 and --set steps=60 disagree"):
        resume_changes(build_parser().parse_args(["runs", "resume", "RUN", "--steps", "50", "--set", "steps=60"]))
    same = build_parser().parse_args(["runs", "resume", "RUN", "--steps", "50", "--set", "steps=50"])
    assert resume_changes(same) == {"steps": 50}


def test_a_finished_run_is_trained_further_from_the_command_line(tmp_path, dataset, fixtures_dir, capsys):
    from sa3_lora_studio.cli import main

    config = dict(dataset=str(dataset), model=str(fixtures_dir / "tiny-small"), adapter_type="lora", rank=2,
                  steps=2, batch_size=1, crop_seconds=0.017, checkpoint_every=1000, demo_every=0, seed=3,
                  device="cpu", lr=1e-3)
    (tmp_path / "run.json").write_text(json.dumps(config))
    runs = tmp_path / "runs"
    assert main(["train", "--config", str(tmp_path / "run.json"), "--runs-dir", str(runs)]) == 0
    registry = RunRegistry(runs)
    (run_id,) = [r["id"] for r in registry.list()]
    capsys.readouterr()
    assert runs_cli(runs, "resume", run_id, "--more-steps", "2", "--lr", "0.002") == 0
    assert "steps 2 → 4" in capsys.readouterr().out and registry.get(run_id)["status"] == "done"
    assert registry.latest_checkpoint(run_id)["step"] == 4
    assert [(e["step"], e["lr"]) for e in run_events(registry, run_id) if e["type"] == "step"] == \
        [(1, 1e-3), (2, 1e-3), (3, 2e-3), (4, 2e-3)]
    registry.update(run_id, world_size=2)  # as if it had trained under torchrun on 2 processes
    assert runs_cli(runs, "resume", run_id, "--more-steps", "1", "--nproc", "1") == 0
    out = capsys.readouterr().out
    assert "warning: it trained on 2 processes (global batch 2) and resumes on 1 (global batch 1)" in out
    assert "resume with --nproc 2 to keep it" in out and registry.get(run_id)["world_size"] == 1
    assert runs_cli(runs, "resume", run_id, "--more-steps", "1") == 0
    assert "warning: it trained on" not in capsys.readouterr().out  # one process, as before


def test_relative_paths_in_a_run_config_are_stored_absolute_so_it_resumes_from_anywhere(tmp_path, dataset,
                                                                                        fixtures_dir, capsys,
                                                                                        monkeypatch):
    import shutil

    from sa3_lora_studio.cli import main

    project = tmp_path / "project"
    shutil.copytree(dataset, project / "ds")
    shutil.copytree(fixtures_dir / "tiny-small", project / "models" / "tiny")
    config = dict(dataset="ds", model="models/tiny", adapter_type="lora", rank=2, steps=2, batch_size=1,
                  crop_seconds=0.017, checkpoint_every=1000, demo_every=0, seed=3, lr=1e-3)
    (project / "run.json").write_text(json.dumps(config))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the config's paths are relative to its own folder here
    runs = tmp_path / "runs"
    assert main(["train", "--config", str(project / "run.json"), "--runs-dir", str(runs)]) == 0
    registry = RunRegistry(runs)
    (run_id,) = [r["id"] for r in registry.list()]
    stored = registry.config(run_id)
    assert stored.dataset == str(project / "ds") and stored.model == str(project / "models" / "tiny")
    monkeypatch.chdir(tmp_path)  # another shell, another folder
    capsys.readouterr()
    assert runs_cli(runs, "resume", run_id, "--more-steps", "1") == 0, capsys.readouterr().err
    assert registry.get(run_id)["status"] == "done" and registry.latest_checkpoint(run_id)["step"] == 3
    # a pack name is no path: kept as given
    assert RunConfig(dataset=str(project / "ds"), model="sa3-small-music").with_absolute_paths().model == \
        "sa3-small-music"


def test_train_refuses_a_model_or_arc_model_it_cannot_find_before_making_a_run(tmp_path, dataset, fixtures_dir,
                                                                               capsys):
    from sa3_lora_studio.cli import main

    base = dict(dataset=str(dataset), model=str(fixtures_dir / "tiny-small"), steps=1)
    for change, named in (({"model": str(tmp_path / "nope")}, "RunConfig.model: .*nope: no such file or folder"),
                          ({"arc_model": str(tmp_path / "gone")}, "RunConfig.arc_model: .*gone: no such file"),
                          ({"model": "sa3-tiny"}, "RunConfig.model: 'sa3-tiny' is neither"),
                          ({"dataset": None}, "RunConfig.dataset: missing")):
        config = {**base, **change}
        if config["dataset"] is None:
            del config["dataset"]
        (tmp_path / "run.json").write_text(json.dumps(config))
        assert main(["train", "--config", str(tmp_path / "run.json"), "--runs-dir", str(tmp_path / "runs")]) != 0
        assert __import__("re").search(named, capsys.readouterr().err), change
        assert not (tmp_path / "runs").exists() or RunRegistry(tmp_path / "runs").list() == []


def test_runs_commands_never_make_a_runs_folder_and_a_finished_run_is_pointed_at_more_steps(tmp_path, capsys):
    missing = tmp_path / "elsewhere"
    assert runs_cli(missing, "list") == 0
    assert "no runs: " in capsys.readouterr().err and not missing.exists()
    assert runs_cli(missing, "stop", "x") != 0
    assert "no runs folder at" in capsys.readouterr().err and not missing.exists()
    (tmp_path / "a file").write_text("")
    assert runs_cli(tmp_path / "a file", "list") == 2
    assert f"--runs-dir {tmp_path / 'a file'} is a file, not a folder" in capsys.readouterr().err
    registry, run_id = _registry_with_run(tmp_path, status="done")
    with pytest.raises(RunError, match="--more-steps N` trains it further"):
        write_request(registry, run_id, "stop")
    with pytest.raises(RunError, match=f"no run 'nope' in {registry.root}"):
        write_request(registry, "nope", "stop")


def test_a_resume_is_queued_once_and_a_finished_run_needs_more_steps(tmp_path):
    registry, run_id = _registry_with_run(tmp_path, status="stopped")
    registry.amend(run_id, more_steps=5, queue=True)
    assert registry.get(run_id)["status"] == "queued" and registry.config(run_id).steps == 10
    with pytest.raises(RunConflict, match="already queued; stop it before resuming it with other settings"):
        registry.amend(run_id, more_steps=5, queue=True)  # a second window's click, or another process
    with pytest.raises(RunConflict, match="already queued: nothing to resume"):  # no settings asked for
        registry.amend(run_id, queue=True)
    assert registry.config(run_id).steps == 10
    registry.update(run_id, status="done")
    (registry.run_dir(run_id) / "latest.json").write_text(json.dumps({"step": 10, "step_offset": 0}))
    with pytest.raises(RunConflict, match=r"done \(10 of 10 steps\): nothing to resume"):
        registry.amend(run_id, queue=True)
    for changes, named in (({"steps": 12}, "not both"), ({"batch_size": None}, "batch_size"),
                           ({"lr": float("inf")}, "finite")):
        with pytest.raises(RunError, match=named):
            registry.amend(run_id, changes, more_steps=2 if "steps" in changes else 0)


def test_null_is_refused_where_a_number_belongs_and_read_as_empty_for_text_and_flags():
    old = RunConfig.from_dict({"dataset": "x", "name": None, "trigger_word": None, "gradient_checkpointing": None})
    assert not old.name and not old.gradient_checkpointing  # configs written by hand or by older versions load
    for field in ("batch_size", "lr", "steps", "crop_seconds"):
        with pytest.raises(RunError, match=f"RunConfig.{field}: null"):
            RunConfig.from_dict({"dataset": "x", field: None})


def test_train_prints_every_nth_step_or_none_and_runs_commands_take_the_runs_folder_after_the_subcommand(
        tmp_path, dataset, fixtures_dir, capsys):
    from sa3_lora_studio.cli import main

    config = dict(dataset=str(dataset), model=str(fixtures_dir / "tiny-small"), adapter_type="lora", rank=2,
                  steps=4, batch_size=1, crop_seconds=0.017, checkpoint_every=2, demo_every=0, seed=3, lr=1e-3,
                  validation_items=1)
    (tmp_path / "run.json").write_text(json.dumps(config))
    runs = tmp_path / "runs"
    assert main(["train", "--config", str(tmp_path / "run.json"), "--runs-dir", str(runs), "--log-every", "2"]) == 0
    out = capsys.readouterr().out
    assert [line.split()[1] for line in out.splitlines() if line.startswith("step ")] == ["2", "4"]
    assert out.count("checkpoint: ") == 2
    # the held-out file's score: the baseline and each checkpoint, with its noise levels, as the metrics have it
    scored = [line for line in out.splitlines() if line.startswith("validation at step ")]
    assert [line.split()[3] for line in scored] == ["0:", "2:", "4:"]
    assert all("on 1 held-out file  (t=0.1 " in line and " t=0.9 " in line for line in scored)
    (run_id,) = [r["id"] for r in RunRegistry(runs).list()]
    assert main(["runs", "resume", run_id, "--runs-dir", str(runs), "--more-steps", "2", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert not [line for line in out.splitlines() if line.startswith("step ")]
    assert "checkpoint: " in out and "done at step 6" in out
    assert main(["runs", "list", "--runs-dir", str(runs), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["step"] == 6
    assert main(["runs", "show", run_id, "--runs-dir", str(runs)]) == 0


def test_small_command_line_mistakes_are_named(tmp_path, fixtures_dir, capsys):
    from sa3_lora_studio.cli import main

    assert main(["generate", str(fixtures_dir / "tiny-small"), "--prompt", "x", "--seed", str(10**20),
                 "--out", str(tmp_path / "x.wav")]) == 2
    assert "seed 100000000000000000000 is too large: use 0 to 2^64 - 1" in capsys.readouterr().err
    from sa3_lora_studio.sa3.generate import resolve_seed

    assert resolve_seed(2**64 - 1) == 2**64 - 1  # the top of ComfyUI's seed widget still generates
    assert main(["bench", "engine", "--seconds", "-1"]) == 2
    assert "--seconds must be > 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as shown:
        main(["--version"])
    assert shown.value.code == 0 and capsys.readouterr().out.startswith("sa3-lora ")
    from sa3_lora_studio.training.preflight import open_continue_from

    with pytest.raises(RunError) as missing:
        open_continue_from(RunConfig(dataset="d", continue_from=str(tmp_path / "nofile.safetensors")))
    assert str(missing.value).count("nofile.safetensors") == 1


def test_train_refuses_patterns_matching_nothing_and_a_file_for_another_model_before_making_a_run(
        tmp_path, dataset, fixtures_dir, capsys):
    """Without loading weights: the model's module tree on the meta device says its layer names and shapes."""
    from sa3_lora_studio.cli import main

    fixture_lora = fixtures_dir / "golden" / "lora" / "bora.safetensors"
    base = dict(dataset=str(dataset), model=str(fixtures_dir / "tiny-small"), steps=1, demo_every=0)
    from sa3_lora_studio.adapters import read_adapter_file
    from safetensors.torch import save_file

    other = read_adapter_file(fixture_lora)  # a fixture LoRA with one layer 3 inputs wider: for another model size
    tensors = {f"{layer}.parametrizations.weight.0.{k}": v for layer, t in other.layers.items() for k, v in t.items()}
    key = next(k for k in tensors if k.endswith("lora_A"))  # [rank, in]: the layer's width, not the rank, grows
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 3)
    save_file(tensors, str(tmp_path / "other.safetensors"),
              metadata={"lora_config": json.dumps({"rank": other.rank, "alpha": other.alpha,
                                                   "adapter_type": other.adapter_type})})
    # a file of another layout sharing a few layer names: all but two renamed away
    few = read_adapter_file(fixture_lora).layers
    kept = sorted(few)[:2]
    renamed = {(layer if layer in kept else layer.replace("model.", "model.other_")): t for layer, t in few.items()}
    save_file({f"{layer}.parametrizations.weight.0.{k}": v for layer, t in renamed.items() for k, v in t.items()},
              str(tmp_path / "few.safetensors"),
              metadata={"lora_config": json.dumps({"rank": other.rank, "alpha": other.alpha,
                                                   "adapter_type": other.adapter_type})})
    for change, named in (({"include": ["nosuchlayer"]}, "RunConfig.include/exclude: with targets .*no Linear/Conv1d layer"),
                          ({"continue_from": str(tmp_path / "other.safetensors")},
                           "RunConfig.continue_from: other.safetensors: .* the loaded model expects"),
                          ({"continue_from": str(tmp_path / "few.safetensors")},
                           "RunConfig.continue_from: few.safetensors: only 2 of its .* layers exist in this model")):
        (tmp_path / "run.json").write_text(json.dumps({**base, **change}))
        assert main(["train", "--config", str(tmp_path / "run.json"), "--runs-dir", str(tmp_path / "runs")]) == 2
        err = capsys.readouterr().err
        assert __import__("re").search(named, err), err
        assert not (tmp_path / "runs").exists() or RunRegistry(tmp_path / "runs").list() == []


def test_runs_list_says_when_a_runs_folder_was_deleted_by_hand_and_delete_clears_it(tmp_path, capsys):
    import shutil

    from sa3_lora_studio.cli import main

    registry, run_id = _registry_with_run(tmp_path, status="done")
    kept = registry.create(RunConfig(dataset="somewhere", steps=5, name="kept"))
    shutil.rmtree(registry.run_dir(run_id))
    assert main(["runs", "--runs-dir", str(tmp_path / "runs"), "list"]) == 0
    out = capsys.readouterr().out
    assert f"{run_id:48} folder missing (`sa3-lora runs delete {run_id}` removes its record)" in out
    assert main(["runs", "--runs-dir", str(tmp_path / "runs"), "delete", run_id]) == 0
    assert [r["id"] for r in registry.list()] == [kept]


def test_a_read_only_mount_is_named_without_a_traceback(monkeypatch, capsys):
    """EROFS is an OSError, not a PermissionError: a runs folder copied onto a read-only mount says so too."""
    import errno

    from sa3_lora_studio import cli
    from sa3_lora_studio.training import cli as training_cli

    def writes(args):
        raise OSError(errno.EROFS, "Read-only file system", "/mnt/archive/runs/r1/.owner.json.abc.tmp")
    monkeypatch.setattr(training_cli, "_cmd_runs", writes)  # the parser is built after this: it takes it
    assert cli.main(["runs", "list"]) == 2
    assert capsys.readouterr().err == ("sa3-lora runs: cannot write into /mnt/archive/runs/r1: Read-only file system "
                                       "(a read-only folder or mount: copy it somewhere writable, or run as a user "
                                       "who may write there)\n")
