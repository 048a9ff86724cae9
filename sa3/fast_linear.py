"""`x·Wᵀ + b` for FROZEN weights through oneDNN on x86 CPUs, in inference and in training.

Why: on the bench machine (2 threads) oneDNN's fp32 matmul beats torch's default sgemm for the DiT's shapes
(bench/adapter_layers.py, "F.linear" vs "frozen": 1.15-1.27x for forward + backward), and the backward of a frozen
Linear needs only the input gradient `g·W`, the same kind of product with Wᵀ (oneDNN reads the transposed view in
place; no copy of W is made). Anything else (a weight that trains, GPU, half precision, other CPUs) takes `F.linear`
and torch's own autograd.
"""

from __future__ import annotations

import platform

import torch
import torch.nn.functional as F
from torch import Tensor

ONEDNN_LINEAR = (getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
                 if torch.backends.mkldnn.is_available() and platform.machine().lower() in ("x86_64", "amd64")
                 else None)


def onednn_applies(x: Tensor, w: Tensor) -> bool:
    """oneDNN computes `x·wᵀ` here: x86 CPU, fp32 input and weight."""
    return (ONEDNN_LINEAR is not None and x.device.type == "cpu" and x.dtype == torch.float32
            and w.dtype == torch.float32)


def rows_times_wt(rows: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
    """rows [N, in] · w [out, in]ᵀ (+ bias) -> [N, out], no autograd; w may be a strided view (e.g. a transpose,
    which makes this `rows · W` for the backward)."""
    if onednn_applies(rows, w):  # oneDNN reads a strided W in place, but the bias only densely
        return ONEDNN_LINEAR(rows.contiguous(), w, None if bias is None else bias.contiguous(), "none", [], "")
    return F.linear(rows, w, bias)


def w_times_rows_t(w: Tensor, rows: Tensor) -> Tensor:
    """w [out, in] · rows [r, in]ᵀ -> [out, r] for a few rows (W·Aᵀ and the like), no autograd. oneDNN with W as the
    source and the r rows as its weight: 1.2-1.5x as fast as torch.mm(w, rowsᵀ) at r = 16 over the DiT's layers on
    the bench machine (bench/step_products.py, "W src")."""
    if onednn_applies(w, rows) and w.is_contiguous():
        return ONEDNN_LINEAR(w, rows.contiguous(), None, "none", [], "")
    return torch.mm(w, rows.T)


class _FrozenLinear(torch.autograd.Function):
    """y = x·wᵀ + b with gradient for x only: dL/dx = g·w, another oneDNN product (with the view wᵀ)."""

    @staticmethod
    def forward(ctx, x2: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(w)
        return rows_times_wt(x2, w, bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (w,) = ctx.saved_tensors
        return rows_times_wt(grad, w.t()), None, None


def frozen_linear(x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
    """x [..., in] · w [out, in]ᵀ + bias [out] -> [..., out]; w and bias get no gradient (x may)."""
    trains = w.requires_grad or (bias is not None and bias.requires_grad)
    if trains or not onednn_applies(x, w) or (bias is not None and bias.dtype != torch.float32):
        return F.linear(x, w, bias)
    x2 = x.reshape(-1, x.shape[-1])
    if torch.is_grad_enabled() and x.requires_grad:
        out = _FrozenLinear.apply(x2, w, bias)
    else:
        out = rows_times_wt(x2, w, bias)
    return out.view(*x.shape[:-1], w.shape[0])


__all__ = ["ONEDNN_LINEAR", "frozen_linear", "onednn_applies", "rows_times_wt"]
