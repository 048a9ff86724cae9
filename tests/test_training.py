"""Training on the tiny fixture model: background runs, exact resume, stop/pause, demos, continue-from-file."""

import json
import math
import re
import threading
import time
import warnings

import pytest
import soundfile as sf
import torch
from sa3_lora_studio import load_model
from sa3_lora_studio.adapters import read_adapter_file
from sa3_lora_studio.training.manager import TrainingManager
from sa3_lora_studio.training.runs import DemoSpec, RunConfig


def _config(dataset, fixtures_dir, **kw):
    base = dict(dataset=str(dataset), model=str(fixtures_dir / "tiny-small"), adapter_type="dora-rows", rank=4,
                steps=4, batch_size=2, crop_seconds=0.017, checkpoint_every=2, demo_every=0, seed=7, lr=1e-3)
    base.update(kw)
    return RunConfig.from_dict(base)


def _provider(model):
    return lambda spec, variant, dtype, device: model


def _final_adapter(manager, run_id):
    latest = manager.registry.latest_checkpoint(run_id)
    state = torch.load(manager.registry.run_dir(run_id) / latest["state_path"], weights_only=True)
    return latest, state


def _straight_and_stopped_at_2(manager, dataset, fixtures_dir) -> tuple[str, str]:
    """(a run trained to its end, the same settings' run stopped after step 2) on `dataset`."""
    straight = manager.submit(_config(dataset, fixtures_dir, name="straight"))
    assert manager.wait(straight, 300)["status"] == "done"
    stopper = {}

    def stop_at_2(event):
        if event["type"] == "step" and event["step"] == 2 and event["run"] == stopper.get("id"):
            manager.worker.controls[event["run"]].request_stop()

    manager.listeners.append(stop_at_2)
    interrupted = manager.registry.create(_config(dataset, fixtures_dir, name="interrupted"))
    stopper["id"] = interrupted
    manager.worker.submit(interrupted)
    assert manager.wait(interrupted, 300)["status"] == "stopped"
    assert manager.registry.latest_checkpoint(interrupted)["step"] == 2
    manager.listeners.remove(stop_at_2)
    return straight, interrupted


def test_stopped_and_resumed_run_equals_the_uninterrupted_run(tmp_path, tiny, dataset, fixtures_dir):
    manager = TrainingManager(tmp_path / "runs", model_provider=_provider(tiny))
    straight, interrupted = _straight_and_stopped_at_2(manager, dataset, fixtures_dir)
    manager.control(interrupted, "restart")
    assert manager.wait(interrupted, 300)["status"] == "done"

    (a_info, a), (b_info, b) = _final_adapter(manager, straight), _final_adapter(manager, interrupted)
    assert a_info["step"] == b_info["step"] == 4
    for x, y in zip(a["adapter"], b["adapter"]):
        assert torch.equal(x, y)  # bit-exact on CPU
    fresh = read_adapter_file(manager.registry.run_dir(straight) / a_info["path"])
    assert fresh.adapter_type == "dora-rows" and fresh.rank == 4 and fresh.metadata["step"] in (4, "4")
    events = [json.loads(line) for line in (manager.registry.run_dir(straight) / "events.jsonl").read_text().splitlines()]
    steps = [e for e in events if e["type"] == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3, 4]
    # the adapter's size: from 0 (B = 0) growing with training, and the saved file's own ‖s·B·A‖
    from sa3_lora_studio.adapters.maths import adapter_scale

    sizes = [e["delta_norm"] for e in steps]
    assert 0 < sizes[0] < sizes[-1]
    from_file = sum(float((adapter_scale(fresh.alpha, fresh.rank, 1.0) * t["lora_B"].float() @ t["lora_A"].float())
                          .square().sum()) for t in fresh.layers.values()) ** 0.5
    assert sizes[-1] == pytest.approx(from_file, rel=2e-3)  # the file holds fp16
    assert all(len(e["samples"]) == 2 and all(0 <= t <= 1 and math.isfinite(v) for t, v in e["samples"]) for e in steps)


def test_training_changes_the_adapter_and_never_the_shared_base_weights(tmp_path, tiny, dataset, fixtures_dir):
    before = {k: v.clone() for k, v in tiny.modules.state_dict().items()}
    x = torch.randn(1, 16, 8, generator=torch.Generator().manual_seed(0))
    cond = tiny.encode_text(["x"], [1.0])
    v_before = tiny.velocity(x, 0.5, cond)
    results = {}

    def generate_meanwhile():
        results["v"] = tiny.velocity(x, 0.5, cond)  # the main thread keeps working while the run trains

    manager = TrainingManager(tmp_path / "runs", model_provider=_provider(tiny))
    run = manager.submit(_config(dataset, fixtures_dir, steps=3))
    generate_meanwhile()
    assert manager.wait(run, 300)["status"] == "done"
    after = tiny.modules.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(results["v"], v_before) and torch.equal(tiny.velocity(x, 0.5, cond), v_before)
    latest, state = _final_adapter(manager, run)
    adapter = read_adapter_file(manager.registry.run_dir(run) / latest["path"])
    assert any(t["lora_B"].abs().max() > 0 for t in adapter.layers.values())  # trained away from identity


def test_detached_norms_are_a_run_option_that_changes_the_gradients_not_the_file(tmp_path, tiny, dataset, fixtures_dir):
    """RunConfig.detach_norm reaches the trained layers: from the same seed, a BoRA run with detached norms ends
    elsewhere than the exact one (already B's first update differs: the exact one has the norms' W·Aᵀ term), and
    writes the same kind of file."""
    manager = TrainingManager(tmp_path / "runs", model_provider=_provider(tiny))
    runs = {d: manager.submit(_config(dataset, fixtures_dir, name=f"bora-{d}", adapter_type="bora", steps=2,
                                      checkpoint_every=2, detach_norm=d)) for d in (False, True)}
    files = {}
    for detached, run in runs.items():
        assert manager.wait(run, 300)["status"] == "done"
        assert manager.registry.config(run).detach_norm is detached  # kept for resume
        latest, _ = _final_adapter(manager, run)
        files[detached] = read_adapter_file(manager.registry.run_dir(run) / latest["path"])
    exact, detached = files[False], files[True]
    assert detached.adapter_type == exact.adapter_type == "bora" and detached.layers.keys() == exact.layers.keys()
    assert all(torch.isfinite(t).all() for layer in detached.layers.values() for t in layer.values())
    assert any(not torch.equal(exact.layers[k]["lora_B"], detached.layers[k]["lora_B"]) for k in exact.layers)


def test_pause_and_stop_act_within_one_step_with_their_own_flag(tmp_path, tiny, dataset, fixtures_dir):
    manager = TrainingManager(tmp_path / "runs", model_provider=_provider(tiny))
    paused = threading.Event()

    def pause_at_1(event):
        if event["type"] == "step" and event["step"] == 1:
            manager.control(event["run"], "pause")
        if event["type"] == "status" and event.get("status") == "paused":
            paused.set()

    manager.listeners.append(pause_at_1)
    run = manager.submit(_config(dataset, fixtures_dir, steps=50))
    assert paused.wait(120)
    step = manager.registry.get(run)["step"]
    assert manager.registry.get(run)["status"] == "paused"
    assert step == 1  # paused after step 1, where it was asked: the list shows that, not the last 5th step
    manager.control(run, "stop")
    assert manager.wait(run, 120)["status"] == "stopped"
    assert manager.registry.latest_checkpoint(run)["step"] <= max(step, 1) + 1


def test_steps_per_second_leave_out_pauses_and_follow_a_monotonic_clock():
    from sa3_lora_studio.training.step_rate import WINDOW_SECONDS, StepRate

    now = [100.0]
    rate = StepRate(0, clock=lambda: now[0])
    now[0] += 0.5
    assert rate.after_step(1) == pytest.approx(2.0)
    with rate.left_out():  # paused for 30 s between steps 1 and 2
        now[0] += 30.0
    now[0] += 0.5
    assert rate.after_step(2) == pytest.approx(2.0)
    now[0] += WINDOW_SECONDS  # a slow stretch: the window restarts after it, so the rate follows it
    assert rate.after_step(3) == pytest.approx(3 / (WINDOW_SECONDS + 1.0))
    now[0] += 1.0
    assert rate.after_step(4) == pytest.approx(1.0)
    with rate.left_out():  # a clock that went back never moves the window back
        now[0] -= 3.0
    now[0] += 3.25
    assert rate.after_step(5) == pytest.approx(2 / 1.25)


def test_a_paused_run_reports_its_rate_without_the_pause(tmp_path, tiny, dataset, fixtures_dir, monkeypatch):
    """The trainer hands the pause to StepRate: on a clock that reads 0.5 s later each time and jumps 10 000 s
    while the run is paused, the rate stays near one step a second, the pause not in it."""
    from sa3_lora_studio.training import step_rate

    manager = TrainingManager(tmp_path / "runs", model_provider=_provider(tiny))
    paused, rates = threading.Event(), {}
    clock = [0.0]

    def tick() -> float:  # every reading 0.5 s later: a step takes a second or two on this clock
        clock[0] += 0.5
        return clock[0]

    def pause_at_1(event):
        if event["type"] == "step":
            rates[event["step"]] = event["steps_per_s"]
            if event["step"] == 1:
                manager.control(event["run"], "pause")
        if event["type"] == "status" and event.get("status") == "paused":
            clock[0] += 10_000.0
            paused.set()

    real_step_rate = step_rate.StepRate  # only the trainer's step rate reads this clock
    monkeypatch.setattr(step_rate, "StepRate", lambda step, clock=None: real_step_rate(step, clock=tick))
    manager.listeners.append(pause_at_1)
    run = manager.submit(_config(dataset, fixtures_dir, steps=3, checkpoint_every=3))
    assert paused.wait(120)
    manager.control(run, "resume")
    assert manager.wait(run, 120)["status"] == "done"
    assert all(0.1 < rates[step] < 10 for step in (1, 2, 3)), rates  # with the pause counted: below 3 / 10 000


def assert_at_demo_loudness(audio, rate: int, settings: dict, target: float) -> None:
    """A written clip [C, N] is at the run's demo loudness, or as close as the -1 dBTP ceiling or the gain limit
    allowed (which its settings name)."""
    from sa3_lora_studio.encoding.loudness import MAX_GAIN_DB, integrated_loudness, true_peak

    loudness = integrated_loudness(audio, rate)
    limit = settings.get("limited_by")
    if limit is None:
        assert loudness == pytest.approx(target, abs=0.05)
    elif limit == "peak":
        assert loudness < target and 20 * math.log10(true_peak(audio)) == pytest.approx(-1, abs=0.01)
    else:
        assert limit == "max gain" and settings["gain_db"] == MAX_GAIN_DB and loudness < target
    assert settings["loudness_lufs"] == pytest.approx(loudness - settings["gain_db"], abs=0.05)


