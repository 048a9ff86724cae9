"""Hand-written autograd nodes for DoRA/BoRA layers in fp32 CPU training (oneDNN and MKL products, `sa3/fast_linear.py`).

z = x·Wᵀ + s·(x·Aᵀ)·Bᵀ with x [N, in], W [out, in] frozen, A [r, in], B [out, r]; the magnitudes renormalise it.
- `dora_rows_linear`: y = d ∘ z + bias, d = m / ‖W + s·B·A‖_rows from ‖W‖², P = W·Aᵀ and B·AAᵀ. The r rows of A
  ride along with the N rows of x through the ONE forward product with W, so P costs r/N of it instead of a separate
  memory-bound pass; in the backward the rows [dz; dPᵀ] share the one product with W.
- `dora_cols_linear`: z of x∘c, c = m / ‖W + s·B·A‖_cols, needs Q = Bᵀ·W (the other product direction): one extra
  pass over W each way.
- `bora_linear`: rows then columns of diag(d)·V; P, Q and S = (d²)ᵀ(W∘W) forward and three such products backward,
  each a pass over W (eight passes instead of the frozen layer's two).

detach_norm (every node): the norms are constants in the backward, as the DoRA paper's section 4.3 suggests and
PEFT does; the magnitudes still learn through m / ‖·‖. The forward is unchanged, and the backward no longer needs the
norms' own passes over W (DoRA-rows's ride-along rows, DoRA-cols's dB product, BoRA's three). The
official trainer does not detach: it is an option (`RunConfig.detach_norm`), exact gradients are the default.

Why by hand: autograd's graph of the same maths makes extra passes over W (for P and its gradient) and runs ~30
small kernels per layer. bench/adapter_layers.py prints each node against autograd per layer shape (plain LoRA is
left to autograd: a node measured no faster). Equality with the formed-weight gradients is tested.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..sa3.fast_linear import onednn_applies, rows_times_wt, w_times_rows_t

# W·rowsᵀ for r rows (P = W·Aᵀ and the like) goes through oneDNN with W as the source (`w_times_rows_t`), Bᵀ·W (the
# other direction) through oneDNN with the view Wᵀ: the fastest of the forms bench/step_products.py prints.
BLOCK_BYTES = 4 << 20  # row blocks of W for the passes that form W∘W (bench/adapter_layers.py)


def row_blocks(w: Tensor) -> list[slice]:
    """Row ranges of W [out, in] of about BLOCK_BYTES each (at least one row)."""
    rows = max(1, BLOCK_BYTES // max(1, w.shape[1] * w.element_size()))
    return [slice(i, min(i + rows, w.shape[0])) for i in range(0, w.shape[0], rows)]


def squares_product(w: Tensor, v: Tensor, transposed: bool) -> Tensor:
    """(W∘W)ᵀ·v [in] for v [out] (transposed) or (W∘W)·v [out] for v [in], in v's dtype, with W [out, in] squared
    in row blocks into one buffer: no W∘W of the whole layer (the size of W) is ever made."""
    blocks = row_blocks(w)
    squares = torch.empty(blocks[0].stop, w.shape[1], dtype=v.dtype, device=v.device)
    out = v.new_zeros(w.shape[1]) if transposed else v.new_empty(w.shape[0])
    for rows in blocks:
        wb = w[rows].to(v.dtype)
        sq = torch.mul(wb, wb, out=squares[:wb.shape[0]])
        if transposed:
            out.addmv_(sq.T, v[rows])
        else:
            torch.mv(sq, v, out=out[rows])
    return out


EPS = 1e-12  # added to the norms by the reference (after the square root); maths.py uses this one too


def _renorm_factor(sq_norm: Tensor, magnitude: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(m / (‖·‖ + eps), ‖·‖, 1 / (‖·‖ + eps)) from a squared norm (clamped at 0: the expanded form can round below)."""
    norm = sq_norm.clamp_min(0).sqrt()
    inv = 1 / (norm + EPS)
    return magnitude * inv, norm, inv


