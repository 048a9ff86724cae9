"""The nodes through their ComfyUI-facing entry points (INPUT_TYPES, FUNCTION), with stand-ins for ComfyUI modules."""

import functools
import os
import re
import shutil
import time
import warnings
from pathlib import Path

import comfy_stubs
import numpy as np
import pytest
import soundfile as sf
import torch
from sa3_lora_studio.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS


@pytest.fixture
def comfy(monkeypatch, tmp_path, fixtures_dir):
    stubs = comfy_stubs.install(monkeypatch, tmp_path / "comfy")
    packs = stubs.models_dir / "sa3" / "sa3-small-music"
    shutil.copytree(fixtures_dir / "tiny-small", packs / "base")
    shutil.copytree(fixtures_dir / "tiny-small-arc", packs / "arc")
    shutil.copy(fixtures_dir / "golden" / "lora" / "lora.safetensors", stubs.folders["loras"][0] / "style.safetensors")
    shutil.copy(fixtures_dir / "golden" / "lora" / "dora-rows.safetensors", stubs.folders["loras"][0] / "dora.safetensors")
    from sa3_lora_studio.nodes import model_nodes, training_nodes

    model_nodes.unload_idle()
    training_nodes.reset_manager()
    yield stubs
    model_nodes.unload_idle()
    training_nodes.reset_manager()


def run_node(node_name, **inputs):
    """Execute a node the way ComfyUI does: an instance, its FUNCTION, under inference mode."""
    return run_node_shown(node_name, **inputs)[0]


def run_node_shown(node_name, **inputs):
    """run_node's result and the text the node shows on itself ({"ui": {"text": [...]}}; None without any)."""
    cls = NODE_CLASS_MAPPINGS[node_name]
    spec = cls.INPUT_TYPES()
    missing = [k for k in spec["required"] if k not in inputs]
    assert not missing, f"{node_name}: test forgot {missing}"
    with torch.inference_mode():
        out = getattr(cls(), cls.FUNCTION)(**inputs)
    result = out["result"] if isinstance(out, dict) else out
    assert len(result) == len(cls.RETURN_TYPES)
    return result, out.get("ui", {}).get("text") if isinstance(out, dict) else None


def test_every_node_has_a_display_name_category_and_tooltips(comfy):  # comfy: runs live in its output folder
    for name, cls in NODE_CLASS_MAPPINGS.items():
        assert NODE_DISPLAY_NAME_MAPPINGS[name].startswith("SA3 ")
        assert cls.CATEGORY == "audio/SA3 LoRA Studio"
        spec = cls.INPUT_TYPES()
        assert hasattr(cls(), cls.FUNCTION)
        for section in spec.values():
            for input_name, (kind, *opts) in section.items():
                assert isinstance(kind, (str, list)), (name, input_name)
                assert opts and opts[0].get("tooltip"), f"{name}.{input_name} has no tooltip"


WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def test_socket_only_inputs_come_after_every_widget_input(comfy):
    # Seen in a real ComfyUI (frontend 1.58.1): on SA3 Train LoRA, a forceInput STRING between widgets made a loaded
    # workflow put each saved widget value one widget too early (wait_until_done got the trigger word).
    for name, cls in NODE_CLASS_MAPPINGS.items():
        spec = cls.INPUT_TYPES()
        order = [(n, kind, opts[0] if opts else {}) for section in ("required", "optional")
                 for n, (kind, *opts) in spec.get(section, {}).items()]
        is_widget = [isinstance(kind, list) or (kind in WIDGET_TYPES and not o.get("forceInput")) for _, kind, o in order]
        socket_only_strings = [i for i, (_, kind, o) in enumerate(order) if o.get("forceInput")]
        for i in socket_only_strings:
            later_widgets = [order[j][0] for j in range(i + 1, len(order)) if is_widget[j]]
            assert not later_widgets, f"{name}.{order[i][0]} (forceInput) comes before widgets {later_widgets}"


def gen_inputs(model, **kw):
    base = dict(model=model, prompt="dog barking", negative_prompt="", duration=0.01, seed=1, steps=2, cfg=0.0,
                sampler="auto", batch_size=1)
    base.update(kw)
    return base


def test_load_pack_generate_and_feed_audio_to_audio_and_inpaint(comfy, caplog):
    (model,) = run_node("SA3LoadPack", pack="sa3-small-music", variant="arc", dtype="fp32", device="cpu")
    (again,) = run_node("SA3LoadPack", pack="sa3-small-music", variant="arc", dtype="fp32", device="cpu")
    assert model is again and model.is_arc  # cached and shared
    assert not model.dit.transformer.project_in.weight.is_inference()  # usable for training despite inference mode
    (audio,) = run_node("SA3Generate", **gen_inputs(model))
    assert audio["sample_rate"] == 44100 and audio["waveform"].shape == (1, 2, 441)
    assert comfy.progress[-1] == (2, 2)  # one progress tick per sampling step
    (a2a,) = run_node("SA3AudioToAudio", **gen_inputs(model, audio=audio, noise_level=0.7))
    (inp,) = run_node("SA3Inpaint", **gen_inputs(model, audio=audio, regions="0.002-0.006", continuation=False,
                                                 paste_back=True))
    assert a2a["waveform"].shape == inp["waveform"].shape == (1, 2, 441)
    assert not torch.equal(a2a["waveform"], audio["waveform"])
    with pytest.raises(ValueError, match="SA3 Inpaint: region"):
        run_node("SA3Inpaint", **gen_inputs(model, audio=audio, regions="abc", continuation=False, paste_back=False))
    # duration 0 (these nodes' default): the source's own length; a shorter duration uses the source's start
    longer = {"waveform": torch.cat([audio["waveform"], audio["waveform"][..., :220]], -1), "sample_rate": 44100}
    for name, extra in (("SA3AudioToAudio", {"noise_level": 0.7}),
                        ("SA3Inpaint", {"regions": "0.002-0.006", "continuation": False, "paste_back": False})):
        assert dict(NODE_CLASS_MAPPINGS[name].INPUT_TYPES()["required"])["duration"][1]["default"] == 0.0
        (whole,), shown = run_node_shown(name, **gen_inputs(model, audio=longer, duration=0.0, **extra))
        assert whole["waveform"].shape == (1, 2, 661), name  # 0.015 s
        assert shown == []  # nothing to say: an empty text takes an earlier warning off the node
        for _ in range(2):  # on the node and in the console at every run, not once per process like warnings.warn
            caplog.clear()
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # said on the node instead, not also through warnings
                _, shown = run_node_shown(name, **gen_inputs(model, audio=longer, **extra))
            cut = "the init audio" if name == "SA3AudioToAudio" else "the inpaint audio"
            assert shown == [f"warning: {cut} lasts 0.015 s but the output 0.01 s: only its first 0.01 s are used "
                             "(a duration of 0.015 s keeps all of it)"], name
            said = [r.getMessage() for r in caplog.records if r.name == "sa3_lora_studio"]
            assert said == [f"SA3 LoRA Studio: {shown[0]}"]  # ComfyUI's log, as its own lines
    too_long = {"waveform": torch.cat([longer["waveform"]] * 2, -1), "sample_rate": 44100}  # past the model's 768
    (capped,), shown = run_node_shown("SA3AudioToAudio", **gen_inputs(model, audio=too_long, duration=0.0,
                                                                      noise_level=0.7))
    assert shown == ["warning: the init audio lasts 0.03 s but the output 0.017 s: only its first 0.017 s are used "
                     "(the model makes at most 0.017 s: split the source)"]
    assert capped["waveform"].shape[-1] == 768
    with pytest.raises(ValueError, match=r"SA3 Inpaint: region 0.012-0.016 s starts after the output's end, 0.01 s "
                                         r"\(the source's length: no duration was given\); set regions inside"):
        run_node("SA3Inpaint", **gen_inputs(model, audio=audio, duration=0.0, regions="0.012-0.016",
                                            continuation=False, paste_back=False))
    with pytest.raises(ValueError, match="SA3 Inpaint: continuing a clip needs the length to extend to"):
        run_node("SA3Inpaint", **gen_inputs(model, audio=audio, duration=0.0, regions="", continuation=True,
                                            paste_back=False))
    (image,) = run_node("SA3Spectrogram", audio=audio, width=128, height=64)
    assert image.shape == (1, 64, 128, 3) and 0 <= image.min() and image.max() <= 1


