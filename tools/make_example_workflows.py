"""Writes example_workflows/*.json (ComfyUI's UI format) and their API twins in example_workflows/api/.

Not needed at runtime: `python tools/make_example_workflows.py` from the repo root (with the package installed,
`pip install -e . --no-deps`) after a node's inputs change; tests/test_workflows.py checks the committed files.

Each graph is built once, by input name: the builder lays the UI widget values out by position (with the frontend's
extra widgets) and records the API inputs by name, so the API twin does not come from our converter, and the test
that converts the UI file and compares it with the twin checks the converter.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sa3_lora_studio.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from sa3_lora_studio.workflow_format import (
    CONTROL_AFTER_GENERATE,
    STOCK_NODES,
    input_type,
    node_inputs,
    socket_inputs,
    widget_slots,
)

ROOT = Path(__file__).resolve().parents[1]
CLASSES = {**STOCK_NODES, **NODE_CLASS_MAPPINGS}

# Names the examples refer to; tests/test_workflows.py puts files with these names into its stand-in ComfyUI.
LORA = "my-lora.safetensors"
OTHER_LORA = "my-other-lora.safetensors"
CHECKPOINTS = [f"my-lora/my-lora-step={step:06d}.safetensors" for step in (200, 400, 600)]
SOURCE_CLIP = "sa3_source_clip.wav"  # in ComfyUI's input folder
TRAINING_FOLDER = "sa3_training_audio"  # inside ComfyUI's input folder (nodes/dataset_nodes.audio_folder)
PROMPT = "warm lo-fi hip hop beat, dusty drums, mellow Rhodes chords, vinyl crackle, 85 BPM"


class Graph:
    """A UI workflow under construction, with its API twin."""

    def __init__(self):
        self.nodes: list[dict] = []
        self.links: list[list] = []
        self.api: dict[str, dict] = {}

    def add(self, kind: str, pos, size=(330, 260), title: str | None = None, **widgets) -> int:
        cls = CLASSES[kind]
        spec = node_inputs(cls)
        node_id = len(self.nodes) + 1
        values, api_inputs = [], {}
        for name, sent in widget_slots(cls):
            if not sent:
                values.append("fixed" if name == CONTROL_AFTER_GENERATE else None)
                continue
            kind_, options = spec[name]
            if name in widgets:
                value = widgets.pop(name)
            elif "default" in options:
                value = options["default"]
            else:
                value = kind_[0] if isinstance(kind_, list) and kind_ else ""
            values.append(value)
            api_inputs[name] = value
        if widgets:
            raise ValueError(f"{kind}: no widget inputs {sorted(widgets)}")
        node = {"id": node_id, "type": kind, "pos": list(pos), "size": list(size), "flags": {}, "order": 0, "mode": 0,
                "inputs": [{"name": n, "type": t, "link": None, **({"shape": 7} if opt else {})}
                           for n, t, opt in socket_inputs(cls)],
                "outputs": [{"name": n, "type": input_type(t), "links": [], "slot_index": i}
                            for i, (n, t) in enumerate(zip(_output_names(cls), cls.RETURN_TYPES))],
                "title": title or NODE_DISPLAY_NAME_MAPPINGS.get(kind) or cls.DISPLAY_NAME,
                "properties": {"Node name for S&R": kind}, "widgets_values": values}
        if kind in ("Note", "MarkdownNote"):
            node.update(properties={"text": ""}, color="#432", bgcolor="#653")
        else:
            self.api[str(node_id)] = {"inputs": api_inputs, "class_type": kind, "_meta": {"title": node["title"]}}
        self.nodes.append(node)
        return node_id

    def note(self, pos, text: str, size=(420, 200)) -> int:
        return self.add("Note", pos, size=size, title="About this workflow", text=text)

    def connect(self, source: int, slot: int, target: int, name: str) -> None:
        src, dst = self.nodes[source - 1], self.nodes[target - 1]
        link_id = len(self.links) + 1
        sockets = dst["inputs"]
        index = next((i for i, s in enumerate(sockets) if s["name"] == name), None)
        if index is None:  # a widget input fed by a link: the frontend gives it a socket, its value stays stored
            kind, _ = node_inputs(CLASSES[dst["type"]])[name]
            sockets.append({"name": name, "type": input_type(kind), "widget": {"name": name}, "link": None})
            index = len(sockets) - 1
        out_type = src["outputs"][slot]["type"]
        sockets[index]["link"] = link_id
        src["outputs"][slot]["links"].append(link_id)
        self.links.append([link_id, source, slot, target, index, out_type])
        self.api[str(target)]["inputs"][name] = [str(source), slot]

    def ui(self) -> dict:
        self._order()
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": [], "config": {}, "extra": {"ds": {"scale": 0.75, "offset": [40, 40]}},
                "version": 0.4}

    def _order(self) -> None:
        """The frontend's `order` field: a topological execution order."""
        placed: list[int] = []
        while len(placed) < len(self.nodes):
            for node in self.nodes:
                sources = {link[1] for link in self.links if link[3] == node["id"]}
                if node["id"] not in placed and sources <= set(placed):
                    node["order"] = len(placed)
                    placed.append(node["id"])


