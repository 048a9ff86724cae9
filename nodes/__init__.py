"""ComfyUI nodes (classic NODE_CLASS_MAPPINGS API). Each node module contributes its classes here.

Nothing in this package imports ComfyUI at import time; node methods import `comfy.*`, `folder_paths` or `server`
lazily where needed, so the pack's tests run without ComfyUI.
"""

from . import dataset_nodes, generate_nodes, lora_nodes, model_nodes, training_nodes

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
for _module in (model_nodes, generate_nodes, lora_nodes, dataset_nodes, training_nodes):
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)


def _register_routes() -> None:
    """Inside ComfyUI (PromptServer exists): mount the /sa3 routes, mark runs that were training as interrupted, and
    let ComfyUI's unload/free-memory calls free SA3 models too."""
    try:
        from server import PromptServer
    except ImportError:
        return
    if getattr(PromptServer, "instance", None) is None:
        return
    from .comfy_bridge import install_memory_hooks
    from .routes import register_routes

    register_routes(training_nodes.get_manager)
    install_memory_hooks(model_nodes.unload_idle, model_nodes.offload_idle)
    try:  # now, not at the first request: runs a restart cut off show as interrupted (and SA3_AUTO_RESUME=1 resumes
        training_nodes.get_manager()  # them) on a server that no page or API call has touched yet
    except Exception as e:  # e.g. a bad SA3_RUNS_PER_DEVICE: said, and the nodes still load (the routes say it again)
        from .comfy_bridge import say

        say(f"training runs not started: {e}")


_register_routes()
