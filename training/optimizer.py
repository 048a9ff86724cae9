"""The trainer's AdamW: torch's, fused into one kernel per step wherever torch has that kernel for the device.

Why fused: torch's default AdamW on the CPU loops over the parameters in Python, about ten small ops each. A BoRA
adapter on every small-music DiT layer has 768 tensors: 61 ms a step looped, 13 ms fused (2 threads on the bench
machine; `bench/optimizer_step.py` prints every type), with the same maths (decoupled weight decay, bias-corrected
moments) and the same saved moments. The kernel choice is saved with them, and `load_adamw_state` replaces it with
this process's, so a state saved by the looped form (or on a device with other kernels) resumes fused here and the
other way round.
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
    """AdamW over `groups` (parameter groups or a list of tensors), fused when every parameter is a dense
    floating-point tensor on a device with the kernel (the adapters always train in fp32), else torch's default
    form."""
    groups = list(groups)
    tensors = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    devices = fused_devices()
    # the fused CPU kernel updates wrongly when a gradient's strides differ from its parameter's: dense ones only
    fused = bool(tensors) and all(p.is_floating_point() and p.is_contiguous() and p.device.type in devices
                                  for p in tensors)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused or None)


def load_adamw_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """optimizer.load_state_dict(state), keeping the kernel choice ("fused", "foreach") this optimiser was built
    with: torch restores the saved groups' settings wholesale, and places each step count by them (a fused kernel
    needs it as fp32 on the parameter's device, a looped one keeps it on the CPU), so the choice goes into the
    saved groups before loading."""
    kernels = [{k: g.get(k) for k in ("fused", "foreach")} for g in optimizer.param_groups]
    groups = [{**saved, **chosen} for saved, chosen in zip(state["param_groups"], kernels)]
    optimizer.load_state_dict({**state, "param_groups": groups})


__all__ = ["adamw", "fused_devices", "load_adamw_state"]
