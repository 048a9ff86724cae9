"""The example workflows: well-formed UI graphs, API twins equal to our conversion, and every example runs.

The examples use realistic settings (bf16 on the best device, 10-30 s of audio, 1000 training steps). To run them
against the tiny fixture models in a few seconds, the execution test applies `TEST_OVERRIDES` to the committed API
prompt (the same way `sa3-lora queue --set node.input=value` would): fp32 on CPU, 2 sampling steps, durations
inside the tiny models' 0.017 s, a 2-step training run that waits for its end. The committed values themselves are
validated unchanged first (combo lists, ranges), so only these inputs differ from what a user queues.
"""

import copy
import json
import shutil
import sys
from pathlib import Path

import comfy_stubs
import graph_executor
import numpy as np
import pytest
import soundfile as sf
import torch
from sa3_lora_studio import workflow_format as wf
from sa3_lora_studio.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

EXAMPLES = Path(__file__).resolve().parents[1] / "example_workflows"
NAMES = sorted(p.stem for p in EXAMPLES.glob("*.json"))

# Files the examples name, made from the fixture LoRAs (all trained on the tiny small model).
LORA_FILES = {
    "my-lora.safetensors": "lora.safetensors",
    "my-other-lora.safetensors": "dora-rows.safetensors",
    "my-lora/my-lora-step=000200.safetensors": "lora.safetensors",
    "my-lora/my-lora-step=000400.safetensors": "dora-rows.safetensors",
    "my-lora/my-lora-step=000600.safetensors": "bora.safetensors",
}
SOURCE_CLIP = "sa3_source_clip.wav"  # 0.01 s in ComfyUI's input folder
TRAINING_FOLDER = "sa3_training_audio"  # inside ComfyUI's input folder, as the 01 example names it

GENERATION = {"duration": 0.015, "steps": 2}
TEST_OVERRIDES = {
    "SA3LoadPack": {"dtype": "fp32", "device": "cpu"},
    "SA3Generate": GENERATION,
    "SA3AudioToAudio": GENERATION,
    "SA3Inpaint": {**GENERATION, "regions": "0.002-0.006"},
    "SA3Spectrogram": {"width": 96, "height": 48},
    "SA3TrainLoRA": {"steps": 2, "crop_seconds": 0.02, "checkpoint_every": 1, "demo_every": 0, "rank": 2,
                     "wait_until_done": True},
}


def load(name: str, api: bool = False) -> dict:
    return json.loads(((EXAMPLES / "api") if api else EXAMPLES).joinpath(f"{name}.json").read_text())


def apply_overrides(prompt: dict, overrides: dict) -> dict:
    """Replace literal inputs per class_type (linked inputs stay links)."""
    prompt = copy.deepcopy(prompt)
    for node in prompt.values():
        for name, value in overrides.get(node["class_type"], {}).items():
            if name in node["inputs"] and not isinstance(node["inputs"][name], list):
                node["inputs"][name] = value
    return prompt


def tone(seconds: float, freq: float, rate: int = 44100) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t))[:, None].repeat(2, 1)  # [N, 2]


@pytest.fixture(scope="module")
def comfy(tmp_path_factory, fixtures_dir):
    """A stand-in ComfyUI folder with the tiny packs, the LoRAs and audio files the examples name; cwd is its root."""
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("comfy")
    stubs = comfy_stubs.install(mp, root)
    input_dir = stubs.input_dir
    mp.chdir(root)
    packs = stubs.models_dir / "sa3" / "sa3-small-music"
    shutil.copytree(fixtures_dir / "tiny-small", packs / "base")
    shutil.copytree(fixtures_dir / "tiny-small-arc", packs / "arc")
    for name, source in LORA_FILES.items():
        target = stubs.folders["loras"][0] / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(fixtures_dir / "golden" / "lora" / source, target)
    sf.write(input_dir / SOURCE_CLIP, tone(0.01, 330), 44100)
    training = input_dir / TRAINING_FOLDER
    training.mkdir(parents=True)
    for i, freq in enumerate((220, 440, 660)):
        sf.write(training / f"tone {i}.wav", tone(0.05, freq), 44100)
        (training / f"tone {i}.txt").write_text(f"a soft sine tone number {i}")
    from sa3_lora_studio.nodes import model_nodes, training_nodes

    model_nodes.unload_idle()
    training_nodes.reset_manager()
    yield stubs
    model_nodes.unload_idle()
    training_nodes.reset_manager()
    mp.undo()