def test_comfyui_cancel_stops_sampling_cleanly(comfy):
    (model,) = run_node("SA3LoadPack", pack="sa3-small-music", variant="arc", dtype="fp32", device="cpu")
    comfy.interrupt = True
    with pytest.raises(comfy_stubs.InterruptProcessingException):
        run_node("SA3Generate", **gen_inputs(model))
    (audio,) = run_node("SA3Generate", **gen_inputs(model))  # the next prompt runs normally
    assert audio["waveform"].shape[-1] == 441


def test_the_lora_list_skips_a_run_folder_moved_away_by_hand_and_keeps_the_other_runs(comfy, tmp_path):
    from sa3_lora_studio.nodes.lora_nodes import RUN_PREFIX, lora_choices
    from sa3_lora_studio.nodes.training_nodes import get_manager
    from sa3_lora_studio.training.runs import RunConfig

    registry = get_manager().registry
    runs = [registry.create(RunConfig(dataset="-", name=f"listed {i}")) for i in range(3)]
    for run in runs:
        (registry.run_dir(run) / "checkpoints").mkdir(parents=True, exist_ok=True)
        (registry.run_dir(run) / "checkpoints" / "r-step=000001.safetensors").write_bytes(b"")
    listed = [f"{RUN_PREFIX}{run}/r-step=000001.safetensors" for run in reversed(runs)]
    assert [c for c in lora_choices() if c in listed] == listed
    shutil.move(registry.run_dir(runs[1]), tmp_path / "moved away")
    assert [c for c in lora_choices() if c.startswith(RUN_PREFIX)] == [listed[0], listed[2]]


def test_lora_stack_changes_the_output_and_info_describes_it(comfy):
    (model,) = run_node("SA3LoadPack", pack="sa3-small-music", variant="base", dtype="fp32", device="cpu")
    (plain,) = run_node("SA3Generate", **gen_inputs(model))
    (stack,) = run_node("SA3LoadLoRA", lora="style.safetensors", strength=1.0, interval_start=0.0, interval_end=1.0,
                        skip_first_steps=0, layer_filter="")
    (stack,) = run_node("SA3LoadLoRA", lora="dora.safetensors", strength=0.5, interval_start=0.0, interval_end=0.5,
                        skip_first_steps=1, layer_filter="", loras=stack)
    assert [e["strength"] for e in stack] == [1.0, 0.5] and stack[1]["interval"] == (0.0, 0.5)
    (styled,) = run_node("SA3Generate", **gen_inputs(model, loras=stack))
    assert not torch.equal(plain["waveform"], styled["waveform"])
    (low,) = run_node("SA3Generate", **gen_inputs(model, loras=stack, lora_memory="low"))  # a stack of two, interval
    assert torch.allclose(low["waveform"], styled["waveform"], atol=1e-4)
    (again,) = run_node("SA3Generate", **gen_inputs(model))
    assert torch.equal(plain["waveform"], again["waveform"])  # the shared model is unchanged
    from sa3_lora_studio.nodes.lora_nodes import lora_choices

    loras_dir = Path(comfy.folders["loras"][0])
    shutil.copy(loras_dir / "style.safetensors", loras_dir / "UPPER.SAFETENSORS")
    assert "UPPER.SAFETENSORS" in lora_choices()  # ComfyUI lists it; any case of the extension is offered
    (upper,) = run_node("SA3LoadLoRA", lora="UPPER.SAFETENSORS", strength=1.0, interval_start=0.0, interval_end=1.0,
                        skip_first_steps=0, layer_filter="")
    (loras_dir / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}xxxxxx")
    with pytest.raises(ValueError, match="SA3 Load LoRA: junk.safetensors: not a readable") as bad:
        run_node("SA3LoadLoRA", lora="junk.safetensors", strength=1.0, interval_start=0.0, interval_end=1.0,
                 skip_first_steps=0, layer_filter="")
    assert str(bad.value).count("junk") == 1  # the file is named once
    (info,) = run_node("SA3LoRAInfo", lora="dora.safetensors")
    assert '"adapter_type": "dora-rows"' in info and '"rank": 4' in info
    with pytest.raises(ValueError, match="interval_end"):
        run_node("SA3LoadLoRA", lora="style.safetensors", strength=1.0, interval_start=0.8, interval_end=0.2,
                 skip_first_steps=0, layer_filter="")