def test_demos_write_audio_spectrogram_and_settings_for_base_and_arc(tmp_path, tiny, dataset, fixtures_dir):
    from sa3_lora_studio.encoding.loudness import integrated_loudness

    demos = [DemoSpec("warm bass drone", False, 3.0, steps=2, seed=1, duration=0.01),
             DemoSpec(None, True, 1.0, steps=2, seed=2, duration=0.01), DemoSpec("", False, 1.0, steps=2, duration=0.01)]
    manager = TrainingManager(tmp_path / "runs", model_provider=_provider(tiny))
    run = manager.submit(_config(dataset, fixtures_dir, steps=2, demo_every=2, demos=[d.__dict__ for d in demos],
                                 arc_model=str(fixtures_dir / "tiny-small-arc"), adapter_type="lora"))
    assert manager.wait(run, 300)["status"] == "done"
    folder = manager.registry.run_dir(run)
    for step in (0, 2):
        for i in range(3):
            audio, rate = sf.read(folder / "demos" / f"step_{step:06d}" / f"demo_{i}.flac")
            assert rate == 44100 and audio.shape[1] == 2 and len(audio) == int(0.01 * 44100)
            assert (folder / "demos" / f"step_{step:06d}" / f"demo_{i}.png").stat().st_size > 100
            settings = json.loads((folder / "demos" / f"step_{step:06d}" / f"demo_{i}.json").read_text())
            assert settings["arc"] == (i == 1) and settings["steps"] == 2
            assert_at_demo_loudness(audio.T, rate, settings, -18.0)
    events = [json.loads(x) for x in (folder / "events.jsonl").read_text().splitlines()]
    assert sum(e["type"] == "demo" for e in events) == 6
    assert not any(e["type"] == "warning" for e in events)

    # the ARC demo (the ARC DiT loaded beside the training model) sounds as the whole ARC model does: at step 0 the
    # new LoRA is the identity (B = 0); at step 2 with the checkpoint, which is stored in fp16 (the demo used fp32)
    arc = load_model(fixtures_dir / "tiny-small-arc")
    for step, loras, atol in ((0, [], 1e-5), (2, [{"path": str(folder / manager.registry.latest_checkpoint(run)["path"]),
                                                  "strength": 1.0}], 2e-3)):
        demo = folder / "demos" / f"step_{step:06d}"
        settings = json.loads((demo / "demo_1.json").read_text())
        expected, _ = arc.generate(settings["prompt"], duration=0.01, seed=2, steps=2, cfg_scale=1.0,
                                   sampler="pingpong", loras=loras)
        heard = torch.from_numpy(sf.read(demo / "demo_1.flac", dtype="float32")[0]).T
        assert expected[0].abs().max() > 1e-2
        gain = 10 ** (settings["gain_db"] / 20)  # what the demo was as generated, brought to the demo loudness
        assert settings["loudness_lufs"] == pytest.approx(integrated_loudness(expected[0].numpy(), 44100), abs=0.05)
        assert torch.allclose(heard, expected[0] * gain, atol=atol * max(1, gain)), \
            (step, (heard - expected[0] * gain).abs().max())

    # the dataset clips beside the demos: each the start of a file at the crop length, through the autoencoder
    references = [e for e in events if e["type"] == "reference"]
    assert [e["index"] for e in references] == [0, 1, 2]  # the fixture dataset has three files: all of them
    from sa3_lora_studio.encoding.dataset import load_dataset

    data = load_dataset(dataset)
    index_of = {relpath: i for i, (relpath, _) in enumerate(data.prompt_items())}
    for e in references:
        heard = torch.from_numpy(sf.read(folder / e["audio"], dtype="float32")[0]).T
        assert (folder / e["image"]).stat().st_size > 100 and e["settings"]["reference"] is True
        item = index_of[e["settings"]["file"]]
        crop = max(1, round(0.017 * tiny.config.latent_rate))
        z, mask, _ = data.item(item, crop)
        expected = tiny.decode_latents(torch.from_numpy(z[:, :int(mask.sum())].copy())[None])[0].clamp(-1, 1)
        gain = 10 ** (e["settings"]["gain_db"] / 20)
        assert_at_demo_loudness(heard.numpy(), 44100, e["settings"], -18.0)
        assert heard.shape == expected.shape and torch.allclose(heard, expected * gain, atol=1e-4 * max(1, gain))
        assert e["settings"]["prompt"] in ("warm bass drone", "bright bell tone", "noisy snare")
    assert sorted(e["settings"]["file"] for e in references) == sorted(index_of)


@pytest.mark.parametrize("kind", ["lora", "dora-rows", "bora", "lora-xs"])
def test_continue_from_a_golden_lora_file_keeps_its_type_rank_and_targets(tmp_path, tiny, dataset, fixtures_dir, kind):
    source = fixtures_dir / "golden" / "lora" / f"{kind}.safetensors"
    original = read_adapter_file(source)
    manager = TrainingManager(tmp_path / "runs", model_provider=_provider(tiny))
    run = manager.submit(_config(dataset, fixtures_dir, steps=1, adapter_type="lora", rank=2,
                                 continue_from=str(source)))
    assert manager.wait(run, 300)["status"] == "done", manager.registry.get(run)["error"]
    latest, _ = _final_adapter(manager, run)
    trained = read_adapter_file(manager.registry.run_dir(run) / latest["path"])
    assert (trained.adapter_type, trained.rank, trained.alpha) == (original.adapter_type, original.rank, original.alpha)
    assert set(trained.layers) == set(original.layers)
    events = [json.loads(x) for x in (manager.registry.run_dir(run) / "events.jsonl").read_text().splitlines()]
    said = next(e["message"] for e in events if e.get("message", "").startswith("continuing "))
    ignored = [f"{n} {v}" for n, v, theirs in (("adapter_type", "lora", original.adapter_type),
                                               ("rank", 2, original.rank)) if v != theirs]
    assert said.endswith(f"the file decides: the config's {', '.join(ignored)} does not apply)") == bool(ignored)
    if kind == "lora":  # a config that leaves type and rank at their defaults asked for neither: nothing to tell
        run = manager.submit(_config(dataset, fixtures_dir, steps=1, adapter_type="dora-rows", rank=16,
                                     continue_from=str(source)))
        assert manager.wait(run, 300)["status"] == "done"
        events = [json.loads(x) for x in (manager.registry.run_dir(run) / "events.jsonl").read_text().splitlines()]
        said = next(e["message"] for e in events if e.get("message", "").startswith("continuing "))
        assert said.startswith("continuing lora rank 4") and "does not apply" not in said


def test_the_prompt_preview_for_step_s_shows_what_training_step_s_sees(tmp_path, tiny, dataset, fixtures_dir):
    from sa3_lora_studio.encoding import preview_prompts, prompt_seed
    from sa3_lora_studio.training.trainer import Trainer

    config = _config(dataset, fixtures_dir, prompt_config={"caption_weight": 50, "path_weight": 50},
                     trigger_word="zz", batch_size=2)
    trainer = Trainer(config, tmp_path, "r", EventLogStub(), _provider(tiny))
    trainer.setup()
    for step in range(5):
        batch = trainer.make_batch(step)
        preview = preview_prompts(trainer.items, trainer.prompt_config, prompt_seed(config.seed, step), n=len(trainer.items))
        by_file = {row["relpath"]: row["prompt"] for row in preview}
        assert batch["prompts"] == [by_file[trainer.items[i][0]] for i in batch["indices"]]
        assert all(p.startswith("zz") for p in batch["prompts"])


def test_crops_begin_at_random_or_at_each_files_start(tmp_path, tiny, dataset, fixtures_dir):
    from sa3_lora_studio.training.trainer import Trainer

    at_start = {}
    for crop_from in ("random", "start"):
        trainer = Trainer(_config(dataset, fixtures_dir, crop_from=crop_from, crop_seconds=0.01), tmp_path / crop_from,
                          "r", EventLogStub(), _provider(tiny))
        trainer.setup()
        try:
            n = trainer.crop_latents
            assert n < min(trainer.dataset.latents(i).shape[1] for i in range(len(trainer.dataset)))  # room to move
            at_start[crop_from] = [torch.equal(x0, torch.from_numpy(trainer.dataset.latents(i)[:, :n].copy()))
                                   for step in range(4) for batch in [trainer.make_batch(step)]
                                   for x0, i in zip(batch["x0"], batch["indices"])]
        finally:
            trainer.release_model()
    assert all(at_start["start"]) and not all(at_start["random"])
    with pytest.raises(ValueError, match="crop_from"):
        _config(dataset, fixtures_dir, crop_from="end")


def test_the_runs_prompt_cache_is_bounded_and_a_prompt_encoded_again_gives_the_same_bits(
        tmp_path, tiny, dataset, fixtures_dir, monkeypatch):
    """Shuffled tags compose a new prompt at most steps: the run's cache of prompt embeddings stays under its byte
    budget (least recently used out first), and a prompt that fell out is encoded again to the same bits."""
    from sa3_lora_studio.training import trainer as trainer_module
    from sa3_lora_studio.training.trainer import Trainer

    config = _config(dataset, fixtures_dir, prompt_config={"caption_weight": 50, "path_weight": 50}, batch_size=2)
    roomy = Trainer(config, tmp_path / "roomy", "r", EventLogStub(), _provider(tiny))
    roomy.setup()
    prompts = sorted({p for step in range(6) for p in roomy.make_batch(step)["prompts"]})
    assert len(prompts) >= 3
    reference = [roomy.encode_prompts([p])[0][0] for p in prompts]
    entry = reference[0].numel() * reference[0].element_size() + reference[0].shape[0]  # embedding + bool mask
    monkeypatch.setattr(trainer_module, "PROMPT_CACHE_BYTES", 2 * entry)
    tight = Trainer(config, tmp_path / "tight", "r", EventLogStub(), _provider(tiny))
    tight.setup()
    prompt_cond = tight.model.conditioner.conditioners["prompt"]
    t5_calls = []
    hook = prompt_cond.text_encoder.register_forward_hook(lambda *args: t5_calls.append(1))
    try:
        for _ in range(2):  # the second pass re-encodes what the first pushed out
            for p, expected in zip(prompts, reference):
                prompt_cond.cache.clear()  # the model's own small cache (shared with `roomy`) must not answer
                calls = len(t5_calls)
                emb, mask = tight.encode_prompts([p, prompts[0]])
                assert torch.equal(emb[0], expected) and mask.dtype == torch.bool
                assert len(tight.prompt_cache) <= 2 and tight.prompt_cache.bytes <= 2 * entry
                assert len(t5_calls) > calls or p == prompts[0]  # prompts[0] is used by every call: it stays
    finally:
        hook.remove()
    assert len(roomy.prompt_cache) == len(prompts)


class EventLogStub:
    def emit(self, *args, **kwargs):
        return {}


