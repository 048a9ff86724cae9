"""The Stable Audio 3 diffusion transformer (DiT), read top to bottom.

`DiffusionTransformer` is the official `DiffusionTransformer` + `ContinuousTransformer` for the SA3 configuration
(adaLN global conditioning, cross-attention over [prompt ‖ seconds] tokens, per-block additive local conditioning,
memory tokens, partial RoPE, q/k RMSNorm, optional differential attention, SwiGLU). Parameter and buffer names equal
the official checkpoint keys under `model.model.`, so loading is a strict key match; `DiTWrapper` adds the `.model`
level, so a wrapper built by `SA3Modules` has exactly the keys `model.model.*`.

Shapes: B batch, C latent channels (io_channels), T latent frames, E embed_dim, H heads, D head dim (E // H),
M memory tokens, N = M + T sequence length, L context tokens (prompt tokens + 1 seconds token), Dc cond_token_dim.
Time: t in [0, 1], 1 = noise, 0 = data; the output is the velocity v = noise - data.

Calling contract (`DiffusionTransformer.forward`, positional x, t, cross_attn_cond, global_cond, local_add_cond):
- cross_attn_cond [B, L, Dc] = [prompt embeddings (padded positions already hold the learned padding embedding)
  ‖ seconds embedding]; no cross-attention mask is applied (the official DiT disables it).
- global_cond [B, Dg] = the seconds embedding; local_add_cond [B, C + 1, T] = [inpaint mask (1 keep, 0 generate)
  ‖ masked latents], zeros (or None) for text-to-audio.
- padding_mask [B, T] bool, True = valid frame; padding_semantics "mask_keys" (default) masks padded keys as the
  training backend (flash-attn varlen) did, "zero_values" reproduces the reference's CPU fallback.
- Guidance: negative_cross_attn_cond [B, L, Dc] laid out like the positive (same L) and negative_cross_attn_mask
  [B, L] (True = real token; False positions are zeroed). Without a negative the uncond context is all zeros.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .fast_linear import ONEDNN_LINEAR, frozen_linear, onednn_applies
from .layers import ExpoFourierFeatures, RMSNorm, RotaryEmbedding

PADDING_SEMANTICS = ("mask_keys", "zero_values")
OBJECTIVES = ("rectified_flow", "rf_denoiser")

# Official kwargs that select features SA3 does not use; a truthy value would change the key set, so it is refused.
_UNSUPPORTED = ("input_concat_dim", "prepend_cond_dim", "conformer", "layer_scale", "use_sinusoidal_emb",
                "use_abs_pos_emb", "cross_attn_rotary_pos_emb", "causal", "modular_local_cond_configs",
                "sliding_window")


# ------------------------------------------------------------------------------------------------------------------
# Pieces
# ------------------------------------------------------------------------------------------------------------------

def use_onednn(layer: nn.Module, x: Tensor) -> bool:
    """Plain fp32 CPU inference of a plain Linear goes through oneDNN (fused GLU below; see sa3/fast_linear.py)."""
    return _is_plain_linear(layer) and onednn_applies(x, layer.weight) and not torch.is_grad_enabled()


def _is_plain_linear(layer: nn.Module) -> bool:
    """An nn.Linear computing its own weight: exactly nn.Linear, or adapters/'s routing subclass while no adapter
    routes this layer in the current thread (so a shared model computes bit-identically before, during and after
    another thread's adapter session)."""
    if type(layer) is nn.Linear:
        return True
    routed = getattr(layer, "routed_layer", None)
    return isinstance(layer, nn.Linear) and routed is not None and routed() is None


def linear(layer: nn.Module, x: Tensor) -> Tensor:
    """layer(x) for an nn.Linear-like layer; x: [..., in] -> [..., out]. A plain Linear with a frozen weight (all
    inference, and adapter training) takes `frozen_linear`, oneDNN in the forward and the backward on x86 CPUs."""
    if _is_plain_linear(layer):
        return frozen_linear(x, layer.weight, layer.bias)
    return layer(x)


def round_down_to_bfloat16(x: Tensor) -> Tensor:
    """x (fp32, >= 0 or -inf) rounded down to a value bf16 holds exactly (and so fp16 too, for |x| in [2^-14, 65504]
    or 0): its low 16 mantissa bits cleared, which truncates towards zero."""
    return (x.float().view(torch.int32) & -(1 << 16)).view(torch.float32)


def collapse_token_runs(cond: Tensor, half_precision_bias: bool = True) -> tuple[Tensor, Tensor] | None:
    """Runs of equal consecutive context tokens, each to be attended once with the log of its length as a bias.

    Why: an SA3 prompt fills its unused positions with one learned padding embedding (a zeroed negative prompt with
    zeros), so a short prompt is mostly one token repeated. Cross-attention has no positions, so n equal keys and
    values weigh like one key whose score gains log(n) (e^(s + log n) = n·e^s): the same values and parameter
    gradients (an input gradient lands on each run's first token, summed over the run), and the keys/values of the
    repeats need not be projected nor attended in any block.

    A bf16 bias would round log(n) by up to 2^-6 (a run's weight 1.6% off), so a run of n > 1 gets two keys: the
    first with log(n) rounded down to a bf16 value (exact in bf16, fp16 and fp32), a second with log of the rest
    (n - e^that, under 3.2% of n), whose own rounding moves the run's weight by under 0.06%. An fp32 bias holds
    log(n) itself (half_precision_bias=False): one key per run.

    cond: [B, L, Dc]. Returns (first [B, U] int64: the context index each key takes its key/value from,
    bias [B, 1, 1, U] float32: the log-weights, -inf on filler slots of items with fewer keys), or None when
    collapsing saves no key (then nothing changes)."""
    batch, length = cond.shape[:2]
    starts = torch.ones(batch, length, dtype=torch.bool, device=cond.device)  # [B, L]: a run begins here
    starts[:, 1:] = (cond[:, 1:] != cond[:, :-1]).any(dim=-1)
    n_runs = int(starts.sum(dim=1).max())
    if n_runs == length:
        return None
    run_of = starts.long().cumsum(dim=1) - 1  # [B, L]: each token's run
    position = torch.arange(length, device=cond.device).expand(batch, length)
    # a run's first token is where it starts: scatter the starts (others to a dropped column; MPS has no int64
    # scatter_reduce), fillers keep index 0
    first = torch.zeros(batch, n_runs + 1, dtype=torch.long, device=cond.device)
    first = first.scatter_(1, torch.where(starts, run_of, n_runs), position)[:, :n_runs]
    # fp32 throughout (Apple's MPS has no float64): counts are exact below 2^24, and e^coarse is within ~1.2e-7·n of
    # its true value, 8x under the split threshold below, so a rest key's weight is off by at most ~1.2e-7 of its run
    runs = torch.zeros(batch, n_runs, dtype=torch.float32, device=cond.device)
    runs.scatter_add_(1, run_of, torch.ones(batch, length, dtype=torch.float32, device=cond.device))  # 0: filler
    if not half_precision_bias:
        return first, runs.log()[:, None, None, :]  # -inf on fillers
    coarse = round_down_to_bfloat16(runs.log())  # [B, U], -inf on fillers
    rest = (runs - coarse.exp()).clamp(min=0)
    split = rest > runs * 2**-20  # [B, U]: runs whose log-length bf16 does not hold
    n_split = int(split.sum(dim=1).max())
    if n_runs + n_split >= length:
        return None
    slot = torch.where(split, split.long().cumsum(dim=1) - 1, n_split)  # [B, U]; unsplit runs -> a dropped slot
    rest_first = first.new_zeros(batch, n_split + 1).scatter_(1, slot, first)[:, :n_split]
    rest_bias = coarse.new_full((batch, n_split + 1), float("-inf")).scatter_(1, slot, rest.log().float())
    first = torch.cat([first, rest_first], dim=1)
    bias = torch.cat([coarse, rest_bias[:, :n_split]], dim=1)
    return first, bias[:, None, None, :]


class BlockRMSNorm(RMSNorm):
    """The block norm (`gamma`, eps 1e-5). force_fp32 (the real configs' `norm_kwargs`) normalises half-precision
    activations in fp32 and casts back, as the reference does."""

    def __init__(self, dim: int, eps: float = 1e-5, force_fp32: bool = False, **ignored):
        super().__init__(dim, eps)
        self.force_fp32 = force_fp32

    def forward(self, x: Tensor) -> Tensor:
        if self.force_fp32 and x.dtype != torch.float32:
            return F.rms_norm(x.float(), (x.shape[-1],), self.gamma.float(), self.eps).to(x.dtype)
        return super().forward(x)


def rotate_partial(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """NeoX rotary embedding of the first R dims of x [B, N, S, H, D]; the other D - R dims pass through.

    cos, sin: [N, 1, 1, R // 2] fp32 (the two halves share frequencies). Computed in fp32 and cast back, as the
    reference does; `x1·c - x2·s` equals the reference's `x1·c + (-x2)·s` bit for bit."""
    half = cos.shape[-1]
    rot = x[..., : 2 * half].float()
    x1, x2 = rot[..., :half], rot[..., half:]
    parts = (x1 * cos - x2 * sin, x2 * cos + x1 * sin)
    if x.shape[-1] > 2 * half:
        return torch.cat([p.to(x.dtype) for p in parts] + [x[..., 2 * half:]], dim=-1)
    return torch.cat(parts, dim=-1).to(x.dtype)


class Attention(nn.Module):
    """Multi-head attention, self (`to_qkv`) or cross (`to_q`, `to_kv`), bias-free, with per-head q/k RMSNorm.

    Differential attention (`differential=True`) projects a second query/key pair and returns
    SDPA(q, k, v) - SDPA(q_diff, k_diff, v) (no λ, no sub-norm). Chunk orders are the checkpoint's:
    `to_qkv` = q, k, v[, q_diff, k_diff]; cross `to_q` = q[, q_diff]; cross `to_kv` = k[, k_diff], v."""

    def __init__(self, dim: int, dim_heads: int = 64, dim_context: int | None = None, qk_norm: str = "none",
                 qk_norm_eps: float = 1e-6, differential: bool = False, **ignored):
        super().__init__()
        if qk_norm not in ("rms", "none"):
            raise ValueError(f"attn_kwargs.qk_norm={qk_norm!r} is not used by SA3; use 'rms' or 'none'")
        if ignored.get("feat_scale"):
            raise ValueError("attn_kwargs.feat_scale is not used by SA3 and is not implemented")
        if dim_context is not None and dim_context != dim:
            raise ValueError(f"cross-attention context width {dim_context} != embed_dim {dim}: SA3 projects "
                             "context tokens to embed_dim (project_cond_tokens=true)")
        self.n_heads, self.dim_heads, self.differential = dim // dim_heads, dim_heads, differential
        n_qk = 2 if differential else 1  # query/key pairs
        if dim_context is None:
            self.to_qkv = nn.Linear(dim, dim * (2 * n_qk + 1), bias=False)
        else:
            self.to_q = nn.Linear(dim, dim * n_qk, bias=False)
            self.to_kv = nn.Linear(dim_context, dim_context * (n_qk + 1), bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)
        if qk_norm == "rms":
            self.q_norm, self.k_norm = RMSNorm(dim_heads, qk_norm_eps), RMSNorm(dim_heads, qk_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def norm_and_rotate(self, qk: Tensor, rope: tuple[Tensor, Tensor] | None, with_v_slot: bool) -> Tensor:
        """q/k RMSNorm (each with its gain), then RoPE in fp32, as the reference orders them, over the slots of
        qk [B, N, S, H, D] = q, k[, v, q_diff, k_diff]. rms_norm(x) · gain is rms_norm(x, gain) bit for bit."""
        if self.q_norm is not None:
            gq, gk = self.q_norm.gamma.to(qk.dtype), self.k_norm.gamma.to(qk.dtype)
            gains = torch.stack([gq, gk, torch.ones_like(gq), gq, gk] if with_v_slot else [gq, gk])  # [S, D]
            qk = F.rms_norm(qk, (qk.shape[-1],), None, self.q_norm.eps) * gains[:, None, :]
        return qk if rope is None else rotate_partial(qk, *rope)

    def forward(self, x: Tensor, context: Tensor | None = None, rope: tuple[Tensor, Tensor] | None = None,
                key_mask: Tensor | None = None, value_mask: Tensor | None = None) -> Tensor:
        """x: [B, N, E]; context: [B, L, E] (cross) or None (self); rope: (cos, sin) [N, 1, 1, R/2] or None;
        key_mask: [B, 1, 1, N or L] bool, True = attend, or a float bias added to the scores (cross-attention over
        `collapse_token_runs`); value_mask: [B, N, 1, 1] (the reference's V-zeroing quirk). Returns [B, N, E]."""
        h, d, pairs = self.n_heads, self.dim_heads, 2 if self.differential else 1
        if context is None:
            qkv = rearrange(linear(self.to_qkv, x), "b n (s h d) -> b n s h d", h=h, d=d)  # q, k, v[, q_diff, k_diff]
            v = qkv[:, :, 2]
            # q/k norm and RoPE in one pass over the leading slots (q, k; or all five, v's result unused):
            # half the elementwise launches of two separate passes, same values
            qk = self.norm_and_rotate(qkv[:, :, : 5 if self.differential else 2], rope, with_v_slot=self.differential)
            q, k = qk[:, :, 0::3], qk[:, :, 1::3]  # slots (0[, 3]) and (1[, 4]): views
        else:
            q = rearrange(linear(self.to_q, x), "b n (s h d) -> b n s h d", h=h, d=d)  # q[, q_diff]
            kv = rearrange(linear(self.to_kv, context), "b n (s h d) -> b n s h d", h=h, d=d)  # k[, k_diff], v
            k, v = kv[:, :, :pairs], kv[:, :, pairs]
            if self.q_norm is not None:  # no RoPE in cross-attention
                q, k = self.q_norm(q), self.k_norm(k)
        # q, k: [B, N, pairs, H, D]; v: [B, N, H, D]
        if value_mask is not None:
            v = v * value_mask
        q, k = rearrange(q, "b n s h d -> s b h n d"), rearrange(k, "b n s h d -> s b h n d")
        v = rearrange(v, "b n h d -> b h n d")
        if key_mask is not None and key_mask.is_floating_point():
            key_mask = key_mask.to(q.dtype)  # SDPA takes a float bias in the query's dtype
        out = F.scaled_dot_product_attention(q[0], k[0], v, attn_mask=key_mask)
        if self.differential:
            out = out - F.scaled_dot_product_attention(q[1], k[1], v, attn_mask=key_mask)
        return linear(self.to_out, rearrange(out, "b h n d -> b n (h d)"))


class GLU(nn.Module):
    """SwiGLU input half: `proj` [2·inner, E] with bias -> a · SiLU(gate)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: Tensor) -> Tensor:
        if use_onednn(self.proj, x):  # SiLU and the product fused into the two halves' matmuls
            w, b, inner = self.proj.weight, self.proj.bias, self.proj.out_features // 2
            rows = x.reshape(-1, x.shape[-1])
            gate = ONEDNN_LINEAR(rows, w[inner:], b[inner:], "swish", [], "")
            out = ONEDNN_LINEAR.binary(rows, gate, w[:inner], b[:inner], "mul")
            return out.view(*x.shape[:-1], inner)
        a, gate = linear(self.proj, x).chunk(2, dim=-1)
        return a * F.silu(gate)


class FeedForward(nn.Module):
    """SwiGLU FF, inner = int(E · mult). Keys `ff.0.proj`, `ff.2` (index 1 is the reference's Identity)."""

    def __init__(self, dim: int, mult: float = 4, **options):
        super().__init__()
        defaults = {"no_bias": False, "glu": True, "use_conv": False, "sinusoidal": False}  # other keys: no effect
        odd = {k: v for k, v in options.items() if k in defaults and v != defaults[k]}
        if odd:
            raise ValueError(f"ff_kwargs {odd} are not used by SA3 and are not implemented (SwiGLU with biases)")
        inner = int(dim * mult)
        self.ff = nn.Sequential(GLU(dim, inner), nn.Identity(), nn.Linear(inner, dim))

    def forward(self, x: Tensor) -> Tensor:
        return linear(self.ff[2], self.ff[0](x))


class TransformerBlock(nn.Module):
    """adaLN block: modulated self-attention, plain cross-attention, additive local conditioning, modulated FF.

    The gates enter as sigmoid(1 - gate), the reference's parameterisation."""

    def __init__(self, dim: int, dim_heads: int, dim_context: int | None, local_add_cond_dim: int | None,
                 attn_kwargs: dict, ff_kwargs: dict, norm_kwargs: dict):
        super().__init__()
        self.pre_norm = BlockRMSNorm(dim, **norm_kwargs)
        self.self_attn = Attention(dim, dim_heads, **attn_kwargs)
        if dim_context is not None:
            self.cross_attend_norm = BlockRMSNorm(dim, **norm_kwargs)
            self.cross_attn = Attention(dim, dim_heads, dim_context=dim_context, **attn_kwargs)
        self.ff_norm = BlockRMSNorm(dim, **norm_kwargs)
        self.ff = FeedForward(dim, **ff_kwargs)
        self.to_scale_shift_gate = nn.Parameter(torch.randn(6 * dim) / dim**0.5)
        if local_add_cond_dim:
            self.to_local_embed = nn.Sequential(nn.Linear(local_add_cond_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        else:
            self.to_local_embed = None

    def forward(self, x: Tensor, context: Tensor | None, global_cond: Tensor, local_cond: Tensor | None,
                rope: tuple[Tensor, Tensor] | None, n_memory: int = 0, key_mask: Tensor | None = None,
                value_mask: Tensor | None = None, query_mask: Tensor | None = None,
                context_rows: Tensor | None = None, context_bias: Tensor | None = None) -> Tensor:
        """x: [B, N, E], the n_memory memory tokens first; context: [B, L, E], or [Bc, L, E] for the items
        context_rows [Bc] (int) when the others have an all-zero context; global_cond: [B, 6E] from
        `global_cond_embedder`; local_cond: [B, T or 1, local_add_cond_dim] (frame tokens only); key_mask and
        value_mask as in `Attention`; query_mask [B, N, 1] zeroes the self-attention and FF branches at padded
        frames; context_bias [B or Bc, 1, 1, L]: the cross-attention score bias of a collapsed context
        (`collapse_token_runs`). Returns [B, N, E]."""
        scale_sa, shift_sa, gate_sa, scale_ff, shift_ff, gate_ff = (
            (self.to_scale_shift_gate + global_cond).unsqueeze(1).chunk(6, dim=-1))  # each [B, 1, E]

        h = self.pre_norm(x) * (1 + scale_sa) + shift_sa
        h = self.self_attn(h, rope=rope, key_mask=key_mask, value_mask=value_mask) * torch.sigmoid(1 - gate_sa)
        x = x + (h if query_mask is None else h * query_mask)

        if context is not None and hasattr(self, "cross_attn"):
            if context_rows is None:
                x = x + self.cross_attn(self.cross_attend_norm(x), context=context, key_mask=context_bias)
            else:  # an all-zero context adds exactly zero (see DiffusionTransformer.velocity): skip those items
                h = self.cross_attn(self.cross_attend_norm(x[context_rows]), context=context, key_mask=context_bias)
                x = x.index_add(0, context_rows, h)

        if local_cond is not None and self.to_local_embed is not None:
            # frame tokens only: the memory tokens in front get no local conditioning
            embed = self.to_local_embed
            local = linear(embed[2], embed[1](linear(embed[0], local_cond)))  # [B, T, E] or [1, 1, E] (all-zero)
            x = torch.cat([x[:, :n_memory], x[:, n_memory:] + local], dim=1)

        h = self.ff_norm(x) * (1 + scale_ff) + shift_ff
        h = self.ff(h) * torch.sigmoid(1 - gate_ff)
        return x + (h if query_mask is None else h * query_mask)


class ContinuousTransformer(nn.Module):
    """The block stack with its input/output projections, memory tokens, RoPE and adaLN embedder.

    Keys: `project_in`, `project_out`, `rotary_pos_emb.inv_freq`, `memory_tokens`, `global_cond_embedder.{0,2}`,
    `layers.{i}.*`."""

    def __init__(self, dim: int, depth: int, dim_in: int, dim_out: int, dim_heads: int, dim_context: int | None,
                 global_cond_dim: int, local_add_cond_dim: int | None, num_memory_tokens: int,
                 rotary_pos_emb: bool, attn_kwargs: dict, ff_kwargs: dict, norm_kwargs: dict):
        super().__init__()
        self.project_in = nn.Linear(dim_in, dim, bias=False)
        self.project_out = nn.Linear(dim, dim_out, bias=False)
        # The reference rotates max(D // 2, 32) dims: 32 of 64 in SA3 (partial RoPE)
        self.rotary_pos_emb = RotaryEmbedding(max(dim_heads // 2, 32)) if rotary_pos_emb else None
        if rotary_pos_emb and dim_heads < 32:
            raise ValueError(f"head dim {dim_heads} < 32: the official DiT rotates max(head_dim // 2, 32) dims, "
                             "so heads need at least 32 dims (embed_dim // num_heads)")
        self.num_memory_tokens = num_memory_tokens
        if num_memory_tokens > 0:
            self.memory_tokens = nn.Parameter(torch.randn(num_memory_tokens, dim))
        self.global_cond_embedder = nn.Sequential(nn.Linear(global_cond_dim, dim), nn.SiLU(), nn.Linear(dim, dim * 6))
        self.layers = nn.ModuleList([
            TransformerBlock(dim, dim_heads, dim_context, local_add_cond_dim, attn_kwargs, ff_kwargs, norm_kwargs)
            for _ in range(depth)])
        self.gradient_checkpointing = False

    def rope(self, n: int, device) -> tuple[Tensor, Tensor] | None:
        """(cos, sin) [n, 1, 1, R/2] fp32 for positions 0..n-1, computed once per forward and shared by all blocks."""
        if self.rotary_pos_emb is None:
            return None
        angles = self.rotary_pos_emb(torch.arange(n, device=device))  # [n, R] = the frequencies twice
        angles = angles[:, None, None, : angles.shape[-1] // 2]  # broadcasts over [B, N, pairs, H, R/2]
        return angles.cos(), angles.sin()

    def forward(self, x: Tensor, context: Tensor | None, global_cond: Tensor, local_cond: Tensor | None = None,
                padding_mask: Tensor | None = None, padding_semantics: str = "mask_keys",
                context_rows: Tensor | None = None, context_bias: Tensor | None = None) -> Tensor:
        """x: [B, T, C_in]; context: [B, L, E] (or [Bc, L, E] for the items context_rows) with its score bias
        context_bias (`TransformerBlock`) or None; global_cond: [B, E];
        local_cond: [B, T or 1, C_local]; padding_mask: [B, T] bool (True = valid) or None. Returns [B, T, C_out]."""
        b, m = x.shape[0], self.num_memory_tokens
        x = self.project_in(x)
        if m > 0:
            x = torch.cat([self.memory_tokens.to(x.dtype).expand(b, -1, -1), x], dim=1)  # memory = positions 0..M-1
        rope = self.rope(x.shape[1], x.device)
        global_cond = self.global_cond_embedder(global_cond)  # [B, 6E]

        masks = {"context_rows": context_rows, "context_bias": context_bias}
        if padding_mask is not None:
            valid = F.pad(padding_mask.bool(), (m, 0), value=True)  # memory tokens are always valid: [B, N]
            if padding_semantics == "mask_keys":
                # true key masking, as flash-attn varlen (the training backend) does; varlen also leaves the
                # self-attention and FF outputs of padded frames at zero, which query_mask reproduces
                masks["key_mask"] = valid[:, None, None, :]
                masks["query_mask"] = valid[:, :, None].to(x.dtype)
            else:  # the reference's CPU fallback: padded keys keep their softmax mass but carry zero values
                masks["value_mask"] = valid[:, :, None, None].to(x.dtype)

        for block in self.layers:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, context, global_cond, local_cond, rope, m, use_reentrant=False, **masks)
            else:
                x = block(x, context, global_cond, local_cond, rope, m, **masks)
        return self.project_out(x[:, m:])


# ------------------------------------------------------------------------------------------------------------------
# Guidance (pure functions over velocities)
# ------------------------------------------------------------------------------------------------------------------

def apg_project(v0: Tensor, v1: Tensor, padding_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Split v0 [B, C, T] into parts parallel and orthogonal to v1 [B, C, T] (per item, over C and T), in fp32.

    padding_mask [B, T] (True = valid): only valid frames enter the projection and the orthogonal part is zero at
    padded frames, as the reference does. Returns (parallel, orthogonal) in v0's dtype."""
    dtype = v0.dtype
    v0, v1 = v0.float(), v1.float()
    dims = [-1, -2]
    if padding_mask is None:
        v1 = F.normalize(v1, dim=dims)
        parallel = (v0 * v1).sum(dim=dims, keepdim=True) * v1
        return parallel.to(dtype), (v0 - parallel).to(dtype)
    mask = padding_mask[:, None, :].float()
    v1 = v1 * mask
    v1 = v1 / v1.norm(dim=dims, keepdim=True).clamp(min=1e-8)
    coeff = (v0 * mask * v1).sum(dim=dims, keepdim=True)
    parallel = coeff * v1
    # the reference recomputes the coefficient from the unmasked v0 (same value: v1 is zero at padded frames)
    orthogonal = (v0 - (v0 * v1).sum(dim=dims, keepdim=True) * v1) * mask
    return parallel.to(dtype), orthogonal.to(dtype)


def guide(x: Tensor, sigma: Tensor, v_cond: Tensor, v_uncond: Tensor, cfg_scale: float, apg_scale: float = 1.0,
          cfg_norm_threshold: float = 0.0, scale_phi: float = 0.0, padding_mask: Tensor | None = None) -> Tensor:
    """Classifier-free guidance in denoised space (rectified flow: x0 = x - sigma·v), the reference's recipe.

    x, v_cond, v_uncond: [B, C, T]; sigma: [B] (= t). apg_scale 1 keeps only the part of (x0_cond - x0_uncond)
    orthogonal to x0_cond (APG), 0 is vanilla CFG, in between blends; cfg_norm_threshold > 0 caps the difference's
    norm (over valid frames); scale_phi rescales toward the conditional output's per-frame std over channels.
    Returns the guided velocity (x - x0_guided) / sigma [B, C, T]; sigma must be > 0."""
    s = sigma[:, None, None]
    denoised_cond, denoised_uncond = x - v_cond * s, x - v_uncond * s
    diff = denoised_cond - denoised_uncond
    if cfg_norm_threshold > 0:
        masked = diff if padding_mask is None else diff * padding_mask[:, None, :].float()
        norm = masked.norm(p=2, dim=[-1, -2], keepdim=True)
        diff = diff * torch.minimum(torch.ones_like(diff), cfg_norm_threshold / norm)
    if apg_scale != 0.0:
        _, orthogonal = apg_project(diff, denoised_cond, padding_mask)
        diff = orthogonal if apg_scale == 1.0 else apg_scale * orthogonal + (1 - apg_scale) * diff
    v = (x - (denoised_cond + (cfg_scale - 1) * diff)) / s
    if scale_phi != 0.0:
        ratio = v_cond.std(dim=1, keepdim=True) / v.std(dim=1, keepdim=True)
        v = scale_phi * (v * ratio) + (1 - scale_phi) * v
    return v


# ------------------------------------------------------------------------------------------------------------------
# The DiT
# ------------------------------------------------------------------------------------------------------------------

class DiffusionTransformer(nn.Module):
    """The SA3 DiT. Takes the kwargs of `model.diffusion.config` in model_config.json (other official kwargs are
    accepted and ignored unless they select a feature SA3 does not use, which is refused).

    Keys (under `model.model.` in a checkpoint): `to_timestep_embed.{0,2}`, `to_cond_embed.{0,2}`,
    `to_global_embed.{0,2}`, `transformer.*`, `preprocess_conv`, `postprocess_conv`.
    Set `gradient_checkpointing = True` to recompute each block in backward (training)."""

    def __init__(self, io_channels: int = 32, patch_size: int = 1, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 8, cond_token_dim: int = 0, global_cond_dim: int = 0,
                 local_add_cond_dim: int | None = None, num_memory_tokens: int = 0, global_cond_type: str = "adaLN",
                 timestep_features_type: str = "expo", timestep_features_dim: int = 256,
                 timestep_features_logsnr: bool = False, norm_type: str = "rms_norm", norm_kwargs: dict | None = None,
                 attn_kwargs: dict | None = None, ff_kwargs: dict | None = None, rotary_pos_emb: bool = True,
                 project_cond_tokens: bool = True, project_global_cond: bool = True,
                 timestep_cond_type: str = "global", transformer_type: str = "continuous_transformer",
                 diffusion_objective: str = "rectified_flow", **official_kwargs):
        super().__init__()
        problems = [f"{k}={v!r}" for k, v in official_kwargs.items() if k in _UNSUPPORTED and v]
        if official_kwargs.get("final_cross_attn_ix", -1) not in (-1, None):
            problems.append(f"final_cross_attn_ix={official_kwargs['final_cross_attn_ix']}")
        if global_cond_type != "adaLN" or global_cond_dim <= 0:
            problems.append(f"global_cond_type={global_cond_type!r}, global_cond_dim={global_cond_dim}")
        if timestep_features_type != "expo" or timestep_cond_type != "global":
            problems.append(f"timestep_features_type={timestep_features_type!r}, "
                            f"timestep_cond_type={timestep_cond_type!r}")
        if norm_type != "rms_norm" or transformer_type != "continuous_transformer":
            problems.append(f"norm_type={norm_type!r}, transformer_type={transformer_type!r}")
        if not (project_cond_tokens and project_global_cond):
            problems.append("project_cond_tokens/project_global_cond = false")
        if patch_size != 1:
            problems.append(f"patch_size={patch_size} (SA3 uses 1)")
        if diffusion_objective not in OBJECTIVES:
            problems.append(f"diffusion_objective={diffusion_objective!r}")
        if problems:
            raise ValueError("DiT config: " + "; ".join(problems) + ". This implementation covers the SA3 DiT "
                             "(adaLN, expo timestep features, rms_norm, rectified flow); check model.diffusion.")
        self.io_channels, self.embed_dim, self.local_add_cond_dim = io_channels, embed_dim, local_add_cond_dim
        self.diffusion_objective, self.timestep_features_logsnr = diffusion_objective, timestep_features_logsnr

        self.timestep_features = ExpoFourierFeatures(timestep_features_dim, 0.5, 10000.0)  # no parameters
        self.to_timestep_embed = nn.Sequential(
            nn.Linear(timestep_features_dim, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim))
        # No biases: a zero context maps to zero, which makes all-zero tokens the "null" condition of CFG
        if cond_token_dim > 0:
            self.to_cond_embed = nn.Sequential(
                nn.Linear(cond_token_dim, embed_dim, bias=False), nn.SiLU(), nn.Linear(embed_dim, embed_dim, bias=False))
        self.to_global_embed = nn.Sequential(
            nn.Linear(global_cond_dim, embed_dim, bias=False), nn.SiLU(), nn.Linear(embed_dim, embed_dim, bias=False))

        self.transformer = ContinuousTransformer(
            embed_dim, depth, dim_in=io_channels, dim_out=io_channels,
            dim_heads=embed_dim // num_heads, dim_context=embed_dim if cond_token_dim > 0 else None,
            global_cond_dim=embed_dim, local_add_cond_dim=local_add_cond_dim, num_memory_tokens=num_memory_tokens,
            rotary_pos_emb=rotary_pos_emb, attn_kwargs=dict(attn_kwargs or {}), ff_kwargs=dict(ff_kwargs or {}),
            norm_kwargs=dict(norm_kwargs or {}))
        # 1x1 convs with a residual around each (zero-initialised officially: the DiT starts as identity there)
        self.preprocess_conv = nn.Conv1d(io_channels, io_channels, 1, bias=False)
        self.postprocess_conv = nn.Conv1d(io_channels, io_channels, 1, bias=False)
        nn.init.zeros_(self.preprocess_conv.weight)
        nn.init.zeros_(self.postprocess_conv.weight)

    @property
    def gradient_checkpointing(self) -> bool:
        return self.transformer.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        self.transformer.gradient_checkpointing = bool(value)

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype (read from a norm gain: adapters never wrap norms, and inv_freq stays fp32)."""
        return self.transformer.layers[0].pre_norm.gamma.dtype if len(self.transformer.layers) else torch.float32

    def timestep_condition(self, t: Tensor) -> Tensor:
        """t [B] -> the features fed to `to_timestep_embed` [B, 256], computed from fp32 t (bf16 t would corrupt
        the conditioning near t = 1) and cast to the weights' dtype only afterwards."""
        t = t.float()
        if self.timestep_features_logsnr:  # the reference's optional log-SNR input, normalised to [0, 1]
            t = t.clamp(1e-7, 1 - 1e-7)
            t = (5.0 - torch.log((1 - t) / t).clamp(-12.0, 5.0)) / 17.0
        return self.timestep_features(t)

    def velocity(self, x: Tensor, t: Tensor, cross_attn_cond: Tensor | None, global_cond: Tensor,
                 local_add_cond: Tensor | None = None, padding_mask: Tensor | None = None,
                 padding_semantics: str = "mask_keys") -> Tensor:
        """One conditional pass, no guidance (what training calls; honours `gradient_checkpointing`).

        x: [B, C, T]; t: [B] (kept fp32); cross_attn_cond: [B, L, Dc]; global_cond: [B, Dg];
        local_add_cond: [B, C + 1, T] = [inpaint mask ‖ masked latents], None meaning zeros (text-to-audio);
        padding_mask: [B, T] bool, True = valid (None or all-true: no masking). Returns v [B, C, T]."""
        if padding_semantics not in PADDING_SEMANTICS:
            raise ValueError(f"padding_semantics={padding_semantics!r}; use one of {PADDING_SEMANTICS}")
        dtype = self.dtype
        x = x.to(dtype)
        temb = self.to_timestep_embed(self.timestep_condition(t).to(dtype))
        global_embed = self.to_global_embed(global_cond.to(dtype)) + temb  # [B, E]
        context, context_rows, context_bias = None, None, None
        if cross_attn_cond is not None:
            # Bias-free projections and a zero-preserving q/k norm make an all-zero context (CFG's default uncond
            # branch) add exactly zero in every cross-attention, values and gradients alike: embed and attend
            # only the items with a context
            has_context = cross_attn_cond.flatten(1).any(dim=1)
            if has_context.any():
                if not has_context.all():
                    context_rows = has_context.nonzero().squeeze(1)
                    cross_attn_cond = cross_attn_cond[context_rows]
                context = self.to_cond_embed(cross_attn_cond.to(dtype))
                # the attention's dtype decides whether the score bias can hold log(n) (autocast: half precision)
                half = dtype != torch.float32 or torch.is_autocast_enabled(cross_attn_cond.device.type)
                runs = collapse_token_runs(cross_attn_cond, half_precision_bias=half)
                if runs is not None:  # a prompt's padding tokens: one key each run, weighted by its length
                    first, context_bias = runs
                    context = context.gather(1, first[:, :, None].expand(-1, -1, context.shape[2]))

        local = None
        if self.local_add_cond_dim:
            if local_add_cond is None or not local_add_cond.any():
                # all-zero local cond (text-to-audio): every frame gets the same embedding, so embed one row
                local = x.new_zeros(1, 1, self.local_add_cond_dim)
            else:
                local = rearrange(local_add_cond.to(dtype), "b c t -> b t c")
        if padding_mask is not None:
            padding_mask = padding_mask.bool()
            padding_mask = None if padding_mask.all() else padding_mask  # all-true: skip the masks entirely

        x = self.preprocess_conv(x) + x
        x = self.transformer(x.transpose(1, 2), context, global_embed, local, padding_mask, padding_semantics,
                             context_rows, context_bias)
        x = x.transpose(1, 2)
        return self.postprocess_conv(x) + x

    def forward(self, x: Tensor, t: Tensor, cross_attn_cond: Tensor | None, global_cond: Tensor,
                local_add_cond: Tensor | None = None, padding_mask: Tensor | None = None, cfg_scale: float = 1.0,
                negative_cross_attn_cond: Tensor | None = None, negative_cross_attn_mask: Tensor | None = None,
                apg_scale: float = 1.0, cfg_interval: tuple[float, float] = (0.0, 1.0),
                cfg_norm_threshold: float = 0.0, scale_phi: float = 0.0, padding_semantics: str = "mask_keys",
                cross_attn_mask: Tensor | None = None) -> Tensor:
        """Velocity with optional classifier-free guidance, exactly as the official DiT computes it.

        x: [B, C, T] noisy latents; t: [B] (or a scalar) in [0, 1], kept fp32; cross_attn_cond: [B, L, Dc] = [prompt tokens
        (padded positions hold the learned padding embedding) ‖ seconds token]; global_cond: [B, Dg] (seconds
        embedding); local_add_cond: [B, C + 1, T] (zeros or None for text-to-audio); padding_mask: [B, T] bool,
        True = valid frame. cross_attn_mask is accepted and ignored: the official DiT disables it, so padded prompt
        positions take part in cross-attention.

        Guidance runs when cfg_scale != 1 and cfg_interval[0] <= t[0] <= cfg_interval[1]: one batched pass over
        [cond ‖ uncond], sharing x, t, global_cond, local_add_cond and padding_mask. The uncond context is:
        - no negative: all zeros [B, L, Dc], the seconds token included;
        - negative_cross_attn_cond [B, L, Dc] (same L as the positive; [negative prompt ‖ seconds token]) with
          negative_cross_attn_mask [B, L] (True = real token): positions where the mask is False are ZEROED
          (not the learned padding embedding), as the reference does. An empty-string negative thus keeps only
          its seconds token.
        Then `guide` (denoised space, divides by t). Returns the velocity [B, C, T]."""
        t = torch.as_tensor(t, device=x.device).float().reshape(-1).expand(x.shape[0])  # [B], also from a scalar
        if not (cfg_scale != 1.0 and cross_attn_cond is not None and cfg_interval[0] <= t[0] <= cfg_interval[1]):
            return self.velocity(x, t, cross_attn_cond, global_cond, local_add_cond, padding_mask, padding_semantics)

        if negative_cross_attn_cond is None:
            uncond = torch.zeros_like(cross_attn_cond)
        elif negative_cross_attn_mask is not None:
            keep = negative_cross_attn_mask.bool().unsqueeze(2)
            uncond = torch.where(keep, negative_cross_attn_cond, torch.zeros_like(negative_cross_attn_cond))
        else:
            uncond = negative_cross_attn_cond

        def twice(v: Tensor | None) -> Tensor | None:
            return None if v is None else torch.cat([v, v], dim=0)

        v = self.velocity(twice(x), twice(t), torch.cat([cross_attn_cond, uncond.to(cross_attn_cond.dtype)], dim=0),
                          twice(global_cond), twice(local_add_cond), twice(padding_mask), padding_semantics)
        v_cond, v_uncond = v.chunk(2, dim=0)
        return guide(x.to(v.dtype), t, v_cond, v_uncond, cfg_scale, apg_scale, cfg_norm_threshold, scale_phi,
                     padding_mask)


class DiTWrapper(nn.Module):
    """The official `DiTWrapper` level: `.model` is the DiT, so keys are `model.*` here and `model.model.*` in the
    full SA3 module tree; LoRA files address layers relative to this wrapper (`model.transformer.layers...`)."""

    def __init__(self, diffusion_objective: str = "rectified_flow", **config):
        super().__init__()
        self.diffusion_objective = diffusion_objective
        self.model = DiffusionTransformer(diffusion_objective=diffusion_objective, **config)

    def forward(self, x: Tensor, t: Tensor, cross_attn_cond: Tensor | None = None, global_cond: Tensor | None = None,
                local_add_cond: Tensor | None = None, **kwargs) -> Tensor:
        return self.model(x, t, cross_attn_cond, global_cond, local_add_cond, **kwargs)