def test_export_for_comfyui_writes_into_the_loras_folder(comfy):
    (model,) = run_node("SA3LoadPack", pack="sa3-small-music", variant="base", dtype="fp32", device="cpu")
    (path,) = run_node("SA3ExportLoRAForComfyUI", model=model, lora="dora.safetensors", strength=1.0,
                       filename="../evil/name")
    from safetensors import safe_open

    assert path.endswith("loras/name.safetensors")
    with safe_open(path, "pt") as f:
        assert any(k.startswith("diffusion_model.") for k in f.keys())
    if os.name == "posix":  # readable as any file this process writes (safetensors' own writer makes 0600)
        assert os.stat(path).st_mode & 0o777 == 0o666 & ~_umask()
    again = run_node("SA3ExportLoRAForComfyUI", model=model, lora="dora.safetensors", strength=0.5, filename="name")
    assert again == (path,)  # an earlier export is replaced
    loras = Path(path).parent
    before = {f.name: f.read_bytes() for f in loras.iterdir()}
    for filename, why in (("dora", "is the LoRA being converted"), ("style", "exists and is no earlier export")):
        with pytest.raises(ValueError, match=f"{filename}.safetensors {why}; give another filename"):
            run_node("SA3ExportLoRAForComfyUI", model=model, lora="dora.safetensors", strength=1.0, filename=filename)
    assert {f.name: f.read_bytes() for f in loras.iterdir()} == before  # the user's LoRAs untouched


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_encode_compose_train_and_watch_a_run(comfy, tmp_path):
    (model,) = run_node("SA3LoadPack", pack="sa3-small-music", variant="base", dtype="fp32", device="cpu")
    audio_dir = tmp_path / "my audio"
    audio_dir.mkdir()
    for i, f in enumerate((220, 440, 660)):
        t = np.arange(2200) / 44100
        sf.write(audio_dir / f"tone {i}.wav", 0.3 * np.sin(2 * np.pi * f * t)[:, None].repeat(2, 1), 44100)
        (audio_dir / f"tone {i}.txt").write_text(f"tone number {i}")
    (audio_dir / "broken.wav").write_bytes(b"not audio at all")
    encode_inputs = dict(model=model, folder=str(audio_dir), dataset_name="tones", include="", exclude="",
                         dtype="float32", force=False)
    dataset, report = run_node("SA3EncodeAudioFolder", **encode_inputs)
    assert "3 encoded" in report and "broken.wav" in report
    # ComfyUI re-runs a node whose inputs are unchanged only when IS_CHANGED changes: it must see folder edits
    changed = NODE_CLASS_MAPPINGS["SA3EncodeAudioFolder"].IS_CHANGED
    before = changed(**encode_inputs)
    assert changed(**encode_inputs) == before
    (audio_dir / "tone 1.txt").write_text("tone number one, edited")
    assert changed(**encode_inputs) != before
    dataset, report = run_node("SA3EncodeAudioFolder", **encode_inputs)
    assert "0 encoded" in report
    assert "tone number one, edited" in (Path(dataset) / "tone 1.wav.json").read_text()
    with pytest.raises(Exception, match=r"include/exclude leave out.*remove 1 of them \(tone 2\.wav\).*`prune` on "
                                        r"SA3 Encode Audio Folder"):  # latents kept unless asked
        run_node("SA3EncodeAudioFolder", **encode_inputs | {"exclude": "tone 2.wav"})
    assert (Path(dataset) / "tone 2.wav.npy").is_file()
    _, report = run_node("SA3EncodeAudioFolder", **encode_inputs | {"exclude": "tone 2.wav", "prune": True})
    assert "1 removed" in report and not (Path(dataset) / "tone 2.wav.npy").exists()
    dataset, report = run_node("SA3EncodeAudioFolder", **encode_inputs)  # back in: encoded again
    assert "1 encoded" in report
    kept = Path(str(dataset) + ".kept")
    shutil.move(dataset, kept)  # a dataset deleted since: the node must run again, whatever it returned last time
    signature = changed(**encode_inputs)
    assert signature != signature and signature != changed(**encode_inputs)  # NaN: never equal, so never cached
    shutil.move(kept, dataset)
    config, preview = run_node("SA3ComposePrompts", caption_weight=100.0, tags_weight=0.0, path_weight=0.0,
                               fixed_weight=0.0, fixed_text="", tag_keys="", hide_tag_names=False, split_commas=False,
                               hide_extension=True, hide_directories=False, shuffle=True, trigger="zz",
                               trigger_percent=100.0, preview_seed=0, dataset=dataset,
                               **{k: v for k, v in _widget_defaults("SA3ComposePrompts").items()
                                  if k in ("hide_commas", "hide_top_folder", "tag_subset_percent", "shuffle_captions",
                                           "fallback")})
    assert "zz" in preview and "tone number" in preview
    more = dict(hide_commas=True, hide_top_folder=True, tag_subset_percent=0.0, shuffle_captions=True, fallback=False)
    (shown, _) = run_node("SA3ComposePrompts", caption_weight=0.0, tags_weight=100.0, path_weight=0.0,
                          fixed_weight=0.0, fixed_text="", tag_keys="", hide_tag_names=False, split_commas=False,
                          hide_extension=True, hide_directories=False, shuffle=False, trigger="", trigger_percent=0.0,
                          preview_seed=0, **more)
    assert {k: shown[k] for k in more} == more
    train_inputs = dict(model=model, dataset=dataset, name="node run", adapter_type="lora", rank=2, alpha=0.0,
                        targets="all", steps=2, batch_size=1, crop_seconds=0.02, learning_rate=1e-3,
                        checkpoint_every=1, demo_every=0, seed=0, gradient_checkpointing=False,
                        wait_until_done=True, prompt_config=config)
    train_changed = NODE_CLASS_MAPPINGS["SA3TrainLoRA"].IS_CHANGED
    before_run = train_changed(**train_inputs)
    run, run_id = run_node("SA3TrainLoRA", **train_inputs)
    finished = train_changed(**train_inputs)  # a new run of this name: the graph queued again must run the node
    assert finished != before_run and train_changed(**train_inputs) == finished  # nothing moved: cached is right
    assert train_changed(**train_inputs | {"name": "another name"}) == before_run  # only runs of this name count
    loss_img, lbt_img, lora, status, best = run_node("SA3RunStatus", run=run, bins=5)
    assert "done step 2/2" in status and lora.endswith("step=000002.safetensors")
    assert best == lora and "validation" not in status  # no items held out: the newest is the best it can tell
    assert loss_img.shape[-1] == 3 and lbt_img.dim() == 4
    assert any(name == "sa3.step" for name, _ in comfy.events)  # events reached the (stub) websocket
    with pytest.raises(ValueError, match="has finished \\(step 2\\); to train it further, restart it with more steps"):
        run_node("SA3RunControl", run=run, action="stop")
    with pytest.raises(ValueError, match="apply to restart"):
        run_node("SA3RunControl", run=run, action="pause", more_steps=1)
    run_node("SA3RunControl", run=run, action="restart", more_steps=1, learning_rate=2e-3)  # trains on to step 3
    from sa3_lora_studio.nodes.training_nodes import get_manager

    assert get_manager().wait(run, 120)["status"] == "done"
    assert train_changed(**train_inputs) != finished  # trained on: the node says so when queued again
    _, _, lora, status, _ = run_node("SA3RunStatus", run=run, bins=5)
    assert "done step 3/3" in status and lora.endswith("step=000003.safetensors")
    (stack,) = run_node("SA3LoadLoRA", lora="", strength=1.0, interval_start=0.0, interval_end=1.0,
                        skip_first_steps=0, layer_filter="", lora_path=lora)
    assert stack[0]["path"] == lora


def _widget_defaults(node_name: str) -> dict:
    spec = NODE_CLASS_MAPPINGS[node_name].INPUT_TYPES()["required"]
    return {name: (opts[1]["default"] if len(opts) > 1 and "default" in opts[1] else opts[0][0])
            for name, opts in spec.items()}


def _base_pack_and_a_tone_dataset(tmp_path, name: str):
    """(the tiny base pack, a dataset of one 0.1 s tone encoded by SA3 Encode Audio Folder as `name`)."""
    (model,) = run_node("SA3LoadPack", pack="sa3-small-music", variant="base", dtype="fp32", device="cpu")
    audio_dir = tmp_path / "audio"
    audio_dir.mkdir()
    sf.write(audio_dir / "tone.wav", 0.3 * np.sin(np.arange(4410) / 7.0)[:, None].repeat(2, 1), 44100)
    dataset, _ = run_node("SA3EncodeAudioFolder", model=model, folder=str(audio_dir), dataset_name=name, include="",
                          exclude="", dtype="float32", force=False)
    return model, dataset


def test_a_run_deleted_while_train_lora_waits_for_it_ends_the_wait_with_a_message_that_says_so(comfy, tmp_path):
    import threading

    from sa3_lora_studio.nodes.training_nodes import get_manager

    model, dataset = _base_pack_and_a_tone_dataset(tmp_path, "w")
    failures = []

    def train():
        try:
            run_node("SA3TrainLoRA", model=model, dataset=dataset, name="waited on", adapter_type="lora", rank=2,
                     alpha=0.0, targets="all", steps=100000, batch_size=1, crop_seconds=0.05, learning_rate=1e-3,
                     checkpoint_every=1000, demo_every=0, seed=0, gradient_checkpointing=False, wait_until_done=True)
        except Exception as e:
            failures.append(e)
    waiting = threading.Thread(target=train)
    waiting.start()
    manager = get_manager()

    def training_run():
        return next((r for r in manager.registry.list() if r["name"] == "waited on" and r["status"] == "training"),
                    None)
    deadline = time.monotonic() + 120
    while training_run() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    run = training_run()
    assert run is not None
    manager.control(run["id"], "delete", confirm=True)
    waiting.join(120)
    assert not waiting.is_alive() and len(failures) == 1
    assert str(failures[0]) == (f"SA3 Train LoRA: run {run['id']} was deleted while this node waited for it to finish "
                                "(queue the graph again for a new run)")