def _output_names(cls) -> tuple:
    return getattr(cls, "RETURN_NAMES", None) or tuple(cls.RETURN_TYPES)


def _load_pack(g: Graph, variant: str, pos=(0, 250)) -> int:
    return g.add("SA3LoadPack", pos, size=(330, 220), pack="sa3-small-music", variant=variant)


def train_lora_from_audio_folder() -> Graph:
    g = Graph()
    g.note((0, 0), "Train a LoRA from a folder of audio files.\n\n"
           f"1. Put your audio (and optional captions: song.txt / song.json beside song.wav) in '{TRAINING_FOLDER}' "
           "inside ComfyUI's input folder, or paste an absolute folder path into SA3 Encode Audio Folder.\n"
           "2. Queue: the folder is encoded once (only new files later), prompts are composed from captions and tags, "
           "and training starts in the background on the BASE model.\n"
           "3. Watch the SA3 Training panel, or queue again: SA3 Run Status refreshes the loss charts and gives the "
           "newest checkpoint. Checkpoints appear in SA3 Load LoRA as 'sa3 runs/<run>/...'.\n"
           "Demos: every demo_every steps the chained SA3 Training Demo nodes render (a fixed prompt on the base model, "
           "a dataset prompt on ARC, as the LoRA will be used); without them, underfit-like defaults.", size=(560, 240))
    pack = _load_pack(g, "base")
    enc = g.add("SA3EncodeAudioFolder", (380, 250), size=(360, 300), folder=TRAINING_FOLDER, dataset_name="my-dataset")
    g.connect(pack, 0, enc, "model")
    compose = g.add("SA3ComposePrompts", (780, 0), size=(360, 520), caption_weight=70.0, tags_weight=30.0,
                    trigger="mystyle")
    g.connect(enc, 0, compose, "dataset")
    train = g.add("SA3TrainLoRA", (1180, 250), size=(380, 560), name="my-lora", adapter_type="dora-rows", rank=16,
                  steps=1000, batch_size=1, crop_seconds=30.0, learning_rate=1e-4, checkpoint_every=200, demo_every=200)
    fixed = g.add("SA3TrainingDemo", (780, 560), size=(360, 330), title="Demo: fixed prompt, base",
                  prompt="mystyle, " + PROMPT, cfg=7.0, demo_seed=1, seconds=10.0)
    rolled = g.add("SA3TrainingDemo", (780, 930), size=(360, 330), title="Demo: dataset prompt, ARC",
                   from_dataset=True, sampler_model="arc", demo_seed=2, seconds=10.0)
    g.connect(fixed, 0, rolled, "demos")
    g.connect(rolled, 0, train, "demos")
    g.connect(pack, 0, train, "model")
    g.connect(enc, 0, train, "dataset")
    g.connect(compose, 0, train, "prompt_config")
    status = g.add("SA3RunStatus", (1600, 250), size=(300, 160), bins=5)
    g.connect(train, 0, status, "run")
    for i, slot in enumerate((0, 1)):
        view = g.add("PreviewImage", (1940, 0 + 380 * i), size=(420, 340),
                     title=("Loss chart", "Loss by noise level")[i])
        g.connect(status, slot, view, "images")
    return g


