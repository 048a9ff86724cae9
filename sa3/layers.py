"""Small building blocks shared by the DiT, the SAME autoencoder and the conditioners.

Parameter and buffer names follow the official checkpoints (`inv_freq`, `gamma`, `alpha`, `beta`), so loading is a
plain key match.
"""

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


def normal_like(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Standard-normal noise like x (its shape, dtype, device and memory layout: `randn_like`'s draws), drawn where
    the generator lives and moved to x: the samplers seed a CPU generator, which cannot draw on CUDA or MPS, and a
    seed then gives the same noise on every device."""
    if generator is None or generator.device == x.device:
        return torch.empty_like(x).normal_(generator=generator)
    return torch.empty_like(x, device=generator.device).normal_(generator=generator).to(x.device)


class RotaryEmbedding(nn.Module):
    """Rotary position frequencies. Holds the checkpoint buffer `inv_freq` [dim // 2].

    `dim` is the number of rotated head dims (32 of 64 in SA3: partial RoPE)."""

    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        self.dim, self.base = dim, base
        self.register_buffer("inv_freq", self.compute_inv_freq())

    def compute_inv_freq(self, device=None) -> Tensor:
        """The official frequencies; used when a checkpoint omits the buffer (some re-saved files do)."""
        return 1.0 / (self.base ** (torch.arange(0, self.dim, 2, device=device).float() / self.dim))

    def forward(self, positions: Tensor) -> Tensor:
        """positions: [N] (any dtype) -> angles [N, dim] in fp32, each frequency repeated for both halves."""
        freqs = torch.outer(positions.float(), self.inv_freq.float())
        return torch.cat((freqs, freqs), dim=-1)

    def angles_for_length(self, n: int, device=None) -> Tensor:
        return self(torch.arange(n, device=device or self.inv_freq.device))


def rotate_half(x: Tensor) -> Tensor:
    """NeoX layout: [x1, x2] -> [-x2, x1] over the last dim."""
    x1, x2 = rearrange(x, "... (j d) -> j ... d", j=2)
    return torch.cat((-x2, x1), dim=-1)


def apply_partial_rotary(x: Tensor, angles: Tensor) -> Tensor:
    """Rotate the first angles.shape[-1] dims of x [..., N, D] by angles [N, R] (R <= D); the rest pass through.

    Computed in fp32 and cast back, as the reference does, because low-precision RoPE drifts at long positions."""
    rot_dim = angles.shape[-1]
    angles = angles[-x.shape[-2]:]
    dtype = torch.promote_types(x.dtype, torch.float32)
    rotated, passthrough = x[..., :rot_dim].to(dtype), x[..., rot_dim:]
    rotated = rotated * angles.cos() + rotate_half(rotated) * angles.sin()
    return torch.cat((rotated.to(x.dtype), passthrough), dim=-1)


class RMSNorm(nn.Module):
    """RMS norm with a learned gain `gamma` [dim] (no bias). eps 1e-5 in DiT blocks, 1e-6 for per-head q/k norms."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.gamma.to(x.dtype), self.eps)


class DynamicTanh(nn.Module):
    """DyT norm used by SAME: gamma * tanh(alpha * x) + beta, with a scalar `alpha` [1]."""

    def __init__(self, dim: int, init_alpha: float = 4.0):
        super().__init__()
        self.alpha = nn.Parameter(torch.full((1,), init_alpha))
        self.gamma = nn.Parameter(torch.ones(dim))
        self.beta = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.gamma * torch.tanh(self.alpha * x) + self.beta


def expo_fourier_features(t: Tensor, dim: int, min_freq: float = 0.5, max_freq: float = 10000.0) -> Tensor:
    """Timestep / seconds features. t: [B] (or [B, 1]) -> [B, dim] = [cos(2πtf), sin(2πtf)] in fp32,
    f log-spaced from min_freq to max_freq over dim // 2 frequencies."""
    t = t.float().reshape(-1, 1)
    ramp = torch.linspace(0, 1, dim // 2, device=t.device, dtype=torch.float32)
    freqs = torch.exp(ramp * (math.log(max_freq) - math.log(min_freq)) + math.log(min_freq))
    args = t * freqs * 2 * math.pi
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ExpoFourierFeatures(nn.Module):
    """Module form of `expo_fourier_features` (no parameters, nothing in the checkpoint)."""

    def __init__(self, dim: int, min_freq: float = 0.5, max_freq: float = 10000.0):
        super().__init__()
        self.dim, self.min_freq, self.max_freq = dim, min_freq, max_freq

    def forward(self, t: Tensor) -> Tensor:
        return expo_fourier_features(t, self.dim, self.min_freq, self.max_freq)