def test_training_options_reach_the_run_and_a_pattern_matching_no_layer_is_refused_before_it_queues(comfy, tmp_path):
    from sa3_lora_studio.adapters import read_adapter_file
    from sa3_lora_studio.nodes.training_nodes import get_manager
    from sa3_lora_studio.training.runs import RunConfig

    (defaults,) = run_node("SA3TrainingOptions", **_widget_defaults("SA3TrainingOptions"))
    official = RunConfig(dataset="-")
    assert RunConfig(dataset="-", **defaults) == official  # the node's defaults are the schema's
    (raw,) = run_node("SA3TrainingOptions", **{**_widget_defaults("SA3TrainingOptions"), "demo_loudness": 0.0})
    assert defaults["demo_loudness"] == -18.0 and raw["demo_loudness"] is None  # 0: demos as generated
    with pytest.raises(ValueError, match="demo_loudness"):
        RunConfig(dataset="-", demo_loudness=3.0)
    with pytest.raises(ValueError, match="all 0"):
        run_node("SA3TrainingOptions", **{**_widget_defaults("SA3TrainingOptions"), "inpaint_segments": 0.0,
                                          "inpaint_full": 0.0, "inpaint_causal": 0.0})
    (options,) = run_node("SA3TrainingOptions", **{
        **_widget_defaults("SA3TrainingOptions"), "include": "self_attn,\ncross_attn.to_q", "exclude": "layers.0.",
        "warmup_steps": 3, "weight_decay": 0.05, "beta1": 0.8, "grad_clip": 0.5, "dropout": 0.1,
        "timestep_sampler": "uniform", "inpaint_segments": 1.0, "inpaint_full": 2.0, "inpaint_causal": 1.0})
    model, dataset = _base_pack_and_a_tone_dataset(tmp_path, "t")
    train = dict(model=model, dataset=dataset, name="options run", adapter_type="lora", rank=2, alpha=0.0,
                 targets="all", steps=1, batch_size=1, crop_seconds=0.05, learning_rate=1e-3, checkpoint_every=1,
                 demo_every=0, seed=0, gradient_checkpointing=False, wait_until_done=True)
    run, _ = run_node("SA3TrainLoRA", options=options, **train)
    config = get_manager().registry.config(run)
    assert (config.include, config.exclude, config.warmup_steps, config.betas, config.timestep_sampler) == (
        ("self_attn", "cross_attn.to_q"), ("layers.0.",), 3, (0.8, 0.95), "uniform")
    assert config.inpaint_probabilities == (0.25, 0.5, 0.25) and config.dropout == 0.1
    latest = get_manager().registry.latest_checkpoint(run)
    adapter = read_adapter_file(get_manager().registry.run_dir(run) / latest["path"])
    assert adapter.layers and all(("self_attn" in n or "cross_attn.to_q" in n) and "layers.0." not in n
                                  for n in adapter.layers)
    assert adapter.config["dropout"] == 0.1
    runs_before = len(get_manager().registry.list())
    (typo,) = run_node("SA3TrainingOptions", **{**_widget_defaults("SA3TrainingOptions"), "include": "self_atn"})
    with pytest.raises(ValueError, match=r"SA3 Train LoRA: include/exclude.*no Linear/Conv1d layer matches.*look like"):
        run_node("SA3TrainLoRA", options=typo, **train)
    with pytest.raises(ValueError, match="SA3 Train LoRA: rank: rank 4096"):
        run_node("SA3TrainLoRA", **{**train, "adapter_type": "lora-xs", "rank": 4096})
    assert len(get_manager().registry.list()) == runs_before  # nothing was queued


def test_chained_training_demo_nodes_set_the_runs_demos_and_their_format(comfy, tmp_path):
    from sa3_lora_studio.encoding.audio_io import decode_audio
    from sa3_lora_studio.nodes.training_nodes import get_manager

    (model,) = run_node("SA3LoadPack", pack="sa3-small-music", variant="base", dtype="fp32", device="cpu")
    audio_dir = tmp_path / "audio"
    audio_dir.mkdir()
    sf.write(audio_dir / "tone.wav", 0.3 * np.sin(np.arange(4410) / 7.0)[:, None].repeat(2, 1), 44100)
    (audio_dir / "tone.txt").write_text("a soft tone")
    dataset, _ = run_node("SA3EncodeAudioFolder", model=model, folder=str(audio_dir), dataset_name="t", include="",
                          exclude="", dtype="float32", force=False)
    demo = dict(cfg=-1.0, steps=2, seconds=0.25, lora_strength=0.5)
    (first,) = run_node("SA3TrainingDemo", prompt=" a bell ", from_dataset=False, sampler_model="base",
                        demo_seed=5, lora_skip_first_steps=1, **demo)
    (chain,) = run_node("SA3TrainingDemo", prompt="ignored", from_dataset=True, sampler_model="arc", demo_seed=6,
                        demos=first, mode="continue", **demo)
    assert [(d.prompt, d.arc, d.cfg, d.seed) for d in chain] == [("a bell", False, None, 5), (None, True, None, 6)]
    run, _ = run_node("SA3TrainLoRA", model=model, dataset=dataset, name="demo run", adapter_type="lora", rank=2,
                      alpha=0.0, targets="all", steps=1, batch_size=1, crop_seconds=0.05, learning_rate=1e-3,
                      checkpoint_every=1, demo_every=1, seed=0, gradient_checkpointing=False, wait_until_done=True,
                      demos=chain, demo_prompts="a drum\n\n", demo_format="opus")
    manager = get_manager()
    assert manager.registry.get(run)["status"] == "done", manager.registry.get(run)["error"]
    folder = manager.registry.run_dir(run) / "demos" / "step_000001"
    assert sorted(p.name for p in folder.glob("*.opus")) == ["demo_0.opus", "demo_1.opus", "demo_2.opus"]
    settings = [__import__("json").loads((folder / f"demo_{i}.json").read_text()) for i in range(3)]
    assert [(s["prompt"] == "a bell", s["arc"], s["cfg"], s["lora_strength"]) for s in settings[:2]] == [
        (True, False, 7.0, 0.5), (False, True, 1.0, 0.5)]
    assert settings[2]["prompt"] == "a drum" and settings[2]["cfg"] == 7.0
    assert [s["lora_skip_first_steps"] for s in settings] == [1, 0, 0]
    assert [s.get("mode") for s in settings] == [None, "continue", None] and settings[1]["source_file"] == "tone.wav"
    decoded = decode_audio(folder / "demo_0.opus")
    assert decoded.sample_rate == 48000 and decoded.channels == 2 and abs(decoded.seconds - settings[0]["duration"]) < 0.01
    assert settings[0]["duration"] <= 0.25  # the tiny model's sample_size caps the length
    # the ARC demo loaded its DiT beside the run's base model instead of caching a whole ARC pack for the session
    from sa3_lora_studio.nodes import model_nodes, training_nodes

    assert [key[1] for key in model_nodes.loaded_models()] == ["base"]
    (arc,) = run_node("SA3LoadPack", pack="sa3-small-music", variant="arc", dtype="fp32", device="cpu")
    assert training_nodes.model_provider.loaded("sa3-small-music", "arc", "fp32", "cpu") is arc
    assert training_nodes.model_provider.loaded("sa3-small-music", "arc", "bf16", "cpu") is None


