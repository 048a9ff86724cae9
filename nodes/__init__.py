"""ComfyUI nodes (classic NODE_CLASS_MAPPINGS API). Each node module contributes its classes here.

Nothing in this package imports ComfyUI at import time; node methods import `comfy.*`, `folder_paths` or `server`
lazily where needed, so the pack's tests run without ComfyUI.
"""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
