"""Validation loss: held-out items never trained on, scored at fixed noise levels, the same after resumes, and the
checkpoint with the lowest score found by every consumer (node, panel data, CLI)."""

import csv
import json
import random

import pytest
import torch
from sa3_lora_studio.adapters import adapter_session, read_adapter_file
from sa3_lora_studio.sa3 import schedules
from sa3_lora_studio.training.events import best_validation, validation_events
from sa3_lora_studio.training.manager import TrainingManager
from sa3_lora_studio.training.runs import RunError
from sa3_lora_studio.training.trainer import Trainer
from sa3_lora_studio.training.validation import noise_levels, split_items
from test_distributed import runs_cli
from test_training import EventLogStub, _config, _final_adapter, _provider


def _events(manager, run_id):
    return [json.loads(line) for line in (manager.registry.run_dir(run_id) / "events.jsonl").read_text().splitlines()]


def test_the_held_out_items_are_a_seeded_choice_and_none_by_default():
    train, held = split_items(10, 3, random.Random(5))
    assert len(held) == 3 and sorted(train + held) == list(range(10)) and not set(train) & set(held)
    assert split_items(10, 3, random.Random(5)) == (train, held)
    assert split_items(10, 3, random.Random(6)) != (train, held)
    assert split_items(4, 0, random.Random(5)) == ([0, 1, 2, 3], [])
    with pytest.raises(ValueError, match="validation_items: 4 of a dataset of 4 items"):
        split_items(4, 4, random.Random(5))
    assert noise_levels(5) == pytest.approx([0.1, 0.3, 0.5, 0.7, 0.9])


def test_held_out_items_never_reach_a_training_batch(tmp_path, tiny, dataset, fixtures_dir):
    trainer = Trainer(_config(dataset, fixtures_dir, validation_items=1, batch_size=2), tmp_path, "r",
                      EventLogStub(), _provider(tiny))
    trainer.setup()
    try:
        (held,) = trainer.validation_ids
        seen = {i for step in range(30) for i in trainer.make_batch(step)["indices"]}
        assert seen == set(range(3)) - {held}
    finally:
        trainer.release_model()


def test_a_run_scores_its_held_out_items_at_the_start_each_checkpoint_and_the_end(tmp_path, tiny, dataset,
                                                                                    fixtures_dir):
    manager = TrainingManager(tmp_path / "runs", model_provider=_provider(tiny))
    run = manager.submit(_config(dataset, fixtures_dir, validation_items=1, steps=4, checkpoint_every=2,
                                 adapter_type="lora"))
    assert manager.wait(run, 300)["status"] == "done"
    events = _events(manager, run)
    scored = validation_events(events)
    assert [e["step"] for e in scored] == [0, 2, 4]
    for e in scored:
        assert e["items"] == 1 and [t for t, _ in e["levels"]] == pytest.approx(noise_levels(5))
        assert e["loss"] == pytest.approx(sum(v for _, v in e["levels"]) / 5)

    # step 0 is the base model (a new LoRA's B is zero): the objective recomputed here from the dataset item alone
    trainer = Trainer(manager.registry.config(run), tmp_path / "probe", "probe", EventLogStub(), _provider(tiny))
    trainer.setup()
    try:
        v = trainer.validate()  # builds the set: the held-out item's fixed crop, noise and prompt
        vs = trainer.validation
        assert vs.indices == trainer.validation_ids and vs.x0.shape[0] == 1
        full = trainer.dataset.latents(vs.indices[0])
        windows = [s for s in range(full.shape[1] - vs.x0.shape[2] + 1)
                   if torch.equal(vs.x0[0], torch.from_numpy(full[:, s:s + vs.x0.shape[2]].copy()))]
        assert windows  # the crop is a window of the item's own latents
        emb, mask = tiny.conditioner.conditioners["prompt"].encode_prompts(vs.prompts, torch.device("cpu"))

        def by_hand() -> list[float]:
            with torch.no_grad():
                sec, _ = tiny.conditioner.conditioners["seconds_total"](torch.tensor(vs.seconds), torch.device("cpu"))
                cross = torch.cat([tiny.conditioner.conditioners["prompt"].project(emb, mask)[0], sec], dim=1)
                levels = []
                for t in noise_levels(5):
                    x_t, target = schedules.flow_pair(vs.x0, vs.noise, torch.tensor([t]))
                    local = torch.zeros(1, vs.x0.shape[1] + 1, vs.x0.shape[2])  # no context: all generated
                    out = tiny.modules.model.model(x_t, torch.tensor([t]), cross, sec[:, 0], local,
                                                   padding_mask=vs.padding)
                    err = ((out - target) ** 2).mean(1)[0]
                    levels.append(float(err[vs.padding[0]].mean()))
            return levels

        base = by_hand()
        assert [lv for _, lv in scored[0]["levels"]] == pytest.approx(base, rel=1e-5)
        assert [lv for _, lv in v["levels"]] == pytest.approx(base, rel=1e-5)  # the same inputs every time

        # the last score is the final checkpoint's: its file applied through another path (merged weights)
        latest = manager.registry.latest_checkpoint(run)
        adapter = read_adapter_file(manager.registry.run_dir(run) / latest["path"])
        with adapter_session(tiny, [adapter], mode="merged"):
            final = by_hand()
        assert [lv for _, lv in scored[-1]["levels"]] == pytest.approx(final, rel=1e-4)
        assert scored[-1]["loss"] != pytest.approx(scored[0]["loss"], rel=1e-6)  # the adapter learnt something
    finally:
        trainer.release_model()