def test_held_out_files_give_a_validation_curve_and_the_best_checkpoint_by_it(comfy, dataset):
    from sa3_lora_studio.nodes.training_nodes import get_manager
    from sa3_lora_studio.training.events import VALIDATION_COLOUR, best_validation, read_events

    (options,) = run_node("SA3TrainingOptions", **{**_widget_defaults("SA3TrainingOptions"), "validation_items": 1})
    (model,) = run_node("SA3LoadPack", pack="sa3-small-music", variant="base", dtype="fp32", device="cpu")
    run, _ = run_node("SA3TrainLoRA", options=options, **_train_inputs(model=model, dataset=str(dataset), steps=3,
                                                                       learning_rate=5e-2))
    assert get_manager().registry.config(run).validation_items == 1
    loss_img, _, latest, status, best = run_node("SA3RunStatus", run=run, bins=5)
    events, _ = read_events(get_manager().events_path(run), 0)
    lowest = best_validation(events)
    assert best == str(get_manager().registry.run_dir(run) / lowest["path"]) and Path(best).is_file()
    assert f"lowest validation loss {lowest['loss']:.4g} at step {lowest['step']}" in status
    assert latest.endswith("step=000003.safetensors")
    pixels = (loss_img[0] * 255).round().reshape(-1, 3)
    assert (pixels == torch.tensor(VALIDATION_COLOUR, dtype=pixels.dtype)).all(1).any()  # the curve is drawn
    with pytest.raises(ValueError, match=r"validation_items \(on SA3 Training Options\): 3 held out"):
        run_node("SA3TrainLoRA", options={**options, "validation_items": 3},
                 **_train_inputs(model=model, dataset=str(dataset)))


def _train_inputs(**changes):
    inputs = dict(name="n", adapter_type="lora", rank=2, alpha=0.0, targets="all",
                  steps=1, batch_size=1, crop_seconds=0.02, learning_rate=1e-3, checkpoint_every=1, demo_every=0,
                  seed=0, gradient_checkpointing=False, wait_until_done=True)
    return {**inputs, **changes}


def test_train_lora_refuses_bad_inputs_before_a_run_is_registered(comfy, tmp_path, dataset):
    from sa3_lora_studio.nodes.training_nodes import get_manager

    (base,) = run_node("SA3LoadPack", pack="sa3-small-music", variant="base", dtype="fp32", device="cpu")
    (arc,) = run_node("SA3LoadPack", pack="sa3-small-music", variant="arc", dtype="fp32", device="cpu")
    (tmp_path / "empty").mkdir()
    cases = [
        (dict(model=arc, dataset=str(dataset)), "ARC .*variant 'base'"),
        (dict(dataset=str(tmp_path / "missing")), "^SA3 Train LoRA: dataset: .*missing"),
        (dict(dataset=str(tmp_path / "empty")), "^SA3 Train LoRA: dataset: .*empty: no .npy"),
        (dict(dataset=str(dataset), continue_from=str(tmp_path / "no.safetensors")),
         f"^SA3 Train LoRA: continue_from: {re.escape(str(tmp_path / 'no.safetensors'))}: no such adapter file"),
        # the message names the node's inputs, not the config's fields (learning_rate is RunConfig.lr)
        (dict(dataset=str(dataset), learning_rate=-1.0), "^SA3 Train LoRA: learning_rate: -1.0 must be"),
        (dict(dataset=str(dataset), prompt_config={"caption_weight": "x"}), "PromptConfig.caption_weight"),
    ]
    for changes, message in cases:
        with pytest.raises(ValueError, match=message):
            run_node("SA3TrainLoRA", **_train_inputs(**{"model": base, **changes}))
    assert get_manager().registry.list() == []
    (again,) = run_node("SA3LoadPack", pack="sa3-small-music", variant="base", dtype="fp32", device="cpu")
    assert again is base and not again.is_arc  # the ARC model never took the base model's cache slot


def test_load_lora_with_a_connected_but_empty_path_names_the_cause(comfy):
    with pytest.raises(ValueError, match="lora_path is connected but empty"):
        run_node("SA3LoadLoRA", lora="style.safetensors", strength=1.0, interval_start=0.0, interval_end=1.0,
                 skip_first_steps=0, layer_filter="", lora_path="")
    (stack,) = run_node("SA3LoadLoRA", lora="style.safetensors", strength=1.0, interval_start=0.0, interval_end=1.0,
                        skip_first_steps=0, layer_filter="")
    assert stack[0]["path"].endswith("style.safetensors")
    # a connected path may also be a name in the loras folder (not one relative to ComfyUI's working folder)
    load = dict(lora="(none)", strength=1.0, interval_start=0.0, interval_end=1.0, skip_first_steps=0, layer_filter="")
    (by_name,) = run_node("SA3LoadLoRA", **load, lora_path=" dora.safetensors ")
    assert by_name[0]["path"] == str(comfy.folders["loras"][0] / "dora.safetensors")
    for text, said in (("nope.safetensors", "'nope.safetensors'"), ("~/nope.safetensors", "'~/nope.safetensors'"),
                       (str(comfy.folders["loras"][0]), f"{re.escape(repr(str(comfy.folders['loras'][0])))} \\(a folder\\)")):
        with pytest.raises(ValueError, match=rf"^SA3 Load LoRA: lora_path: no file {said}; give a file path"):
            run_node("SA3LoadLoRA", **load, lora_path=text)


def test_training_options_of_a_comfyui_process_come_from_its_environment(comfy):
    from sa3_lora_studio.nodes.training_nodes import manager_options

    assert manager_options({}) == {"auto_resume": False, "runs_per_device": 1}
    assert manager_options({"SA3_AUTO_RESUME": "1", "SA3_RUNS_PER_DEVICE": "2"}) == {"auto_resume": True,
                                                                                      "runs_per_device": 2}
    for environ, named in (({"SA3_AUTO_RESUME": "maybe"}, "SA3_AUTO_RESUME"), ({"SA3_RUNS_PER_DEVICE": "0"},
                                                                                "SA3_RUNS_PER_DEVICE")):
        with pytest.raises(ValueError, match=named):
            manager_options(environ)


def test_continuing_a_lora_counts_on_from_its_step_unless_reset(comfy, dataset):
    (model,) = run_node("SA3LoadPack", pack="sa3-small-music", variant="base", dtype="fp32", device="cpu")
    first, _ = run_node("SA3TrainLoRA", **_train_inputs(model=model, dataset=str(dataset), steps=2))
    _, _, lora, _, _ = run_node("SA3RunStatus", run=first, bins=5)
    assert lora.endswith("step=000002.safetensors")
    for reset, step in ((False, 3), (True, 1)):
        run, _ = run_node("SA3TrainLoRA", **_train_inputs(model=model, dataset=str(dataset), continue_from=lora,
                                                          reset_step=reset))
        assert run_node("SA3RunStatus", run=run, bins=5)[2].endswith(f"step={step:06d}.safetensors"), reset


