"""SA3 LoRA Studio: fine-tune Stable Audio 3 with LoRA-family adapters and use them, in ComfyUI or from Python.

As a ComfyUI custom node pack this module exports `NODE_CLASS_MAPPINGS`, `NODE_DISPLAY_NAME_MAPPINGS` and
`WEB_DIRECTORY`. As a library (`pip install -e .` makes it importable as `sa3_lora_studio`):

    from sa3_lora_studio import load_model
    model = load_model("path/to/stable-audio-3-small-music-base")  # or a pack name, or a ComfyUI checkpoint
"""

WEB_DIRECTORY = "./web"
__version__ = "0.1.0"


def __getattr__(name):
    # Nodes and engine are imported on first use (ComfyUI asks for the mappings when it loads the pack), so that
    # `sa3-lora --help` and other commands that need no torch start at once.
    if name in ("NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"):
        from . import nodes

        return getattr(nodes, name)
    if name in ("load_model", "load_autoencoder", "SA3Model"):
        from .sa3 import model as _model

        return getattr(_model, name)
    raise AttributeError(name)


__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY", "load_model", "load_autoencoder"]