def text_to_audio_with_lora_on_arc() -> Graph:
    g = Graph()
    g.note((0, 0), "Text to audio with a trained LoRA on the ARC model: 8 ping-pong steps at CFG 1.\n\n"
           "LoRAs are trained on the base model and work on ARC. 'skip_first_steps = 1' leaves the LoRA off for the "
           "first step, where ARC lays out the song's structure, so the base model keeps the arrangement and the "
           "LoRA brings the sound. Pick your LoRA (models/loras or 'sa3 runs/...') in SA3 Load LoRA.")
    pack = _load_pack(g, "arc")
    lora = g.add("SA3LoadLoRA", (380, 250), size=(330, 250), lora=LORA, strength=1.0, skip_first_steps=1)
    gen = g.add("SA3Generate", (760, 0), size=(380, 520), prompt=PROMPT, duration=10.0, seed=42, steps=8, cfg=1.0)
    g.connect(pack, 0, gen, "model")
    g.connect(lora, 0, gen, "loras")
    save = g.add("SaveAudio", (1180, 0), size=(340, 140), filename_prefix="sa3/lora_arc")
    g.connect(gen, 0, save, "audio")
    spec = g.add("SA3Spectrogram", (1180, 200), size=(300, 120))
    g.connect(gen, 0, spec, "audio")
    view = g.add("PreviewImage", (1180, 360), size=(520, 200), title="Spectrogram")
    g.connect(spec, 0, view, "images")
    return g


def blend_two_loras() -> Graph:
    g = Graph()
    g.note((0, 0), "Two LoRAs blended at different strengths and noise intervals.\n\n"
           "SA3 Load LoRA nodes chain into a stack. The first is active only while the noise level t is in "
           "[0.5, 1] (the early, structural steps) at strength 0.7; the second only in [0, 0.5] (the late steps that "
           "shape timbre and texture) at full strength. Swap the intervals to hear the other combination.")
    pack = _load_pack(g, "arc")
    first = g.add("SA3LoadLoRA", (380, 250), size=(330, 250), title="LoRA 1: structure (early steps)", lora=LORA,
                  strength=0.7, interval_start=0.5, interval_end=1.0)
    second = g.add("SA3LoadLoRA", (380, 550), size=(330, 250), title="LoRA 2: texture (late steps)", lora=OTHER_LORA,
                   strength=1.0, interval_start=0.0, interval_end=0.5)
    g.connect(first, 0, second, "loras")
    gen = g.add("SA3Generate", (760, 0), size=(380, 520), prompt=PROMPT, duration=10.0, seed=7, steps=8)
    g.connect(pack, 0, gen, "model")
    g.connect(second, 0, gen, "loras")
    save = g.add("SaveAudio", (1180, 0), size=(340, 140), filename_prefix="sa3/two_loras")
    g.connect(gen, 0, save, "audio")
    spec = g.add("SA3Spectrogram", (1180, 200), size=(300, 120))
    g.connect(gen, 0, spec, "audio")
    view = g.add("PreviewImage", (1180, 360), size=(520, 200), title="Spectrogram")
    g.connect(spec, 0, view, "images")
    return g