def test_scoring_changes_nothing_in_training_and_a_resumed_run_scores_a_step_once(tmp_path, tiny, dataset,
                                                                                  fixtures_dir):
    manager = TrainingManager(tmp_path / "runs", model_provider=_provider(tiny))
    rarely = manager.submit(_config(dataset, fixtures_dir, name="rarely", validation_items=1, validation_every=1000))
    often = manager.submit(_config(dataset, fixtures_dir, name="often", validation_items=1, validation_every=1))
    for run in (rarely, often):
        assert manager.wait(run, 300)["status"] == "done"
    assert [e["step"] for e in validation_events(_events(manager, rarely))] == [0, 4]
    assert [e["step"] for e in validation_events(_events(manager, often))] == [0, 1, 2, 3, 4]
    (_, a), (_, b) = _final_adapter(manager, rarely), _final_adapter(manager, often)
    assert all(torch.equal(x, y) for x, y in zip(a["adapter"], b["adapter"]))

    # a stop right after step 2 was scored: its checkpoint's state says so, and the resumed run does not score it
    # again; a stop before step 3's score cancels it, and the resumed run scores step 3
    stops = {"after-score": ("validation", 2), "before-score": ("step", 3)}
    runs = {}

    def stop_there(event):
        for name, (kind, step) in stops.items():
            if event["run"] == runs.get(name) and event["type"] == kind and event["step"] == step:
                manager.worker.controls[event["run"]].request_stop()

    manager.listeners.append(stop_there)
    for name in stops:
        runs[name] = manager.registry.create(_config(dataset, fixtures_dir, name=name, validation_items=1,
                                                     validation_every=1))
        manager.worker.submit(runs[name])
        assert manager.wait(runs[name], 300)["status"] == "stopped"
    manager.listeners.remove(stop_there)
    assert [e["step"] for e in _events(manager, runs["before-score"]) if e["type"] == "validation"] == [0, 1, 2]
    for run in runs.values():
        manager.control(run, "restart")
        assert manager.wait(run, 300)["status"] == "done"
        raw = [e for e in _events(manager, run) if e["type"] == "validation"]
        assert [e["step"] for e in raw] == [0, 1, 2, 3, 4], run  # each step once
        assert [e["loss"] for e in raw] == [e["loss"] for e in validation_events(_events(manager, often))]
        (_, c) = _final_adapter(manager, run)
        assert all(torch.equal(x, y) for x, y in zip(b["adapter"], c["adapter"]))


