"""Validation loss: held-out items never trained on, scored at fixed noise levels, the same after resumes, and the
checkpoint with the lowest score found by every consumer (node, panel data, CLI)."""

import json
import random

import pytest
import torch
from sa3_lora_studio.adapters import adapter_session, read_adapter_file
from sa3_lora_studio.sa3 import schedules
from sa3_lora_studio.training.manager import TrainingManager
from sa3_lora_studio.training.runs import RunError
from sa3_lora_studio.training.trainer import Trainer
from sa3_lora_studio.training.validation import best_validation, noise_levels, split_items, validation_events
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
        start = next(s for s in range(full.shape[1] - vs.x0.shape[2] + 1)
                     if torch.equal(vs.x0[0], torch.from_numpy(full[:, s:s + vs.x0.shape[2]].copy())))
        assert start >= 0  # the crop is a window of the item's own latents
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

    stopper = {}

    def stop_at_2(event):
        if event["type"] == "step" and event["step"] == 2 and event["run"] == stopper.get("id"):
            manager.worker.controls[event["run"]].request_stop()

    manager.listeners.append(stop_at_2)
    interrupted = manager.registry.create(_config(dataset, fixtures_dir, name="interrupted", validation_items=1,
                                                  validation_every=1))
    stopper["id"] = interrupted
    manager.worker.submit(interrupted)
    assert manager.wait(interrupted, 300)["status"] == "stopped"
    manager.listeners.remove(stop_at_2)
    manager.control(interrupted, "restart")
    assert manager.wait(interrupted, 300)["status"] == "done"
    raw = [e for e in _events(manager, interrupted) if e["type"] == "validation"]
    assert [e["step"] for e in raw] == [0, 1, 2, 3, 4]  # step 2 scored before the stop, not again on resume
    assert [e["loss"] for e in raw] == [e["loss"] for e in validation_events(_events(manager, often))]
    (_, c) = _final_adapter(manager, interrupted)
    assert all(torch.equal(x, y) for x, y in zip(b["adapter"], c["adapter"]))


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
    assert [e["step"] for e in validation_events(_events(manager, run))] == [0, 2, 3, 4]

    assert runs_cli(tmp_path / "runs", "show", run) == 0  # the command line names the best checkpoint too
    shown = json.loads(capsys.readouterr().out)
    assert shown["best_validation"] == best_validation(_events(manager, run)) and shown["best_validation"]["path"]
    assert shown["config"]["validation_items"] == 1 and shown["config"]["validation_every"] == 1
