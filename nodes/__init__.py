"""ComfyUI nodes (classic NODE_CLASS_MAPPINGS API). Each node module contributes its classes here.

Nothing in this package imports ComfyUI at import time; node methods import `comfy.*`, `folder_paths` or `server`
lazily where needed, so the pack's tests run without ComfyUI.
"""

from . import generate_nodes, model_nodes

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
for _module in (model_nodes, generate_nodes):
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)