def test_a_stop_that_cancels_the_last_steps_score_ends_stopped_and_a_restart_scores_it(tmp_path, tiny, dataset,
                                                                                      fixtures_dir):
    manager = TrainingManager(tmp_path / "runs", model_provider=_provider(tiny))
    holder = {}

    def stop_at_last(event):
        if event["run"] == holder.get("run") and event["type"] == "step" and event["step"] == 3:
            manager.worker.controls[event["run"]].request_stop()

    manager.listeners.append(stop_at_last)
    holder["run"] = run = manager.registry.create(_config(dataset, fixtures_dir, validation_items=1, steps=3))
    manager.worker.submit(run)
    assert manager.wait(run, 300)["status"] == "stopped"  # not done: the final checkpoint has no score yet
    assert manager.registry.latest_checkpoint(run)["step"] == 3
    assert [e["step"] for e in validation_events(_events(manager, run))] == [0, 2]
    manager.listeners.remove(stop_at_last)
    manager.control(run, "restart")
    assert manager.wait(run, 300)["status"] == "done"
    assert [e["step"] for e in _events(manager, run) if e["type"] == "validation"] == [0, 2, 3]
    assert best_validation(_events(manager, run))["step"] in (2, 3)


def test_the_held_out_files_are_kept_by_name_with_their_crop(tmp_path, tiny, dataset, fixtures_dir):
    from sa3_lora_studio.training.validation import PLAN_FILE, ValidationPlan

    files = [f"f{i}.wav" for i in range(10)]
    plan = ValidationPlan.load_or_create(tmp_path, files, 3, random.Random(1), 40, True)
    again = ValidationPlan.load_or_create(tmp_path, files, 3, random.Random(99), 80, False)  # read, not chosen
    assert again == plan and json.loads((tmp_path / PLAN_FILE).read_text())["files"] == plan.files
    grown = ["a-new-file.wav"] + files  # a file added before a resume shifts every index
    train, held, gone = plan.indices(grown)
    assert [grown[i] for i in held] == plan.files and 0 in train and not gone
    train, held, gone = plan.indices([f for f in files if f != plan.files[0]])
    assert gone == [plan.files[0]] and len(held) == 2
    assert ValidationPlan.load_or_create(tmp_path / "none", files, 0, random.Random(1), 40, True) is None

    trainer = Trainer(_config(dataset, fixtures_dir, validation_items=1), tmp_path / "run", "r", EventLogStub(),
                      _provider(tiny))
    trainer.setup()
    try:
        saved = json.loads((tmp_path / "run" / PLAN_FILE).read_text())
        assert saved["files"] == [trainer.items[trainer.validation_ids[0]][0]]
        assert saved["crop_latents"] == trainer.crop_latents and saved["random_crop"] is True
    finally:
        trainer.release_model()
    saved["crop_latents"] = 1  # a resume with another crop_seconds still scores the crop the run started with
    (tmp_path / "run" / PLAN_FILE).write_text(json.dumps(saved))
    trainer = Trainer(_config(dataset, fixtures_dir, validation_items=1, crop_seconds=0.01), tmp_path / "run", "r",
                      EventLogStub(), _provider(tiny))
    trainer.setup()
    try:
        trainer.validate()
        assert trainer.validation.x0.shape[-1] == 1 and trainer.crop_latents != 1
    finally:
        trainer.release_model()


def test_only_rank_0_scores_and_it_scores_its_own_share_of_a_batch_at_a_time(dataset, fixtures_dir):
    from sa3_lora_studio.training.distributed import DistributedTrainer, rank_rows
    from sa3_lora_studio.training.worker import RunControl

    trainer = DistributedTrainer.__new__(DistributedTrainer)
    trainer.rank, trainer.rows = 0, rank_rows(8, 0, 4)
    assert trainer.is_main and trainer.validation_batch == 2
    trainer.config = _config(dataset, fixtures_dir, validation_items=1)
    trainer.validation_ids, trainer.validated_step, trainer.step, trainer.step_offset = [0], None, 0, 0
    scored = []
    trainer.validate = lambda stop_requested: scored.append(trainer.rank) or {"loss": 1.0, "levels": []}
    trainer.stop_asked = lambda control: (lambda: False)
    trainer.log = EventLogStub()
    for rank in (1, 0):  # step 0 is due; rank 1 leaves it to rank 0
        trainer.rank = rank
        assert trainer.validate_if_due(RunControl()) is False
    assert scored == [0] and trainer.validated_step == 0


