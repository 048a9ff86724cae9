"""`SA3 Load Pack` and `SA3 Unload Models`: loaded models are cached and shared by every node and training run."""

from __future__ import annotations

import gc
import threading
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..adapters import notices
from ..sa3.packs import PACKS, PackError, find_text_encoder, get_pack, pack_folder
from ..sa3.residency import empty_device_cache, is_out_of_memory
from ..training.trainer import usable_device
from .comfy_bridge import CATEGORY, folder_file_path, folder_files, free_comfy_memory, models_dir, with_notices

_CACHE: dict[tuple, object] = {}
_LOAD_NOTICES: dict[tuple, list[str]] = {}  # what loading each key said (its files say it again at a reload)
_KEYS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its cache key, while the model lives
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
            _KEYS[model] = key
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


@contextmanager
def using(model):
    """`with using(model):` around every computation a node does with an SA3 model. Brings offloaded weights back
    to the device and keeps them there meanwhile (`sa3.residency`). A model that an unload dropped from the cache but
    that ComfyUI still holds as a cached node output is cached again, so runs and nodes keep sharing one copy."""
    with _LOCK:
        key = _KEYS.get(model)
        if key is not None:
            _CACHE.setdefault(key, model)
    retry_after_freeing(model.residency.acquire, model.device, f"SA3: out of memory moving {_describe(model)} back "
                        "to its device; free memory (ComfyUI's 'Unload models') or load it in bf16")
    try:
        yield model
    finally:
        model.residency.release()


def _describe(model) -> str:
    kind = "ARC" if model.is_arc else "base"
    return f"{model.pack or model.source} {kind} on {model.device}"


@dataclass
class UnloadReport:
    unloaded: int = 0  # models dropped from the cache (idle ones)
    offloaded: int = 0  # of those, GPU models whose weights moved to host memory
    kept: list[str] = field(default_factory=list)  # models in use (a training run, a generation): left loaded

    def summary(self) -> str:
        text = f"unloaded {self.unloaded} SA3 model(s)"
        if self.offloaded:
            text += f", {self.offloaded} moved off the GPU"
        if self.kept:
            text += f"; kept {len(self.kept)} in use (a training run or a generation): " + ", ".join(self.kept)
        return text


def unload_idle() -> UnloadReport:
    """Drop every idle model from the cache and offload its weights from the GPU (ComfyUI's "Unload models", SA3
    Unload Models). Models in use stay: freeing them is impossible while a run holds them, and dropping them from
    the cache would only make the next node load a second copy. A dropped CPU model's memory is freed when ComfyUI
    lets go of the node output holding it (its "Free model and node cache", or a changed workflow)."""
    report = UnloadReport()
    with _LOCK:
        for key, model in list(_CACHE.items()):
            if model.residency.users:
                if _describe(model) not in report.kept:
                    report.kept.append(_describe(model))
                continue
            del _CACHE[key]
            report.unloaded += 1
            report.offloaded += model.residency.offload()  # (which returns the device's cached blocks too)
    return report


def offload_idle(device) -> int:
    """Offload idle cached models on `device` to host memory (another model needs the memory); they stay cached and
    come back on their next use. Returns how many moved."""
    device = torch.device(device)
    with _LOCK:
        models = {id(m): m for m in _CACHE.values()}.values()
    return sum(m.residency.offload() for m in models
               if m.device.type == device.type and (device.index is None or m.device.index in (None, device.index)))


class DeviceOutOfMemory(RuntimeError):
    """Still out of device memory after ComfyUI freed what it could (`retry_after_freeing`)."""


def retry_after_freeing(fn, device, advice: str):
    """fn(); when the device runs out of memory, ComfyUI is asked to free that device (its own models, and through
    `install_memory_hooks` idle SA3 models; the caller's model stays if it holds `using`), then fn() runs once more.
    Still out of memory: DeviceOutOfMemory (a RuntimeError) with `advice`."""
    try:
        return fn()
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        first = f"{type(e).__name__}: {str(e).strip()[:300]}"  # a string: the exception's frames hold tensors
    gc.collect()
    free_comfy_memory(1 << 62, device)
    empty_device_cache(torch.device(device))
    try:
        return fn()
    except Exception as e:
        if not is_out_of_memory(e):
            raise
    raise DeviceOutOfMemory(f"{advice} ({first})")