def _sq_norm_grad(g_factor: Tensor, magnitude: Tensor, norm: Tensor, inv: Tensor) -> Tensor:
    """dL/dq for factor = m / (√q + eps) given dL/dfactor; 0 where the norm is 0 (the clamp's gradient)."""
    return torch.where(norm > 0, -g_factor * magnitude * inv * inv / (2 * norm).clamp_min(EPS), torch.zeros_like(norm))


class _DoraRowsLinear(torch.autograd.Function):
    """y = d ∘ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + bias with d = m / (‖W + s·B·A‖_rows + eps), the norms from
    ‖W‖²_rows + 2s·rowsum(P∘B) + s²·rowsum((B·AAᵀ)∘B), P = W·Aᵀ (`maths.row_col_scales`), forward AND backward
    written out: one product with W each way (A's rows ride along), no autograd graph of ~30 small kernels.
    P may come in (an -xs layer's (W·V)·Mᵀ): then no rows ride along and dL/dP goes back to it."""

    @staticmethod
    def forward(ctx, x2: Tensor, a: Tensor, b: Tensor, m: Tensor, scale: float, w: Tensor, bias: Tensor | None,
                row_sq: Tensor, p_in: Tensor | None, detach_norm: bool) -> Tensor:
        n = x2.shape[0]
        if p_in is None:
            out = rows_times_wt(torch.cat([x2, a]), w)
            z, p = out[:n], out[n:].T  # p = W·Aᵀ [out, r]
        else:
            z, p = rows_times_wt(x2, w), p_in
        h = x2 @ a.T  # [N, r]
        z.addmm_(h, b.T, alpha=scale)
        bk = b @ (a @ a.T)  # B·AAᵀ [out, r]
        d, norm, inv = _renorm_factor(row_sq + (2 * scale) * (p * b).sum(1) + (scale * scale) * (bk * b).sum(1), m)
        y = z * d if bias is None else torch.addcmul(bias, z, d)
        ctx.save_for_backward(x2, a, b, m, w, z, h, p, bk, norm, inv, d)
        ctx.scale, ctx.p_given, ctx.detach_norm = scale, p_in is not None, detach_norm
        return y

    @staticmethod
    def backward(ctx, g: Tensor):
        x2, a, b, m, w, z, h, p, bk, norm, inv, d = ctx.saved_tensors
        s, n, r = ctx.scale, x2.shape[0], a.shape[0]
        need_x, need_a, need_b, need_m = ctx.needs_input_grad[:4]
        g_d = (g * z).sum(0)  # [out]
        g_m = (g_d * inv).view_as(m) if need_m else None
        g_q = None if ctx.detach_norm else _sq_norm_grad(g_d, m, norm, inv)[:, None]  # [out, 1]
        g_p = None if g_q is None else (2 * s) * g_q * b  # dL/dP [out, r]; dL/dA gets (dL/dP)ᵀ·W (A's rows)
        ride = need_a and not ctx.p_given and g_p is not None
        rows = torch.empty(n + r if ride else n, g.shape[1], dtype=g.dtype, device=g.device)
        g_z = torch.mul(g, d, out=rows[:n])
        if ride:
            rows[n:] = g_p.T
        through_w = None
        if need_x or ride:
            through_w = rows_times_wt(rows if need_x else rows[n:], w.t())  # [(N +) r, in] = rows·W
        g_h = (g_z @ b).mul_(s)  # [N, r]
        g_x = through_w[:n].addmm_(g_h, a) if need_x else None
        g_a = g_b = None
        if need_a:  # + through h = x·Aᵀ, + through AAᵀ (symmetric): 2·(s²·Bᵀ diag(g_q) B)·A
            g_a = torch.mm(g_h.T, x2) if not ride else through_w[-r:].addmm_(g_h.T, x2)
            if g_q is not None:
                g_a.addmm_(b.T @ (g_q * b), a, alpha=2 * s * s)
        if need_b:
            g_b = (g_z.T @ h).mul_(s)
            if g_q is not None:
                g_b.add_(g_q * p, alpha=2 * s).add_(g_q * bk, alpha=2 * s * s)
        g_p_in = g_p if ctx.p_given and ctx.needs_input_grad[8] else None
        return g_x, g_a, g_b, g_m, None, None, None, None, g_p_in, None


