"""Adapter maths: the nine SA3 adapter types as a delta (low-rank or -xs) times a renorm (none/rows/cols/both).

Every function takes and returns tensors. Weights are viewed as 2-D `[out, in]` (a Conv1d weight `[out, in, k]` as
`[out, in·k]`); results are viewed back to the weight's shape. The op order of `effective_weight` follows the
official `LoRAParametrization` forwards exactly, so our merged weights are bit-identical to the reference's.

The factored forms at the bottom (`factored_linear`, `row_col_scales`) give the same layer output without forming
`W + s·ΔW` at every forward: the low-rank path is `x·Aᵀ·Bᵀ`, and the DoRA/BoRA norms come from ‖W‖², `W·Aᵀ` and
`B(AAᵀ)Bᵀ`. Training uses them; the merged inference path uses `effective_weight`.
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..sa3.fast_linear import frozen_linear
from .fused import EPS, bora_linear, dora_cols_linear, dora_rows_linear, fused_applies, squares_product
from .xs_bases import svd_bases

# file-format type string -> (delta form, renorm axes). "dora" is a legacy alias resolved by `resolve_adapter_type`.
ADAPTER_TYPES = {
    "lora": ("lowrank", "none"),
    "dora-rows": ("lowrank", "rows"),
    "dora-cols": ("lowrank", "cols"),
    "bora": ("lowrank", "both"),
    "lora-xs": ("xs", "none"),
    "dora-rows-xs": ("xs", "rows"),
    "dora-cols-xs": ("xs", "cols"),
    "bora-xs": ("xs", "both"),
}
_DELTA_TENSORS = {"lowrank": ("lora_A", "lora_B"), "xs": ("M_xs",)}
_RENORM_TENSORS = {"none": (), "rows": ("magnitude",), "cols": ("magnitude",), "both": ("magnitude_r", "magnitude_c")}
TRAINABLE_NAMES = ("lora_A", "lora_B", "M_xs", "magnitude", "magnitude_r", "magnitude_c")


def unknown_adapter_type(adapter_type) -> str:
    """What to say of a type string that is not one of ADAPTER_TYPES: the types, and the closest one."""
    from difflib import get_close_matches

    close = get_close_matches(str(adapter_type).lower().replace("_", "-"), sorted(ADAPTER_TYPES) + ["dora"], n=1,
                              cutoff=0.6)
    return (f"{adapter_type!r} is unknown" + (f" (did you mean {close[0]!r}?)" if close else "")
            + f"; use one of {sorted(ADAPTER_TYPES)} (or the legacy alias 'dora')")


def check_adapter_type(adapter_type: str) -> tuple[str, str]:
    """The (delta form, renorm) pair of a resolved type string; a clear error otherwise."""
    if adapter_type not in ADAPTER_TYPES:
        raise ValueError(f"adapter_type={unknown_adapter_type(adapter_type)}")
    return ADAPTER_TYPES[adapter_type]


def tensor_names(adapter_type: str) -> tuple[str, ...]:
    """Names of the stored (trainable) tensors of one adapted layer, in the reference's registration order."""
    delta, renorm = check_adapter_type(adapter_type)
    return _DELTA_TENSORS[delta] + _RENORM_TENSORS[renorm]


def _dora_axis_from_shapes(tensors: dict[str, Tensor]) -> str | None:
    """"dora-rows" or "dora-cols" from a layer whose magnitude length matches only its fan-out (lora_B [out, r]) or
    only its fan-in (lora_A [r, in]); None when no layer tells (square layers, -xs files)."""
    layers: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        layer, name = key.rsplit(".", 1)
        layers.setdefault(layer, {})[name] = value
    for t in layers.values():
        if {"magnitude", "lora_A", "lora_B"} <= t.keys():
            n, fan_in, fan_out = t["magnitude"].numel(), t["lora_A"][0].numel(), t["lora_B"].shape[0]
            if fan_in != fan_out and n in (fan_in, fan_out):
                return "dora-rows" if n == fan_out else "dora-cols"
    return None