def test_a_run_resumes_on_its_dataset_moved_to_another_folder_and_refuses_another_dataset(tmp_path, tiny, dataset,
                                                                                             fixtures_dir):
    """A renamed folder or a drive mounted elsewhere: the same dataset (its files and encoder) is accepted in its
    new place and the run continues exactly; other files are refused by name, and so is the move without a record."""
    import shutil

    from sa3_lora_studio.training.runs import RunError

    here, moved, other = tmp_path / "ds", tmp_path / "moved ds", tmp_path / "other ds"
    shutil.copytree(dataset, here)
    manager = TrainingManager(tmp_path / "runs", model_provider=_provider(tiny))
    straight, run = _straight_and_stopped_at_2(manager, here, fixtures_dir)
    from sa3_lora_studio.encoding.dataset import MANIFEST
    from sa3_lora_studio.training.preflight import open_dataset

    shutil.copytree(here, other)  # another dataset: the same one less a file
    listed = json.loads((other / MANIFEST).read_text())
    listed["files"] = [f for f in listed["files"] if f.get("status") != "encoded"] + \
        [f for f in listed["files"] if f.get("status") == "encoded"][1:]
    (other / MANIFEST).write_text(json.dumps(listed))
    shutil.move(here, moved)
    with pytest.raises(RunError, match="RunConfig.dataset: .*If it moved, a stopped run resumes on it in its new "
                                       "folder: sa3-lora runs resume RUN --set dataset=NEW_FOLDER"):
        open_dataset(manager.registry.config(run))
    with pytest.raises(RunError, match=f"dataset: {re.escape(str(other))} is not the dataset run {run} trained on"):
        manager.control(run, "restart", changes={"dataset": str(other)})
    record = manager.registry.run_dir(run) / "dataset.json"
    kept = record.read_bytes()
    record.unlink()  # a run from before the record: nothing to check another folder against
    with pytest.raises(RunError, match=f"its dataset cannot change .*move the dataset back to {re.escape(str(here))}"):
        manager.control(run, "restart", changes={"dataset": str(moved)})
    record.write_bytes(kept)
    part = tmp_path / "part of it"  # the same dataset, copied in part: refused before any setting changes
    shutil.copytree(moved, part)
    (part / json.loads((part / MANIFEST).read_text())["files"][-1]["latents"]).unlink()
    steps_before = manager.registry.config(run).steps
    with pytest.raises(RunError, match="dataset: 1 of the files .* lists are not there"):
        manager.control(run, "restart", changes={"dataset": str(part)}, more_steps=2)
    assert (manager.registry.config(run).dataset, manager.registry.config(run).steps) == (str(here), steps_before)
    manager.control(run, "restart", changes={"dataset": str(moved)})
    assert manager.wait(run, 300)["status"] == "done"
    assert manager.registry.config(run).dataset == str(moved)
    (_, a), (_, b) = _final_adapter(manager, straight), _final_adapter(manager, run)
    assert all(torch.equal(x, y) for x, y in zip(a["adapter"], b["adapter"]))  # the same run, bit-exact


def test_a_run_killed_during_demos_resumes_and_renders_that_steps_demos_again(tmp_path, tiny, dataset, fixtures_dir):
    manager = TrainingManager(tmp_path / "runs", model_provider=_provider(tiny))

    def stop_at_2(event):
        if event["type"] == "step" and event["step"] == 2:
            manager.control(event["run"], "stop")

    manager.listeners.append(stop_at_2)
    demo = [{"prompt": "x", "steps": 1, "duration": 0.01}]
    run = manager.submit(_config(dataset, fixtures_dir, steps=4, demo_every=4, demos=demo))
    assert manager.wait(run, 300)["status"] == "stopped"
    manager.listeners.remove(stop_at_2)
    demos = manager.registry.run_dir(run) / "demos"
    (demos / "step_000004.partial").mkdir()  # what a process killed while rendering step 4's demos leaves
    (demos / "step_000004.partial" / "demo_7.flac").write_bytes(b"half")
    manager.control(run, "restart")
    assert manager.wait(run, 300)["status"] == "done", manager.registry.get(run)["error"]
    assert sorted(p.name for p in demos.iterdir()) == ["reference", "step_000000", "step_000004"]
    assert sorted(p.name for p in (demos / "step_000004").iterdir()) == ["demo_0.flac", "demo_0.json", "demo_0.png"]


def test_demo_events_a_kill_cut_off_are_said_when_the_run_resumes(tmp_path, tiny, dataset, fixtures_dir):
    """A step's demos are put in place whole, then announced one event each: a kill between two of those events
    left the step showing fewer demos for ever (a resume renders only steps without a folder)."""
    manager = TrainingManager(tmp_path / "runs", model_provider=_provider(tiny))
    demos = [{"prompt": "x", "steps": 1, "duration": 0.01}, {"prompt": "y", "steps": 1, "duration": 0.01}]
    run = manager.submit(_config(dataset, fixtures_dir, steps=2, demo_every=2, demos=demos))
    assert manager.wait(run, 300)["status"] == "done"
    events_file = manager.registry.run_dir(run) / "events.jsonl"

    def demo_events():
        return [(e["step"], e["index"], e["audio"], e["settings"]["prompt"])
                for e in map(json.loads, events_file.read_text().splitlines()) if e["type"] == "demo"]
    full = demo_events()
    assert [(step, index) for step, index, _, _ in full] == [(0, 0), (0, 1), (2, 0), (2, 1)]
    lines = events_file.read_text().splitlines(keepends=True)
    cut = next(i for i, line in enumerate(lines) if '"type": "demo"' in line and '"step": 2' in line
               and '"index": 1' in line)
    events_file.write_text("".join(lines[:cut]))  # killed right after step 2's first demo event
    manager.control(run, "restart", more_steps=1)
    assert manager.wait(run, 300)["status"] == "done"
    assert demo_events() == full  # the missing one said once, as it was (step 3 has no demos)


def test_a_resume_that_fails_before_training_undoes_its_changes_so_a_retry_makes_them_once(tmp_path, tiny, dataset,
                                                                                            fixtures_dir):
    """more_steps after a resume whose model would not load: the retry with the same more_steps trains to the same
    total as if the first attempt had worked (it used to add the steps a second time)."""
    failing = {"on": False}

    def provider(spec, variant, dtype, device):
        if failing["on"]:
            raise OSError("model files moved")
        return tiny

    manager = TrainingManager(tmp_path / "runs", model_provider=provider)
    run = manager.submit(_config(dataset, fixtures_dir, steps=2))
    assert manager.wait(run, 300)["status"] == "done"
    failing["on"] = True
    manager.control(run, "restart", changes={"lr": 5e-4}, more_steps=2)
    record = manager.wait(run, 300)
    assert record["status"] == "failed" and "are back as they were" in record["error"], record["error"]
    config = manager.registry.config(run)
    assert (config.steps, config.lr, record["total_steps"]) == (2, _config(dataset, fixtures_dir).lr, 2)
    failing["on"] = False
    manager.control(run, "restart", changes={"lr": 5e-4}, more_steps=2)
    record = manager.wait(run, 300)
    assert (record["status"], record["step"], record["total_steps"]) == ("done", 4, 4), record.get("error")
    assert manager.registry.config(run).lr == 5e-4
    assert not any(manager.registry.run_dir(run).glob("config.before-resume.json"))  # it took: nothing to undo


def test_a_run_being_deleted_refuses_every_other_action_until_it_is_gone(tmp_path, tiny, dataset, fixtures_dir):
    import threading

    from sa3_lora_studio.training.runs import RunConflict, RunNotFound

    manager = TrainingManager(tmp_path / "runs", model_provider=_provider(tiny))
    at_step, release = threading.Event(), threading.Event()

    def hold_at_step_1(event):  # the training thread waits here, between two steps
        if event["type"] == "step" and event["step"] == 1:
            at_step.set()
            release.wait(60)
    manager.listeners.append(hold_at_step_1)
    run = manager.submit(_config(dataset, fixtures_dir, steps=50))
    try:
        assert at_step.wait(120)
        assert manager.control(run, "delete", confirm=True) == {"id": run, "deleted": False, "deleting": True}
        for action in ("resume", "pause", "save", "stop", "restart"):
            with pytest.raises(RunConflict, match=f"run {run} is being deleted"):
                manager.control(run, action)
    finally:
        release.set()
    manager.worker.join(run, 120)
    with pytest.raises(RunNotFound):
        manager.control(run, "resume")


def test_a_stop_during_demos_acts_before_the_next_demo(tmp_path, tiny, dataset, fixtures_dir):
    manager = TrainingManager(tmp_path / "runs", model_provider=_provider(tiny))

    def stop_when_demos_start(event):
        if event["type"] == "status" and event.get("status") == "demos":
            manager.control(event["run"], "stop")

    manager.listeners.append(stop_when_demos_start)
    run = manager.submit(_config(dataset, fixtures_dir, steps=4, demo_every=2,
                                 demos=[{"prompt": "x", "steps": 1, "duration": 0.01}] * 3))
    record = manager.wait(run, 300)
    assert record["status"] == "stopped" and record["step"] == 0
    # the step's demos are dropped, and the dataset clips not begun (both are rendered on resume)
    assert not list((manager.registry.run_dir(run) / "demos").iterdir())
    assert manager.registry.latest_checkpoint(run)["step"] == 0


def test_a_failing_demo_is_skipped_with_a_warning_and_training_goes_on(tmp_path, tiny, dataset, fixtures_dir,
                                                                      monkeypatch):
    import sa3_lora_studio.training.demos as demos_module

    real = demos_module.write_audio

    def breaks_demo_1(path, *args, **kwargs):
        if path.name == "demo_1":
            path.with_suffix(".flac").write_bytes(b"half")  # a partial file the failure leaves behind
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(demos_module, "write_audio", breaks_demo_1)
    manager = TrainingManager(tmp_path / "runs", model_provider=_provider(tiny))
    run = manager.submit(_config(dataset, fixtures_dir, steps=2, demo_every=2, checkpoint_every=5,
                                 demos=[{"prompt": "x", "steps": 1, "duration": 0.01}] * 3))
    assert manager.wait(run, 300)["status"] == "done", manager.registry.get(run)["error"]
    folder = manager.registry.run_dir(run)
    for step in (0, 2):
        names = sorted(p.name for p in (folder / "demos" / f"step_{step:06d}").iterdir())
        assert names == ["demo_0.flac", "demo_0.json", "demo_0.png", "demo_2.flac", "demo_2.json", "demo_2.png"]
    events = [json.loads(x) for x in (folder / "events.jsonl").read_text().splitlines()]
    warnings = [e["message"] for e in events if e["type"] == "warning"]
    assert warnings == [f"demo 1 at step {s} failed and was skipped: RuntimeError: CUDA out of memory (simulated)"
                        for s in (0, 2)]
    assert [e["index"] for e in events if e["type"] == "demo"] == [0, 2, 0, 2]
    assert manager.registry.latest_checkpoint(run)["step"] == 2


def test_a_non_finite_gradient_skips_the_update_and_keeps_the_schedule(tmp_path, tiny, dataset, fixtures_dir):
    from sa3_lora_studio.training.trainer import Trainer

    trainer = Trainer(_config(dataset, fixtures_dir, warmup_steps=3), tmp_path, "r", EventLogStub(), _provider(tiny))
    trainer.setup()
    before = [p.detach().clone() for p in trainer.params]
    hook = trainer.params[0].register_hook(lambda g: g * float("inf"))
    metrics = trainer.train_step(0)
    assert metrics["skipped"] and not math.isfinite(metrics["grad_norm"]) and math.isfinite(metrics["loss"])
    assert all(torch.equal(a, p) for a, p in zip(before, trainer.params))
    assert all(p.grad is None for p in trainer.params) and trainer.scheduler.last_epoch == 1
    hook.remove()
    assert not trainer.train_step(1)["skipped"]
    assert any(not torch.equal(a, p) for a, p in zip(before, trainer.params))


def _stopped_run(manager, dataset, fixtures_dir, stop_at, **kw):
    def stop(event):
        if event["type"] == "step" and event["step"] == stop_at:
            manager.control(event["run"], "stop")

    manager.listeners.append(stop)
    run = manager.submit(_config(dataset, fixtures_dir, **kw))
    assert manager.wait(run, 300)["status"] == "stopped"
    manager.listeners.remove(stop)
    return run