class _DoraColsLinear(torch.autograd.Function):
    """y = (x∘c)·Wᵀ + s·((x∘c)·Aᵀ)·Bᵀ + bias with c = m / ‖W + s·B·A‖_cols, the norms from ‖W‖²_cols +
    2s·colsum(Q∘A) + s²·colsum((BᵀB·A)∘A), Q = Bᵀ·W [r, in]. Q and its gradient's share of dB are products of r
    rows with W in the other direction than the layer's own product, so they are one extra pass over W each way,
    unless Q comes in: an -xs layer's cached Uᵀ·W, a constant (U never trains), so it gets no gradient."""

    @staticmethod
    def forward(ctx, x2: Tensor, a: Tensor, b: Tensor, m: Tensor, scale: float, w: Tensor, bias: Tensor | None,
                col_sq: Tensor, q_in: Tensor | None, detach_norm: bool) -> Tensor:
        if q_in is not None and ctx.needs_input_grad[2]:
            raise ValueError("a given Q = upᵀ·W must belong to a frozen up (-xs's U): its dB share needs W")
        q_bw = rows_times_wt(b.T, w.t()) if q_in is None else q_in  # Bᵀ·W [r, in]
        kb = b.T @ b  # [r, r]
        q = col_sq + (2 * scale) * (q_bw * a).sum(0) + (scale * scale) * ((kb @ a) * a).sum(0)
        c, norm, inv = _renorm_factor(q, m)
        xc = x2 * c
        z = rows_times_wt(xc, w, bias)
        h = xc @ a.T  # [N, r]
        z.addmm_(h, b.T, alpha=scale)
        ctx.save_for_backward(x2, xc, a, b, m, w, h, q_bw, kb, norm, inv, c)
        ctx.scale, ctx.q_given, ctx.detach_norm = scale, q_in is not None, detach_norm
        return z

    @staticmethod
    def backward(ctx, g: Tensor):
        x2, xc, a, b, m, w, h, q_bw, kb, norm, inv, c = ctx.saved_tensors
        s = ctx.scale
        need_x, need_a, need_b, need_m = ctx.needs_input_grad[:4]
        g = g.contiguous()
        g_h = (g @ b).mul_(s)  # [N, r]
        g_xc = rows_times_wt(g, w.t()).addmm_(g_h, a)  # [N, in]
        g_c = (g_xc * x2).sum(0)
        g_x = g_xc.mul_(c) if need_x else None
        g_m = (g_c * inv).view_as(m) if need_m else None
        g_a = g_b = None
        if need_a:  # through h = xc·Aᵀ
            g_a = g_h.T @ xc
        if need_b:  # through the low-rank path
            g_b = (g.T @ h).mul_(s)
        if ctx.detach_norm:
            return g_x, g_a, g_b, g_m, None, None, None, None, None, None
        g_q = _sq_norm_grad(g_c, m, norm, inv)  # [in]
        g_qa = g_q * a  # [r, in]; dL/dQ = 2s·g_qa
        if need_a:  # the norms' cross term (Q fixed) and quad term (BᵀB symmetric)
            g_a.add_(g_q * q_bw, alpha=2 * s).addmm_(kb, g_qa, alpha=2 * s * s)
        if need_b:  # the norms' Q = Bᵀ·W (dB = W·dQᵀ) and BᵀB
            if not ctx.q_given:
                g_b.add_(w_times_rows_t(w, g_qa), alpha=2 * s)
            g_b.addmm_(b, a @ g_qa.T, alpha=2 * s * s)
        return g_x, g_a, g_b, g_m, None, None, None, None, None, None