def resolve_adapter_type(adapter_type: str | None, tensors: dict[str, Tensor] | None = None) -> str:
    """The one home of type resolution. The legacy alias "dora" becomes "dora-cols" when the first `.magnitude`
    tensor is stored as [1, fan_in], "dora-rows" when [fan_out, 1] or 1-D (the reference cannot tell a 1-D axis
    without the model and defaults to rows, the paper's variant). A missing type is read from the tensor names
    (the reference would take "lora" and drop the magnitudes of a DoRA/BoRA file, or refuse an -xs one): M_xs
    makes an -xs type, magnitude_r/magnitude_c BoRA, magnitude DoRA (rows or cols as for "dora"), else "lora"."""
    if adapter_type is None or adapter_type == "":
        names = {key.rsplit(".", 1)[-1] for key in (tensors or {})}
        renorm = "bora" if "magnitude_r" in names else "dora" if "magnitude" in names else "lora"
        if renorm == "dora":
            renorm = _dora_axis_from_shapes(tensors) or resolve_adapter_type("dora", tensors)
        return renorm + "-xs" if "M_xs" in names else renorm
    if adapter_type != "dora":
        check_adapter_type(adapter_type)
        return adapter_type
    for key, value in (tensors or {}).items():
        if key.endswith(".magnitude"):
            if value.dim() == 2 and value.shape[0] == 1:
                return "dora-cols"
            break  # only the first magnitude decides, as the reference does
    return "dora-rows"


# ---------------------------------------------------------------------------------------------------- scale, deltas

def adapter_scale(alpha: float, rank: int, strength: float) -> Tensor:
    """alpha / rank · strength as the reference computes it: a Python float times a 0-dim fp32 strength buffer."""
    return (alpha / rank) * torch.tensor(float(strength), dtype=torch.float32)


def lowrank_delta(a: Tensor, b: Tensor) -> Tensor:
    """a: [r, in], b: [out, r] -> [out, in] (unscaled)."""
    return b @ a


def xs_delta(u: Tensor, m: Tensor, v: Tensor) -> Tensor:
    """LoRA-XS: frozen bases u [out, r], v [in, r] around a trainable core m [r, r] -> [out, in] (unscaled)."""
    return u @ m.to(u.dtype) @ v.T


# ---------------------------------------------------------------------------------------------------- renorms

def _norm(v: Tensor, dim: int, detach: bool) -> Tensor:
    """‖v‖ along dim (kept), a constant for autograd when detach (`factored_linear`'s detach_norm)."""
    n = v.norm(dim=dim, keepdim=True)
    return n.detach() if detach else n


def renorm_rows(v: Tensor, magnitude: Tensor, detach_norm: bool = False) -> Tensor:
    """Give each output row of v [out, in] the length magnitude[out]."""
    return v / (_norm(v, 1, detach_norm) + EPS) * magnitude.unsqueeze(1)  # reference op order: bit parity


def renorm_cols(v: Tensor, magnitude: Tensor, detach_norm: bool = False) -> Tensor:
    """Give each input column of v [out, in] the length magnitude[in]."""
    return v / (_norm(v, 0, detach_norm) + EPS) * magnitude.unsqueeze(0)


def renorm_both(v: Tensor, magnitude_r: Tensor, magnitude_c: Tensor, detach_norm: bool = False) -> Tensor:
    """BoRA: rows to magnitude_r, then columns to magnitude_c."""
    rows = magnitude_r.unsqueeze(1) * (v / (_norm(v, 1, detach_norm) + EPS))
    return rows / (_norm(rows, 0, detach_norm) + EPS) * magnitude_c.unsqueeze(0)


def delta_of(adapter_type: str, t: dict[str, Tensor]) -> Tensor:
    """The unscaled [out, in] update of one layer; t holds the stored tensors (+ U, V for -xs)."""
    delta, _ = check_adapter_type(adapter_type)
    if delta == "lowrank":
        return lowrank_delta(t["lora_A"], t["lora_B"])
    return xs_delta(t["U"], t["M_xs"], t["V"])


