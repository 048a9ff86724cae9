"""`SA3 Load Pack` and `SA3 Unload Models`: loaded models are cached and shared by every node and training run."""

from __future__ import annotations

import threading

import torch

from ..sa3.packs import PACKS, get_pack
from ..training.trainer import pick_device
from .comfy_bridge import CATEGORY, folder_file_path, folder_files, free_comfy_memory, models_dir

_CACHE: dict[tuple, object] = {}
_LOCK = threading.Lock()
CUSTOM = "(ComfyUI checkpoint file)"
NO_FILE = "(none)"  # not "": some ComfyUI builds (the pip-installable fork) refuse an empty combo value


def get_or_load(key: tuple, loader):
    """One loaded model per (source, variant, dtype, device): nodes and runs share it instead of loading twice."""
    with _LOCK:
        model = _CACHE.get(key)
        if model is None:
            model = loader()
            _CACHE[key] = model
        return model


def find_loaded(key: tuple):
    """The model cached under `key`, or None (nothing is loaded)."""
    with _LOCK:
        return _CACHE.get(key)


def register_model(key: tuple, model) -> None:
    """Make an already loaded model findable under another key (a run's model spec)."""
    with _LOCK:
        _CACHE.setdefault(key, model)


def loaded_models() -> list[tuple]:
    with _LOCK:
        return list(_CACHE)


def unload_all() -> int:
    with _LOCK:
        n = len(_CACHE)
        _CACHE.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        torch.mps.empty_cache()
    return n


def _out_of_memory_message(e: Exception, dtype: str, pack: str) -> str:
    return (f"SA3 Load Pack: out of memory loading {pack} in {dtype} ({e}). Try dtype bf16 or fp16, a smaller pack "
            "(sa3-small-* instead of sa3-medium), device cpu, or unload other models (SA3 Unload Models / ComfyUI's "
            "'Unload models').")


class SA3LoadPack:
    """Load an SA3 pack (base or ARC) from ComfyUI's models/sa3 folder, or a ComfyUI checkpoint + text encoder."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "pack": (list(PACKS) + [CUSTOM], {
                    "default": "sa3-small-music",
                    "tooltip": "Which Stable Audio 3 pack. Files live in models/sa3/<pack>/<variant>/."}),
                "variant": (["base", "arc"], {
                    "default": "arc",
                    "tooltip": "base: Euler, ~50 steps, CFG 7; adapters are trained on it. "
                               "arc: post-trained, 8-step ping-pong, CFG 1."}),
                "dtype": (["fp32", "bf16", "fp16"], {"default": "bf16", "tooltip": "Weights precision. fp16 keeps the "
                                                     "SAME autoencoder in fp32 (it breaks in fp16)."}),
                "device": (["auto", "cpu", "cuda", "mps"], {"default": "auto", "tooltip": "auto: CUDA, else Apple MPS, else CPU."}),
            },
            "optional": {
                "checkpoint": ([NO_FILE] + folder_files("checkpoints"), {"default": NO_FILE, "tooltip": "Only for "
                               f"'{CUSTOM}': a single-file SA3 checkpoint from models/checkpoints."}),
                "text_encoder": ([NO_FILE] + folder_files("text_encoders"), {"default": NO_FILE, "tooltip": "Only for "
                                 f"'{CUSTOM}': t5gemma_b_b_ul2.safetensors from models/text_encoders."}),
                "download_missing": ("BOOLEAN", {"default": False, "tooltip": "Download a missing pack from the "
                                     "Hugging Face Hub (accept its licence on the model page and log in first)."}),
            },
        }

    RETURN_TYPES = ("SA3_MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads a Stable Audio 3 model for SA3 LoRA Studio nodes; loaded models are cached and shared."

    def load(self, pack, variant, dtype, device, checkpoint=NO_FILE, text_encoder=NO_FILE, download_missing=False):
        from ..sa3.model import load_model

        dev = pick_device(device)
        checkpoint, text_encoder = ("" if name in (NO_FILE, ".") else name for name in (checkpoint, text_encoder))
        if pack == CUSTOM:
            if not checkpoint:
                raise ValueError(f"SA3 Load Pack: choose a checkpoint file for '{CUSTOM}'")
            ckpt = folder_file_path("checkpoints", checkpoint)
            te = folder_file_path("text_encoders", text_encoder) if text_encoder else None
            key = (str(ckpt), str(te), dtype, str(dev))

            def loader():
                return load_model(ckpt, dtype=dtype, device=dev, text_encoder=te)
        else:
            get_pack(pack)
            root = models_dir()
            key = (pack, variant, dtype, str(dev))

            def loader():
                return load_model(pack, dtype=dtype, device=dev, variant=variant,
                                  models_dir=root / "sa3" if root else None, download=download_missing)
        try:
            with torch.inference_mode(False):  # ComfyUI runs nodes in inference mode; training needs normal tensors
                return (get_or_load(key, loader),)
        except torch.cuda.OutOfMemoryError as e:
            free_comfy_memory(1 << 62, dev)
            try:
                with torch.inference_mode(False):
                    return (get_or_load(key, loader),)
            except torch.cuda.OutOfMemoryError:
                raise RuntimeError(_out_of_memory_message(e, dtype, pack)) from None


class SA3UnloadModels:
    """Free every SA3 model this pack has cached (the next node that needs one loads it again)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}, "optional": {"trigger": ("*", {"tooltip": "Connect anything to run this after it."})}}

    RETURN_TYPES = ("STRING",)
    FUNCTION = "unload"
    CATEGORY = CATEGORY
    OUTPUT_NODE = True

    def unload(self, trigger=None):
        return (f"unloaded {unload_all()} SA3 model(s)",)


NODE_CLASS_MAPPINGS = {"SA3LoadPack": SA3LoadPack, "SA3UnloadModels": SA3UnloadModels}
NODE_DISPLAY_NAME_MAPPINGS = {"SA3LoadPack": "SA3 Load Pack", "SA3UnloadModels": "SA3 Unload Models"}