class _BoraLinear(torch.autograd.Function):
    """BoRA: y = d ∘ ((x∘c)·Wᵀ + s·((x∘c)·Aᵀ)·Bᵀ) + bias, V = W + s·B·A, d = m_r / ‖V‖_rows, c = m_c / ‖diag(d)·V‖_cols.

    Row norms need P = W·Aᵀ; the column norms of diag(d)·V need Q = (d²∘B)ᵀ·W and S = (d²)ᵀ·(W∘W); the backward
    needs W·(dL/dQ)ᵀ, (W∘W)·(dL/dS) and, for dL/dA, (dL/dP)ᵀ·W. Each waits for the one before it, and none can ride
    along with the layer's own product, so each is its own pass over W: whole-matrix products (faster than the same
    products over row blocks, bench/step_products.py), W∘W in row blocks (`squares_product`).
    P may come in (an -xs layer's (W·V)·Mᵀ): then it is not computed and dL/dP goes back to it."""

    @staticmethod
    def forward(ctx, x2: Tensor, a: Tensor, b: Tensor, m_r: Tensor, m_c: Tensor, scale: float, w: Tensor,
                bias: Tensor | None, row_sq: Tensor, p_in: Tensor | None, detach_norm: bool) -> Tensor:
        s = scale
        bk = b @ (a @ a.T)  # B·AAᵀ [out, r]
        p = w_times_rows_t(w, a) if p_in is None else p_in  # W·Aᵀ [out, r]
        qr = row_sq + (2 * s) * torch.linalg.vecdot(p, b) + (s * s) * torch.linalg.vecdot(bk, b)  # ‖V‖²_rows
        d, norm_r, inv_r = _renorm_factor(qr, m_r)
        b_g2 = b * (d * d)[:, None]  # d²∘B [out, r]
        q = rows_times_wt(b_g2.T, w.t())  # (d²∘B)ᵀ·W [r, in]
        kb = b.T @ b_g2  # Bᵀ diag(d²) B [r, r]
        qc = (squares_product(w, d * d, transposed=True) + (2 * s) * torch.linalg.vecdot(q, a, dim=0)
              + (s * s) * torch.linalg.vecdot(kb @ a, a, dim=0))
        c, norm_c, inv_c = _renorm_factor(qc, m_c)
        xc = x2 * c
        z = rows_times_wt(xc, w)
        h = xc @ a.T  # [N, r]
        z.addmm_(h, b.T, alpha=s)
        y = z * d if bias is None else torch.addcmul(bias, z, d)
        ctx.save_for_backward(x2, xc, a, b, m_r, m_c, w, z, h, p, q, bk, kb, norm_r, inv_r, norm_c, inv_c, d, c)
        ctx.scale, ctx.p_given, ctx.detach_norm = s, p_in is not None, detach_norm
        return y

    @staticmethod
    def backward(ctx, g: Tensor):
        x2, xc, a, b, m_r, m_c, w, z, h, p, q, bk, kb, norm_r, inv_r, norm_c, inv_c, d, c = ctx.saved_tensors
        s = ctx.scale
        need_x = ctx.needs_input_grad[0]
        g_d = (g * z).sum(0)  # [out], from y = d∘z
        g_z = g * d
        g_h = (g_z @ b).mul_(s)
        g_xc = rows_times_wt(g_z, w.t()).addmm_(g_h, a)  # [N, in]
        g_c = (g_xc * x2).sum(0)
        g_x = g_xc.mul_(c) if need_x else None
        g_mc = g_c * inv_c
        if ctx.detach_norm:  # constant norms: the low-rank path's terms and m / ‖·‖ only, no pass over W
            g_a = g_h.T @ xc if ctx.needs_input_grad[1] else None
            g_b = (g_z.T @ h).mul_(s) if ctx.needs_input_grad[2] else None  # -xs: up = U is frozen
            return g_x, g_a, g_b, (g_d * inv_r).view_as(m_r), g_mc.view_as(m_c), None, None, None, None, None, None
        g_qc = _sq_norm_grad(g_c, m_c, norm_c, inv_c)  # [in]
        g2 = d * d
        g_qa = g_qc * a  # [r, in]; dL/dQ = 2s·g_qa
        g_kb = (s * s) * (a @ g_qa.T)  # [r, r], symmetric
        # S = (d²)ᵀ(W∘W), Q = (d²∘B)ᵀW and Kb = Bᵀdiag(d²)B give dL/d(d²∘B) = 2s·W·g_qaᵀ + B·g_Kb and
        # dL/d(d²) = (W∘W)·g_qc + rowsum(dL/d(d²∘B) ∘ B)
        g_ub = torch.add(b @ g_kb, w_times_rows_t(w, g_qa), alpha=2 * s)  # [out, r]
        g_g2 = squares_product(w, g_qc, transposed=False).add_(torch.linalg.vecdot(g_ub, b))  # [out]
        g_dr = torch.addcmul(g_d, d, g_g2, value=2)
        g_qr_col = _sq_norm_grad(g_dr, m_r, norm_r, inv_r)[:, None]  # dL/d‖V‖²_rows
        g_a = (g_h.T @ xc).add_(g_qc * q, alpha=2 * s).addmm_(kb, g_qa, alpha=2 * s * s)
        g_b = (g_z.T @ h).mul_(s)
        g_b.addcmul_(g_ub, g2[:, None]).add_(g_qr_col * p, alpha=2 * s).add_(g_qr_col * bk, alpha=2 * s * s)
        g_b.addmm_(b * g2[:, None], g_kb)  # Kb = Bᵀ·(d²∘B): the (d²∘B) side went into g_ub, this is the Bᵀ side
        # row-norm terms: P = W·Aᵀ (dL/dA += dL/dPᵀ·W), and B·AAᵀ (dL/dA += 2·Bᵀ diag(g_qr) B·A)
        g_a.addmm_(b.T @ (g_qr_col * b), a, alpha=2 * s * s)
        g_p_in = None
        if not ctx.p_given:
            g_a.add_(rows_times_wt((g_qr_col * b).T, w.t()), alpha=2 * s)
        elif ctx.needs_input_grad[9]:
            g_p_in = (2 * s) * g_qr_col * b
        return g_x, g_a, g_b, (g_dr * inv_r).view_as(m_r), g_mc.view_as(m_c), None, None, None, None, g_p_in, None


