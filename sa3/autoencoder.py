"""SAME: the Stable Audio 3 waveform autoencoder (SAME-S with chunked attention, SAME-L with sliding windows).

Pipeline (sa3-reference.md §3). Encode: stereo audio [B, 2, N] -> patches [B, 2·P, N/P] (P = 256 real) -> encoder
resampling block (16 patch tokens + 1 learned token per latent; the learned token's output is the latent) ->
Linear -> soft-norm bottleneck -> latents [B, 256, N/4096]. Decode runs the mirror image: each latent token is
followed by 16 learned tokens whose outputs become the 16 patches of that latent.

Module and parameter names equal the official `pretransform.model.*` keys with that prefix removed (`encoder.layers.0.
transformers.3.self_attn.to_qkv.weight`, `decoder.layers.3.mapping.weight_g`, `bottleneck.running_std`, ...), so a
checkpoint loads with a strict key match.
"""

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .channels import stereo_weights
from .layers import DynamicTanh, RMSNorm, RotaryEmbedding, apply_partial_rotary, normal_like

# --- attention kernels -------------------------------------------------------------------------------------------

def sliding_window_attention(q: Tensor, k: Tensor, v: Tensor, window: tuple[int, int],
                             block: int | None = None) -> Tensor:
    """Exact band attention: query i sees key j iff -window[0] <= j - i <= window[1] (both ends inclusive, as
    flash-attn's `window_size`). q, k, v: [B, H, N, D] -> [B, H, N, D].

    Queries are cut into blocks of `block`; each block attends to its own keys plus a halo of window keys on each
    side, so all blocks run as one batched SDPA call over [B, H, n_blocks, block, block + w_left + w_right] scores
    instead of an N x N score matrix. The default block is the window width (34 tokens for SAME-L): measured on
    CPU at SAME-L's 30 s shape (48 heads x 5508 tokens, 1 thread) it takes 0.62 s per call, against 0.81 s with
    128-query blocks and 3.9 s with 1024 (the reference's chunked-halo fallback); full masked SDPA needs an N x N
    mask and is 5x slower already at 10 s."""
    w_left, w_right = window
    n = q.shape[-2]
    block = min(block or max(16, w_left + w_right), n)
    n_blocks = math.ceil(n / block)
    n_padded = n_blocks * block
    span = block + w_left + w_right
    q = F.pad(q, (0, 0, 0, n_padded - n))
    k = F.pad(k, (0, 0, w_left, n_padded - n + w_right))
    v = F.pad(v, (0, 0, w_left, n_padded - n + w_right))
    q = rearrange(q, "b h (nb s) d -> b h nb s d", s=block)
    k = k.unfold(2, span, block).transpose(-1, -2)  # [B, H, nb, span, D]: block keys plus both halos
    v = v.unfold(2, span, block).transpose(-1, -2)
    q_pos = torch.arange(n_padded, device=q.device).view(n_blocks, block, 1)
    k_pos = (torch.arange(n_blocks, device=q.device).view(n_blocks, 1, 1) * block - w_left
             + torch.arange(span, device=q.device).view(1, 1, span))
    delta = k_pos - q_pos
    # Zero-padded keys outside [0, N) are masked; padded queries (discarded below) may see them, so no row is empty.
    visible = (delta >= -w_left) & (delta <= w_right) & (((k_pos >= 0) & (k_pos < n)) | (q_pos >= n))
    b = q.shape[0]  # batch and heads merged: 4-D inputs (MPS before torch 2.7 takes no 5-D attention)
    q, k, v = (rearrange(t, "b h nb s d -> (b h) nb s d") for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
    return rearrange(out, "(b h) nb s d -> b h (nb s) d", b=b)[:, :, :n]


def band_mask(n: int, window: tuple[int, int], device=None) -> Tensor:
    """[N, N] bool, True where key j is visible to query i (-window[0] <= j - i <= window[1])."""
    delta = torch.arange(n, device=device)[None, :] - torch.arange(n, device=device)[:, None]
    return (delta >= -window[0]) & (delta <= window[1])


# --- transformer block ---------------------------------------------------------------------------------------------

class SAMEAttention(nn.Module):
    """Self-attention with q/k norm over each head (DyT or RMS), partial RoPE and optional differential attention.

    Differential: `to_qkv` gives q, k, v, q_diff, k_diff (dim each) and the output is attn(q, k, v) - attn(q_diff,
    k_diff, v), with no learned lambda. Both maps run in one SDPA call over 2H heads."""

    def __init__(self, dim: int, dim_heads: int, differential: bool, dyt: bool, qk_norm_eps: float = 1e-3):
        super().__init__()
        self.n_heads, self.differential = dim // dim_heads, differential
        self.to_qkv = nn.Linear(dim, dim * (5 if differential else 3), bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)
        self.q_norm = DynamicTanh(dim_heads) if dyt else RMSNorm(dim_heads, eps=qk_norm_eps)
        self.k_norm = DynamicTanh(dim_heads) if dyt else RMSNorm(dim_heads, eps=qk_norm_eps)

    def forward(self, x: Tensor, angles: Tensor, window: tuple[int, int] | None = None,
                queries: slice | None = None) -> Tensor:
        """x: [B, N, dim], angles: [N, rot_dim] RoPE angles; window: band in tokens, None for full attention.
        queries: only these positions' outputs (full attention only) -> [B, len(queries), dim]."""
        h = self.n_heads
        if self.differential:
            q, k, v, q_diff, k_diff = rearrange(self.to_qkv(x), "b n (s h d) -> s b h n d", s=5, h=h)
            q, k, v = torch.cat([q, q_diff], dim=1), torch.cat([k, k_diff], dim=1), torch.cat([v, v], dim=1)
        else:
            q, k, v = rearrange(self.to_qkv(x), "b n (s h d) -> s b h n d", s=3, h=h)  # each [B, H, N, D]
        q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_partial_rotary(q, angles), apply_partial_rotary(k, angles)
        if queries is not None:
            q = q[:, :, queries]
        if window is None:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = sliding_window_attention(q, k, v, window)
        if self.differential:
            out = out[:, :h] - out[:, h:]
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class GLU(nn.Module):
    """proj -> (value, gate) halves -> value * act(gate). act is SiLU, or sin(πx) in "sinusoidal" decoder blocks."""

    def __init__(self, dim: int, inner_dim: int, sinusoidal: bool):
        super().__init__()
        self.proj = nn.Linear(dim, inner_dim * 2)
        self.sinusoidal = sinusoidal

    def forward(self, x: Tensor) -> Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * (torch.sin(3.14159265359 * gate) if self.sinusoidal else F.silu(gate))  # the reference's π


class FeedForward(nn.Module):
    """GLU feed-forward, biased. `ff` is indexed like the checkpoint: ff.0 = GLU, ff.2 = output Linear."""

    def __init__(self, dim: int, mult: float, sinusoidal: bool):
        super().__init__()
        inner_dim = int(dim * mult)
        self.ff = nn.Sequential(GLU(dim, inner_dim, sinusoidal), nn.Identity(), nn.Linear(inner_dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.ff(x)


class SAMEBlock(nn.Module):
    """Pre-norm residual block: x += attn(norm(x)); x += ff(norm(x)). Owns its RoPE frequencies (`rope.inv_freq`,
    rotating dim_heads // 2 of each head's dims)."""

    def __init__(self, dim: int, dim_heads: int, differential: bool, dyt: bool, ff_mult: float, sinusoidal: bool):
        super().__init__()
        dim_heads = min(dim_heads, dim)
        norm = (lambda: DynamicTanh(dim)) if dyt else (lambda: RMSNorm(dim, eps=1e-3))
        self.pre_norm = norm()
        self.self_attn = SAMEAttention(dim, dim_heads, differential, dyt)
        self.ff_norm = norm()
        self.ff = FeedForward(dim, ff_mult, sinusoidal)
        self.rope = RotaryEmbedding(dim_heads // 2)

    def forward(self, x: Tensor, window: tuple[int, int] | None = None, keep: slice | None = None) -> Tensor:
        """x: [B, N, dim] -> [B, N, dim]. RoPE positions are 0..N-1 of this sequence (per chunk for chunked
        attention). keep: compute only these positions' outputs (their attention still sees every token)."""
        angles = self.rope.angles_for_length(x.shape[-2], device=x.device)
        if keep is None:
            x = x + self.self_attn(self.pre_norm(x), angles, window)
        else:
            x = x[:, keep] + self.self_attn(self.pre_norm(x), angles, window, queries=keep)
        return x + self.ff(self.ff_norm(x))


# --- resampling block ----------------------------------------------------------------------------------------------

class WNConv1d(nn.Module):
    """Conv1d with legacy weight norm (dim 0): weight = weight_g * weight_v / ||weight_v||, the norm over (in, k) per
    output channel. Keys `weight_g` [out, 1, 1], `weight_v` [out, in, k], `bias` [out]; 'same' padding."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool = True):
        super().__init__()
        self.weight_v = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size) / math.sqrt(in_channels))
        self.weight_g = nn.Parameter(self.weight_v.detach().norm(dim=(1, 2), keepdim=True))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    @property
    def weight(self) -> Tensor:
        return self.weight_v * (self.weight_g / self.weight_v.norm(dim=(1, 2), keepdim=True))  # torch's op order

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, in, L] -> [B, out, L]."""
        return F.conv1d(x, self.weight, self.bias, padding="same")


class ResamplingBlock(nn.Module):
    """The SAME transformer resampler (the official `TransformerResamplingBlock`).

    encoder: [B, in, L] patches -> mapping -> groups of `stride` tokens + 1 learned token -> transformer -> the learned
    token of each group -> [B, out, ceil(L / stride)] (L first padded to the attention alignment).
    decoder: [B, in, T] latents -> each latent token + `stride` learned tokens -> transformer -> the learned tokens
    -> mapping -> [B, out, T·stride] (T first padded to the attention alignment).

    Attention is either chunked (`chunk_size` patch tokens = chunk_size / stride groups per chunk, optionally with the
    second half of the blocks on chunks shifted by half a chunk) or a sliding window of `sliding_window` groups."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, kind: str, transformer_depth: int = 3,
                 sliding_window: Sequence[int] | None = None, chunk_size: int = 128, chunk_midpoint_shift: bool = False,
                 dim_heads: int = 128, differential: bool = True, dyt: bool = True, variable_stride: bool = False,
                 sinusoidal_blocks: int = 0, mask_noise: float = 0.0, ff_mult: float = 3, mapping_bias: bool = True,
                 conv_mapping: bool = False):
        super().__init__()
        if kind not in ("encoder", "decoder"):
            raise ValueError(f"ResamplingBlock kind={kind!r}; use 'encoder' or 'decoder'")
        if sliding_window is None and chunk_size % stride:
            raise ValueError(f"SAME chunk_size={chunk_size} must be a multiple of the stride {stride}")
        self.kind, self.stride, self.depth = kind, stride, transformer_depth
        self.chunk_size, self.chunk_midpoint_shift, self.mask_noise = chunk_size, chunk_midpoint_shift, mask_noise
        group = stride + 1  # tokens per latent: stride patch tokens and one latent token
        self.window = None if sliding_window is None else (sliding_window[0] * group, sliding_window[1] * group)
        self.n_new = 1 if kind == "encoder" else stride  # learned tokens per group (= outputs per group)
        dim = out_channels if kind == "encoder" else in_channels
        self.mapping = (WNConv1d(in_channels, out_channels, 3 if conv_mapping else 1, bias=mapping_bias)
                        if in_channels != out_channels else nn.Identity())
        self.transformers = nn.ModuleList(
            SAMEBlock(dim, dim_heads, differential, dyt, ff_mult, sinusoidal=(transformer_depth - i) < sinusoidal_blocks)
            for i in range(transformer_depth))
        # variable_stride checkpoints hold one learned token broadcast over the group
        self.new_tokens = nn.Parameter(1e-5 * torch.randn(1, 1 if variable_stride else self.n_new, dim))

    @property
    def latent_alignment(self) -> int:
        """Latent counts are padded to a multiple of this: chunk_size / stride when chunked, 1 with a sliding window."""
        return 1 if self.window is not None else self.chunk_size // self.stride

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """x: [B, in_channels, L] -> [B, out_channels, L'] (see the class docstring). `generator` drives the decoder's
        `mask_noise` on the learned tokens (the global RNG when None, as the reference)."""
        if self.depth == 0:
            return self.mapping(x)
        b = x.shape[0]
        if self.kind == "encoder":
            # pad before the mapping, as the reference: padded silence is projected like real silence
            x = F.pad(x, (0, -x.shape[-1] % (self.latent_alignment * self.stride)))
            x = rearrange(self.mapping(x), "b d (n s) -> b n s d", s=self.stride)  # [B, T, stride, dim]
        else:
            x = F.pad(x, (0, -x.shape[-1] % self.latent_alignment))
            x = rearrange(x, "b d n -> b n 1 d")  # [B, T, 1, dim]
        new_tokens = self.new_tokens.expand(b * x.shape[1], self.n_new, -1)
        if self.mask_noise > 0:  # the reference adds it in eval too (decoder only in the real configs)
            new_tokens = new_tokens + self.mask_noise * normal_like(new_tokens, generator)
        x = torch.cat([x, new_tokens.reshape(b, x.shape[1], self.n_new, -1)], dim=2)  # [B, T, group, dim]
        x = self.run_transformers(rearrange(x, "b n g d -> b (n g) d"))  # the learned tokens' outputs
        x = rearrange(x, "b n d -> b d n")
        return self.mapping(x) if self.kind == "decoder" else x

    def run_transformers(self, x: Tensor) -> Tensor:
        """x: [B, N, dim] token sequence of groups (N = T · group) -> the outputs of each group's learned tokens,
        [B, T · n_new, dim]."""
        group = self.stride + 1
        if self.window is not None:
            for block in self.transformers:
                x = block(x, window=self.window)
            return self.learned_outputs(x)
        chunk = self.chunk_size + self.chunk_size // self.stride  # tokens per attention chunk, whole groups
        # The encoder keeps one token per group, so its last block computes only those rows (attention still sees
        # every token): exact, and it skips 16/17 of that block. Needs group-aligned chunks, which they are unless
        # a midpoint shift cuts a group in half.
        shift = chunk // 2 if self.chunk_midpoint_shift else 0
        keep = slice(group - 1, None, group) if self.kind == "encoder" and shift % group == 0 else None
        if not self.chunk_midpoint_shift:
            x = self.run_chunked(x, self.transformers, chunk, keep)
            return x if keep is not None else self.learned_outputs(x)
        if 2 * shift != chunk:
            raise ValueError(f"SAME midpoint shift needs an even attention chunk; got {chunk} tokens")
        x = self.run_chunked(x, self.transformers[:self.depth // 2], chunk)
        # Second half: chunk boundaries move by half a chunk. The sequence is extended by copies of its first and
        # last half chunk (not zeros) so the edge chunks are full, then trimmed back.
        x = torch.cat([x[:, :shift], x, x[:, -shift:]], dim=1)
        x = self.run_chunked(x, self.transformers[self.depth // 2:], chunk, keep)
        if keep is not None:  # one token per group left: trim the copied groups
            return x[:, shift // group:-(shift // group)]
        return self.learned_outputs(x[:, shift:-shift])

    def learned_outputs(self, x: Tensor) -> Tensor:
        """[B, T · group, dim] -> the last n_new tokens of each group, [B, T · n_new, dim]."""
        x = rearrange(x, "b (n g) d -> b n g d", g=self.stride + 1)[:, :, -self.n_new:]
        return rearrange(x, "b n g d -> b (n g) d")

    @staticmethod
    def run_chunked(x: Tensor, blocks: Sequence[nn.Module], chunk: int, keep: slice | None = None) -> Tensor:
        """Independent attention chunks of `chunk` tokens, folded into the batch. keep: positions (within each
        chunk) the last block computes; the result then holds only those."""
        b = x.shape[0]
        x = rearrange(x, "b (nc c) d -> (b nc) c d", c=chunk)
        for i, block in enumerate(blocks):
            x = block(x, keep=keep if i == len(blocks) - 1 else None)
        return rearrange(x, "(b nc) c d -> b (nc c) d", b=b)


class Transpose(nn.Module):
    """[..., a, b] -> [..., b, a]. Placeholders that keep the official `layers.<i>` indices of the Linear layers."""

    def forward(self, x: Tensor) -> Tensor:
        return x.transpose(-1, -2)


_BLOCK_KWARGS = ("sliding_window", "chunk_size", "chunk_midpoint_shift", "dim_heads", "differential", "dyt",
                 "variable_stride", "mask_noise", "ff_mult", "mapping_bias", "conv_mapping")
_UNSUPPORTED = ("conformer", "layer_scale", "feat_scale", "cross_attn", "causal")


def _block_kwargs(config: dict, where: str) -> dict:
    for key in _UNSUPPORTED:
        if config.get(key):
            raise ValueError(f"SAME {where}: {key}={config[key]!r} is not part of the released SAME models "
                             "and is not implemented")
    return {k: config[k] for k in _BLOCK_KWARGS if k in config}


class SAMEEncoder(nn.Module):
    """Patches [B, in_channels, L] -> [B, latent_dim, T] (before the bottleneck). `layers` = resampling blocks, then
    Transpose, Linear(width, latent_dim), Transpose (official indices). Takes the official config kwargs."""

    def __init__(self, in_channels: int = 2, channels: int = 128, latent_dim: int = 32, c_mults=(1, 2, 4, 8),
                 strides=(2, 4, 8, 8), transformer_depths=(3, 3, 3, 3), **kwargs):
        super().__init__()
        dims = [in_channels] + [c * channels for c in c_mults]
        block_kwargs = _block_kwargs(kwargs, "encoder")
        blocks = [ResamplingBlock(dims[i], dims[i + 1], strides[i], "encoder", transformer_depths[i], **block_kwargs)
                  for i in range(len(c_mults))]
        self.layers = nn.ModuleList([*blocks, Transpose(), nn.Linear(dims[-1], latent_dim), Transpose()])

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class SAMEDecoder(nn.Module):
    """[B, latent_dim, T] -> patches [B, out_channels, T·prod(strides)]. `layers` = Transpose, Linear(latent_dim,
    width), Transpose, then resampling blocks from the deepest level up (official indices)."""

    def __init__(self, out_channels: int = 2, channels: int = 128, latent_dim: int = 32, c_mults=(1, 2, 4, 8),
                 strides=(2, 4, 8, 8), transformer_depths=(3, 3, 3, 3), sinusoidal_blocks=(0, 0, 0, 0), **kwargs):
        super().__init__()
        dims = [out_channels] + [c * channels for c in c_mults]
        block_kwargs = _block_kwargs(kwargs, "decoder")
        blocks = [ResamplingBlock(dims[i], dims[i - 1], strides[i - 1], "decoder", transformer_depths[i - 1],
                                  sinusoidal_blocks=sinusoidal_blocks[i - 1], **block_kwargs)
                  for i in range(len(c_mults), 0, -1)]
        self.layers = nn.ModuleList([Transpose(), nn.Linear(latent_dim, dims[-1]), Transpose(), *blocks])

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        for layer in self.layers:
            x = layer(x, generator) if isinstance(layer, ResamplingBlock) else layer(x)
        return x


# --- bottleneck and patching ---------------------------------------------------------------------------------------

class SoftNormBottleneck(nn.Module):
    """Encode: (y · scaling_factor + bias) / running_std. Decode: z · running_std only (the decoder was trained on the
    scaled latents, so scale and bias are not inverted), plus the reference's optional regularisation noise.

    Parameters: `scaling_factor`, `bias` [1, dim, 1]; `noise_scaling_factor` [1, noise_augment_dim, 1] (zero-sized in
    the released models); `running_std` [1] when auto_scale (a frozen parameter, as in the checkpoint)."""

    def __init__(self, dim: int = 32, noise_augment_dim: int = 0, noise_regularize: bool = False,
                 auto_scale: bool = False, **_ignored):
        super().__init__()
        self.noise_augment_dim, self.noise_regularize = noise_augment_dim, noise_regularize
        self.scaling_factor = nn.Parameter(torch.ones(1, dim, 1))
        self.bias = nn.Parameter(torch.zeros(1, dim, 1))
        self.noise_scaling_factor = nn.Parameter(torch.ones(1, noise_augment_dim, 1))
        self.running_std = nn.Parameter(torch.ones(1), requires_grad=False) if auto_scale else None

    def encode(self, y: Tensor) -> Tensor:
        """y: [B, dim, T] encoder output -> latents [B, dim, T]. (The reference's training-time running_std update
        is not done: SAME is frozen here.)"""
        z = y * self.scaling_factor + self.bias
        return z / self.running_std if self.running_std is not None else z

    def decode(self, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """z: [B, dim, T] latents -> decoder input [B, dim + noise_augment_dim, T]."""
        x = z * self.running_std if self.running_std is not None else z
        if self.noise_regularize:
            scaling = self.running_std if self.running_std is not None else x.std(dim=-1, keepdim=True)
            noise = normal_like(x, generator)  # randn_like's draws, as the reference
            x = x + noise * scaling * (5e-2 if self.training else 1e-3)
        if self.noise_augment_dim > 0:
            noise = normal_like(x.new_empty(x.shape[0], self.noise_augment_dim, x.shape[-1]), generator)
            x = torch.cat([x, self.noise_scaling_factor * noise], dim=1)
        return x


class PatchedPretransform(nn.Module):
    """Waveform <-> patches, no parameters. [B, C, N] -> [B, C·P, ceil(N / P)] with channel index c·P + h."""

    def __init__(self, channels: int, patch_size: int, oversampling: int = 1, postfilter_channels: int = 0, **_ignored):
        super().__init__()
        if oversampling != 1 or postfilter_channels:
            raise ValueError("PatchedPretransform: oversampling / postfilter are not used by SAME and not implemented")
        self.channels, self.patch_size = channels, patch_size

    def encode(self, audio: Tensor) -> Tensor:
        audio = F.pad(audio, (0, -audio.shape[-1] % self.patch_size))
        return rearrange(audio, "b c (l h) -> b (c h) l", h=self.patch_size)

    def decode(self, patches: Tensor) -> Tensor:
        return rearrange(patches, "b (c h) l -> b c (l h)", h=self.patch_size)


# --- the autoencoder -----------------------------------------------------------------------------------------------

class SAMEAutoencoder(nn.Module):
    """The official `AudioAutoencoder` with a SAME encoder/decoder (keys `encoder.*`, `decoder.*`, `bottleneck.*`).

    `encode`/`decode` follow the config's `chunked` flag unless told otherwise (128-latent chunks, 32 overlap, as the
    official pretransform); `encode_chunked`/`decode_chunked` always chunk. fp32 is recommended: the differential
    attention cancels catastrophically in fp16."""

    def __init__(self, encoder: SAMEEncoder, decoder: SAMEDecoder, bottleneck: SoftNormBottleneck,
                 pretransform: PatchedPretransform, latent_dim: int, downsampling_ratio: int, io_channels: int = 2,
                 sample_rate: int = 44100, soft_clip: bool = False, chunked: bool = False, iterate_batch: bool = False):
        super().__init__()
        self.encoder, self.decoder, self.bottleneck, self.pretransform = encoder, decoder, bottleneck, pretransform
        self._latent_dim, self._downsampling_ratio, self._io_channels = latent_dim, downsampling_ratio, io_channels
        self.sample_rate, self.soft_clip, self.chunked, self.iterate_batch = sample_rate, soft_clip, chunked, iterate_batch

    @classmethod
    def from_config(cls, pretransform_config: dict, sample_rate: int = 44100) -> "SAMEAutoencoder":
        """`model.pretransform` of model_config.json ({"type": "autoencoder", "chunked", "iterate_batch", "config":
        {...}}), or a bare autoencoder config (the `model` of a SAME-only repo: {"encoder", "decoder", ...})."""
        outer = pretransform_config if "config" in pretransform_config else {}
        cfg = pretransform_config.get("config", pretransform_config)
        try:
            encoder = SAMEEncoder(**cfg["encoder"]["config"])
            decoder = SAMEDecoder(**cfg["decoder"]["config"])
            bottleneck = SoftNormBottleneck(**cfg["bottleneck"]["config"])
            pretransform = PatchedPretransform(**cfg["pretransform"]["config"])
            return cls(encoder, decoder, bottleneck, pretransform, latent_dim=cfg["latent_dim"],
                       downsampling_ratio=cfg["downsampling_ratio"], io_channels=cfg.get("io_channels", 2),
                       sample_rate=sample_rate, soft_clip=cfg["decoder"].get("soft_clip", False),
                       chunked=outer.get("chunked", False), iterate_batch=outer.get("iterate_batch", False))
        except KeyError as e:
            raise ValueError(f"SAME autoencoder config: missing {e.args[0]!r} (expected model.pretransform of "
                             "model_config.json with encoder/decoder/bottleneck/pretransform sections)") from None

    # --- shape facts ---
    @property
    def latent_dim(self) -> int:
        return self._latent_dim

    @property
    def downsampling_ratio(self) -> int:
        """Audio samples per latent frame (4096 real)."""
        return self._downsampling_ratio

    @property
    def io_channels(self) -> int:
        return self._io_channels

    @property
    def min_length(self) -> int:
        """Latent alignment: outputs are padded to a multiple of this many latents (2 chunked SAME-S, 1 SAME-L)."""
        return max(m.latent_alignment for m in self.modules() if isinstance(m, ResamplingBlock))

    # --- whole-signal passes ---
    def encode_unchunked(self, audio: Tensor) -> Tensor:
        """audio [B, io_channels, N] -> latents [B, latent_dim, T], T = ceil(N / ratio) rounded up to min_length."""
        if self.iterate_batch and audio.shape[0] > 1:  # the reference's per-item loop (lower peak memory)
            y = torch.cat([self.encoder(self.pretransform.encode(a[None])) for a in audio])
        else:
            y = self.encoder(self.pretransform.encode(audio))
        return self.bottleneck.encode(y)

    def decode_unchunked(self, latents: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """latents [B, latent_dim, T] -> audio [B, io_channels, T' · ratio], T' = T rounded up to min_length."""
        if self.iterate_batch and latents.shape[0] > 1:
            # the reference's order of random draws: all bottleneck noise first, then the decoder's, item by item
            x = torch.cat([self.bottleneck.decode(z[None], generator) for z in latents])
            patches = torch.cat([self.decoder(z[None], generator) for z in x])
        else:
            patches = self.decoder(self.bottleneck.decode(latents, generator), generator)
        audio = self.pretransform.decode(patches)
        return torch.tanh(audio) if self.soft_clip else audio

    # --- public API ---
    def encode(self, audio: Tensor, chunked: bool | None = None, chunk_size: int = 128, overlap: int = 32,
               on_chunk: Callable[[int, int, Tensor], None] | None = None,
               finished: dict[int, Tensor] | None = None) -> Tensor:
        """Waveform to latents. audio: [B, io_channels, N] float in [-1, 1] at sample_rate (N a multiple of
        downsampling_ratio, see `prepare_audio`) -> [B, latent_dim, N / downsampling_ratio] (≈ 10.77 per second).
        `chunked=None` follows the config's flag. on_chunk, finished: see `encode_chunked`."""
        if self.chunked if chunked is None else chunked:
            return self.encode_chunked(audio, chunk_size, overlap, on_chunk, finished)
        return self.encode_unchunked(audio)

    def decode(self, latents: Tensor, chunked: bool | None = None, chunk_size: int = 128, overlap: int = 32,
               generator: torch.Generator | None = None) -> Tensor:
        """Latents [B, latent_dim, T] to waveform [B, io_channels, T · downsampling_ratio] (T first rounded up to
        min_length when unchunked, as the reference). `generator` drives the optional bottleneck/decoder noise."""
        if self.chunked if chunked is None else chunked:
            return self.decode_chunked(latents, chunk_size, overlap, generator)
        return self.decode_unchunked(latents, generator)

    def encode_chunked(self, audio: Tensor, chunk_size: int = 128, overlap: int = 32,
                       on_chunk: Callable[[int, int, Tensor], None] | None = None,
                       finished: dict[int, Tensor] | None = None) -> Tensor:
        """Encode in overlapping chunks of `chunk_size` latents (the official stitching; see `chunk_layout`).
        Signals shorter than one chunk are encoded whole. A length that is not a multiple of downsampling_ratio is
        zero-padded first (the reference would drop the tail).

        For long signals (an hour of audio is some 400 chunks of a real pack): on_chunk(done, total, kept) is called after each
        chunk with the latents it contributes, kept [B, latent_dim, k]; it may raise to stop. finished: {chunk
        index (done - 1): kept} from an earlier, stopped encode of the same audio, not computed again (one of
        another shape is)."""
        ratio = self.downsampling_ratio
        if audio.shape[-1] % ratio:  # F.pad copies even when it adds nothing: a long signal is not copied for 0
            audio = F.pad(audio, (0, -audio.shape[-1] % ratio))
        if audio.shape[-1] < chunk_size * ratio:
            return self.encode_unchunked(audio)
        n_latents = audio.shape[-1] // ratio
        out = None
        plan = chunk_layout(n_latents, chunk_size, overlap)
        for index, (start, (left, right), out_start) in enumerate(plan):
            kept = (finished or {}).get(index)
            if kept is None or tuple(kept.shape) != (audio.shape[0], self.latent_dim, right - left):
                z = self.encode_unchunked(audio[..., start * ratio:(start + chunk_size) * ratio])  # whole batch
                kept = z[..., left:right]
            kept = kept.to(audio.device, audio.dtype)
            if out is None:
                out = kept.new_zeros(*kept.shape[:-1], n_latents)
            out[..., out_start + left:out_start + right] = kept
            if on_chunk is not None:
                on_chunk(index + 1, len(plan), kept)
        return out

    def decode_chunked(self, latents: Tensor, chunk_size: int = 128, overlap: int = 32,
                       generator: torch.Generator | None = None) -> Tensor:
        """Decode in overlapping chunks of `chunk_size` latents, one chunk in memory at a time (the official
        stitching; see `chunk_layout`). Fewer than `chunk_size` latents are decoded whole."""
        if latents.shape[-1] < chunk_size:
            return self.decode_unchunked(latents, generator)
        ratio = self.downsampling_ratio
        out = None
        for start, (left, right), out_start in chunk_layout(latents.shape[-1], chunk_size, overlap):
            audio = self.decode_unchunked(latents[..., start:start + chunk_size], generator)  # whole batch per chunk
            if out is None:
                out = audio.new_zeros(*audio.shape[:-1], latents.shape[-1] * ratio)
            out[..., (out_start + left) * ratio:(out_start + right) * ratio] = audio[..., left * ratio:right * ratio]
        return out

    def prepare_audio(self, audio, in_sample_rate) -> Tensor:
        """`prepare_audio` to this model's rate, channels and length multiple."""
        return prepare_audio(audio, in_sample_rate, self.sample_rate, self.io_channels, self.downsampling_ratio)


def chunk_layout(n_latents: int, chunk_size: int, overlap: int) -> list[tuple[int, tuple[int, int], int]]:
    """The official chunked encode/decode plan, in latents: a list of (chunk start, (keep from, keep to) inside the
    chunk, output start). Starts are range(0, n - chunk + 1, chunk - overlap) plus a last chunk anchored at the end;
    overlap // 2 latents are dropped from every edge that faces a neighbour."""
    if n_latents < chunk_size:
        raise ValueError(f"chunk_layout: {n_latents} latents is shorter than one chunk ({chunk_size})")
    if not 0 <= overlap < chunk_size:
        raise ValueError(f"chunked SAME: overlap={overlap} must be in [0, chunk_size={chunk_size})")
    starts = list(range(0, n_latents - chunk_size + 1, chunk_size - overlap))
    if starts[-1] != n_latents - chunk_size:
        starts.append(n_latents - chunk_size)
    half = overlap // 2
    plan = []
    for i, start in enumerate(starts):
        last = i == len(starts) - 1
        keep = (0 if i == 0 else half, chunk_size if last else chunk_size - half)
        plan.append((start, keep, n_latents - chunk_size if last else start))
    return plan


# --- input preparation ---------------------------------------------------------------------------------------------

def prepare_audio(audio, in_sample_rate, target_sample_rate: int, channels: int, multiple_of: int = 1) -> Tensor:
    """Make a batch the encoder accepts (the official `preprocess_audio_list_for_encoder`).

    audio: a tensor [N] (mono), [C, N] or [B, C, N], or a list of [N] / [C, N] / [1, C, N] tensors; in_sample_rate:
    one rate in Hz or one per item. Each item is resampled with soxr to target_sample_rate, given `channels` channels
    (mono is duplicated, extra channels dropped; mean when channels == 1), and zero-padded at the end to the longest
    item, rounded up to a multiple of `multiple_of` samples (pass the downsampling ratio). Returns
    [B, channels, N'] float."""
    if isinstance(audio, Tensor):
        items = list(audio) if audio.dim() == 3 else [audio]
    else:
        items = list(audio)
    rates = list(in_sample_rate) if isinstance(in_sample_rate, Sequence) else [in_sample_rate] * len(items)
    if len(rates) != len(items):
        raise ValueError(f"prepare_audio: {len(items)} signals but {len(rates)} sample rates")
    prepared = []
    for item, rate in zip(items, rates):
        if item.dim() == 3 and item.shape[0] == 1:
            item = item[0]
        elif item.dim() == 1:
            item = item[None]
        if item.dim() != 2:
            raise ValueError(f"prepare_audio: expected [N], [C, N] or [1, C, N] per signal, got {tuple(item.shape)}")
        if int(rate) != int(target_sample_rate):
            item = resample(item, int(rate), int(target_sample_rate))
        if channels == 1:
            item = item.mean(dim=0, keepdim=True)
        elif item.shape[0] == 1:
            item = item.expand(channels, -1)
        elif item.shape[0] > channels == 2:  # surround: mixed as the dataset encoder mixes it, not cut to L/R
            item = torch.from_numpy(stereo_weights(item.shape[0])).to(item) @ item
        else:
            item = item[:channels]
        prepared.append(item)
    longest = max(item.shape[-1] for item in prepared)
    length = longest + (-longest % multiple_of)
    if len(prepared) == 1 and prepared[0].shape[-1] == length:  # one long signal: a view, not two copies
        return prepared[0][None]
    return torch.stack([F.pad(item, (0, length - item.shape[-1])) for item in prepared])


def resample(audio: Tensor, in_rate: int, out_rate: int) -> Tensor:
    """[C, N] at in_rate -> [C, N'] at out_rate with soxr (high quality), on the CPU in fp32; back to audio's
    device and dtype."""
    import soxr

    out = soxr.resample(audio.detach().float().cpu().numpy().T, in_rate, out_rate)
    return torch.from_numpy(out.T.copy()).to(audio.device, audio.dtype)


__all__ = ["SAMEAutoencoder", "SAMEEncoder", "SAMEDecoder", "SoftNormBottleneck", "PatchedPretransform",
           "ResamplingBlock", "SAMEBlock", "WNConv1d", "chunk_layout", "prepare_audio", "resample",
           "sliding_window_attention", "band_mask"]