def test_resume_skips_a_damaged_latest_state_for_the_newest_intact_one_and_says_so(tmp_path, tiny, dataset,
                                                                                   fixtures_dir):
    manager = TrainingManager(tmp_path / "runs", model_provider=_provider(tiny))
    events = []
    manager.listeners.append(events.append)
    run = _stopped_run(manager, dataset, fixtures_dir, 3, steps=6, checkpoint_every=2)
    folder = manager.registry.run_dir(run)
    latest = json.loads((folder / "latest.json").read_text())
    assert latest["step"] == 3
    (folder / latest["state_path"]).write_bytes(b"PK\x03\x04 truncated by a full disk")
    (folder / "latest.json").write_text('{"step": 3, "pa')
    manager.control(run, "restart")
    assert manager.wait(run, 300)["status"] == "done", manager.registry.get(run)["error"]
    messages = [e.get("message", "") for e in events if e["type"] in ("warning", "status")]
    assert any("latest.json is damaged" in m for m in messages)
    assert any(latest["state_path"] in m and "unreadable" in m for m in messages)
    assert "resumed from step 2" in messages


def test_a_continued_run_resumes_from_its_own_checkpoint_when_the_source_file_is_gone(tmp_path, tiny, dataset,
                                                                                      fixtures_dir):
    import shutil

    source = tmp_path / "source.safetensors"
    shutil.copy(fixtures_dir / "golden" / "lora" / "dora-rows.safetensors", source)
    original = read_adapter_file(source)
    manager = TrainingManager(tmp_path / "runs", model_provider=_provider(tiny))
    run = _stopped_run(manager, dataset, fixtures_dir, 1, steps=3, checkpoint_every=1, continue_from=str(source))
    assert (manager.registry.get(run)["adapter_type"], manager.registry.get(run)["rank"]) == (
        original.adapter_type, original.rank)  # the file's, not the config's lora/4
    source.unlink()
    manager.control(run, "restart")
    assert manager.wait(run, 300)["status"] == "done", manager.registry.get(run)["error"]
    latest, _ = _final_adapter(manager, run)
    trained = read_adapter_file(manager.registry.run_dir(run) / latest["path"])
    assert trained.adapter_type == original.adapter_type and set(trained.layers) == set(original.layers)


def test_a_continued_run_resumes_from_its_own_checkpoint_when_the_source_file_was_replaced(tmp_path, tiny, dataset,
                                                                                          fixtures_dir):
    """A file of another type put where the run's source was (a re-export, a newer version) does not break the
    resume: the run's own checkpoint has its adapter, and it ends as an uninterrupted run from the source does."""
    import shutil

    golden = fixtures_dir / "golden" / "lora"
    source = tmp_path / "source.safetensors"
    shutil.copy(golden / "dora-rows.safetensors", source)
    manager = TrainingManager(tmp_path / "runs", model_provider=_provider(tiny))
    straight = manager.submit(_config(dataset, fixtures_dir, steps=3, checkpoint_every=1, continue_from=str(source)))
    assert manager.wait(straight, 300)["status"] == "done"
    run = _stopped_run(manager, dataset, fixtures_dir, 1, steps=3, checkpoint_every=1, continue_from=str(source))
    shutil.copy(golden / "bora.safetensors", source)
    manager.control(run, "restart")
    assert manager.wait(run, 300)["status"] == "done", manager.registry.get(run)["error"]
    a = read_adapter_file(manager.registry.run_dir(straight) / manager.registry.latest_checkpoint(straight)["path"])
    b = read_adapter_file(manager.registry.run_dir(run) / manager.registry.latest_checkpoint(run)["path"])
    assert b.adapter_type == "dora-rows" and a.layers.keys() == b.layers.keys()
    for layer in a.layers:
        for key in a.layers[layer]:
            assert torch.equal(a.layers[layer][key], b.layers[layer][key]), (layer, key)


def test_a_continued_file_with_a_step_that_is_no_count_starts_at_0_with_a_warning(tmp_path, tiny, dataset,
                                                                                  fixtures_dir):
    """Hand-edited or foreign metadata ('abc', '-5', '1.5') must not fail the run at loading, which no resume
    could get past; '12.0' is step 12."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    golden = fixtures_dir / "golden" / "lora" / "lora.safetensors"
    with safe_open(str(golden), "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    manager = TrainingManager(tmp_path / "runs", model_provider=_provider(tiny))
    for step, first in (("abc", 1), ("-5", 1), ("1.5", 1), ("12.0", 13)):
        source = tmp_path / f"step {step}.safetensors"
        save_file(tensors, str(source), metadata={**metadata, "step": step})
        run = manager.submit(_config(dataset, fixtures_dir, steps=1, continue_from=str(source)))
        record = manager.wait(run, 300)
        assert record["status"] == "done" and record["step"] == first, (step, record.get("error"))
        events = [json.loads(x) for x in (manager.registry.run_dir(run) / "events.jsonl").read_text().splitlines()]
        warnings = [e["message"] for e in events if e["type"] == "warning"]
        assert any("which is no whole number from 0 up" in w for w in warnings) == (first == 1), (step, warnings)


def test_a_lightning_checkpoint_without_a_step_counts_on_from_the_step_in_its_name(tmp_path, tiny, dataset,
                                                                                   fixtures_dir):
    """The official trainer's callback keeps only the weights and lora_config in its .ckpt; Lightning names the file
    epoch=E-step=S.ckpt, so that name is where its step is (a name without one starts at 0; reset_step too)."""
    from safetensors import safe_open

    golden = fixtures_dir / "golden" / "lora" / "dora-rows.safetensors"
    with safe_open(str(golden), "pt") as f:
        state, config = {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["lora_config"])
    manager = TrainingManager(tmp_path / "runs", model_provider=_provider(tiny))
    for name, reset, first in (("epoch=3-step=40.ckpt", False, 41), ("epoch=3-step=40.ckpt", True, 1),
                               ("last.ckpt", False, 1)):
        source = tmp_path / name
        torch.save({"state_dict": state, "lora_config": config}, source)
        run = manager.submit(_config(dataset, fixtures_dir, steps=1, continue_from=str(source), reset_step=reset))
        record = manager.wait(run, 300)
        assert record["status"] == "done" and record["step"] == first, (name, reset, record.get("error"))
        events = [json.loads(x) for x in (manager.registry.run_dir(run) / "events.jsonl").read_text().splitlines()]
        said = [e.get("message", "") for e in events if e["type"] == "status"]
        assert any("at step 40 (the step in its file name" in m for m in said) == (first == 41), said
        assert any("at step 0 (the file records no step" in m for m in said) == (name == "last.ckpt"), said
        assert not [e for e in events if e["type"] == "warning" and "step" in e["message"]]


def test_a_continued_files_step_that_is_no_count_is_passed_over_for_the_next_place_that_has_one():
    from sa3_lora_studio.adapters import LoadedAdapter
    from sa3_lora_studio.training.preflight import continued_epoch, continued_step

    layers = {"model.x": {"lora_A": torch.zeros(2, 4), "lora_B": torch.zeros(3, 2)}}

    def adapter(name, metadata=None, config=None):
        return LoadedAdapter("lora", 2, 2.0, layers, config=config or {}, metadata=metadata or {}, name=name)

    step, warning, where = continued_step(adapter("x-step=99-epoch=4", config={"step": -3, "epoch": 4}))
    assert (step, where) == (99, "file name") and "its lora_config gives step -3, which is no whole number" in warning
    assert continued_step(adapter("x", {"step": "7"}, {"step": 12})) == (7, None, "metadata")  # ours first
    assert continued_step(adapter("x-step=3", {}, {"step": 12})) == (12, None, "lora_config")  # then underfit's
    assert continued_step(adapter("last")) == (0, None, "none")
    assert continued_epoch(adapter("x", {"epoch": "5"}, {"epoch": 4})) == (5, None)
    assert continued_epoch(adapter("epoch=1-step=7")) == (1, None)  # Lightning's name
    epoch, warning = continued_epoch(adapter("x-epoch=2", {}, {"epoch": -2}))
    assert epoch == 2 and "its lora_config gives epoch -2, which is no whole number from 0 up" in warning
    assert continued_epoch(adapter("x")) == (0, None)


def test_an_underfit_file_counts_on_from_the_step_in_its_lora_config(tmp_path, tiny, dataset, fixtures_dir):
    """underfit writes the step inside lora_config ({"rank", ..., "step", "epoch", "base_model"}), which decides
    over the step= in its name, as underfit's own resume takes it."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    golden = fixtures_dir / "golden" / "lora" / "lora.safetensors"
    with safe_open(str(golden), "pt") as f:
        tensors, config = {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["lora_config"])
    source = tmp_path / "drums-step=30-epoch=2.safetensors"
    save_file(tensors, str(source), metadata={"lora_config": json.dumps({**config, "step": 120, "epoch": 2,
                                                                          "base_model": "sa3-small-music"})})
    manager = TrainingManager(tmp_path / "runs", model_provider=_provider(tiny))
    run = manager.submit(_config(dataset, fixtures_dir, steps=1, continue_from=str(source)))
    record = manager.wait(run, 300)
    assert record["status"] == "done" and record["step"] == 121, record.get("error")
    written = read_adapter_file(manager.registry.run_dir(run) / manager.registry.latest_checkpoint(run)["path"])
    assert written.metadata["step"] == "121"
    assert written.config["step"] == 121 and written.config["base_model"] == "sa3-small-music"  # underfit reads these
    # epochs count on from the file's 2 by this run's own passes over the data (not its step count's)
    from sa3_lora_studio.encoding.dataset import load_dataset

    assert written.config["epoch"] == int(written.metadata["epoch"]) == 2 + 1 // len(load_dataset(dataset).entries)


