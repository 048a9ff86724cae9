"""A tiny stand-in for ComfyUI's executor, used only by the tests: runs an API-format prompt in-process.

What it shares with ComfyUI (`execution.py`): only output nodes and what they depend on run, in topological order;
an input is a literal or `[source id, output slot]`, routed from the source's result; a node is an instance of its
class called through `FUNCTION` under `torch.inference_mode()`; a result is a tuple, or a dict with "result" and
"ui"; prompts are validated first (known classes, required inputs, links to existing outputs, literal values of
widget inputs in their combo list / range). What it leaves out: caching between prompts, IS_CHANGED, lazy inputs,
list mapping (INPUT_IS_LIST), async nodes, and progress/websocket messages.

`stock_stand_ins()` gives minimal working versions of the stock nodes the examples use (LoadAudio reads the input
folder, SaveAudio writes FLAC to the output folder, previews record what they were given), with the interfaces of
`workflow_format.STOCK_NODES`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from sa3_lora_studio import workflow_format as wf


def _input_dir() -> Path:
    import folder_paths

    return Path(folder_paths.get_input_directory())


def _output_dir() -> Path:
    import folder_paths

    return Path(folder_paths.get_output_directory())


class LoadAudio(wf.LoadAudio):
    @classmethod
    def INPUT_TYPES(cls):
        files = sorted(p.name for p in _input_dir().iterdir() if p.is_file())
        return {"required": {"audio": (files, {"audio_upload": True})}}

    FUNCTION = "load"

    def load(self, audio):
        data, rate = sf.read(_input_dir() / audio, dtype="float32", always_2d=True)  # [N, C]
        return ({"waveform": torch.from_numpy(data.T.copy())[None], "sample_rate": rate},)  # [1, C, N]


class SaveAudio(wf.SaveAudio):
    FUNCTION = "save"

    def save(self, audio, filename_prefix="audio/ComfyUI", prompt=None, extra_pnginfo=None):
        saved = []
        for i, wav in enumerate(audio["waveform"]):
            path = _output_dir() / f"{filename_prefix}_{i:05d}_.flac"
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(path, np.clip(wav.float().numpy().T, -1, 1), audio["sample_rate"])
            saved.append({"filename": path.name, "subfolder": str(path.parent.relative_to(_output_dir())),
                          "type": "output"})
        return {"ui": {"audio": saved}}


class PreviewAudio(wf.PreviewAudio):
    FUNCTION = "preview"

    def preview(self, audio, prompt=None, extra_pnginfo=None):
        return {"ui": {"audio": [{"shape": tuple(audio["waveform"].shape), "sample_rate": audio["sample_rate"]}]}}


class PreviewImage(wf.PreviewImage):
    FUNCTION = "preview"

    def preview(self, images, prompt=None, extra_pnginfo=None):
        assert images.dim() == 4 and images.shape[-1] == 3, f"IMAGE is [B, H, W, 3], got {tuple(images.shape)}"
        return {"ui": {"images": [{"shape": tuple(images.shape)}]}}


class PrimitiveStringMultiline(wf.PrimitiveStringMultiline):
    FUNCTION = "execute"

    def execute(self, value):
        return (value,)


class PrimitiveInt(wf.PrimitiveInt):
    FUNCTION = "execute"

    def execute(self, value):
        return (value,)


def stock_stand_ins() -> dict:
    return {cls.__name__: cls for cls in (LoadAudio, SaveAudio, PreviewAudio, PreviewImage, PrimitiveStringMultiline,
                                          PrimitiveInt)}


@dataclass
class Execution:
    order: list[str] = field(default_factory=list)  # node ids in the order they ran
    results: dict[str, tuple] = field(default_factory=dict)
    ui: dict[str, dict] = field(default_factory=dict)


def _is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def validate(prompt: dict, classes: dict, check_values: bool = True) -> list[str]:
    """Problems ComfyUI's `validate_prompt` would report, one line each (empty = fine)."""
    problems = []
    if not any(getattr(classes.get(n["class_type"]), "OUTPUT_NODE", False) for n in prompt.values()):
        problems.append("prompt has no output node")
    for node_id, node in prompt.items():
        cls = classes.get(node["class_type"])
        if cls is None:
            problems.append(f"node {node_id}: unknown class_type {node['class_type']!r}")
            continue
        spec = cls.INPUT_TYPES()
        inputs = wf.node_inputs(cls)
        for name in spec.get("required") or {}:
            if name not in node["inputs"]:
                problems.append(f"node {node_id} ({node['class_type']}): required input {name!r} missing")
        for name, value in node["inputs"].items():
            if name not in inputs:
                continue  # ComfyUI ignores inputs a node does not declare
            kind, options = inputs[name]
            if _is_link(value):
                source = prompt.get(value[0])
                source_cls = classes.get(source["class_type"]) if source else None
                if source_cls is None or value[1] >= len(source_cls.RETURN_TYPES):
                    problems.append(f"node {node_id}: input {name!r} links to a missing output {value}")
                    continue
                out_type, in_type = wf.input_type(source_cls.RETURN_TYPES[value[1]]), wf.input_type(kind)
                if "*" not in (out_type, in_type) and out_type != in_type:
                    problems.append(f"node {node_id}: input {name!r} ({in_type}) fed by {out_type}")
            elif check_values and wf.is_widget(kind, options):
                why = wf.check_widget_value(name, kind, options, value)
                if why:
                    problems.append(f"node {node_id} ({node['class_type']}): {why}")
    return problems