def audio_to_audio_style_transfer() -> Graph:
    g = Graph()
    g.note((0, 0), "Audio to audio: re-render a clip in a LoRA's style.\n\n"
           f"Load Audio reads ComfyUI's input folder (upload your clip there; the example expects '{SOURCE_CLIP}'). "
           "The clip is noised to 'noise_level' and regenerated with the prompt and the LoRA: 1.0 ignores the source, "
           "around 0.5-0.8 keeps its rhythm and melody and changes the sound.")
    pack = _load_pack(g, "arc")
    source = g.add("LoadAudio", (0, 520), size=(330, 140), title="Source clip", audio=SOURCE_CLIP)
    lora = g.add("SA3LoadLoRA", (380, 250), size=(330, 250), lora=LORA, strength=1.0)
    a2a = g.add("SA3AudioToAudio", (760, 0), size=(380, 560), prompt=PROMPT, duration=10.0, seed=3, steps=8,
                noise_level=0.7)
    g.connect(pack, 0, a2a, "model")
    g.connect(source, 0, a2a, "audio")
    g.connect(lora, 0, a2a, "loras")
    save = g.add("SaveAudio", (1180, 0), size=(340, 140), filename_prefix="sa3/style_transfer")
    g.connect(a2a, 0, save, "audio")
    return g


def inpaint_and_continue() -> Graph:
    g = Graph()
    g.note((0, 0), "Inpainting and continuation of a clip.\n\n"
           "Top: regenerate the region 4-6 s of the source (several regions: '4-6, 12-14'); the rest guides the "
           "model. Bottom: continue the clip from its end up to 'duration' seconds. paste_back puts the original "
           f"audio back outside the regions. Load Audio reads ComfyUI's input folder (example: '{SOURCE_CLIP}').")
    pack = _load_pack(g, "arc")
    source = g.add("LoadAudio", (0, 520), size=(330, 140), title="Source clip", audio=SOURCE_CLIP)
    inpaint = g.add("SA3Inpaint", (380, 0), size=(380, 600), title="SA3 Inpaint: region 4-6 s", prompt=PROMPT,
                    duration=10.0, seed=11, steps=8, regions="4.0-6.0", paste_back=True)
    cont = g.add("SA3Inpaint", (380, 640), size=(380, 600), title="SA3 Inpaint: continue to 20 s", prompt=PROMPT,
                 duration=20.0, seed=12, steps=8, continuation=True)
    for node, prefix, y in ((inpaint, "sa3/inpainted", 0), (cont, "sa3/continued", 640)):
        g.connect(pack, 0, node, "model")
        g.connect(source, 0, node, "audio")
        save = g.add("SaveAudio", (800, y), size=(340, 140), filename_prefix=prefix)
        g.connect(node, 0, save, "audio")
    return g


def compare_lora_checkpoints() -> Graph:
    g = Graph()
    g.note((0, 0), "Compare LoRA checkpoints side by side: one prompt and one seed (the two primitives feed every "
           "column), no LoRA on the left, then the checkpoints of a run at steps 200, 400 and 600.\n\n"
           "Choose your run's checkpoints ('sa3 runs/<run>/...-step=000200.safetensors') in the SA3 Load LoRA "
           "nodes; listen for where the style arrives and where it starts to overfit.", size=(560, 200))
    pack = _load_pack(g, "arc", pos=(0, 560))
    prompt = g.add("PrimitiveStringMultiline", (0, 240), size=(330, 160), title="Prompt", value=PROMPT)
    seed = g.add("PrimitiveInt", (0, 440), size=(330, 90), title="Seed", value=1234)
    for col, checkpoint in enumerate([None, *CHECKPOINTS]):
        x = 380 + 420 * col
        label = "no LoRA" if checkpoint is None else checkpoint.rsplit("step=", 1)[1].removesuffix(".safetensors")
        gen = g.add("SA3Generate", (x, 300), size=(380, 460), title=f"SA3 Generate: {label}", prompt=PROMPT,
                    duration=10.0, seed=1234, steps=8)
        g.connect(pack, 0, gen, "model")
        g.connect(prompt, 0, gen, "prompt")
        g.connect(seed, 0, gen, "seed")
        if checkpoint is not None:
            lora = g.add("SA3LoadLoRA", (x, 0), size=(380, 250), title=f"SA3 Load LoRA: step {label}",
                         lora=checkpoint, strength=1.0)
            g.connect(lora, 0, gen, "loras")
        save = g.add("SaveAudio", (x, 800), size=(380, 120), filename_prefix=f"sa3/compare/{label.replace(' ', '_')}")
        g.connect(gen, 0, save, "audio")
        spec = g.add("SA3Spectrogram", (x, 960), size=(380, 120), width=400, height=120)
        g.connect(gen, 0, spec, "audio")
        view = g.add("PreviewImage", (x, 1120), size=(380, 200), title=f"Spectrogram: {label}")
        g.connect(spec, 0, view, "images")
    return g