def test_continue_from_takes_a_loras_folder_name_or_a_run_checkpoint_as_load_lora_lists_them(comfy, dataset):
    from sa3_lora_studio.nodes.lora_nodes import lora_choices
    from sa3_lora_studio.nodes.training_nodes import get_manager

    (model,) = run_node("SA3LoadPack", pack="sa3-small-music", variant="base", dtype="fp32", device="cpu")
    from_folder, _ = run_node("SA3TrainLoRA", **_train_inputs(model=model, dataset=str(dataset), steps=1,
                                                              continue_from="dora.safetensors", reset_step=True))
    assert get_manager().registry.get(from_folder)["adapter_type"] == "dora-rows"  # the loras folder's file
    (listed,) = [c for c in lora_choices() if c.startswith("sa3 runs/") and from_folder in c]
    from_run, _ = run_node("SA3TrainLoRA", **_train_inputs(model=model, dataset=str(dataset), continue_from=listed))
    assert run_node("SA3RunStatus", run=from_run, bins=5)[2].endswith("step=000002.safetensors")  # its 1 step + 1
    with pytest.raises(ValueError, match=r"^SA3 Train LoRA: continue_from: no file 'nope.safetensors'; give a file "
                                         r"path, a file name in ComfyUI's loras folder"):
        run_node("SA3TrainLoRA", **_train_inputs(model=model, dataset=str(dataset), continue_from="nope.safetensors"))


def test_comfyui_cancel_ends_a_waiting_train_node_and_the_run_trains_on(comfy, dataset):
    import threading
    import time

    from sa3_lora_studio.nodes.training_nodes import get_manager

    (model,) = run_node("SA3LoadPack", pack="sa3-small-music", variant="base", dtype="fp32", device="cpu")
    manager = get_manager()
    started = threading.Event()
    manager.listeners.append(lambda e: e["type"] == "step" and started.set())
    threading.Thread(target=lambda: started.wait(120) and setattr(comfy, "interrupt", True), daemon=True).start()
    with pytest.raises(comfy_stubs.InterruptProcessingException):
        run_node("SA3TrainLoRA", **_train_inputs(model=model, dataset=str(dataset), steps=100000))
    (run,) = [r["id"] for r in manager.registry.list()]
    time.sleep(0.5)
    assert manager.worker.is_running(run) and manager.registry.get(run)["status"] == "training"
    manager.control(run, "stop")
    assert manager.wait(run, 120)["status"] == "stopped"


def test_load_pack_offers_a_non_empty_none_for_its_optional_files_and_accepts_the_old_spellings(monkeypatch):
    """An empty combo value is refused by some ComfyUI builds (the pip-installable fork turns '' into '.'): the
    optional checkpoint / text encoder offer '(none)'; '', '.' and '(none)' all mean no file."""
    from sa3_lora_studio.nodes import model_nodes

    optional = model_nodes.SA3LoadPack.INPUT_TYPES()["optional"]
    for name in ("checkpoint", "text_encoder"):
        options, spec = optional[name]
        assert options[0] == spec["default"] == "(none)" and "" not in options
    seen = []
    monkeypatch.setattr(model_nodes, "get_or_load", lambda key, loader: seen.append(key) or "model")
    monkeypatch.setattr(model_nodes, "models_dir", lambda: None)
    for none in ("(none)", "", "."):
        with pytest.raises(ValueError, match="choose a checkpoint file"):
            model_nodes.SA3LoadPack().load(model_nodes.CUSTOM, "base", "fp32", "cpu", checkpoint=none, text_encoder=none)


def test_a_lora_node_fed_by_lora_path_has_a_valid_list_value_even_with_no_lora_files(comfy, fixtures_dir):
    """The LoRA list ends with '(none)' (some ComfyUI builds refuse an empty combo value, and a fresh install has
    no LoRA yet when SA3 Run Status feeds lora_path); '(none)' without lora_path asks for a file."""
    for name in ("SA3LoadLoRA", "SA3LoRAInfo", "SA3ExportLoRAForComfyUI"):
        options = NODE_CLASS_MAPPINGS[name].INPUT_TYPES()["required"]["lora"][0]
        assert options[-1] == "(none)" and "style.safetensors" in options and "" not in options
    for f in comfy.folders["loras"][0].iterdir():
        f.unlink()
    assert NODE_CLASS_MAPPINGS["SA3LoadLoRA"].INPUT_TYPES()["required"]["lora"][0] == ["(none)"]
    inputs = dict(lora="(none)", strength=1.0, interval_start=0.0, interval_end=1.0, skip_first_steps=0, layer_filter="")
    golden = str(fixtures_dir / "golden" / "lora" / "dora-rows.safetensors")
    (stack,) = run_node("SA3LoadLoRA", **inputs, lora_path=golden)
    assert stack[0]["path"] == golden
    with pytest.raises(ValueError, match=r"choose a LoRA file, or connect lora_path"):
        run_node("SA3LoadLoRA", **inputs)
    with pytest.raises(ValueError, match=r"choose a LoRA file"):
        run_node("SA3LoadLoRA", **{**inputs, "lora": "."})


def test_status_and_control_take_a_run_by_id_and_the_same_graph_after_a_restart_reuses_its_run(comfy, dataset):
    """After a restart a graph has no SA3_RUN link to an old run: run_id names it. Queueing the unchanged training
    graph again (ComfyUI's cache is gone) resumes the run it started instead of a second one from step 0."""
    from sa3_lora_studio.nodes import training_nodes

    (model,) = run_node("SA3LoadPack", pack="sa3-small-music", variant="base", dtype="fp32", device="cpu")
    inputs = _train_inputs(model=model, dataset=str(dataset), steps=3, checkpoint_every=1, name="kept")
    manager = training_nodes.get_manager()

    def stop_at_1(event):
        if event["type"] == "step" and event["step"] == 1:
            manager.worker.controls[event["run"]].request_stop()

    manager.listeners.append(stop_at_1)
    try:
        run, run_id = run_node("SA3TrainLoRA", **{**inputs, "wait_until_done": True})
    finally:
        manager.listeners.remove(stop_at_1)
    assert manager.registry.get(run)["status"] == "stopped"

    training_nodes.reset_manager()  # "a restart": a new manager over the same runs folder, no cached node output
    cls = NODE_CLASS_MAPPINGS["SA3TrainLoRA"]
    with torch.inference_mode():
        again = cls().train(**{**inputs, "wait_until_done": False})
    assert again["result"] == (run, run) and "was stopped at step 1: resumed" in again["ui"]["text"][0]
    manager = training_nodes.get_manager()
    assert manager.wait(run, 300)["status"] == "done" and len(manager.registry.list()) == 1
    with torch.inference_mode():
        done = cls().train(**{**inputs, "wait_until_done": False})
    assert done["result"][0] == run and "already finished with these settings" in done["ui"]["text"][0]
    other, _ = run_node("SA3TrainLoRA", **{**inputs, "seed": 1})  # another setting: another run
    assert other != run and len(manager.registry.list()) == 2

    _, _, lora, status, _ = run_node("SA3RunStatus", bins=5, run_id=f"  {run}  ")
    assert "kept: done step 3/3" in status and lora.endswith("step=000003.safetensors")
    out = NODE_CLASS_MAPPINGS["SA3RunControl"]().control("restart", run_id=run, more_steps=1)
    assert out["result"][0] == run and out["ui"]["text"][0].startswith("kept: restarted (now ")
    assert manager.wait(run, 300)["status"] == "done" and manager.registry.latest_checkpoint(run)["step"] == 4
    training_nodes.reset_manager()  # restarted since, and the graph queued again: the run it made, trained on
    with torch.inference_mode():
        amended = cls().train(**{**inputs, "wait_until_done": False})
    manager = training_nodes.get_manager()
    assert amended["result"][0] == run and "already finished" in amended["ui"]["text"][0]
    assert len(manager.registry.list()) == 2
    for node, call in (("SA3 Run Status", lambda **k: run_node("SA3RunStatus", bins=5, **k)),
                       ("SA3 Run Control", lambda **k: run_node("SA3RunControl", action="stop", **k))):
        with pytest.raises(ValueError, match=f"{node}: connect run .* or give a run_id"):
            call()
        with pytest.raises(ValueError, match=f"{node}: .*no run 'nope'"):
            call(run_id="nope")