def needed_nodes(prompt: dict, classes: dict) -> list[str]:
    """Output nodes and everything they depend on, in a topological order (ties by node id)."""
    needed, stack = set(), [i for i, n in prompt.items() if getattr(classes[n["class_type"]], "OUTPUT_NODE", False)]
    while stack:
        node_id = stack.pop()
        if node_id not in needed:
            needed.add(node_id)
            stack += [v[0] for v in prompt[node_id]["inputs"].values() if _is_link(v)]
    order, done = [], set()
    while len(order) < len(needed):
        ready = sorted((i for i in needed - done
                        if all(v[0] in done for v in prompt[i]["inputs"].values() if _is_link(v))), key=lambda i: int(i))
        if not ready:
            raise ValueError(f"prompt has a cycle among nodes {sorted(needed - done)}")
        order.append(ready[0])
        done.add(ready[0])
    return order


def execute(prompt: dict, classes: dict, check_values: bool = True) -> Execution:
    """Validate, then run the prompt. classes: {class_type: class}. Raises with every validation problem listed."""
    problems = validate(prompt, classes, check_values)
    if problems:
        raise ValueError("prompt is invalid:\n" + "\n".join(problems))
    run = Execution()
    for node_id in needed_nodes(prompt, classes):
        node = prompt[node_id]
        cls = classes[node["class_type"]]
        declared = wf.node_inputs(cls)
        kwargs = {name: run.results[value[0]][value[1]] if _is_link(value) else value
                  for name, value in node["inputs"].items() if name in declared}
        hidden = cls.INPUT_TYPES().get("hidden") or {}
        kwargs.update({k: {"PROMPT": prompt, "UNIQUE_ID": node_id}.get(v) for k, v in hidden.items()})
        with torch.inference_mode():  # as ComfyUI runs every node
            out = getattr(cls(), cls.FUNCTION)(**kwargs)
        if isinstance(out, dict):
            run.ui[node_id] = out.get("ui") or {}
            out = out.get("result", ())
        out = tuple(out or ())
        if len(out) != len(cls.RETURN_TYPES):
            raise ValueError(f"node {node_id} ({node['class_type']}) returned {len(out)} values for "
                             f"{len(cls.RETURN_TYPES)} outputs")
        run.results[node_id] = out
        run.order.append(node_id)
    return run