WORKFLOWS = {
    "01_train_lora_from_audio_folder": train_lora_from_audio_folder,
    "02_text_to_audio_with_lora_on_arc": text_to_audio_with_lora_on_arc,
    "03_blend_two_loras": blend_two_loras,
    "04_audio_to_audio_style_transfer": audio_to_audio_style_transfer,
    "05_inpaint_and_continue": inpaint_and_continue,
    "06_compare_lora_checkpoints": compare_lora_checkpoints,
}


def draw_thumbnail(ui: dict, path: Path, width: int = 480, height: int = 270) -> None:
    """A small picture of the graph for the template browser: node boxes (SA3 nodes teal, stock grey, the note
    brown) with their titles, and the links."""
    from PIL import Image, ImageDraw

    boxes = {n["id"]: (n["pos"][0], n["pos"][1], n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
             for n in ui["nodes"]}
    x0, y0 = min(b[0] for b in boxes.values()), min(b[1] for b in boxes.values())
    x1, y1 = max(b[2] for b in boxes.values()), max(b[3] for b in boxes.values())
    pad = 10
    scale = min((width - 2 * pad) / (x1 - x0), (height - 2 * pad) / (y1 - y0))

    def at(x, y):
        return pad + (x - x0) * scale, pad + (y - y0) * scale

    image = Image.new("RGB", (width, height), (32, 33, 36))
    draw = ImageDraw.Draw(image)
    for _, src, _, dst, _, _ in ui["links"]:
        a, b = boxes[src], boxes[dst]
        draw.line([at(a[2], (a[1] + a[3]) / 2), at(b[0], (b[1] + b[3]) / 2)], fill=(140, 160, 190), width=2)
    for node in ui["nodes"]:
        left, top, right, bottom = boxes[node["id"]]
        fill = (90, 70, 50) if node["type"] == "Note" else (30, 95, 100) if node["type"].startswith("SA3") else (70, 70, 74)
        draw.rounded_rectangle([at(left, top), at(right, bottom)], radius=4, fill=fill, outline=(200, 200, 200))
        tx, ty = at(left, top)
        draw.text((tx + 3, ty + 2), node["title"][: max(3, int((right - left) * scale / 6))], fill=(235, 235, 235))
    image.save(path, quality=85)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "example_workflows")
    args = parser.parse_args()
    (args.out / "api").mkdir(parents=True, exist_ok=True)
    for name, build in WORKFLOWS.items():
        graph = build()
        (args.out / f"{name}.json").write_text(json.dumps(graph.ui(), indent=1) + "\n")
        (args.out / "api" / f"{name}.json").write_text(json.dumps(graph.api, indent=1) + "\n")
        draw_thumbnail(graph.ui(), args.out / f"{name}.jpg")
        print(f"{name}: {len(graph.nodes)} nodes, {len(graph.links)} links")


if __name__ == "__main__":
    main()