def test_checkpoints_record_the_fingerprint_of_the_weights_they_were_trained_on(tmp_path, tiny, dataset,
                                                                                 fixtures_dir):
    """A continued file made on other weights (an ARC model's) must not pass its fingerprint on: the run's output
    would then warn on the very model it was trained on."""
    from sa3_lora_studio.adapters.apply import SA3_ROOTS, trained_on_fingerprint
    from safetensors import safe_open
    from safetensors.torch import save_file

    golden = fixtures_dir / "golden" / "lora" / "dora-rows-xs.safetensors"
    with safe_open(str(golden), "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    source = tmp_path / "made-elsewhere.safetensors"
    save_file(tensors, str(source), metadata={**metadata, "base_fingerprint": "0123456789abcdef"})
    manager = TrainingManager(tmp_path / "runs", model_provider=_provider(tiny))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = manager.submit(_config(dataset, fixtures_dir, steps=1, continue_from=str(source)))
        assert manager.wait(run, 300)["status"] == "done", manager.registry.get(run)["error"]
    said = [e["message"] for e in map(json.loads, (manager.registry.run_dir(run) / "events.jsonl").read_text()
                                      .splitlines()) if e["type"] == "warning"]
    assert sum("trained on other base weights" in m for m in said) == 1  # said once, as the run's event ...
    assert not [w for w in caught if "trained on other base weights" in str(w.message)]  # ... not also by Python
    out = read_adapter_file(manager.registry.run_dir(run) / manager.registry.latest_checkpoint(run)["path"])
    mine = trained_on_fingerprint(tiny.modules, out, SA3_ROOTS)
    assert out.metadata["base_fingerprint"] == mine != "0123456789abcdef"


def test_a_dataset_copied_in_part_is_refused_before_the_run_is_queued(tmp_path, tiny, dataset, fixtures_dir):
    import shutil

    from sa3_lora_studio.encoding import load_dataset

    copy = tmp_path / "partial copy"
    shutil.copytree(dataset, copy)
    gone = load_dataset(copy).entries[-1]["metadata"]
    (copy / gone).unlink()
    from sa3_lora_studio.training.preflight import check_run_inputs
    from sa3_lora_studio.training.runs import RunError

    config = _config(copy, fixtures_dir)
    named = f"RunConfig.dataset: 1 of the files .* lists are not there .*{re.escape(gone)}"
    with pytest.raises(RunError, match=named):  # the node's and the command line's check before queueing
        check_run_inputs(config, tiny)
    manager = TrainingManager(tmp_path / "runs", model_provider=_provider(tiny))
    record = manager.wait(manager.submit(config), 300)  # a run queued anyway fails at setup with the same words
    assert record["status"] == "failed" and re.search(named, record["error"]), record["error"]
    shutil.copy(dataset / gone, copy / gone)  # all there again, but one latent file cut off part-way
    cut = copy / load_dataset(copy).entries[0]["latents"]
    cut.write_bytes(cut.read_bytes()[:-40])
    with pytest.raises(RunError, match=f"1 latent file.* damaged .*{re.escape(cut.name)}: shorter than its header"):
        check_run_inputs(config, tiny)


def test_a_latent_file_broken_mid_run_is_named_and_the_last_good_step_is_saved(tmp_path, tiny, dataset, fixtures_dir):
    import shutil

    from sa3_lora_studio.encoding import load_dataset

    copy = tmp_path / "dataset"
    shutil.copytree(dataset, copy)
    victim = copy / load_dataset(copy).entries[0]["latents"]
    manager = TrainingManager(tmp_path / "runs", model_provider=_provider(tiny))

    def break_at_2(event):
        if event["type"] == "step" and event["step"] == 2:
            victim.write_bytes(victim.read_bytes()[:90])

    manager.listeners.append(break_at_2)
    run = manager.submit(_config(copy, fixtures_dir, steps=8, checkpoint_every=100, batch_size=3))
    record = manager.wait(run, 300)
    assert record["status"] == "failed" and victim.name in record["error"] and "re-encode" in record["error"]
    assert manager.registry.latest_checkpoint(run)["step"] == 2  # nothing trained before the failure is lost


def test_a_stop_during_the_final_demos_ends_stopped_and_a_restart_renders_them(tmp_path, tiny, dataset,
                                                                                fixtures_dir):
    manager = TrainingManager(tmp_path / "runs", model_provider=_provider(tiny))
    seen = []

    def stop_at_the_final_demos(event):
        if event["type"] == "status" and event.get("status") == "demos":
            seen.append(event)
            if len(seen) == 2:  # step 0's demos, then the final step's
                manager.control(event["run"], "stop")

    manager.listeners.append(stop_at_the_final_demos)
    run = manager.submit(_config(dataset, fixtures_dir, steps=2, demo_every=2,
                                 demos=[{"prompt": "x", "steps": 1, "duration": 0.01}] * 2))
    assert manager.wait(run, 300)["status"] == "stopped"
    demos = manager.registry.run_dir(run) / "demos"
    assert sorted(p.name for p in demos.iterdir()) == ["reference", "step_000000"]
    assert manager.registry.latest_checkpoint(run)["step"] == 2
    manager.listeners.remove(stop_at_the_final_demos)
    manager.control(run, "restart")
    assert manager.wait(run, 300)["status"] == "done"
    assert sorted(p.name for p in demos.iterdir()) == ["reference", "step_000000", "step_000002"]
    references = [e for e in map(json.loads, (demos.parent / "events.jsonl").read_text().splitlines())
                  if e["type"] == "reference"]
    assert len(references) == 3  # written once, not again on the restart


def test_arc_demos_use_a_loaded_arc_model_when_the_provider_has_one_else_a_sibling(tmp_path, tiny, dataset, fixtures_dir):
    from sa3_lora_studio.training.trainer import Trainer

    arc_spec = str(fixtures_dir / "tiny-small-arc")
    config = _config(dataset, fixtures_dir, arc_model=arc_spec)
    plain = Trainer(config, tmp_path, "r", EventLogStub(), _provider(tiny))
    plain.setup()
    sibling, private = plain.load_arc_model(arc_spec)
    assert sibling.is_arc and sibling.autoencoder is tiny.autoencoder and sibling is not tiny and private

    loaded_arc = load_model(arc_spec)
    asked = []

    def provider(spec, variant, dtype, device):
        return tiny

    def loaded(spec, variant, dtype, device):
        asked.append((spec, variant, dtype, device))
        return loaded_arc if variant == "arc" else None

    provider.loaded = loaded
    cached = Trainer(config, tmp_path, "r", EventLogStub(), provider)
    cached.setup()
    assert cached.load_arc_model(arc_spec) == (loaded_arc, False)
    assert asked == [(arc_spec, "arc", "fp32", "cpu")]

    # a round of demos drops the ARC model the run loaded for itself, and keeps the provider's
    from sa3_lora_studio.training.demos import run_demos

    demo = {"prompt": "x", "arc": True, "steps": 1, "duration": 0.01}
    for trainer, kept in ((plain, None), (cached, loaded_arc)):
        trainer.config = _config(dataset, fixtures_dir, arc_model=arc_spec, demos=[demo])
        assert len(run_demos(trainer, 0)) == 1 and (tmp_path / "demos" / "step_000000" / "demo_0.flac").is_file()
        assert trainer._arc_model is kept


def test_an_arc_load_that_fails_once_skips_one_round_and_a_missing_arc_model_turns_arc_demos_off(
        tmp_path, tiny, dataset, fixtures_dir):
    from sa3_lora_studio.sa3.loading import CheckpointError
    from sa3_lora_studio.training.demos import run_demos
    from sa3_lora_studio.training.trainer import Trainer

    class Log:
        def __init__(self):
            self.warnings = []

        def emit(self, kind, **payload):
            if kind == "warning":
                self.warnings.append(payload["message"])
            return {"type": kind, **payload}

    demo = {"prompt": "x", "arc": True, "steps": 1, "duration": 0.01}
    config = _config(dataset, fixtures_dir, arc_model=str(fixtures_dir / "tiny-small-arc"), demos=[demo])
    for failure, rounds_with_arc in ((RuntimeError("CUDA out of memory (simulated)"), [2, 4]),
                                     (CheckpointError("tiny-small-arc: no model.safetensors"), [])):
        log = Log()
        trainer = Trainer(config, tmp_path / type(failure).__name__, "r", log, _provider(tiny))
        trainer.setup()
        real, calls = trainer.load_arc_model, []

        def fails_first(spec, real=real, calls=calls, failure=failure):
            calls.append(spec)
            if len(calls) == 1 or isinstance(failure, CheckpointError):
                raise failure
            return real(spec)

        trainer.load_arc_model = fails_first
        written = [step for step in (0, 2, 4) if run_demos(trainer, step)]
        assert written == rounds_with_arc
        if rounds_with_arc:
            assert log.warnings == ["ARC demos skipped this round: loading the ARC model failed (RuntimeError: CUDA "
                                    "out of memory (simulated))"] and len(calls) == 3
        else:  # warned once, not tried again
            assert log.warnings == [f"ARC demos skipped: no ARC model ({failure})"] and len(calls) == 1


def test_a_non_arc_model_for_arc_demos_is_warned_about_once_though_loaded_every_round(tmp_path, tiny, dataset,
                                                                                     fixtures_dir):
    import shutil

    from sa3_lora_studio.training.demos import run_demos
    from sa3_lora_studio.training.trainer import Trainer

    copy = tmp_path / "not-arc"
    shutil.copytree(fixtures_dir / "tiny-small", copy)  # a base model in another folder: loaded beside, not ARC
    warnings = []

    class Log:
        def emit(self, kind, **payload):
            if kind == "warning":
                warnings.append(payload["message"])
            return {}

    demo = {"prompt": "x", "arc": True, "steps": 1, "duration": 0.01}
    trainer = Trainer(_config(dataset, fixtures_dir, arc_model=str(copy), demos=[demo]), tmp_path / "run", "r", Log(),
                      _provider(tiny))
    trainer.setup()
    assert all(len(run_demos(trainer, step)) == 1 for step in (0, 2, 4))
    assert warnings == [f"ARC demos: {copy} is not an ARC model; using it with ping-pong anyway"]


def test_an_xs_run_takes_each_layers_svd_once_though_the_arc_model_is_loaded_anew_each_round(tmp_path, tiny, dataset,
                                                                                             fixtures_dir, monkeypatch):
    from sa3_lora_studio.adapters import xs_bases
    from sa3_lora_studio.training.demos import run_demos
    from sa3_lora_studio.training.trainer import Trainer

    class Log:
        def emit(self, kind, **payload):
            assert kind != "warning" or "-xs" in payload["message"], payload
            return {}


    xs_bases.clear_cache()  # nothing cached by earlier tests
    calls = []
    real = xs_bases.compute_svd_bases
    monkeypatch.setattr(xs_bases, "compute_svd_bases", lambda w, r: calls.append(tuple(w.shape)) or real(w, r))
    demo = {"prompt": "x", "arc": True, "steps": 1, "duration": 0.01}
    trainer = Trainer(_config(dataset, fixtures_dir, arc_model=str(fixtures_dir / "tiny-small-arc"), demos=[demo],
                              adapter_type="lora-xs"), tmp_path / "run", "r", Log(), _provider(tiny))
    trainer.setup()
    at_setup = len(calls)
    assert at_setup > 0
    assert len(run_demos(trainer, 0)) == 1
    first_round = len(calls) - at_setup  # the ARC model's own weights (another model: other bases)
    assert all(len(run_demos(trainer, step)) == 1 for step in (2, 4))
    assert len(calls) == at_setup + first_round


def test_an_xs_run_on_a_model_whose_config_names_svd_bases_trains_on_the_files_bases(tmp_path, dataset, fixtures_dir):
    """As the official train_lora.py --svd_bases_path: the file's bases, not the weights' own SVD."""
    import shutil

    from sa3_lora_studio.adapters.xs_bases import write_svd_bases_file
    from sa3_lora_studio.training.trainer import Trainer
    from safetensors.torch import load_file

    model_dir = tmp_path / "model"
    shutil.copytree(fixtures_dir / "tiny-small", model_dir)
    other = load_file(str(fixtures_dir / "tiny-small-arc" / "model.safetensors"))  # bases of other weights: visible
    keys = [k for k, w in other.items() if k.startswith(("model.model.", "conditioner.")) and w.dim() >= 2]
    write_svd_bases_file(model_dir / "bases.pt", ((k, other[k]) for k in keys), columns=4)
    config = json.loads((model_dir / "model_config.json").read_text())
    config["svd_bases_path"] = "bases.pt"
    (model_dir / "model_config.json").write_text(json.dumps(config))

    said = []

    class Log:
        def emit(self, kind, **payload):
            said.append(payload.get("message", ""))
            return {}

    trainer = Trainer(_config(dataset, fixtures_dir, model=str(model_dir), adapter_type="lora-xs", rank=4),
                      tmp_path / "run", "r", Log(), None)
    trainer.setup()
    bases = torch.load(model_dir / "bases.pt", weights_only=True)
    slots = trainer.stack.slots(0)
    assert slots
    for slot in slots.values():
        key = ("model." if slot.layer.startswith("model.") else "conditioner.") + slot.layer + ".weight"
        assert torch.equal(slot.U, bases[key]["U"]) and torch.equal(slot.V, bases[key]["V"]), key
    assert any("bases from the SVD bases file" in n for n in trainer.stack.report.notes)
    assert any("bases from the SVD bases file" in m for m in said)  # in the run's log, where a user sees it


def test_a_model_whose_text_encoder_is_narrower_than_cond_dim_loads_and_its_prompt_projection_trains(tmp_path):
    """The official T5Gemma conditioner adds `proj_out` when the T5 width differs from cond_dim, and its config
    does not say so: the checkpoint's tensors decide. Adapters on `proj_out` learn (it runs at every step, after the
    cached frozen T5), so the file's proj_out layer leaves its identity start."""
    import copy
    import json

    import numpy as np
    import soundfile as sf
    from sa3_lora_studio.encoding import encode_folder
    from sa3_lora_studio.sa3.tiny import TINY_CONFIG, TINY_T5, write_tiny_model

    config = copy.deepcopy(TINY_CONFIG)
    wide = TINY_T5["hidden_size"] + 16
    config["model"]["conditioning"]["cond_dim"] = wide
    config["model"]["diffusion"]["config"].update(cond_token_dim=wide, global_cond_dim=wide)
    config["model"]["conditioning"]["configs"][0]["config"]["text_dim"] = TINY_T5["hidden_size"]
    folder = write_tiny_model(tmp_path / "model", config=config)
    official = json.loads((folder / "model_config.json").read_text())
    del official["model"]["conditioning"]["configs"][0]["config"]["text_dim"]  # as an official config reads
    (folder / "model_config.json").write_text(json.dumps(official))
    model = load_model(folder)
    assert model.conditioner.conditioners["prompt"].proj_out.weight.shape == (wide, TINY_T5["hidden_size"])

    audio = tmp_path / "audio"
    audio.mkdir()
    for i in range(2):
        tone = 0.3 * np.sin(2 * np.pi * (220 + 330 * i) * np.arange(4410) / 44100)
        sf.write(audio / f"tone{i}.wav", np.stack([tone, tone], 1).astype(np.float32), 44100)
        (audio / f"tone{i}.txt").write_text(f"tone number {i}")
    assert encode_folder(audio, tmp_path / "dataset", encoder=model).complete
    manager = TrainingManager(tmp_path / "runs", model_provider=_provider(model))
    run = manager.submit(RunConfig.from_dict(dict(
        dataset=str(tmp_path / "dataset"), model=str(folder), adapter_type="lora", rank=2, steps=2, batch_size=2,
        crop_seconds=0.05, checkpoint_every=2, demo_every=0, seed=1, lr=1e-2, cfg_dropout=0.0)))
    assert manager.wait(run, 300)["status"] == "done"
    adapter = read_adapter_file(manager.registry.run_dir(run) / manager.registry.latest_checkpoint(run)["path"])
    (projection,) = [t for name, t in adapter.layers.items() if name.endswith("prompt.proj_out")]
    assert projection["lora_B"].abs().max() > 0


def test_a_crop_longer_than_the_models_window_is_capped_with_a_warning(tmp_path, tiny, dataset, fixtures_dir):
    from sa3_lora_studio.training.trainer import Trainer

    events = []

    class Log:
        def emit(self, kind, **fields):
            events.append((kind, fields))
            return {}

    trainer = Trainer(_config(dataset, fixtures_dir, crop_seconds=1.0), tmp_path / "run", "r", Log(), _provider(tiny))
    trainer.setup()
    assert trainer.crop_latents == tiny.config.max_latents
    assert trainer.make_batch(0)["x0"].shape[-1] == tiny.config.max_latents
    assert [f["message"] for kind, f in events if kind == "warning"] == [
        f"crop_seconds 1 is longer than this model's maximum of {tiny.config.max_latents / tiny.config.latent_rate:.3g}"
        " s; training crops are capped there"]


def test_a_dataset_another_autoencoder_encoded_is_refused_naming_what_differs(dataset, fixtures_dir, tiny):
    from types import SimpleNamespace

    from sa3_lora_studio.training.preflight import open_dataset
    from sa3_lora_studio.training.runs import RunError

    config = _config(dataset, fixtures_dir)
    assert len(open_dataset(config, tiny)) == 3
    same_width = SimpleNamespace(latent_dim=tiny.latent_dim, downsampling_ratio=4 * tiny.downsampling_ratio,
                                 sample_rate=tiny.sample_rate)
    with pytest.raises(RunError, match=rf"RunConfig.dataset: .*another autoencoder: samples per latent "
                                       rf"{tiny.downsampling_ratio} \(the model's: {4 * tiny.downsampling_ratio}\)"):
        open_dataset(config, same_width)
    other_rate = SimpleNamespace(latent_dim=tiny.latent_dim + 1, downsampling_ratio=tiny.downsampling_ratio,
                                 sample_rate=48000)
    with pytest.raises(RunError, match=r"latent width .*; sample rate 44100 \(the model's: 48000\)"):
        open_dataset(config, other_rate)


def test_the_model_label_in_a_files_metadata_names_a_packs_folder_not_just_base():
    from sa3_lora_studio.training.trainer import model_label

    assert model_label("sa3-small-music") == "sa3-small-music"
    assert model_label("/models/my-pack/base") == "my-pack/base" and model_label("/m/x/arc/") == "x/arc"
    assert model_label("/ckpt/stable_audio_3_medium_base.safetensors") == "stable_audio_3_medium_base.safetensors"


def test_a_dataset_from_an_autoencoder_with_other_weights_is_refused_whatever_precision_this_one_has(
        dataset, fixtures_dir, tiny):
    """Same shapes, other weights (small vs medium SAME at real size, or a fine-tuned one): refused. The same
    autoencoder loaded in bf16 is the same autoencoder."""
    import copy

    from sa3_lora_studio.training.preflight import open_dataset
    from sa3_lora_studio.training.runs import RunError

    config = _config(dataset, fixtures_dir)
    assert len(open_dataset(config, load_model(fixtures_dir / "tiny-small", dtype="bf16"))) == 3
    other = copy.deepcopy(tiny)
    with torch.no_grad():
        next(other.autoencoder.parameters()).view(-1)[0] += 0.5
    with pytest.raises(RunError, match="another autoencoder: its autoencoder's weights are not this model's"):
        open_dataset(config, other)


def test_a_model_loaded_under_inference_mode_is_refused_before_a_run_is_queued(dataset, fixtures_dir):
    from sa3_lora_studio.training.preflight import check_run_inputs
    from sa3_lora_studio.training.runs import RunError

    with torch.inference_mode():
        frozen = load_model(fixtures_dir / "tiny-small")
    with pytest.raises(RunError, match="loaded under torch.inference_mode"):
        check_run_inputs(_config(dataset, fixtures_dir), frozen)


def test_a_wrong_arc_model_is_refused_by_name_before_a_run_is_queued_even_with_the_base_model_loaded(
        tiny, dataset, fixtures_dir):
    """SA3 Train LoRA has its model loaded, so only the ARC demos' model is still a name to look for."""
    from sa3_lora_studio.training.preflight import check_run_inputs
    from sa3_lora_studio.training.runs import RunError

    with pytest.raises(RunError, match="RunConfig.arc_model: .*no-such-pack"):
        check_run_inputs(_config(dataset, fixtures_dir, arc_model="no-such-pack", demo_every=2), tiny)
    assert check_run_inputs(_config(dataset, fixtures_dir, arc_model=str(fixtures_dir / "tiny-small-arc"),
                                    demo_every=2), tiny) == []
    no_arc_demos = [{"prompt": "a", "arc": False}]  # the name is only looked for when ARC demos will use it
    assert check_run_inputs(_config(dataset, fixtures_dir, arc_model="no-such-pack", demo_every=2,
                                    demos=no_arc_demos), tiny) == []


def test_a_layer_pattern_that_matches_nothing_is_refused_by_name_with_the_model_loaded_or_not(
        tiny, dataset, fixtures_dir):
    """Patterns are substrings of layer names: '*.ff.*' would exclude nothing and train every layer it meant to
    spare. The command line has no model loaded: its module tree (meta device) answers the same."""
    from sa3_lora_studio.training.preflight import check_run_inputs
    from sa3_lora_studio.training.runs import RunError

    for model in (tiny, None):
        for field, patterns, named, hint in (("exclude", ["*.ff.*"], "'*.ff.*'", "not globs"),
                                             ("exclude", ["nonexistent_xyz"], "'nonexistent_xyz'", ""),
                                             ("include", ["self_attn", "bogus_layer"], "'bogus_layer'", "")):
            with pytest.raises(RunError, match=rf"RunConfig\.{field}: {re.escape(named)} is part of no layer's "
                                               rf"name.*{hint}"):
                check_run_inputs(_config(dataset, fixtures_dir, **{field: patterns}), model)
        assert check_run_inputs(_config(dataset, fixtures_dir, exclude=["ff"], include=["layers.[0-1]."]),
                                model) == []


def test_a_dataset_of_another_autoencoder_is_refused_before_queueing_without_the_model_loaded(tmp_path,
                                                                                              fixtures_dir):
    from sa3_lora_studio.encoding import encode_folder
    from sa3_lora_studio.encoding.toy import ToyEncoder, tone, write_audio_file
    from sa3_lora_studio.sa3.config import read_config
    from sa3_lora_studio.training.preflight import check_run_inputs
    from sa3_lora_studio.training.runs import RunError

    width = read_config(fixtures_dir / "tiny-small" / "model_config.json").latent_dim
    toy = ToyEncoder(latent_dim=width + 3)
    (tmp_path / "audio").mkdir()
    write_audio_file(tmp_path / "audio" / "a", tone(0.3, 44100), 44100, "wav16")
    encode_folder(tmp_path / "audio", tmp_path / "toy", toy)
    with pytest.raises(RunError, match=rf"was encoded by another autoencoder: latent width {width + 3} \(the "
                                       rf"model's: {width}\)"):
        check_run_inputs(_config(tmp_path / "toy", fixtures_dir))


def test_fp16_runs_scale_the_loss_and_resume_with_their_scale(tmp_path, dataset, fixtures_dir):
    """fp16 activations round gradients under 6e-8 to zero: an fp16 run multiplies the loss by a dynamic scale,
    halves it when the gradients overflow (that update skipped, reported as a loss_scale event, not a warning) and
    keeps it in the checkpoint, so a run stopped and resumed equals the uninterrupted one."""
    fp16 = load_model(fixtures_dir / "tiny-small", dtype="fp16")
    manager = TrainingManager(tmp_path / "runs", model_provider=_provider(fp16))
    straight = manager.submit(_config(dataset, fixtures_dir, name="straight", precision="fp16"))
    assert manager.wait(straight, 300)["status"] == "done"
    events = [json.loads(line) for line in (manager.registry.run_dir(straight) / "events.jsonl").read_text().splitlines()]
    scales = [(e["step"], e["scale"]) for e in events if e["type"] == "loss_scale"]
    assert scales[0] == (1, 2.0**15) and [s for _, s in scales] == [2.0**-k for k in range(-15, -15 + len(scales))]
    assert not [e for e in events if e["type"] in ("warning", "error")]

    def stop_at_2(event):
        if event["type"] == "step" and event["step"] == 2 and event["run"] == interrupted:
            manager.worker.controls[event["run"]].request_stop()

    manager.listeners.append(stop_at_2)
    interrupted = manager.registry.create(_config(dataset, fixtures_dir, name="interrupted", precision="fp16"))
    manager.worker.submit(interrupted)
    assert manager.wait(interrupted, 300)["status"] == "stopped"
    manager.listeners.remove(stop_at_2)
    _, at_2 = _final_adapter(manager, interrupted)
    assert at_2["loss_scale"]["scale"] == min(s for step, s in scales if step <= 2)
    manager.control(interrupted, "restart")
    assert manager.wait(interrupted, 300)["status"] == "done"
    (_, a), (_, b) = _final_adapter(manager, straight), _final_adapter(manager, interrupted)
    assert all(torch.equal(x, y) for x, y in zip(a["adapter"], b["adapter"]))
    assert any(not torch.equal(x, y) for x, y in zip(a["adapter"], at_2["adapter"]))  # it trained after step 2


def test_the_loss_scale_keeps_gradients_fp16_would_round_to_zero():
    from sa3_lora_studio.training.trainer import LossScale

    p = torch.ones(4, requires_grad=True)  # an fp32 adapter parameter behind fp16 activations

    def grad_with(scale: LossScale) -> torch.Tensor:
        p.grad = None
        loss = ((p.half() * 1e-4).float().sum() * 1e-4)  # dL/dp = 1e-8, under fp16's smallest subnormal
        (loss * scale.scale).backward()
        scale.unscale([p])
        return p.grad

    assert torch.equal(grad_with(LossScale(enabled=False)), torch.zeros(4))
    torch.testing.assert_close(grad_with(LossScale(enabled=True)), torch.full((4,), 1e-8), rtol=2e-3, atol=0)
    scale = LossScale(enabled=True, growth_interval=2)
    scale.update(overflow=True)
    assert scale.scale == 2.0**15
    scale.update(overflow=False), scale.update(overflow=False)
    assert scale.scale == 2.0**16 and LossScale(enabled=False).scale == 1.0
    # `lowered` (a loss_scale event, not a warning) is about the scale before the update: 2 -> 1 was lowered, 1 not
    two = LossScale(enabled=True, init_scale=2.0)
    two.update(overflow=True)
    assert two.lowered and two.scale == 1.0
    two.update(overflow=True)
    assert not two.lowered and two.scale == 1.0
    two.update(overflow=False)
    assert not two.lowered


def test_a_run_out_of_device_memory_fails_with_what_to_change_and_lets_go_of_its_model(tmp_path, tiny, dataset,
                                                                                     fixtures_dir, monkeypatch):
    from sa3_lora_studio.training.trainer import Trainer

    real_step = Trainer.train_step

    def train_step(self, step):
        if self.global_step >= 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")
        return real_step(self, step)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    users = tiny.residency.users  # (tests that call Trainer.setup() alone leave theirs on the shared model)
    manager = TrainingManager(tmp_path / "runs", model_provider=_provider(tiny))
    run = manager.submit(_config(dataset, fixtures_dir, name="oom"))
    record = manager.wait(run, 300)
    assert record["status"] == "failed"
    assert record["error"].startswith("out of device memory at step 2: lower batch_size or crop_seconds, turn on "
                                      "gradient_checkpointing")
    assert "OutOfMemoryError: CUDA out of memory" in record["error"]
    assert manager.registry.latest_checkpoint(run)["step"] == 2  # resumable once the settings change
    assert record["step"] == 2  # the list says the step the message names
    assert tiny.residency.users == users


def test_out_of_memory_advice_leaves_out_what_the_run_already_does():
    from types import SimpleNamespace

    from sa3_lora_studio.training.trainer import failure_message

    oom = torch.OutOfMemoryError("CUDA out of memory")
    both = SimpleNamespace(config=SimpleNamespace(gradient_checkpointing=True, precision="bf16"), global_step=7)
    assert failure_message(oom, both).startswith("out of device memory at step 7: lower batch_size or crop_seconds "
                                                 "(the VRAM estimate")
    neither = SimpleNamespace(config=SimpleNamespace(gradient_checkpointing=False, precision="fp32"), global_step=0)
    assert ("lower batch_size or crop_seconds, turn on gradient_checkpointing or load the model in bf16"
            in failure_message(oom, neither))
    assert failure_message(ValueError("bad"), None) == "ValueError: bad"


def test_a_finished_run_trained_further_equals_a_longer_run_and_takes_a_new_learning_rate(tmp_path, tiny, dataset,
                                                                                          fixtures_dir):
    manager = TrainingManager(tmp_path / "runs", model_provider=_provider(tiny))
    straight = manager.submit(_config(dataset, fixtures_dir, name="straight", steps=6))
    extended = manager.submit(_config(dataset, fixtures_dir, name="extended", steps=4))
    faster = manager.submit(_config(dataset, fixtures_dir, name="faster", steps=4))
    for run in (straight, extended, faster):
        assert manager.wait(run, 300)["status"] == "done"

    manager.control(extended, "restart", more_steps=2)  # the same settings: exactly the 6-step run
    record = manager.control(faster, "restart", changes={"lr": 5e-3, "weight_decay": 0.1, "betas": [0.8, 0.9]},
                             more_steps=2)
    assert record["total_steps"] == 6
    for run in (extended, faster):
        assert manager.wait(run, 300)["status"] == "done"
    (a_info, a), (b_info, b) = _final_adapter(manager, straight), _final_adapter(manager, extended)
    assert a_info["step"] == b_info["step"] == 6 and manager.registry.get(extended)["total_steps"] == 6
    for x, y in zip(a["adapter"], b["adapter"]):
        assert torch.equal(x, y)
    assert manager.registry.config(extended).steps == 6

    _, c = _final_adapter(manager, faster)
    assert not all(torch.equal(x, y) for x, y in zip(a["adapter"], c["adapter"]))
    decay, magnitudes = c["optimizer"]["param_groups"]
    assert decay["lr"] == magnitudes["lr"] == 5e-3 and c["scheduler"]["base_lrs"] == [5e-3, 5e-3]
    assert decay["weight_decay"] == 0.1 and magnitudes["weight_decay"] == 0.0  # the magnitudes never decay
    assert tuple(decay["betas"]) == (0.8, 0.9)
    steps = [e for e in map(json.loads, (manager.registry.run_dir(faster) / "events.jsonl").read_text().splitlines())
             if e["type"] == "step"]
    assert [e["lr"] for e in steps if e["step"] > 4] == [5e-3, 5e-3]
    assert all(e["lr"] == 1e-3 for e in steps if e["step"] <= 4)
    messages = [e.get("message", "") for e in map(json.loads, (manager.registry.run_dir(faster) / "events.jsonl")
                                                   .read_text().splitlines()) if e["type"] == "status"]
    assert any("steps 4 → 6" in m and "lr 0.001 → 0.005" in m for m in messages)


def test_a_demo_can_leave_the_adapter_off_for_its_first_sampling_steps(tmp_path, tiny, dataset, fixtures_dir):
    demo = dict(prompt="a bell", steps=3, seed=2, duration=0.1)
    demos = [DemoSpec(**demo), DemoSpec(**demo, lora_skip_first_steps=1), DemoSpec(**demo, lora_skip_first_steps=3),
             DemoSpec(**demo, lora_strength=0.0)]
    manager = TrainingManager(tmp_path / "runs", model_provider=_provider(tiny))
    # the DiT's attention and feed-forward only: the conditioners' adapted layers run once per generation, outside
    # the step gating
    run = manager.submit(_config(dataset, fixtures_dir, adapter_type="lora", steps=2, demo_every=2, lr=3e-2,
                                 targets="attention-ff", demos=demos, demo_format="wav"))
    assert manager.wait(run, 300)["status"] == "done"
    folder = manager.registry.run_dir(run) / "demos" / "step_000002"
    full, skip_one, skip_all, off = (sf.read(folder / f"demo_{i}.wav")[0] for i in range(4))
    assert (skip_all == off).all()  # skipping every step is the model without the adapter
    assert not (full == off).all() and not (skip_one == off).all() and not (skip_one == full).all()
    settings = json.loads((folder / "demo_1.json").read_text())
    assert settings["lora_skip_first_steps"] == 1


def test_a_stop_asked_while_a_demo_samples_ends_it_at_the_next_sampling_step(tmp_path, tiny, dataset, fixtures_dir):
    from sa3_lora_studio.training.demos import run_demos
    from sa3_lora_studio.training.trainer import Trainer

    trainer = Trainer(_config(dataset, fixtures_dir, demos=[{"prompt": "x", "steps": 40, "duration": 0.01}] * 2),
                      tmp_path, "r", EventLogStub(), _provider(tiny))
    trainer.setup()
    asked = []

    def stop_on_the_fifth_look():  # the loop's look before demo 0, then one per sampling step
        asked.append(1)
        return len(asked) >= 5

    try:
        assert run_demos(trainer, 0, stop_requested=stop_on_the_fifth_look) is None
    finally:
        trainer.release_model()
    assert len(asked) == 5  # four sampling steps of the first demo's forty, the second never began
    assert sorted(p.name for p in (tmp_path / "demos").iterdir()) == ["reference"]  # the step's demos dropped


def test_lora_dropout_acts_in_training_only_and_a_resumed_run_draws_the_same_masks(tmp_path, tiny, dataset,
                                                                                    fixtures_dir):
    manager = TrainingManager(tmp_path / "runs", model_provider=_provider(tiny))
    kw = dict(adapter_type="lora", steps=4, lr=1e-2)
    runs = {name: manager.submit(_config(dataset, fixtures_dir, name=name, **{**kw, **extra})) for name, extra in (
        ("plain", {}), ("dropout", {"dropout": 0.5}), ("checkpointed", {"dropout": 0.5, "gradient_checkpointing": True}),
        ("resumed", {"dropout": 0.5, "steps": 2}))}
    for run in runs.values():
        assert manager.wait(run, 300)["status"] == "done"
    manager.control(runs["resumed"], "restart", more_steps=2)
    assert manager.wait(runs["resumed"], 300)["status"] == "done"
    final = {name: _final_adapter(manager, run)[1]["adapter"] for name, run in runs.items()}
    assert not all(torch.equal(a, b) for a, b in zip(final["plain"], final["dropout"]))  # the masks act
    for a, b in zip(final["dropout"], final["resumed"]):
        assert torch.equal(a, b)  # the same masks after a resume
    for a, b in zip(final["dropout"], final["checkpointed"]):
        assert torch.allclose(a, b, atol=1e-6)  # a recomputed block draws its masks again, the same
    state = read_adapter_file(manager.registry.run_dir(runs["dropout"]) / manager.registry.latest_checkpoint(
        runs["dropout"])["path"])
    assert state.config["dropout"] == 0.5


@pytest.mark.parametrize("mode", ["inpaint", "continue"])
def test_inpaint_and_continue_demos_fill_in_a_fixed_dataset_clip(tmp_path, tiny, dataset, fixtures_dir, mode):
    from sa3_lora_studio.encoding.dataset import load_dataset
    from sa3_lora_studio.encoding.loudness import integrated_loudness

    demos = [{"prompt": None, "steps": 2, "seed": 3, "duration": 0.05, "mode": mode}]
    manager = TrainingManager(tmp_path / "runs", model_provider=_provider(tiny))
    run = manager.submit(_config(dataset, fixtures_dir, adapter_type="lora", steps=2, demo_every=2, demos=demos,
                                 demo_format="wav"))
    assert manager.wait(run, 300)["status"] == "done"
    folder = manager.registry.run_dir(run) / "demos"
    first, last = (json.loads((folder / f"step_{s:06d}" / "demo_0.json").read_text()) for s in (0, 2))
    assert first["mode"] == mode and first["source_file"] == last["source_file"]  # the same clip every round
    data = load_dataset(dataset)
    index_of = {relpath: i for i, (relpath, _) in enumerate(data.prompt_items())}
    item = index_of[first["source_file"]]
    assert first["prompt"] == data.metadata(item).get("prompt")  # the clip's own caption
    duration = first["duration"]
    assert first["region"] == pytest.approx([duration / 3, 2 * duration / 3] if mode == "inpaint"
                                            else [duration / 2, duration], abs=1e-3)
    # step 0: the new LoRA is the identity, so the demo is the model's own inpainting of the clip's latents
    window = min(0.05, tiny.config.sample_size / tiny.config.sample_rate)  # the tiny model caps the 0.05 s asked
    z, mask, _ = data.item(item, max(1, round(window * tiny.config.latent_rate)))
    source = torch.from_numpy(z[:, :int(mask.sum())].copy())
    expected, rate = tiny.generate(first["prompt"], duration=duration, seed=3, steps=2, cfg_scale=7.0,
                                   inpaint_latents=source, inpaint_regions=[tuple(first["region"])])
    heard = torch.from_numpy(sf.read(folder / "step_000000" / "demo_0.wav", dtype="float32")[0]).T
    gain = 10 ** (first["gain_db"] / 20)  # brought to the run's demo loudness, the gain on record
    assert first["gain_db"] != 0 and first["loudness_lufs"] == pytest.approx(
        integrated_loudness(expected[0].numpy(), rate), abs=0.01)
    assert heard.shape == expected[0].shape and torch.allclose(heard, expected[0] * gain, atol=1e-3 * max(1, gain))


def test_a_dataset_clip_sounds_the_same_every_round_through_a_noisy_decoder(tiny, dataset):
    from types import SimpleNamespace

    from sa3_lora_studio.encoding.dataset import load_dataset
    from sa3_lora_studio.training.demos import dataset_clip

    noisy = [m for m in tiny.autoencoder.modules() if hasattr(m, "mask_noise")]
    before = [m.mask_noise for m in noisy]
    assert noisy
    trainer = SimpleNamespace(dataset=load_dataset(dataset), config=SimpleNamespace(seed=4))
    try:
        for m in noisy:
            m.mask_noise = 0.5  # the real SAMEs add noise when decoding (0.01); louder here
        first, again = (dataset_clip(trainer, tiny, 1, 8) for _ in range(2))
        trainer.config.seed = 5  # another run: other noise
        other = dataset_clip(trainer, tiny, 1, 8)
    finally:
        for m, level in zip(noisy, before):
            m.mask_noise = level
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_a_stop_another_process_asks_for_reaches_demos_within_a_second(tmp_path, tiny, dataset, fixtures_dir):
    from sa3_lora_studio.training.requests import request_path
    from sa3_lora_studio.training.trainer import Trainer
    from sa3_lora_studio.training.worker import RunControl

    trainer = Trainer(_config(dataset, fixtures_dir), tmp_path, "r", EventLogStub(), _provider(tiny))
    control = RunControl()
    asked = trainer.stop_asked(control, poll_seconds=0.05)
    assert not asked()
    request_path(tmp_path, "stop").write_text("")  # what `sa3-lora runs stop` leaves
    assert not asked()  # read at most once per poll interval

    time.sleep(0.06)
    assert asked() and control.stop.is_set() and not request_path(tmp_path, "stop").exists()


def test_demos_follow_a_changed_loudness_and_runs_saved_before_it_keep_their_demos_as_generated(tmp_path, tiny,
                                                                                                dataset, fixtures_dir):
    demos = [{"prompt": "warm bass drone", "steps": 2, "seed": 1, "duration": 0.01}]
    manager = TrainingManager(tmp_path / "runs", model_provider=_provider(tiny))
    run = manager.submit(_config(dataset, fixtures_dir, adapter_type="lora", steps=2, demo_every=2, demos=demos))
    assert manager.wait(run, 300)["status"] == "done"
    folder = manager.registry.run_dir(run) / "demos"
    assert json.loads((folder / "reference" / "ref_0.json").read_text())["target_lufs"] == -18.0
    manager.control(run, "restart", changes={"demo_loudness": -30.0}, more_steps=2)
    assert manager.wait(run, 300)["status"] == "done"
    for path in (folder / "reference" / "ref_0.json", folder / "step_000004" / "demo_0.json"):
        settings = json.loads(path.read_text())  # the dataset clips again, at the demos' new loudness
        assert settings["target_lufs"] == -30.0, path
        audio, rate = sf.read(path.with_suffix(".flac"), dtype="float64")
        assert_at_demo_loudness(audio.T, rate, settings, -30.0)
    references = [e for e in map(json.loads, (manager.registry.run_dir(run) / "events.jsonl").read_text().splitlines())
                  if e["type"] == "reference"]
    assert len(references) == 2 * 3 and references[-1]["settings"]["target_lufs"] == -30.0

    stored = json.loads((manager.registry.run_dir(run) / "config.json").read_text())
    del stored["demo_loudness"]  # a run saved by an older version
    (manager.registry.run_dir(run) / "config.json").write_text(json.dumps(stored))
    assert manager.registry.config(run).demo_loudness is None
    assert RunConfig.from_dict({"dataset": "d"}).demo_loudness == -18.0  # a new config gets the default
    with pytest.raises(ValueError, match=r"demo_loudness: 0.0 must be in \[-70, -1\]"):
        RunConfig.from_dict({"dataset": "d", "demo_loudness": 0.0})


def test_old_training_states_can_be_pruned_and_the_run_still_resumes_exactly(tmp_path, tiny, dataset, fixtures_dir):
    manager = TrainingManager(tmp_path / "runs", model_provider=_provider(tiny))
    straight = manager.submit(_config(dataset, fixtures_dir, name="straight", steps=6, checkpoint_every=1))
    pruned = manager.submit(_config(dataset, fixtures_dir, name="pruned", steps=4, checkpoint_every=1, keep_states=2))
    for run in (straight, pruned):
        assert manager.wait(run, 300)["status"] == "done"
    folder = manager.registry.run_dir(pruned) / "checkpoints"
    assert sorted(p.name for p in folder.glob("*.state.pt")) == [f"pruned-step={s:06d}.state.pt" for s in (3, 4)]
    assert sorted(p.name for p in folder.glob("*.safetensors")) == [f"pruned-step={s:06d}.safetensors"
                                                                     for s in (1, 2, 3, 4)]  # every LoRA file stays
    manager.control(pruned, "restart", more_steps=2)
    assert manager.wait(pruned, 300)["status"] == "done"
    (_, a), (_, b) = _final_adapter(manager, straight), _final_adapter(manager, pruned)
    assert all(torch.equal(x, y) for x, y in zip(a["adapter"], b["adapter"]))  # pruning changed nothing learnt
    assert sorted(p.name for p in folder.glob("*.state.pt")) == [f"pruned-step={s:06d}.state.pt" for s in (5, 6)]
    assert len(list((manager.registry.run_dir(straight) / "checkpoints").glob("*.state.pt"))) == 6  # 0 keeps all
    with pytest.raises(ValueError, match="keep_states"):
        _config(dataset, fixtures_dir, keep_states=-1)


def test_inpaint_demos_and_reference_clips_pass_over_files_too_short_to_show_anything():
    from types import SimpleNamespace

    from sa3_lora_studio.training.demos import demo_source, long_enough_items

    dataset = SimpleNamespace(entries=[{"n_latents": 2}, {"n_latents": 50}, {"n_latents": 40}, {}])
    assert long_enough_items(dataset, 30) == [1, 2]
    assert long_enough_items(dataset, 100) == [1]  # none is long enough: the longest
    picks = {demo_source(SimpleNamespace(dataset=dataset, config=SimpleNamespace(seed=seed)), 0, 30)
             for seed in range(40)}
    assert picks == {1, 2}
    assert long_enough_items(SimpleNamespace(entries=[]), 5) == []


def test_a_resume_that_fails_while_setting_up_keeps_the_runs_step(tmp_path, tiny, dataset, fixtures_dir):
    calls = []

    def provider(*args):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("model file gone")
        return tiny

    manager = TrainingManager(tmp_path / "runs", model_provider=provider)
    run = manager.submit(_config(dataset, fixtures_dir, adapter_type="lora", steps=4))
    assert manager.wait(run, 300)["status"] == "done"
    manager.control(run, "restart", more_steps=2)
    record = manager.wait(run, 300)
    assert record["status"] == "failed" and "model file gone" in record["error"]
    assert record["step"] == 4  # where it is, not the 0 of a trainer that never loaded its state


def test_a_run_on_a_dataset_whose_encode_was_interrupted_says_so_and_trains_on_what_is_encoded(tmp_path, tiny,
                                                                                                 fixtures_dir):
    import numpy as np
    import soundfile as sf
    from sa3_lora_studio.encoding import encode_folder
    from sa3_lora_studio.training.preflight import check_run_inputs

    audio, out = tmp_path / "audio", tmp_path / "dataset"
    audio.mkdir()
    for i in range(4):
        t = np.arange(int(44100 * 0.06)) / 44100
        sf.write(audio / f"clip{i}.wav", (0.3 * np.sin(2 * np.pi * 220 * (i + 1) * t)).astype(np.float32), 44100)
    done = []
    report = encode_folder(audio, out, encoder=tiny, progress=done.append, should_stop=lambda: len(done) >= 2)
    assert not report.complete  # stopped as Ctrl-C or SA3 Encode Audio Folder's cancel would
    config = _config(out, fixtures_dir, name="partial", steps=1, batch_size=1, checkpoint_every=1)
    warnings = check_run_inputs(config, tiny)
    assert len(warnings) == 1 and re.fullmatch(
        rf"dataset {re.escape(str(out))} is incomplete: 2 of its files are not encoded yet; training uses the 2 "
        r"encoded ones\. Run the encode again \(SA3 Encode Audio Folder or `sa3-lora encode`\) to add the rest",
        warnings[0]), warnings
    manager = TrainingManager(tmp_path / "runs", model_provider=_provider(tiny))
    run = manager.submit(config)
    assert manager.wait(run, 300)["status"] == "done"
    events = [json.loads(x) for x in (manager.registry.run_dir(run) / "events.jsonl").read_text().splitlines()]
    assert [e["message"] for e in events if e["type"] == "warning" and "incomplete" in e["message"]] == warnings
    encode_folder(audio, out, encoder=tiny)  # finished: nothing more to say
    assert check_run_inputs(config, tiny) == []