def test_the_same_continued_graph_queued_again_goes_on_from_its_checkpoint_when_its_lora_file_is_gone(comfy, dataset,
                                                                                                      tmp_path):
    """The run resumes from its own checkpoint and never reads the file it started from: a file deleted or damaged
    since must not refuse the graph that would resume it (SA3 Run Control's restart never read it either)."""
    import shutil

    from sa3_lora_studio.nodes import training_nodes

    (model,) = run_node("SA3LoadPack", pack="sa3-small-music", variant="base", dtype="fp32", device="cpu")
    first, _ = run_node("SA3TrainLoRA", **_train_inputs(model=model, dataset=str(dataset), name="source"))
    manager = training_nodes.get_manager()
    source = tmp_path / "source.safetensors"
    shutil.copy(manager.registry.run_dir(first) / manager.registry.latest_checkpoint(first)["path"], source)
    inputs = _train_inputs(model=model, dataset=str(dataset), steps=3, name="continued", continue_from=str(source))

    def stop_at_1(event):
        if event["type"] == "step" and event["step"] == 2:  # the source's step 1, and one more
            manager.worker.controls[event["run"]].request_stop()

    manager.listeners.append(stop_at_1)
    try:
        run, _ = run_node("SA3TrainLoRA", **inputs)
    finally:
        manager.listeners.remove(stop_at_1)
    assert manager.registry.get(run)["status"] == "stopped"
    for damage in (lambda: source.write_bytes(b"not a LoRA any more"), source.unlink):
        damage()
        training_nodes.reset_manager()
        with torch.inference_mode():
            again = NODE_CLASS_MAPPINGS["SA3TrainLoRA"]().train(**{**inputs, "wait_until_done": False})
        assert again["result"][0] == run and "resumed" in again["ui"]["text"][0]
        manager = training_nodes.get_manager()
        assert manager.wait(run, 300)["status"] == "done", manager.registry.get(run)["error"]
        manager.registry.update(run, status="stopped")  # as if stopped again: the next damage is tried on it
    with pytest.raises(ValueError, match="continue_from: .*source.safetensors"):  # a new run still needs the file
        run_node("SA3TrainLoRA", **{**inputs, "seed": 5})

    # a warning the run gives while it trains reaches the node's text when it waits (an API caller sees no events)
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(manager.registry.run_dir(first) / manager.registry.latest_checkpoint(first)["path"]), "pt") as f:
        save_file({k: f.get_tensor(k) for k in f.keys()}, str(source), metadata={**f.metadata(), "step": "abc"})
    with torch.inference_mode():
        waited = NODE_CLASS_MAPPINGS["SA3TrainLoRA"]().train(**{**inputs, "seed": 6, "steps": 1})
    assert "done at step 1" in waited["ui"]["text"][0]
    assert "warning: continue_from: its metadata gives step 'abc'" in waited["ui"]["text"][0]


def test_encode_finds_a_relative_folder_in_comfyuis_input_folder_and_shows_its_report(comfy, tmp_path, monkeypatch):
    from sa3_lora_studio.nodes.dataset_nodes import SA3EncodeAudioFolder

    (model,) = run_node("SA3LoadPack", pack="sa3-small-music", variant="base", dtype="fp32", device="cpu")
    audio = comfy.input_dir / "sa3_training_audio"
    audio.mkdir()
    t = np.arange(2200) / 44100
    sf.write(audio / "tone.wav", 0.3 * np.sin(2 * np.pi * 330 * t)[:, None].repeat(2, 1), 44100)
    elsewhere = tmp_path / "cwd"
    (elsewhere / "input").mkdir(parents=True)  # ComfyUI started elsewhere, with --input-directory
    monkeypatch.chdir(elsewhere)
    assert SA3EncodeAudioFolder.OUTPUT_NODE  # Load Pack -> Encode alone runs
    for i, folder in enumerate(("sa3_training_audio", "input/sa3_training_audio")):
        with torch.inference_mode():
            out = SA3EncodeAudioFolder().encode(model=model, folder=folder, dataset_name=f"rel{i}", include="",
                                                exclude="", dtype="float32", force=False)
        assert "1 encoded" in out["ui"]["text"][0] and out["result"][1] == out["ui"]["text"][0]
    with pytest.raises(ValueError, match="give the folder of your audio"):
        run_node("SA3EncodeAudioFolder", model=model, folder="  ", dataset_name="x", include="", exclude="",
                 dtype="float32", force=False)
    with pytest.raises(ValueError, match="'nothing_here' is not a folder \\(looked for .*input/nothing_here"):
        run_node("SA3EncodeAudioFolder", model=model, folder="nothing_here", dataset_name="x", include="",
                 exclude="", dtype="float32", force=False)


def test_encode_node_moves_its_bar_within_a_long_file_and_a_cancel_there_keeps_the_finished_files(comfy, tmp_path,
                                                                                                   monkeypatch):
    from sa3_lora_studio.encoding import load_dataset
    from sa3_lora_studio.sa3.autoencoder import SAMEAutoencoder

    (model,) = run_node("SA3LoadPack", pack="sa3-small-music", variant="base", dtype="fp32", device="cpu")
    audio = tmp_path / "audio"
    audio.mkdir()
    chunk_seconds = 128 * model.downsampling_ratio / 44100  # the encoder's own chunks: the long file spans 5+
    for name, seconds in (("a_short", chunk_seconds / 2), ("b_long", chunk_seconds * 4.5)):
        t = np.arange(int(44100 * seconds)) / 44100
        sf.write(audio / f"{name}.wav", 0.3 * np.sin(2 * np.pi * 330 * t)[:, None].repeat(2, 1), 44100)
    inputs = dict(model=model, folder=str(audio), dataset_name="long", include="", exclude="", dtype="float32",
                  force=False)
    real_chunk, chunks_seen = SAMEAutoencoder.encode_unchunked, []

    def cancel_during_the_long_file(self, x):  # the user presses cancel while the third chunk encodes
        chunks_seen.append(x.shape[-1])
        if len(chunks_seen) == 4:  # the silence, the short file, then the long file's chunks
            comfy.interrupt = True
        return real_chunk(self, x)
    monkeypatch.setattr(SAMEAutoencoder, "encode_unchunked", cancel_during_the_long_file)
    from sa3_lora_studio.nodes import comfy_bridge

    every = functools.partial(comfy_bridge.fractional_progress, min_interval=0)  # this fast model's every chunk
    monkeypatch.setattr(comfy_bridge, "fractional_progress", every)
    comfy.progress.clear()
    with pytest.raises(comfy_stubs.InterruptProcessingException):  # ComfyUI's own cancel: no error box
        run_node("SA3EncodeAudioFolder", **inputs)
    positions = [current / total for current, total in comfy.progress]
    assert positions[0] == 0.5 and 0.5 < positions[1] < 1.0  # the short file, then part-way through the long one
    monkeypatch.setattr(SAMEAutoencoder, "encode_unchunked", real_chunk)
    (path, summary) = run_node("SA3EncodeAudioFolder", **inputs)
    assert "1 encoded, 1 unchanged" in summary, summary
    assert [e["relpath"] for e in load_dataset(path).entries] == ["a_short.wav", "b_long.wav"]
    assert comfy.progress[-1][0] == comfy.progress[-1][1]