def effective_weight(w: Tensor, adapter_type: str, t: dict[str, Tensor], scale: Tensor | float,
                     detach_norm: bool = False) -> Tensor:
    """One adapter applied to a weight w (Linear [out, in] or Conv1d [out, in, k]) -> a tensor of w's shape and dtype.

    scale = alpha / rank · strength (`adapter_scale`). DoRA/BoRA renormalise at every scale != 0 and return w itself
    at scale 0, as the reference does; plain LoRA/-xs multiply by 0. detach_norm: the norms are constants for
    autograd (training option, fused.py's docstring); the value is the same."""
    _, renorm = check_adapter_type(adapter_type)
    delta = delta_of(adapter_type, t)
    if renorm == "none":
        return w + (scale * delta.view(w.shape)).to(w.dtype)
    if float(scale) == 0.0:
        return w
    work_dtype = t["lora_A"].dtype if "lora_A" in t else t["U"].dtype  # norms in the adapter's (fp32) dtype
    v = w.reshape(w.shape[0], -1).to(work_dtype) + scale * delta
    if renorm == "rows":
        out = renorm_rows(v, t["magnitude"], detach_norm)
    elif renorm == "cols":
        out = renorm_cols(v, t["magnitude"], detach_norm)
    else:
        out = renorm_both(v, t["magnitude_r"], t["magnitude_c"], detach_norm)
    return out.view(w.shape).to(w.dtype)


def chain_weight(w: Tensor, steps: list[tuple[str, dict[str, Tensor], Tensor | float]]) -> Tensor:
    """Stacked adapters in order, the reference's chain semantics: W -> P0(W) -> P1(P0(W)) -> ...
    steps: (adapter_type, tensors, scale) per enabled adapter."""
    for adapter_type, t, scale in steps:
        w = effective_weight(w, adapter_type, t, scale)
    return w


# ---------------------------------------------------------------------------------------------------- fresh init

def init_tensors(adapter_type: str, w0: Tensor, rank: int, generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float32, bases: bool = True) -> dict[str, Tensor]:
    """Fresh trainable tensors exactly as the reference initialises them, so a fresh adapter is an identity:
    A Kaiming-uniform (a=√5), B and M_xs zero, magnitudes = the base weight's row/column norms.
    Also returns the frozen U, V for -xs types unless `bases` is False (a file stores none: the view that applies
    the adapter takes them, maybe from a bases file, so an SVD here would be wasted). w0: the ORIGINAL base weight
    (the reference uses it even when stacking on top of other adapters)."""
    delta, renorm = check_adapter_type(adapter_type)
    w2 = w0.detach().reshape(w0.shape[0], -1)
    fan_out, fan_in = w2.shape
    t: dict[str, Tensor] = {}
    if delta == "lowrank":
        # drawn where the generator lives (a CPU generator cannot fill a CUDA/MPS tensor), so a seed gives the same
        # adapter on every device
        a = torch.zeros(rank, fan_in, dtype=dtype, device=generator.device if generator is not None else w0.device)
        t["lora_A"] = nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator).to(w0.device)
        t["lora_B"] = torch.zeros(fan_out, rank, dtype=dtype, device=w0.device)
    else:
        t["M_xs"] = torch.zeros(rank, rank, dtype=dtype, device=w0.device)
        if bases:
            u, v = svd_bases(w0, rank)
            t["U"], t["V"] = u.to(w0.device, dtype), v.to(w0.device, dtype)
    if renorm == "rows":
        t["magnitude"] = w2.norm(dim=1).to(dtype)
    elif renorm == "cols":
        t["magnitude"] = w2.norm(dim=0).to(dtype)
    elif renorm == "both":
        t["magnitude_r"], t["magnitude_c"] = w2.norm(dim=1).to(dtype), w2.norm(dim=0).to(dtype)
    return t


# ---------------------------------------------------------------------------------------------------- factored forms