def test_the_best_checkpoint_is_the_scored_one_with_the_lowest_loss():
    events = [{"type": "validation", "step": 0, "loss": 0.9}, {"type": "checkpoint", "step": 2, "path": "a"},
              {"type": "validation", "step": 2, "loss": 0.5}, {"type": "validation", "step": 3, "loss": 0.1},
              {"type": "checkpoint", "step": 4, "path": "b"}, {"type": "validation", "step": 4, "loss": 0.7},
              {"type": "checkpoint", "step": 6, "path": "c"}, {"type": "validation", "step": 6, "loss": 0.5},
              {"type": "validation", "step": 4, "loss": 0.4}]  # step 4 scored again after a resume: the last counts
    assert best_validation(events) == {"step": 4, "loss": 0.4, "path": "b"}  # step 3 has no checkpoint to keep
    events.append({"type": "validation", "step": 6, "loss": 0.4})
    assert best_validation(events)["path"] == "c"  # a tie goes to the later checkpoint
    assert best_validation([{"type": "checkpoint", "step": 2, "path": "a"}]) is None


def test_holding_out_every_item_or_a_negative_count_is_refused_by_name(tmp_path, tiny, dataset, fixtures_dir):
    from sa3_lora_studio.training.preflight import open_dataset

    with pytest.raises(RunError, match="validation_items: 3 held out of .* 3 encoded files .* at most 2"):
        open_dataset(_config(dataset, fixtures_dir, validation_items=3))
    with pytest.raises(RunError, match="RunConfig.validation_every: -1 must be >= 0"):
        _config(dataset, fixtures_dir, validation_every=-1)
    manager = TrainingManager(tmp_path / "runs", model_provider=_provider(tiny))
    run = manager.submit(_config(dataset, fixtures_dir, validation_items=5))  # no preflight here: the run says it
    record = manager.wait(run, 300)
    assert record["status"] == "failed" and "validation_items: 5 held out" in record["error"]


def test_a_resumed_run_may_score_more_often_but_not_hold_out_other_items(tmp_path, tiny, dataset, fixtures_dir,
                                                                        capsys):
    manager = TrainingManager(tmp_path / "runs", model_provider=_provider(tiny))
    run = manager.submit(_config(dataset, fixtures_dir, validation_items=1, steps=2))
    assert manager.wait(run, 300)["status"] == "done"
    with pytest.raises(RunError, match="validation_items cannot change"):
        manager.registry.amend(run, {"validation_items": 2}, more_steps=2)
    manager.control(run, "restart", changes={"validation_every": 1}, more_steps=2)
    assert manager.wait(run, 300)["status"] == "done"
    assert [e["step"] for e in _events(manager, run) if e["type"] == "validation"] == [0, 2, 3, 4]  # 2 once

    assert runs_cli(tmp_path / "runs", "show", run) == 0  # the command line names the best checkpoint too
    shown = json.loads(capsys.readouterr().out)
    assert shown["best_validation"] == best_validation(_events(manager, run)) and shown["best_validation"]["path"]
    assert shown["config"]["validation_items"] == 1 and shown["config"]["validation_every"] == 1

    # the metrics table: a row per step (step 0 for its score), the score and checkpoint where there are some
    assert runs_cli(tmp_path / "runs", "metrics", run, "--out", str(tmp_path / "m.csv")) == 0
    rows = list(csv.DictReader((tmp_path / "m.csv").open()))
    events = _events(manager, run)
    steps = {e["step"]: e for e in events if e["type"] == "step"}
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3, 4]
    assert rows[0]["loss"] == "" and float(rows[0]["validation_loss"]) == validation_events(events)[0]["loss"]
    for r in rows[1:]:
        e = steps[int(r["step"])]
        assert (float(r["loss"]), float(r["lr"]), float(r["grad_norm"])) == (e["loss"], e["lr"], e["grad_norm"])
        by_bin = {}
        for t, loss in e["samples"]:
            by_bin.setdefault(min(4, int(t * 5)), []).append(loss)
        names = [k for k in r if k.startswith("loss_t")]
        assert names == ["loss_t0.00-0.20", "loss_t0.20-0.40", "loss_t0.40-0.60", "loss_t0.60-0.80", "loss_t0.80-1.00"]
        assert [float(r[k]) if r[k] else None for k in names] == [
            pytest.approx(sum(by_bin[i]) / len(by_bin[i])) if i in by_bin else None for i in range(5)]
    assert [r["step"] for r in rows if r["checkpoint"]] == ["2", "4"] and rows[1]["validation_loss"] == ""
    assert rows[3]["validation_loss"] != ""
    assert runs_cli(tmp_path / "runs", "metrics", "no-such-run") == 2