def classes() -> dict:
    return {**graph_executor.stock_stand_ins(), **NODE_CLASS_MAPPINGS}


# --- the converter on small hand-made graphs (independent of the examples) ---

def ui_node(node_id, kind, widgets, inputs=(), mode=0, title=None):
    node = {"id": node_id, "type": kind, "mode": mode, "inputs": list(inputs), "outputs": [], "widgets_values": widgets}
    if title:
        node["title"] = title
    return node


GEN_WIDGETS = ["a prompt", "", 10.0, 5, "randomize", 8, 1.0, "auto", 1]


def test_widget_values_map_by_position_and_seed_control_values_are_dropped():
    ui = {"nodes": [ui_node(1, "SA3LoadPack", ["sa3-small-music", "arc", "bf16", "auto", "(none)", "(none)", False]),
                    ui_node(2, "SA3Generate", GEN_WIDGETS, [{"name": "model", "type": "SA3_MODEL", "link": 1},
                                                            {"name": "loras", "type": "SA3_LORA_STACK", "link": None}]),
                    ui_node(3, "Note", ["just a note"]), ui_node(4, "MarkdownNote", ["# a note"])],
          "links": [[1, 1, 0, 2, 0, "SA3_MODEL"]]}
    api = wf.ui_to_api(ui, NODE_CLASS_MAPPINGS, display_names=NODE_DISPLAY_NAME_MAPPINGS)
    assert set(api) == {"1", "2"}  # notes never reach the server
    assert api["2"] == {"class_type": "SA3Generate", "_meta": {"title": "SA3 Generate"}, "inputs": {
        "prompt": "a prompt", "negative_prompt": "", "duration": 10.0, "seed": 5, "steps": 8, "cfg": 1.0,
        "sampler": "auto", "batch_size": 1, "model": ["1", 0]}}
    assert api["1"]["inputs"]["download_missing"] is False
    # GEN_WIDGETS predate the optional lora_memory widget: it takes its default; the current layout names it
    assert wf.check_ui_workflow(ui, NODE_CLASS_MAPPINGS) == []
    ui["nodes"][1]["widgets_values"] = GEN_WIDGETS + ["low"]
    assert wf.ui_to_api(ui, NODE_CLASS_MAPPINGS)["2"]["inputs"]["lora_memory"] == "low"
    ui["nodes"][1]["widgets_values"] = GEN_WIDGETS[:-1]  # a required widget missing is still an error
    with pytest.raises(ValueError, match="8 widget values for 10 widgets"):
        wf.ui_to_api(ui, NODE_CLASS_MAPPINGS)
    assert "8 widget values" in wf.check_ui_workflow(ui, NODE_CLASS_MAPPINGS)[0]


def test_a_linked_widget_keeps_its_position_and_the_api_gets_the_link():
    text = ui_node(5, "PrimitiveStringMultiline", ["shared prompt"])
    gen = ui_node(2, "SA3Generate", GEN_WIDGETS, [{"name": "model", "type": "SA3_MODEL", "link": None},
                                                  {"name": "prompt", "type": "STRING", "widget": {"name": "prompt"},
                                                   "link": 7}])
    api = wf.ui_to_api({"nodes": [text, gen], "links": [[7, 5, 0, 2, 1, "STRING"]]}, NODE_CLASS_MAPPINGS)
    assert api["2"]["inputs"]["prompt"] == ["5", 0]
    assert api["2"]["inputs"]["negative_prompt"] == "" and api["2"]["inputs"]["seed"] == 5  # later values unshifted
    assert api["5"] == {"inputs": {"value": "shared prompt"}, "class_type": "PrimitiveStringMultiline",
                        "_meta": {"title": "String (Multiline)"}}