def test_the_encode_bar_sends_part_way_positions_at_most_ten_times_a_second_and_whole_ones_always(comfy):
    from sa3_lora_studio.nodes.comfy_bridge import fractional_progress

    clock = [50.0]
    comfy.progress.clear()
    position = fractional_progress(2, clock=lambda: clock[0])
    for done in (0.01, 0.02, 0.03):  # three chunks within 20 ms: the first goes out
        position(done)
        clock[0] += 0.01
    clock[0] += 0.2
    position(0.5)
    position(1)  # a file done: always
    assert comfy.progress == [(10, 2000), (500, 2000), (1000, 2000)]


def test_a_load_pack_served_from_the_cache_shows_the_warning_its_load_gave(monkeypatch):
    from sa3_lora_studio.adapters import notices
    from sa3_lora_studio.nodes import model_nodes

    cache = {}

    def get_or_load(key, loader):  # ComfyUI's second run of the node finds the model loaded: nothing is said again
        if key not in cache:
            notices.warn("model.safetensors: its config was guessed (put its model_config.json beside it)")
            cache[key] = "model"
        return cache[key]

    monkeypatch.setattr(model_nodes, "get_or_load", get_or_load)
    monkeypatch.setattr(model_nodes, "models_dir", lambda: None)
    monkeypatch.setattr(model_nodes, "_LOAD_NOTICES", {})
    for _ in range(2):
        out = model_nodes.SA3LoadPack().load("sa3-small-music", "base", "fp32", "cpu")
        assert out["result"] == ("model",) and out["ui"]["text"] == [
            "warning: model.safetensors: its config was guessed (put its model_config.json beside it)"]


def test_node_errors_name_the_nodes_inputs_not_the_config_fields():
    from sa3_lora_studio.nodes.training_nodes import node_error
    from sa3_lora_studio.training.runs import RunError

    for node, said, shown in (
            ("SA3 Training Demo", "DemoSpec.duration: -1.0 seconds must be > 0", "seconds: -1.0 seconds must be > 0"),
            ("SA3 Training Demo", "DemoSpec.lora_strength: nan must be", "lora_strength: nan must be"),
            ("SA3 Run Control", "RunConfig.steps: 3 is below the 5 steps", "steps: 3 is below the 5 steps"),
            ("SA3 Train LoRA", "RunConfig.lr: 0 must be a finite number > 0", "learning_rate: 0 must be a finite"),
            # a setting of the options node wired into Train LoRA's options input
            ("SA3 Train LoRA", "RunConfig.validation_items: 50 held out", "validation_items (on SA3 Training "
                                                                          "Options): 50 held out"),
            ("SA3 Training Options", "RunConfig.validation_items: 50 held out", "validation_items: 50 held out")):
        assert str(node_error(node, RunError(said))).startswith(f"{node}: {shown}")


def test_load_dataset_names_itself_in_its_errors(comfy, tmp_path):
    with pytest.raises(ValueError, match=r"^SA3 Load Dataset: .*nope: no such dataset folder"):
        run_node("SA3LoadDataset", path=str(tmp_path / "nope"))


def test_a_pack_without_its_text_encoder_says_so_on_load_pack_and_loads_it_once_it_is_there(comfy, fixtures_dir):
    """Encoding audio works without T5Gemma, so the pack loads, but the node says what is missing in its own terms,
    generation names it too, and queueing again after adding the folder finds it (no restart, no cache to free)."""
    from sa3_lora_studio.nodes.model_nodes import SA3LoadPack

    folder = comfy.models_dir / "sa3" / "sa3-small-sfx" / "base"
    shutil.copytree(fixtures_dir / "tiny-small", folder, ignore=shutil.ignore_patterns("t5gemma-b-b-ul2"))
    load = dict(pack="sa3-small-sfx", variant="base", dtype="fp32", device="cpu")
    (model,), shown = run_node_shown("SA3LoadPack", **load)
    assert shown == ["warning: no text encoder loaded: its folder models/sa3/sa3-small-sfx/base/t5gemma-b-b-ul2 is "
                     "missing (download_missing fetches it). Generating and training need it (encoding audio does "
                     "not); queue again once it is there"]
    before = SA3LoadPack.IS_CHANGED(**load)
    assert before == SA3LoadPack.IS_CHANGED(**load)  # ComfyUI keeps its output until the folder appears
    with pytest.raises(ValueError, match=r"^SA3 Generate: the model has no text encoder loaded: its folder"):
        run_node("SA3Generate", **gen_inputs(model))
    shutil.copytree(fixtures_dir / "tiny-small" / "t5gemma-b-b-ul2", folder / "t5gemma-b-b-ul2")
    (again,), shown = run_node_shown("SA3LoadPack", **load)
    assert shown == [] and again is not model
    assert SA3LoadPack.IS_CHANGED(**load) != before  # so ComfyUI runs the node again and it loads the encoder
    other = dict(load, pack="sa3-small-music")  # a complete pack is not run again for another pack's state
    assert SA3LoadPack.IS_CHANGED(**other) == SA3LoadPack.IS_CHANGED(**other)
    (audio,) = run_node("SA3Generate", **gen_inputs(again))
    assert audio["waveform"].abs().sum() > 0


def test_every_sampler_of_the_api_is_on_the_generation_nodes(comfy):
    from sa3_lora_studio.nodes.generate_nodes import SAMPLERS
    from sa3_lora_studio.sa3.samplers import SAMPLERS as ENGINE_SAMPLERS

    assert set(SAMPLERS) == {"auto", *ENGINE_SAMPLERS} - {"dpmpp_2m"}  # dpmpp_2m: an alias of dpmpp
    (model,) = run_node("SA3LoadPack", pack="sa3-small-music", variant="arc", dtype="fp32", device="cpu")
    (audio,) = run_node("SA3Generate", **gen_inputs(model, sampler="rk4"))
    assert torch.isfinite(audio["waveform"]).all() and audio["waveform"].abs().sum() > 0


def test_an_inpaint_region_past_the_models_capped_length_is_named_by_the_node(comfy):
    """A duration past the model's maximum is capped there by the engine: a region beyond the cap is refused by the
    node itself, and any error the engine raises names the node (a workflow may hold several)."""
    from sa3_lora_studio.sa3.generate import max_output_seconds

    (model,) = run_node("SA3LoadPack", pack="sa3-small-music", variant="arc", dtype="fp32", device="cpu")
    cap = max_output_seconds(model)
    audio = {"waveform": torch.zeros(1, 2, 44100), "sample_rate": 44100}
    with pytest.raises(ValueError, match=rf"^SA3 Inpaint: region {cap + 0.001:g}-.*\(the model's maximum length\); "
                                         r"set regions inside it$"):
        run_node("SA3Inpaint", **gen_inputs(model, audio=audio, duration=cap * 4, regions=f"{cap + 0.001:g}-{cap * 2:g}",
                                            continuation=False, paste_back=False))
    with pytest.raises(ValueError, match=r"^SA3 Generate: .*cfg"):
        run_node("SA3Generate", **gen_inputs(model, cfg=float("nan")))
