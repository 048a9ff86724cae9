"""Where a loaded model's weights live between uses, and who is using them.

A model on a GPU (CUDA or Apple MPS) can be offloaded to host memory when its memory is wanted back (ComfyUI's
"Unload models", another model that needs the VRAM, SA3 Unload Models), and comes back to its device the next time
something uses it: the same object stays valid, as ComfyUI's own models do, so a node output ComfyUI has cached keeps
working. A model in use (a generation in progress, a training run from setup to its end) is never offloaded.
A CPU model has nothing to offload: its memory is freed when the last reference to it goes.
"""

from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager

import torch


def empty_device_cache(device: torch.device) -> None:
    """Return the allocator's unused cached blocks of `device` to the driver (CUDA, MPS)."""
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()
    elif device.type == "mps" and getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        torch.mps.empty_cache()


def is_out_of_memory(error: BaseException) -> bool:
    """A device allocation failure: CUDA's OutOfMemoryError, or MPS's RuntimeError "MPS backend out of memory"."""
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    return isinstance(error, oom) or (isinstance(error, RuntimeError) and "out of memory" in str(error).lower())


class Residency:
    """The users count and the offloaded state of one SA3Model. Thread-safe: a training thread, ComfyUI's prompt
    worker and the server's route handlers may all ask at once."""

    def __init__(self, model):
        self._model_ref = weakref.ref(model)  # no model <-> residency cycle: a dropped model is freed at once
        self._lock = threading.RLock()
        self.users = 0
        self.offloaded = False

    @property
    def _model(self):
        return self._model_ref()

    def __getstate__(self) -> dict:  # a copied model (copy.deepcopy) starts with no users and its own lock
        return {"_model": self._model, "offloaded": self.offloaded}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["_model"])
        self.offloaded = state["offloaded"]

    @property
    def can_offload(self) -> bool:
        """A GPU model whose weights all live on its device and are its own: a model lending its DiT blocks from
        host memory per forward (`sa3.sibling`) is already as small on the device as it gets, and a sibling's
        shared parts (autoencoder, text encoder) belong to the model it was loaded beside."""
        m = self._model
        return m.device.type != "cpu" and not m.streams_dit and not m.shared_parts

    def acquire(self) -> None:
        """One more user; the weights are back on the device when this returns."""
        with self._lock:
            if self.offloaded:
                self._model.modules.to(self._model.device)
                self.offloaded = False
            self.users += 1

    def release(self) -> None:
        with self._lock:
            if self.users <= 0:
                raise RuntimeError(f"{self._model!r}: released more often than acquired")
            self.users -= 1

    @contextmanager
    def in_use(self):
        """`with model.residency.in_use():` the weights stay on the device for the block."""
        self.acquire()
        try:
            yield self._model
        finally:
            self.release()

    def offload(self) -> bool:
        """Move the weights (and the text encoder) to host memory unless the model is in use or on the CPU;
        True if this freed device memory."""
        with self._lock:
            if self.users or self.offloaded or not self.can_offload:
                return False
            self._model.modules.to("cpu")
            self._model.offload_text_encoder()
            self.offloaded = True
        empty_device_cache(self._model.device)
        return True


__all__ = ["Residency", "empty_device_cache", "is_out_of_memory"]