def _low_rank_factors(adapter_type: str, t: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(down [r, in], up [out, r]) with delta = up @ down. For -xs: down = M·Vᵀ (r x in), up = U."""
    delta, _ = check_adapter_type(adapter_type)
    if delta == "lowrank":
        return t["lora_A"], t["lora_B"]
    return t["M_xs"].to(t["U"].dtype) @ t["V"].T, t["U"]


def delta_sq_norm(adapter_type: str, t: dict[str, Tensor], scale: Tensor | float) -> Tensor:
    """‖s·up·down‖²_F, the squared Frobenius norm of one layer's low-rank update (before any DoRA/BoRA
    renormalisation), from r×r products: trace((upᵀ·up)(down·downᵀ)), never the [out, in] matrix."""
    down, up = _low_rank_factors(adapter_type, t)
    down, up = down.float(), up.float()
    return float(scale) ** 2 * ((up.T @ up) * (down @ down.T)).sum()


class BaseProducts(NamedTuple):
    """What the factored forms need of a frozen base weight W [out, in], computed once per base weight
    (`base_products`) instead of at every step: its squared row [out] and column [in] norms and, for the -xs types
    (whose bases U [out, r] and V [in, r] never train), W·V [out, r] and Uᵀ·W [r, in]. With those, W·downᵀ =
    (W·V)·Mᵀ and upᵀ·W = Uᵀ·W cost r×r products instead of a pass over W (bench/adapter_layers.py)."""

    row_sq: Tensor
    col_sq: Tensor
    w_v: Tensor | None = None
    ut_w: Tensor | None = None


def base_products(w: Tensor, adapter_type: str | None = None, t: dict[str, Tensor] | None = None) -> BaseProducts:
    """`BaseProducts` of w [out, in]. With the layer's adapter type and tensors t, an -xs DoRA/BoRA layer also gets
    the products its renorm uses (W·V for row norms, Uᵀ·W for column norms); other types need none."""
    sq = w.float() * w.float()
    row_sq, col_sq = sq.sum(1), sq.sum(0)
    if adapter_type is None or t is None or not adapter_type.endswith("-xs"):
        return BaseProducts(row_sq, col_sq)
    _, renorm = check_adapter_type(adapter_type)
    u, v = t["U"], t["V"]
    w = w.to(u.dtype)
    w_v = w @ v if renorm in ("rows", "both") else None
    ut_w = u.T @ w if renorm == "cols" else None  # BoRA's column term weights U's rows by d², so it cannot be cached
    return BaseProducts(row_sq, col_sq, w_v, ut_w)


def _xs_cross_products(adapter_type: str, t: dict[str, Tensor], products: BaseProducts | None
                       ) -> tuple[Tensor | None, Tensor | None]:
    """(P = W·downᵀ [out, r], Q = upᵀ·W [r, in]) from the cached -xs products, None where not cached; P follows M_xs
    under autograd (down = M·Vᵀ, so P = (W·V)·Mᵀ), Q is a constant (up = U)."""
    if products is None or not adapter_type.endswith("-xs"):
        return None, None
    p = None if products.w_v is None else products.w_v @ t["M_xs"].to(products.w_v.dtype).T
    return p, products.ut_w


def _autocast_off(device_type: str):
    try:
        return torch.autocast(device_type, enabled=False)
    except RuntimeError:  # a device type autocast does not know: nothing to turn off
        return contextlib.nullcontext()


class _FrozenProduct(torch.autograd.Function):
    """W·x (w_left) or x·W for a frozen W of any dtype and a trainable x: computed in x's dtype with W converted on
    the fly, saving W itself for the backward. `w.to(fp32) @ x` under autograd saves the converted copy instead: a
    full fp32 (or, under autocast, another half) copy of every adapted weight alive until the backward in bf16/fp16
    training."""

    @staticmethod
    def forward(ctx, w: Tensor, x: Tensor, w_left: bool) -> Tensor:
        ctx.save_for_backward(w)
        ctx.w_left = w_left
        with _autocast_off(x.device.type):
            wx = w.to(x.dtype)
            return wx @ x if w_left else x @ wx

    @staticmethod
    def backward(ctx, g: Tensor):
        (w,) = ctx.saved_tensors
        with _autocast_off(g.device.type):
            wg = w.to(g.dtype)
            return None, (wg.T @ g if ctx.w_left else g @ wg.T), None


def frozen_product(w: Tensor, x: Tensor, w_left: bool = True) -> Tensor:
    """W·x (w_left) or x·W in x's dtype; W frozen (no gradient, none saved but W itself: `_FrozenProduct`)."""
    if w.requires_grad or not x.requires_grad or not torch.is_grad_enabled():
        wx = w.to(x.dtype)
        return wx @ x if w_left else x @ wx
    return _FrozenProduct.apply(w, x, w_left)