def pack_text_encoder(pack: str, variant: str) -> Path | None:
    """The pack variant's T5Gemma folder in ComfyUI's models/sa3, or None (not there, or no such pack)."""
    root = models_dir()
    try:
        folder = pack_folder(pack, variant, root / "sa3" if root else None)
    except PackError:  # an unknown pack: load names it
        return None
    return None if folder is None else find_text_encoder(folder)  # None folder: the Hugging Face cache


def has_text_encoder(model) -> bool:
    """Whether the model's prompt conditioner has T5Gemma loaded (prompts need it; encoding audio does not)."""
    conditioners = getattr(getattr(model, "conditioner", None), "conditioners", {})  # a stand-in model has none
    prompt = conditioners["prompt"] if "prompt" in conditioners else None
    return prompt is None or bool(getattr(prompt, "has_text_encoder", True))


def no_text_encoder_advice(pack: str, variant: str) -> str:
    """What SA3 Load Pack says of a model without its text encoder, in the node's own terms."""
    where = ("choose text_encoder (t5gemma_b_b_ul2.safetensors in models/text_encoders)" if pack == CUSTOM else
             f"its folder models/sa3/{pack}/{variant}/t5gemma-b-b-ul2 is missing (download_missing fetches it)")
    return (f"no text encoder loaded: {where}. Generating and training need it (encoding audio does not); queue "
            "again once it is there")


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

        try:
            dev = usable_device(device)
        except ValueError as e:
            raise ValueError(f"SA3 Load Pack: {e}") from None
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
        def load_shared():
            with torch.inference_mode(False):  # ComfyUI runs nodes in inference mode; training needs normal tensors
                return get_or_load(key, loader)

        cached = find_loaded(key)
        if cached is not None and not has_text_encoder(cached) and pack != CUSTOM and pack_text_encoder(pack, variant):
            with _LOCK:  # loaded before the pack's text encoder was put in place: load it again, with it
                _CACHE.pop(key, None)
        with notices.collected() as found:  # e.g. a checkpoint whose config had to be guessed
            model = retry_after_freeing(load_shared, dev, f"SA3 Load Pack: out of memory loading {pack} in {dtype} "
                                        f"on {dev}. Try dtype bf16 or fp16, a smaller pack (sa3-small-* instead of "
                                        "sa3-medium), or device cpu")
        if found:
            _LOAD_NOTICES[key] = list(found)
        said = list(found or _LOAD_NOTICES.get(key, []))  # a cached model says them again
        if not has_text_encoder(model):
            said.append(no_text_encoder_advice(pack, variant))
        return with_notices((model,), said)

    @classmethod
    def IS_CHANGED(cls, pack, variant, dtype, device, checkpoint=NO_FILE, text_encoder=NO_FILE,
                   download_missing=False):
        """Whether the pack's text encoder folder is there: ComfyUI runs the node again when it appears (its cache
        would hand out the model loaded without it). A checkpoint file's text encoder is an input already."""
        return "" if pack == CUSTOM else str(pack_text_encoder(pack, variant))


class SA3UnloadModels:
    """Free the SA3 models this pack has cached: GPU weights move to host memory at once (a cached SA3 Load Pack
    output brings them back when next used), and idle models leave the cache. Models in use by a training run stay."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}, "optional": {"trigger": ("*", {"tooltip": "Connect anything to run this after it."})}}

    RETURN_TYPES = ("STRING",)
    FUNCTION = "unload"
    CATEGORY = CATEGORY
    OUTPUT_NODE = True

    def unload(self, trigger=None):
        summary = unload_idle().summary()
        return {"ui": {"text": [summary]}, "result": (summary,)}


NODE_CLASS_MAPPINGS = {"SA3LoadPack": SA3LoadPack, "SA3UnloadModels": SA3UnloadModels}
NODE_DISPLAY_NAME_MAPPINGS = {"SA3LoadPack": "SA3 Load Pack", "SA3UnloadModels": "SA3 Unload Models"}
