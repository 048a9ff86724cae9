"""Blocks of a model kept in host memory and lent to the accelerator one block at a time.

Why: ARC demos during training need a second DiT (the ARC weights) beside the base model being trained. Held on the
GPU, it would make demos need more device memory than training itself. Streamed, the device holds one block of it at
a time; the price is one copy of the DiT over the bus per model evaluation (8 for an ARC demo at CFG 1).

The tensors keep their identity (their `.data` is swapped), so views that share them (adapter sessions,
`adapters.apply`) see the lent copy during the block's forward. Because the swap is the module's state, a streamed
model serves one thread at a time (a training run's demos); the kept host tensors are never computed on.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import chain

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


def place_around_blocks(module: nn.Module, blocks: Iterable[nn.Module], device: str | torch.device) -> None:
    """Move every tensor of `module` outside `blocks` to `device` (the small parts around streamed blocks)."""
    in_blocks = {id(t) for block in blocks for t in chain(block.parameters(), block.buffers())}
    for t in chain(module.parameters(), module.buffers()):
        if id(t) not in in_blocks:
            t.data = t.data.to(device)


def stream_from_host(blocks: Iterable[nn.Module], device: str | torch.device) -> list[RemovableHandle]:
    """Keep each block's parameters and buffers in host memory and copy them to `device` only
    for that block's forward. The blocks must be on the CPU; everything around them belongs on `device`
    (`place_around_blocks`). Returns the hook handles (removing them leaves the blocks on the host)."""
    device = torch.device(device)
    handles = []
    for block in blocks:
        tensors = list(chain(block.parameters(), block.buffers()))
        if any(t.device.type != "cpu" for t in tensors):
            raise ValueError("stream_from_host: the blocks must be in host memory (on the CPU)")
        # Not pinned: torch keeps freed pinned memory cached for reuse, so the host RAM of a model dropped after a
        # round of demos would never be given back; pageable copies are slower but this is demo-time only.
        host = [t.data for t in tensors]

        def lend(module, args, tensors=tensors, host=host):
            with torch.no_grad():
                for t, h in zip(tensors, host):
                    t.data = h.to(device) if h.device != device else h.clone()

        def take_back(module, args, output, tensors=tensors, host=host):
            for t, h in zip(tensors, host):
                t.data = h

        handles.append(block.register_forward_pre_hook(lend))
        handles.append(block.register_forward_hook(take_back, always_call=True))  # also after an exception
    return handles


__all__ = ["place_around_blocks", "stream_from_host"]
