"""LoRA nodes: load (and stack) adapters with strength, interval and step skipping; inspect; export for ComfyUI."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from .comfy_bridge import CATEGORY, folder_file_path, folder_files
from .model_nodes import NO_FILE, using

RUN_PREFIX = "sa3 runs/"
# the reference gates (interval, skipped steps, layer filter) the DiT's adapted layers, never the conditioner's
GATED_LAYERS_NOTE = "The DiT layers only: an adapter's layers in the seconds conditioner act at every step, as in the official tools."


LORA_PATH_TOOLTIP = ("A LoRA file, overriding the list: a path (e.g. SA3 Run Status's lora_path), a file name in "
                     "ComfyUI's loras folder, or a run's checkpoint as the list shows it.")


def lora_list() -> list[str]:
    """The LoRA combo: `lora_choices()` then "(none)", for a node fed by `lora_path` (a combo needs a valid value:
    some ComfyUI builds refuse an empty one, and picking an unrelated file there was confusing)."""
    return lora_choices() + [NO_FILE]


def lora_choices() -> list[str]:
    """Files from ComfyUI's `loras` folder plus our training runs' checkpoints (newest runs first)."""
    choices = [f for f in folder_files("loras") if f.lower().endswith((".safetensors", ".sft", ".ckpt"))]
    try:
        from .training_nodes import get_manager

        manager = get_manager()
        runs = list(reversed(manager.registry.list()))
    except Exception:  # no runs folder (yet), or an unreadable one: ComfyUI's own LoRAs still list
        return choices
    for run in runs:
        try:  # one run folder moved or deleted by hand, or refused as outside the runs folder: skip that run only
            found = sorted((manager.registry.run_dir(run["id"]) / "checkpoints").glob("*.safetensors"), reverse=True)
        except Exception:
            continue
        choices += [f"{RUN_PREFIX}{run['id']}/{ckpt.name}" for ckpt in found]
    return choices


def resolve_lora(name: str) -> Path:
    """A choice from `lora_choices()` (or an absolute path) -> the file."""
    if name.startswith(RUN_PREFIX):
        from .training_nodes import get_manager

        run_id, _, file = name[len(RUN_PREFIX):].partition("/")
        return get_manager().registry.run_file(run_id, f"checkpoints/{file}")
    path = Path(name)
    if path.is_absolute():
        if not path.is_file():
            raise ValueError(f"LoRA file {name} does not exist")
        return path
    return folder_file_path("loras", name)


def lora_file(node: str, input_name: str, text: str, missing_ok: bool = False) -> Path:
    """A LoRA file given as text (a socket such as lora_path or continue_from): a path (absolute, relative to
    ComfyUI's working folder, or with ~), a file name in ComfyUI's loras folder, or a run checkpoint as the LoRA
    list shows it (`sa3 runs/<run>/<file>`). ValueError naming the node, the input and what it accepts otherwise
    (a folder, or nothing there). missing_ok: an absolute path to nothing comes back as it is (a run queued again
    goes on from its own checkpoint when the file it started from is gone)."""
    text = text.strip()
    path = Path(text).expanduser()
    if path.is_file() or (missing_ok and path.is_absolute() and not path.exists()):
        return path
    found = None
    if not path.is_absolute():
        with contextlib.suppress(Exception):  # not in the loras folder, nor a run's checkpoint
            found = resolve_lora(text)
        if found is not None and found.is_file():
            return found
    folder = " (a folder)" if path.is_dir() or (found is not None and found.is_dir()) else ""
    raise ValueError(f"{node}: {input_name}: no file {text!r}{folder}; give a file path, a file name in ComfyUI's "
                     "loras folder, or a run's checkpoint as SA3 Load LoRA lists it ('sa3 runs/<run>/<file>')")


def chosen_lora(node: str, lora: str, lora_path: str | None) -> Path:
    """The file a LoRA node uses: a connected `lora_path` wins (even empty: SA3 Run Status gives "" until the run's
    first checkpoint, and falling back to the list would silently load another LoRA), else the list's choice."""
    if lora_path is not None:
        if not lora_path.strip():
            raise ValueError(f"{node}: lora_path is connected but empty (SA3 Run Status gives no file until the "
                             "run saves its first checkpoint)")
        return lora_file(node, "lora_path", lora_path)
    if lora in ("", ".", NO_FILE):  # "." is how the pip-installable fork passes an empty combo value
        raise ValueError(f"{node}: choose a LoRA file, or connect lora_path (e.g. from SA3 Run Status)")
    return resolve_lora(lora)


class SA3LoadLoRA:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "lora": (lora_list(), {"tooltip": "An adapter from models/loras or from an SA3 training run "
                                                "(official SA3, underfit, fal and our files); (none) with lora_path."}),
                "strength": ("FLOAT", {"default": 1.0, "min": -4.0, "max": 4.0, "step": 0.05, "tooltip":
                                       "alpha/rank × strength. DoRA/BoRA renormalise, so 0.5 is not a linear blend."}),
                "interval_start": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                                             "Active only while the noise level t is in [start, end] (1 = pure "
                                             "noise, the first steps). end < 1 keeps the base model's song structure. "
                                             + GATED_LAYERS_NOTE}),
                "interval_end": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "End of the active noise-level interval (0 = the last, cleanest steps)."}),
                "skip_first_steps": ("INT", {"default": 0, "min": 0, "max": 100, "tooltip": "Leave the adapter off for "
                                             "the first N sampling steps (e.g. 1 on an 8-step ARC model). " + GATED_LAYERS_NOTE}),
                "layer_filter": ("STRING", {"default": "", "tooltip": "Comma-separated layer names to switch OFF, e.g. "
                                            "'transformer.layers.[0-3].' (bracket ranges allowed). " + GATED_LAYERS_NOTE}),
            },
            "optional": {
                "loras": ("SA3_LORA_STACK", {"tooltip": "Chain several SA3 Load LoRA nodes to stack adapters."}),
                "lora_path": ("STRING", {"forceInput": True, "tooltip": LORA_PATH_TOOLTIP}),
            },
        }

    RETURN_TYPES = ("SA3_LORA_STACK",)
    RETURN_NAMES = ("loras",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Adds an adapter to a LoRA stack for SA3 Generate / Audio to Audio / Inpaint (applied in order)."

    def load(self, lora, strength, interval_start, interval_end, skip_first_steps, layer_filter, loras=None,
             lora_path=None):
        from ..adapters import AdapterFileError, load_adapter_cached

        if interval_end < interval_start:
            raise ValueError(f"SA3 Load LoRA: interval_end {interval_end} is below interval_start {interval_start}")
        path = chosen_lora("SA3 Load LoRA", lora, lora_path)
        try:
            load_adapter_cached(path)  # validate now, with the file named in the error
        except Exception as e:
            named = isinstance(e, (AdapterFileError, FileNotFoundError))  # these name the file already
            raise ValueError(f"SA3 Load LoRA: {'' if named else path.name + ': '}{e}") from None
        entry = {"path": str(path), "strength": float(strength), "interval": (float(interval_start), float(interval_end)),
                 "skip_first_steps": int(skip_first_steps), "layer_filter": layer_filter}
        return (list(loras or []) + [entry],)


class SA3LoRAInfo:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"lora": (lora_list(), {"tooltip": "The adapter file to describe."})},
                "optional": {"lora_path": ("STRING", {"forceInput": True, "tooltip": LORA_PATH_TOOLTIP})}}

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("info",)
    FUNCTION = "info"
    CATEGORY = CATEGORY
    OUTPUT_NODE = True
    DESCRIPTION = "Type, rank, alpha, base model, training step, trigger words and adapted layers of a LoRA file."

    def info(self, lora, lora_path=None):
        from ..adapters import read_adapter_file

        path = chosen_lora("SA3 LoRA Info", lora, lora_path)
        info = read_adapter_file(path).info()
        text = "\n".join(f"{k}: {', '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in info.items()
                         if v not in (None, "", []))
        return {"ui": {"text": [text]}, "result": (json.dumps(info, default=str, indent=1),)}


