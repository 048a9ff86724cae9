"""The trainer's AdamW: torch's, fused into one kernel per step wherever torch has that kernel for the device.

Why fused: torch's default AdamW on the CPU loops over the parameters in Python, about ten small ops each. A BoRA
adapter on every small-music DiT layer has 760 tensors: 50 ms a step looped, 10 ms fused (2 threads on the bench
machine), the same maths (decoupled weight decay, bias-corrected moments). The state-dict layout is the same too,
but loading one also loads the saving optimiser's kernel choice: `load_adamw_state` keeps this process's, so a state
saved by the looped form (or on a device with other kernels) resumes fused here and the other way round.
"""

from __future__ import annotations

import torch


def fused_devices() -> tuple[str, ...]:
    """Device types torch has a fused AdamW kernel for (its own list where this torch has one)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:  # a private helper: other torch versions may move it
        return ("cpu", "cuda")
    return tuple(_get_fused_kernels_supported_devices())


def adamw(groups: list[dict] | list[torch.Tensor], lr: float, betas: tuple[float, float],
          weight_decay: float = 0.01) -> torch.optim.AdamW:
    """AdamW over `groups` (parameter groups or a list of tensors), fused when every parameter is a floating-point
    tensor on a device with the kernel (the adapters always train in fp32), else torch's default form."""
    tensors = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    fused = bool(tensors) and all(p.is_floating_point() and p.device.type in fused_devices() for p in tensors)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused or None)


def load_adamw_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """optimizer.load_state_dict(state), keeping the kernel choice ("fused", "foreach") this optimiser was built
    with: torch restores the saved groups' settings wholesale."""
    kernels = [{k: g.get(k) for k in ("fused", "foreach")} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, chosen in zip(optimizer.param_groups, kernels):
        group.update(chosen)


__all__ = ["adamw", "fused_devices", "load_adamw_state"]
