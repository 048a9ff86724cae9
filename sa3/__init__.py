"""The SA3 engine: a pure-PyTorch Stable Audio 3 that loads the official checkpoints. No ComfyUI imports here."""