def test_bypassed_nodes_pass_their_matching_input_through_and_muted_nodes_vanish():
    load = ui_node(1, "LoadAudio", ["clip.wav", None, None])  # the upload and preview widgets never reach the API
    bypassed = ui_node(2, "SA3AudioToAudio", GEN_WIDGETS + [0.5], [
        {"name": "model", "type": "SA3_MODEL", "link": None}, {"name": "audio", "type": "AUDIO", "link": 1}], mode=4)
    save = ui_node(3, "SaveAudio", ["out"], [{"name": "audio", "type": "AUDIO", "link": 2}])
    muted = ui_node(4, "LoadAudio", ["other.wav", None, None], mode=2)
    preview = ui_node(5, "PreviewAudio", [], [{"name": "audio", "type": "AUDIO", "link": 3}])
    ui = {"nodes": [load, bypassed, save, muted, preview],
          "links": [[1, 1, 0, 2, 1, "AUDIO"], [2, 2, 0, 3, 0, "AUDIO"], [3, 4, 0, 5, 0, "AUDIO"]]}
    api = wf.ui_to_api(ui, NODE_CLASS_MAPPINGS)
    assert set(api) == {"1", "3", "5"}
    assert api["1"]["inputs"] == {"audio": "clip.wav"}
    assert api["3"]["inputs"] == {"filename_prefix": "out", "audio": ["1", 0]}  # wired past the bypassed node
    assert api["5"]["inputs"] == {}  # its source is muted (ComfyUI then reports the missing input)


def test_reroutes_are_followed_and_frontend_primitives_leave_the_stored_widget_value():
    load = ui_node(1, "LoadAudio", ["clip.wav", None, None])
    reroute = {"id": 2, "type": "Reroute", "mode": 0, "inputs": [{"name": "", "type": "*", "link": 1}],
               "outputs": [{"name": "", "type": "AUDIO", "links": [2]}]}
    primitive = ui_node(3, "PrimitiveNode", ["song", "fixed"])  # the old frontend-only primitive
    save = ui_node(4, "SaveAudio", ["song"], [{"name": "audio", "type": "AUDIO", "link": 2},
                                              {"name": "filename_prefix", "type": "STRING",
                                               "widget": {"name": "filename_prefix"}, "link": 3}])
    ui = {"nodes": [load, reroute, primitive, save],
          "links": [[1, 1, 0, 2, 0, "AUDIO"], [2, 2, 0, 4, 0, "AUDIO"], [3, 3, 0, 4, 1, "STRING"]]}
    api = wf.ui_to_api(ui, NODE_CLASS_MAPPINGS)
    assert set(api) == {"1", "4"} and api["4"]["inputs"] == {"filename_prefix": "song", "audio": ["1", 0]}
    primitive["outputs"] = [{"name": "STRING", "type": "STRING", "links": [3]}]
    assert wf.check_ui_workflow(ui, NODE_CLASS_MAPPINGS) == [  # the spec-only LoadAudio knows no input files
        "node 1 (LoadAudio): audio='clip.wav' is not one of []"]


def test_a_widget_count_that_does_not_fit_the_node_is_an_error_naming_it():
    ui = {"nodes": [ui_node(9, "SA3Spectrogram", [600])], "links": []}
    with pytest.raises(ValueError, match=r"node 9 \(SA3Spectrogram\): 1 widget values for 2 widgets"):
        wf.ui_to_api(ui, NODE_CLASS_MAPPINGS)
    with pytest.raises(ValueError, match="unknown node type 'KSampler'"):
        wf.ui_to_api({"nodes": [ui_node(1, "KSampler", [])], "links": []}, NODE_CLASS_MAPPINGS)


# --- the committed examples ---

def test_each_ui_example_has_an_api_twin_in_a_folder_the_template_browser_does_not_list():
    assert len(NAMES) == 6
    assert sorted(p.stem for p in (EXAMPLES / "api").glob("*.json")) == NAMES
    for name in NAMES:  # ComfyUI lists example_workflows/*.json only (no subfolders): these are all UI graphs
        assert "nodes" in load(name) and "class_type" in next(iter(load(name, api=True).values()))


@pytest.mark.parametrize("name", NAMES)
def test_ui_example_nodes_widgets_and_links_match_the_node_definitions(name, comfy):
    ui = load(name)
    assert wf.check_ui_workflow(ui, NODE_CLASS_MAPPINGS, graph_executor.stock_stand_ins()) == []
    notes = [n for n in ui["nodes"] if n["type"] in ("Note", "MarkdownNote")]
    assert len(notes) == 1 and len(notes[0]["widgets_values"][0]) > 80  # one short explanation