class SA3ExportLoRAForComfyUI:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("SA3_MODEL", {"tooltip": "The model the LoRA is for (its weights are needed for DoRA/BoRA/-xs)."}),
            "lora": (lora_list(), {"tooltip": "The adapter to convert."}),
            "strength": ("FLOAT", {"default": 1.0, "min": -4.0, "max": 4.0, "step": 0.05, "tooltip": "Baked into the exported file (DoRA/BoRA are not linear in strength)."}),
            "filename": ("STRING", {"default": "sa3_lora_comfy", "tooltip": "Saved in models/loras/ as <name>.safetensors"}),
        }, "optional": {"lora_path": ("STRING", {"forceInput": True, "tooltip": LORA_PATH_TOOLTIP})}}

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    FUNCTION = "export"
    CATEGORY = CATEGORY
    OUTPUT_NODE = True
    DESCRIPTION = ("Writes a file ComfyUI's stock LoraLoaderModelOnly applies to its native SA3 model "
                   "(lora_up/lora_down/alpha, dora_scale where the maths match, exact weight differences otherwise).")

    def export(self, model, lora, strength, filename, lora_path=None):
        import folder_paths

        from ..adapters import read_adapter_file
        from ..adapters.comfy_export import export_for_comfyui, is_comfy_export

        src = chosen_lora("SA3 Export LoRA for ComfyUI", lora, lora_path)
        name = Path(filename).name.removesuffix(".safetensors") or "sa3_lora_comfy"
        out = Path(folder_paths.get_folder_paths("loras")[0]) / f"{name}.safetensors"
        converted = out.exists() and out.resolve() == src.resolve()
        if converted or (out.exists() and not is_comfy_export(out)):
            what = "is the LoRA being converted" if converted else "exists and is no earlier export"
            raise ValueError(f"SA3 Export LoRA for ComfyUI: {out} {what}; give another filename (nothing was "
                             "overwritten: only an earlier export of this node is replaced)")
        from ..adapters.apply import model_xs_bases

        with using(model):  # -xs bases as generation on this model takes them (e.g. the base's, on ARC)
            report = export_for_comfyui(out, read_adapter_file(src), model.modules, strength=strength,
                                        xs_bases=model_xs_bases(model))
        return {"ui": {"text": [f"{out}: {report.summary()}"]}, "result": (str(out),)}


NODE_CLASS_MAPPINGS = {"SA3LoadLoRA": SA3LoadLoRA, "SA3LoRAInfo": SA3LoRAInfo,
                       "SA3ExportLoRAForComfyUI": SA3ExportLoRAForComfyUI}
NODE_DISPLAY_NAME_MAPPINGS = {"SA3LoadLoRA": "SA3 Load LoRA", "SA3LoRAInfo": "SA3 LoRA Info",
                              "SA3ExportLoRAForComfyUI": "SA3 Export LoRA for ComfyUI"}