def fused_applies(x: Tensor, w: Tensor, down: Tensor) -> bool:
    """The fused node is used for fp32 x86 CPU training (oneDNN products) outside autocast."""
    return (onednn_applies(x, w) and down.dtype == torch.float32 and torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu"))


def dora_rows_linear(x2: Tensor, down: Tensor, up: Tensor, magnitude: Tensor, scale: float, w: Tensor,
                     bias: Tensor | None, row_sq: Tensor, w_down: Tensor | None = None,
                     detach_norm: bool = False) -> Tensor:
    """DoRA-rows layer output [N, out] for x2 [N, in]; row_sq: the cached squared row norms of W [out]; w_down:
    W·downᵀ [out, r] when the caller has it cheaper than a pass over W (-xs), else None; detach_norm: the norms get
    no gradient (module docstring)."""
    return _DoraRowsLinear.apply(x2, down, up, magnitude, scale, w, bias, row_sq, w_down, detach_norm)


def dora_cols_linear(x2: Tensor, down: Tensor, up: Tensor, magnitude: Tensor, scale: float, w: Tensor,
                     bias: Tensor | None, col_sq: Tensor, up_w: Tensor | None = None,
                     detach_norm: bool = False) -> Tensor:
    """dora-cols layer output [N, out] for x2 [N, in]; col_sq: the cached squared column norms of W [in]; up_w:
    upᵀ·W [r, in] when the caller has it cached (-xs: Uᵀ·W, constant), else None; detach_norm as above."""
    return _DoraColsLinear.apply(x2, down, up, magnitude, scale, w, bias, col_sq, up_w, detach_norm)


def bora_linear(x2: Tensor, down: Tensor, up: Tensor, magnitude_r: Tensor, magnitude_c: Tensor, scale: float,
                w: Tensor, bias: Tensor | None, row_sq: Tensor, w_down: Tensor | None = None,
                detach_norm: bool = False) -> Tensor:
    """BoRA layer output [N, out] for x2 [N, in]; row_sq: the cached squared row norms of W [out]; w_down and
    detach_norm as for `dora_rows_linear`."""
    return _BoraLinear.apply(x2, down, up, magnitude_r, magnitude_c, scale, w, bias, row_sq, w_down, detach_norm)


__all__ = ["bora_linear", "dora_cols_linear", "dora_rows_linear", "fused_applies", "row_blocks", "squares_product"]