def test_the_checker_catches_swapped_widgets_unknown_nodes_and_mismatched_links(comfy):
    ui = load("02_text_to_audio_with_lora_on_arc")
    stand_ins = graph_executor.stock_stand_ins()
    assert wf.check_ui_workflow(ui, NODE_CLASS_MAPPINGS, stand_ins) == []
    gen = next(n for n in ui["nodes"] if n["type"] == "SA3Generate")
    gen["widgets_values"][2], gen["widgets_values"][3] = gen["widgets_values"][3], gen["widgets_values"][2]
    gen["widgets_values"][5] = 10_000  # steps above max
    lora = next(n for n in ui["nodes"] if n["type"] == "SA3LoadLoRA")
    lora["widgets_values"][0] = "missing.safetensors"
    ui["nodes"].append(ui_node(99, "KSampler", []))
    spectrogram = next(n["id"] for n in ui["nodes"] if n["type"] == "SA3Spectrogram")
    save = next(n for n in ui["nodes"] if n["type"] == "SaveAudio")
    link = next(lk for lk in ui["links"] if lk[0] == save["inputs"][0]["link"])
    link[1], link[2] = spectrogram, 0  # an IMAGE into SaveAudio's AUDIO input
    problems = "\n".join(wf.check_ui_workflow(ui, NODE_CLASS_MAPPINGS, stand_ins))
    for expected in ("seed=10.0 is not an INT", "steps=10000 is outside [0, 500]", "missing.safetensors",
                     "node 99 (KSampler): unknown node type", "SA3Spectrogram output 0 (IMAGE) feeds SaveAudio.audio (AUDIO)"):
        assert expected in problems, problems


@pytest.mark.parametrize("name", NAMES)
def test_converting_the_ui_example_gives_its_committed_api_twin(name):
    assert wf.ui_to_api(load(name), NODE_CLASS_MAPPINGS, display_names=NODE_DISPLAY_NAME_MAPPINGS) == load(name, api=True)


@pytest.mark.parametrize("name", NAMES)
def test_api_example_runs_against_the_tiny_models(name, comfy):
    prompt = load(name, api=True)
    assert graph_executor.validate(prompt, classes()) == []  # the committed values, unchanged
    run = graph_executor.execute(apply_overrides(prompt, TEST_OVERRIDES), classes(), check_values=False)
    by_class = {}
    for node_id in run.order:
        by_class.setdefault(prompt[node_id]["class_type"], []).append(node_id)
    assert set(run.order) == set(prompt) - {i for i, n in prompt.items() if n["class_type"] == "Note"}
    for node_id in by_class.get("SaveAudio", []):
        (saved,) = run.ui[node_id]["audio"]
        data, rate = sf.read(comfy.output_dir / saved["subfolder"] / saved["filename"])
        assert rate == 44100 and data.shape[1] == 2 and np.isfinite(data).all() and np.abs(data).max() > 0
    for node_id in by_class.get("PreviewImage", []):
        assert run.ui[node_id]["images"][0]["shape"][-1] == 3
    if "SA3TrainLoRA" in by_class:
        (status,) = by_class["SA3RunStatus"]
        assert "done step 2/2" in run.results[status][3]
        assert run.results[status][2].endswith("step=000002.safetensors")
    if name == "06_compare_lora_checkpoints":  # same prompt and seed: the columns differ only by their LoRA
        waves = [run.results[i][0]["waveform"] for i in by_class["SA3Generate"]]
        assert len(waves) == 4 and not any(torch.equal(waves[0], w) for w in waves[1:])


def test_the_committed_examples_are_what_the_builder_makes_from_todays_nodes(tmp_path):
    """A node that gains an input or output must not leave the examples describing the old one (regenerate them
    with `python tools/make_example_workflows.py`)."""
    import subprocess

    subprocess.run([sys.executable, str(EXAMPLES.parent / "tools" / "make_example_workflows.py"), "--out",
                    str(tmp_path)], check=True, capture_output=True)
    made = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.json"))
    assert made == sorted(p.relative_to(EXAMPLES) for p in EXAMPLES.rglob("*.json"))
    for rel in made:
        assert json.loads((tmp_path / rel).read_text()) == json.loads((EXAMPLES / rel).read_text()), rel
