"""The only place that talks to ComfyUI's own modules, always lazily: progress bars, interrupts, folders, events.

Outside ComfyUI (CLI, tests without stand-ins) every function degrades to a no-op or a plain default.
"""

from __future__ import annotations

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


def send_event(event: str, payload: dict) -> None:
    """Websocket event to the browser (safe from background threads: ComfyUI posts it to its loop)."""
    try:
        from server import PromptServer
    except ImportError:
        return
    instance = getattr(PromptServer, "instance", None)
    if instance is not None:
        instance.send_sync(f"sa3.{event}", payload)
