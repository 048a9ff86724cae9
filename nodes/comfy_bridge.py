"""The only place that talks to ComfyUI's own modules, always lazily: progress bars, interrupts, folders, events.

Outside ComfyUI (CLI, tests without stand-ins) every function degrades to a no-op or a plain default.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

CATEGORY = "audio/SA3 LoRA Studio"


def progress_callback(total: int, node_id: str | None = None):
    """A sampler callback that advances ComfyUI's progress bar one step per call. ComfyUI's progress hook raises
    `InterruptProcessingException` when the user pressed cancel, which ends sampling cleanly between steps."""
    try:
        import comfy.utils
    except ImportError:
        return None
    bar = comfy.utils.ProgressBar(total, node_id=node_id) if node_id else comfy.utils.ProgressBar(total)

    def callback(info: dict) -> None:
        bar.update(1)

    return callback


def fractional_progress(total: int, min_interval: float = 0.1, clock: Callable[[], float] = time.monotonic):
    """position(done) -> None: ComfyUI's progress bar at `done` of `total` (a float: a long file part-way), or None
    outside ComfyUI. Part-way positions go out at most every `min_interval` seconds (a small model's encoder makes
    some 160 chunks a second: one websocket message each would flood the page); whole ones always. Like every
    progress update, a sent one raises ComfyUI's interrupt when the user pressed cancel."""
    try:
        import comfy.utils
    except ImportError:
        return None
    steps = 1000  # per unit: the bar moves in thousandths of a file
    bar = comfy.utils.ProgressBar(max(total, 1) * steps)
    last_sent = [float("-inf")]

    def position(done: float) -> None:
        now = clock()
        if done != int(done) and now - last_sent[0] < min_interval:
            return
        last_sent[0] = now
        bar.update_absolute(round(done * steps))

    return position


def say(message: str) -> None:
    """A line for ComfyUI's console and its log (logging, as ComfyUI's own lines go: written and flushed at once,
    also when the server's output goes to a file, where a print() stayed in Python's buffer)."""
    logging.getLogger("sa3_lora_studio").warning(f"SA3 LoRA Studio: {message}")


def with_notices(result: tuple, found: list[str]) -> dict:
    """A node's return value with the engine's notices of this call (`adapters.notices.collected`): printed to the
    console and shown on the node every time, not once per process as Python's warnings are. No notices still sends
    an empty text, which takes an earlier run's warning off the node. A message said twice (a retry after freeing
    memory) is shown once."""
    found = list(dict.fromkeys(found))
    for message in found:
        say(f"warning: {message}")
    return {"ui": {"text": [f"warning: {message}" for message in found]}, "result": result}


def throw_if_interrupted() -> None:
    try:
        import comfy.model_management as mm
    except ImportError:
        return
    mm.throw_exception_if_processing_interrupted()


def folder_files(kind: str) -> list[str]:
    """Files ComfyUI knows in one of its model folders ("checkpoints", "text_encoders", "loras")."""
    try:
        import folder_paths
    except ImportError:
        return []
    try:
        return list(folder_paths.get_filename_list(kind))
    except Exception:
        return []


def folder_file_path(kind: str, name: str) -> Path:
    import folder_paths

    return Path(folder_paths.get_full_path_or_raise(kind, name))


def models_dir() -> Path | None:
    try:
        import folder_paths
    except ImportError:
        return None
    return Path(folder_paths.models_dir)


def input_dir() -> Path | None:
    """ComfyUI's input folder (its --input-directory), or None outside ComfyUI."""
    try:
        import folder_paths
    except ImportError:
        return None
    getter = getattr(folder_paths, "get_input_directory", None)
    return Path(getter()) if getter else None


def output_dir() -> Path | None:
    try:
        import folder_paths
    except ImportError:
        return None
    return Path(folder_paths.get_output_directory())


def free_comfy_memory(bytes_needed: int, device) -> None:
    """Ask ComfyUI to unload its own cached models so ours fit (no-op outside ComfyUI)."""
    try:
        import comfy.model_management as mm
    except ImportError:
        return
    try:
        mm.free_memory(bytes_needed, device)
    except Exception:
        pass


def install_memory_hooks(unload_idle, offload_idle, mm=None) -> bool:
    """Make ComfyUI's memory management free SA3 models too (our models are not ComfyUI ModelPatchers, so it does
    not see them): after its `unload_all_models` (the "Unload models" and "Free model and node cache" buttons)
    `unload_idle()` runs; after its `free_memory(memory_required, device)` (another model is about to load) still
    leaves too little free, `offload_idle(device)` moves idle SA3 models to host memory. Wrapped once; a failure in
    ours is printed, never raised into ComfyUI. mm: the `comfy.model_management` module (tests pass a stand-in)."""
    import functools
    import traceback

    if mm is None:
        try:
            import comfy.model_management as mm
        except ImportError:
            return False
    if getattr(mm, "_sa3_memory_hooks", False):
        return True

    def quietly(fn, *args):
        try:
            fn(*args)
        except Exception:
            say("freeing SA3 models for ComfyUI failed:\n" + traceback.format_exc())

    original_unload, original_free = getattr(mm, "unload_all_models", None), getattr(mm, "free_memory", None)
    if original_unload is None and original_free is None:
        say("this ComfyUI has no comfy.model_management.unload_all_models / free_memory; its 'Unload models' will "
            "not free SA3 models (use SA3 Unload Models)")
        return False
    if original_unload is not None:
        @functools.wraps(original_unload)
        def unload_all_models(*args, **kwargs):
            result = original_unload(*args, **kwargs)
            quietly(unload_idle)
            return result

        mm.unload_all_models = unload_all_models
    if original_free is not None:
        def offload_if_short(memory_required, device) -> None:
            import torch

            if torch.device(device).type != "cpu" and mm.get_free_memory(device) < memory_required:
                offload_idle(device)

        @functools.wraps(original_free)
        def free_memory(memory_required, device, *args, **kwargs):
            result = original_free(memory_required, device, *args, **kwargs)
            quietly(offload_if_short, memory_required, device)
            return result

        mm.free_memory = free_memory
    mm._sa3_memory_hooks = True
    return True


def send_event(event: str, payload: dict) -> None:
    """Websocket event to the browser (safe from background threads: ComfyUI posts it to its loop)."""
    try:
        from server import PromptServer
    except ImportError:
        return
    instance = getattr(PromptServer, "instance", None)
    if instance is not None:
        instance.send_sync(f"sa3.{event}", payload)