def _sq_norms_plus_delta(w: Tensor, down: Tensor, up: Tensor, scale: Tensor | float, dim: int,
                         base_sq: Tensor | None = None, row_weights: Tensor | None = None,
                         cross_product: Tensor | None = None) -> Tensor:
    """Squared row (dim=1) or column (dim=0) norms of diag(g)·(W + s·up·down) without forming it, where g =
    row_weights (rows: must be None): ‖g∘W‖² + 2s·<g²∘W, up·down> + s²·‖g∘(up·down)‖².
    base_sq: the cached squared row/column norms of W (`base_products`), used when g is None; cross_product: the
    cached W·downᵀ (rows) or upᵀ·W (columns, g None) of an -xs layer (`_xs_cross_products`). w may be in another
    dtype than the factors (a bf16 base): the products are taken in the factors' dtype (`frozen_product`)."""
    if dim == 1:
        p = frozen_product(w, down.T) if cross_product is None else cross_product
        cross = (p * up).sum(1)  # <W_i, (up·down)_i> = up_i · (W_i · downᵀ)
        quad = ((up @ (down @ down.T)) * up).sum(1)  # ‖(up·down)_i‖² = up_i (down downᵀ) up_iᵀ
        sq = _sq_sum(w, 1, down.dtype) if base_sq is None else base_sq
        return sq + 2 * scale * cross + scale * scale * quad
    if row_weights is None:
        sq = _sq_sum(w, 0, down.dtype) if base_sq is None else base_sq
        up_g = up
        q = frozen_product(w, up.T, w_left=False) if cross_product is None else cross_product
    else:
        g2 = row_weights * row_weights
        sq, up_g = _weighted_col_sq(g2, w), up * g2[:, None]
        q = frozen_product(w, up_g.T, w_left=False)
    cross = (q * down).sum(0)
    quad = (((up.T @ up_g) @ down) * down).sum(0)
    return sq + 2 * scale * cross + scale * scale * quad


def _sq_sum(w: Tensor, dim: int, dtype: torch.dtype) -> Tensor:
    """Squared row (dim=1) or column (dim=0) sums of W in `dtype`."""
    wd = w.to(dtype)
    return (wd * wd).sum(dim)


class _WeightedColSq(torch.autograd.Function):
    """g2 [out] -> Σ_i g2_i·W_ij² [in] for a frozen W [out, in], with W∘W formed in row blocks and never saved
    (autograd would keep a full W∘W per layer alive until the backward). The BoRA path off the fused CPU node."""

    @staticmethod
    def forward(ctx, g2: Tensor, w: Tensor) -> Tensor:
        ctx.save_for_backward(w)
        with _autocast_off(g2.device.type):
            return squares_product(w, g2, transposed=True)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (w,) = ctx.saved_tensors
        with _autocast_off(grad.device.type):
            return squares_product(w, grad, transposed=False), None


def _weighted_col_sq(g2: Tensor, w: Tensor) -> Tensor:
    if w.requires_grad:
        wd = w.to(g2.dtype)
        return g2 @ (wd * wd)
    return _WeightedColSq.apply(g2, w)


def row_col_scales(w: Tensor, adapter_type: str, t: dict[str, Tensor], scale: Tensor | float,
                   products: BaseProducts | None = None, detach_norm: bool = False) -> tuple[Tensor | None, Tensor | None]:
    """Per-row and per-column factors (d [out] or None, c [in] or None) with
    effective_weight = diag(d) · (W + s·ΔW) · diag(c), computed from W, the factors and ‖W‖² only (exact maths; not
    bit-identical to `effective_weight`, whose norms are taken on the formed matrix). w: [out, in] (2-D view).
    products: cached `base_products(w, adapter_type, t)`. detach_norm: the norms are constants for autograd."""
    _, renorm = check_adapter_type(adapter_type)
    if renorm == "none":
        return None, None

    def norm(sq: Tensor) -> Tensor:
        n = sq.clamp_min(0).sqrt()
        return n.detach() if detach_norm else n

    down, up = _low_rank_factors(adapter_type, t)
    rows_sq, cols_sq = (products.row_sq, products.col_sq) if products is not None else (None, None)
    p, q = _xs_cross_products(adapter_type, t, products)
    if renorm == "rows":
        n = norm(_sq_norms_plus_delta(w, down, up, scale, 1, rows_sq, cross_product=p))
        return t["magnitude"] / (n + EPS), None
    if renorm == "cols":
        n = norm(_sq_norms_plus_delta(w, down, up, scale, 0, cols_sq, cross_product=q))
        return None, t["magnitude"] / (n + EPS)
    n_r = norm(_sq_norms_plus_delta(w, down, up, scale, 1, rows_sq, cross_product=p))
    d = t["magnitude_r"] / (n_r + EPS)
    n_c = norm(_sq_norms_plus_delta(w, down, up, scale, 0, row_weights=d))
    return d, t["magnitude_c"] / (n_c + EPS)


def factored_linear(x: Tensor, w: Tensor, bias: Tensor | None, adapter_type: str, t: dict[str, Tensor],
                    scale: Tensor | float, products: BaseProducts | None = None, detach_norm: bool = False,
                    scales: tuple[Tensor | None, Tensor | None] | None = None) -> Tensor:
    """A Linear layer's output with one adapter, never forming W + s·ΔW: x [..., in] -> [..., out].
    y = ((x∘c)·Wᵀ + s·((x∘c)·downᵀ)·upᵀ) ∘ d + bias. At scale 0 DoRA/BoRA give the base output (reference rule).
    products: the layer's cached `base_products(w, adapter_type, t)`; without it only the squared norms are
    computed here (the -xs products would cost more than the pass over W they save in a single call).
    detach_norm: the DoRA/BoRA norms are constants for autograd (a training option; see fused.py).
    scales: `row_col_scales` of this layer when the caller keeps them (a frozen adapter in a generation session).

    Cost: one product with the frozen W per direction (`frozen_linear`). In fp32 CPU training each DoRA/BoRA type is
    one hand-written autograd node (`fused.py`; DoRA-rows gets W·downᵀ from the layer's own product, -xs types from
    the cached W·V and Uᵀ·W); plain LoRA/-XS is frozen_linear + addmm under autograd, as fast as a hand-written node
    (bench/adapter_layers.py)."""
    _, renorm = check_adapter_type(adapter_type)
    if renorm != "none" and float(scale) == 0.0:
        return frozen_linear(x, w, bias)
    down, up = _low_rank_factors(adapter_type, t)
    x2 = x.reshape(-1, x.shape[-1])
    if renorm != "none" and fused_applies(x, w, down):  # one hand-written autograd node per layer (fused.py)
        s, products = float(scale), products if products is not None else base_products(w)
        p, q = _xs_cross_products(adapter_type, t, products)
        if renorm == "rows":
            y = dora_rows_linear(x2, down, up, t["magnitude"], s, w, bias, products.row_sq, p, detach_norm)
        elif renorm == "cols":
            y = dora_cols_linear(x2, down, up, t["magnitude"], s, w, bias, products.col_sq, q, detach_norm)
        else:
            y = bora_linear(x2, down, up, t["magnitude_r"], t["magnitude_c"], s, w, bias, products.row_sq, p,
                            detach_norm)
        return y.view(*x.shape[:-1], w.shape[0])
    d, c = scales if scales is not None else row_col_scales(w, adapter_type, t, scale, products, detach_norm)
    if c is not None:
        x2 = x2 * c.to(x.dtype)
    base = frozen_linear(x2, w, bias if d is None else None)
    low = nn.functional.linear(x2, down.to(x.dtype)) * scale  # [N, r]: scaling r columns, not out
    z = torch.addmm(base, low, up.to(x.dtype).T)
    if d is not None:
        d = d.to(z.dtype)
        z = z * d if bias is None else torch.addcmul(bias, z, d)
    return z.view(*x.shape[:-1], w.shape[0])
