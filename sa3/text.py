"""The T5Gemma text encoder (encoder half only) and its tokenizers, without transformers.

SA3 conditions on `last_hidden_state` of `google/t5gemma-b-b-ul2`'s encoder: a Gemma-2-style bidirectional transformer
(768 wide, 12 layers, 12 heads of 64). What matters for parity with transformers' eager path:
  - token embeddings are scaled by sqrt(hidden) rounded to the model dtype;
  - RMSNorm is computed in fp32 as x̂·(1 + w) and cast back;
  - every layer is pre-norm + post-norm around both attention and the GeGLU MLP;
  - attention logits are (q·k) · query_pre_attn_scalar^-0.5, soft-capped as c·tanh(s/c), then get an additive mask
    bias of the fp32 minimum (not -inf: a fully padded row, i.e. an empty prompt, becomes a uniform average
    instead of NaN), softmax in fp32;
  - RoPE over the full head dim (rotate-half layout) at positions 0..L-1 whatever the padding.

Weights load from the Hugging Face folder (`config.json`, `model.safetensors` with `encoder.*` or `model.encoder.*`
keys, `tokenizer.json`, `tokenizer_config.json`) or from ComfyUI's single `t5gemma_b_b_ul2.safetensors`
(`model.encoder.*` keys plus the SentencePiece model as the uint8 tensor `spiece_model`; no config: the real model's
defaults, checked against the tensor shapes).
"""

from __future__ import annotations

import json
import re
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .layers import rotate_half
from .loading import CheckpointError, SafetensorsFile, describe_key_mismatch, load_into_meta_module, resolve_dtype

SPIECE_KEY = "spiece_model"  # ComfyUI stores the SentencePiece model inside the weights file under this key
CONFIG_METADATA_KEY = "t5gemma_config"  # our single files also carry the encoder config (ComfyUI's do not)
_EMBED_KEY = "encoder.embed_tokens.weight"
_ACTIVATIONS = {"gelu_pytorch_tanh": "tanh", "gelu_tanh": "tanh", "gelu_new": "tanh", "gelu": "none"}


class TextEncoderError(CheckpointError):
    """A text encoder file/folder cannot be used; the message names it and says what to give instead."""


# --------------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class T5GemmaConfig:
    """Encoder hyper-parameters. Defaults are the real `google/t5gemma-b-b-ul2` encoder (also ComfyUI's values)."""

    vocab_size: int = 256000
    hidden_size: int = 768
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_key_value_heads: int = 12
    head_dim: int = 64
    query_pre_attn_scalar: float = 64.0
    attn_logit_softcapping: float | None = 50.0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    sliding_window: int | None = 4096
    layer_types: tuple[str, ...] = ()  # empty: Gemma-2's default, sliding on even layers, full on odd ones
    hidden_activation: str = "gelu_pytorch_tanh"
    pad_token_id: int = 0

    def __post_init__(self):
        if not self.layer_types:
            default = tuple("sliding_attention" if i % 2 == 0 else "full_attention"
                            for i in range(self.num_hidden_layers))
            object.__setattr__(self, "layer_types", default)
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        unknown = set(self.layer_types) - {"sliding_attention", "full_attention"}
        if unknown:
            raise ValueError(f"layer_types {sorted(unknown)} are unknown; use sliding_attention / full_attention")
        if self.hidden_activation not in _ACTIVATIONS:
            raise ValueError(f"hidden_activation={self.hidden_activation!r} is not supported; "
                             f"use one of {sorted(_ACTIVATIONS)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"{self.num_attention_heads} heads are not a multiple of "
                             f"{self.num_key_value_heads} key/value heads")

    @classmethod
    def from_hf(cls, raw: dict) -> T5GemmaConfig:
        """From a Hugging Face `config.json`: a T5GemmaConfig (settings in its `encoder` sub-config) or a flat one."""
        enc = raw.get("encoder", raw)
        if isinstance(enc, str):  # some dumps store sub-configs as JSON strings
            enc = json.loads(enc)
        rope = enc.get("rope_parameters") or enc.get("rope_scaling") or {}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"rope_type={rope['rope_type']!r} is not supported by this encoder (only 'default')")
        values = {f.name: enc[f.name] for f in fields(cls) if f.name in enc and enc[f.name] is not None}
        values.pop("rope_theta", None)
        values["rope_theta"] = float(rope.get("rope_theta", enc.get("rope_theta", cls.rope_theta)))
        if "attn_logit_softcapping" in enc:  # an explicit null turns the cap off
            values["attn_logit_softcapping"] = enc["attn_logit_softcapping"]
        if "sliding_window" in enc:
            values["sliding_window"] = enc["sliding_window"]
        if "layer_types" in values:
            values["layer_types"] = tuple(values["layer_types"])
        return cls(**values)

    def checked_against(self, shapes: dict[str, tuple], where: str) -> T5GemmaConfig:
        """This config with vocab/width/depth/MLP/kv-head sizes taken from the tensor shapes ({module key: shape}).

        The head count cannot be read from shapes ([heads·head_dim, hidden]); it comes from the config, and a
        q_proj that does not divide into head_dim is an error."""
        try:
            vocab, hidden = shapes["embed_tokens.weight"]
            depth = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(r"layers\.(\d+)\.", k)))
            inter = shapes["layers.0.mlp.gate_proj.weight"][0]
            q_rows = shapes["layers.0.self_attn.q_proj.weight"][0]
            kv_rows = shapes["layers.0.self_attn.k_proj.weight"][0]
        except (KeyError, ValueError):
            raise TextEncoderError(f"{where}: incomplete T5Gemma encoder weights (need embed_tokens, layers.0.* "
                                   "and norm)") from None
        if q_rows % self.head_dim or kv_rows % self.head_dim:
            raise TextEncoderError(f"{where}: q_proj has {q_rows} rows and k_proj {kv_rows}, not multiples of "
                                   f"head_dim={self.head_dim}; give the encoder's config.json")
        layer_types = self.layer_types if len(self.layer_types) == depth else ()
        return replace(self, vocab_size=vocab, hidden_size=hidden, num_hidden_layers=depth, intermediate_size=inter,
                       num_attention_heads=q_rows // self.head_dim, num_key_value_heads=kv_rows // self.head_dim,
                       layer_types=layer_types)


# --------------------------------------------------------------------------------------------------- modules


class GemmaRMSNorm(nn.Module):
    """Gemma RMSNorm: x / rms(x) · (1 + weight), computed in fp32 and cast back. `weight` [dim] starts at 0."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).type_as(x)


def rope_cos_sin(n: int, head_dim: int, theta: float, dtype: torch.dtype, device) -> tuple[Tensor, Tensor]:
    """cos, sin [n, head_dim] for positions 0..n-1, computed in fp32 then cast to the model dtype (as transformers
    does), each frequency repeated for both halves (rotate-half layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.int64).float() / head_dim))
    angles = torch.outer(torch.arange(n, device=device).float(), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def attention_bias(mask: Tensor, window: int | None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Additive attention bias [B, 1, L, L]: 0 where key j is visible from query i, the dtype's minimum elsewhere.

    mask: [B, L] bool, True at real tokens (only keys are masked: padded queries still attend to real keys).
    window: bidirectional sliding window, keys with |i - j| < window are visible (None: all); transformers versions
    differ on < or <=, which only matters past 4096 tokens.
    The minimum rather than -inf keeps a fully padded row finite: it softmaxes to a uniform average."""
    visible = mask[:, None, None, :]  # [B, 1, 1, L]
    if window is not None:
        pos = torch.arange(mask.shape[1], device=mask.device)
        visible = visible & ((pos[:, None] - pos[None, :]).abs() < window)
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    return torch.where(visible, zero, torch.finfo(dtype).min)


class T5GemmaSelfAttention(nn.Module):
    """Bidirectional multi-head (or grouped) self-attention with RoPE and logit soft-capping (eager maths)."""

    def __init__(self, cfg: T5GemmaConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.scale = cfg.query_pre_attn_scalar ** -0.5
        self.softcap = cfg.attn_logit_softcapping
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, bias: Tensor) -> Tensor:
        """x: [B, L, hidden]; cos, sin: [L, head_dim]; bias: [B, 1, L, L] fp32 additive. Returns [B, L, hidden]."""
        q = rearrange(self.q_proj(x), "b n (h d) -> b h n d", d=self.head_dim)
        k = rearrange(self.k_proj(x), "b n (h d) -> b h n d", d=self.head_dim)
        v = rearrange(self.v_proj(x), "b n (h d) -> b h n d", d=self.head_dim)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if self.n_kv != self.n_heads:  # grouped-query attention: each kv head serves a block of query heads
            k = k.repeat_interleave(self.n_heads // self.n_kv, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv, dim=1)
        # Soft-capping is a non-linearity between the logits and the softmax, so no fused SDPA here.
        logits = (q @ k.transpose(-1, -2)) * self.scale  # [B, H, L, L]
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        # transformers adds the bias in the model dtype; in fp16 min + logit overflows to -inf and an empty prompt
        # gives NaN, so add it in fp32 (identical for fp32, and for every row with at least one visible key).
        weights = F.softmax(logits.float() + bias, dim=-1).to(q.dtype)
        return self.o_proj(rearrange(weights @ v, "b h n d -> b n (h d)"))


class T5GemmaMLP(nn.Module):
    """GeGLU feed-forward: down(gelu(gate(x)) · up(x)), gelu with the tanh approximation for the real model."""

    def __init__(self, cfg: T5GemmaConfig):
        super().__init__()
        self.approximate = _ACTIVATIONS[cfg.hidden_activation]
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate=self.approximate) * self.up_proj(x))


class T5GemmaEncoderLayer(nn.Module):
    """Gemma-2 sandwich block: x + post(attn(pre(x))), then x + post(mlp(pre(x)))."""

    def __init__(self, cfg: T5GemmaConfig, layer_type: str):
        super().__init__()
        self.window = cfg.sliding_window if layer_type == "sliding_attention" else None
        self.self_attn = T5GemmaSelfAttention(cfg)
        self.mlp = T5GemmaMLP(cfg)
        self.pre_self_attn_layernorm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_self_attn_layernorm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, bias: Tensor) -> Tensor:
        x = x + self.post_self_attn_layernorm(self.self_attn(self.pre_self_attn_layernorm(x), cos, sin, bias))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class T5GemmaEncoder(nn.Module):
    """The T5Gemma encoder stack. State-dict keys are the Hugging Face keys without their leading `encoder.`
    (`embed_tokens.weight`, `layers.{i}.self_attn.q_proj.weight`, ..., `norm.weight`)."""

    def __init__(self, cfg: T5GemmaConfig | None = None):
        super().__init__()
        self.config = cfg = cfg or T5GemmaConfig()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(T5GemmaEncoderLayer(cfg, t) for t in cfg.layer_types)
        self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def embed(self, input_ids: Tensor) -> Tensor:
        """input_ids: [B, L] -> [B, L, hidden], times sqrt(hidden) rounded to the model dtype (as transformers)."""
        h = self.embed_tokens(input_ids)
        return h * torch.tensor(self.config.hidden_size ** 0.5, dtype=h.dtype)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """input_ids: [B, L] int; attention_mask: [B, L] (True/1 at real tokens; None: ids != pad id).
        Returns last_hidden_state [B, L, hidden] in the model dtype (padded positions hold whatever the encoder
        computes there; callers replace them)."""
        if attention_mask is None:
            attention_mask = input_ids != self.config.pad_token_id
        attention_mask = attention_mask.to(device=input_ids.device, dtype=torch.bool)
        h = self.embed(input_ids)
        cos, sin = rope_cos_sin(h.shape[1], self.config.head_dim, self.config.rope_theta, h.dtype, h.device)
        biases = {}  # one bias per distinct window, shared by the layers that use it
        for layer in self.layers:
            if layer.window not in biases:
                biases[layer.window] = attention_bias(attention_mask, layer.window)
            h = layer(h, cos, sin, biases[layer.window])
        return self.norm(h)


# --------------------------------------------------------------------------------------------------- tokenizers


class _TokenizersBackend:
    """text -> ids with a `tokenizers.Tokenizer`, special tokens left to PromptTokenizer (picklable)."""

    def __init__(self, tok):
        self.tok = tok

    def __call__(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids


class _SentencePieceBackend:
    """text -> ids with plain SentencePiece `Encode()`; pickles as the serialized model."""

    def __init__(self, model: bytes):
        import sentencepiece as spm

        self.model = model
        self.sp = spm.SentencePieceProcessor()
        self.sp.LoadFromSerializedProto(model)

    def __call__(self, text: str) -> list[int]:
        return list(self.sp.encode(text, out_type=int))

    def __reduce__(self):
        return (_SentencePieceBackend, (self.model,))


class PromptTokenizer:
    """Text -> fixed-length ids and mask, like `AutoTokenizer(texts, truncation=True, max_length=L,
    padding="max_length")`.

    Backed by a `tokenizers.Tokenizer` (the folder's tokenizer.json) or a SentencePiece model (ComfyUI's
    `spiece_model` bytes). Special tokens: `add_bos`/`add_eos` wrap each text's ids; truncation keeps them and cuts
    the text (on `truncation_side`); pads go on `padding_side` (left by default, GemmaTokenizer's class default)."""

    def __init__(self, encode_text: Callable[[str], list[int]], pad_id: int = 0, bos_id: int | None = None,
                 eos_id: int | None = None, add_bos: bool = False, add_eos: bool = False, padding_side: str = "left",
                 truncation_side: str = "right", source: str = ""):
        for name, side in (("padding_side", padding_side), ("truncation_side", truncation_side)):
            if side not in ("left", "right"):
                raise ValueError(f"{name}={side!r}; use 'left' or 'right'")
        if (add_bos and bos_id is None) or (add_eos and eos_id is None):
            raise ValueError(f"{source}: BOS/EOS requested but the tokenizer has no such token")
        self.encode_text, self.pad_id, self.bos_id, self.eos_id = encode_text, pad_id, bos_id, eos_id
        self.add_bos, self.add_eos = add_bos, add_eos
        self.padding_side, self.truncation_side, self.source = padding_side, truncation_side, source

    @classmethod
    def from_folder(cls, folder: str | Path) -> PromptTokenizer:
        """A Hugging Face tokenizer folder: tokenizer.json (or tokenizer.model) + tokenizer_config.json."""
        folder = Path(folder)
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        if (folder / "tokenizer.json").is_file():
            return cls.from_tokenizer_json(folder / "tokenizer.json", config)
        if (folder / "tokenizer.model").is_file():
            return cls.from_sentencepiece((folder / "tokenizer.model").read_bytes(), config, source=str(folder))
        raise TextEncoderError(f"{folder}: no tokenizer.json or tokenizer.model; the text encoder folder is "
                               "incomplete (download the t5gemma-b-b-ul2 folder again)")

    @classmethod
    def from_tokenizer_json(cls, path: str | Path, config: dict | None = None) -> PromptTokenizer:
        """tokenizers' own BPE (the TRT port's route). BOS/EOS follow `add_bos_token`/`add_eos_token` in
        tokenizer_config.json; when a flag is absent, tokenizer.json's post-processor decides, as it would in
        transformers."""
        from tokenizers import Tokenizer

        config = config or {}
        tok = Tokenizer.from_file(str(path))
        probe, plain = tok.encode("a", add_special_tokens=True).ids, tok.encode("a", add_special_tokens=False).ids
        start = next((i for i in range(len(probe)) if probe[i:i + len(plain)] == plain), 0)
        post_bos, post_eos = probe[:start], probe[start + len(plain):]

        def token_id(name: str, fallback: list[int]) -> int | None:
            token = config.get(f"{name}_token")
            if isinstance(token, dict):
                token = token.get("content")
            found = tok.token_to_id(token) if token else None
            return found if found is not None else (fallback[0] if fallback else None)

        pad_id = token_id("pad", [])
        return cls(_TokenizersBackend(tok),
                   pad_id=pad_id if pad_id is not None else 0,
                   bos_id=token_id("bos", post_bos), eos_id=token_id("eos", post_eos),
                   add_bos=config.get("add_bos_token", bool(post_bos)),
                   add_eos=config.get("add_eos_token", bool(post_eos)),
                   padding_side=config.get("padding_side", "left"),
                   truncation_side=config.get("truncation_side", "right"), source=str(path))

    @classmethod
    def from_sentencepiece(cls, model: bytes, config: dict | None = None, source: str = "spiece_model"
                           ) -> PromptTokenizer:
        """A serialized SentencePiece model, plain `Encode()` (ComfyUI and the MLX port: no BOS/EOS unless a
        tokenizer_config says so)."""
        import sentencepiece as spm

        config = config or {}
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(bytes(model))
        except Exception as err:  # noqa: BLE001 - sentencepiece raises plain RuntimeError/OSError
            raise TextEncoderError(f"{source}: not a valid SentencePiece model ({err})") from None
        pad_id = sp.pad_id() if sp.pad_id() >= 0 else max(sp.piece_to_id("<pad>"), 0)

        def special(fn, piece):
            i = fn()
            return i if i >= 0 else (sp.piece_to_id(piece) if sp.piece_to_id(piece) != sp.unk_id() else None)

        return cls(_SentencePieceBackend(bytes(model)), pad_id=pad_id,
                   bos_id=special(sp.bos_id, "<bos>"), eos_id=special(sp.eos_id, "<eos>"),
                   add_bos=config.get("add_bos_token", False), add_eos=config.get("add_eos_token", False),
                   padding_side=config.get("padding_side", "left"),
                   truncation_side=config.get("truncation_side", "right"), source=source)

    def ids(self, text: str, max_length: int | None = None) -> list[int]:
        """Token ids of one text with BOS/EOS as configured, truncated to max_length (specials kept), unpadded.
        A lone surrogate (JSON can carry one; UTF-8 cannot) becomes "?", as encoding the text to UTF-8 would."""
        body = self.encode_text(text.encode("utf-8", "replace").decode("utf-8") if not text.isascii() else text)
        head = [self.bos_id] if self.add_bos else []
        tail = [self.eos_id] if self.add_eos else []
        if max_length is not None:
            room = max(max_length - len(head) - len(tail), 0)
            if len(body) > room:
                body = body[:room] if self.truncation_side == "right" else body[len(body) - room:]
        return (head + body + tail)[:max_length] if max_length is not None else head + body + tail

    def encode(self, texts: str | Sequence[str], max_length: int) -> tuple[Tensor, Tensor]:
        """texts: B strings -> input_ids [B, max_length] int64, attention_mask [B, max_length] bool (False at pads)."""
        if isinstance(texts, str):
            texts = [texts]
        input_ids = torch.full((len(texts), max_length), self.pad_id, dtype=torch.int64)
        mask = torch.zeros((len(texts), max_length), dtype=torch.bool)
        for row, text in enumerate(texts):
            ids = self.ids(text, max_length)
            span = slice(max_length - len(ids), max_length) if self.padding_side == "left" else slice(0, len(ids))
            input_ids[row, span] = torch.tensor(ids, dtype=torch.int64)
            mask[row, span] = True
        return input_ids, mask


# --------------------------------------------------------------------------------------------------- loading


def _encoder_prefix(keys: Sequence[str]) -> str | None:
    """The prefix in front of `encoder.` ('' for transformers' files, 'model.' for ComfyUI's), or None."""
    prefixes = [k[: -len(_EMBED_KEY)] for k in keys if k.endswith(_EMBED_KEY)]
    prefixes = [p for p in prefixes if p == "" or p.endswith(".")]
    for preferred in ("", "model."):
        if preferred in prefixes:
            return preferred
    return min(prefixes, key=len) if prefixes else None


def _weights_in_folder(folder: Path) -> Path:
    if (folder / "model.safetensors").is_file():
        return folder / "model.safetensors"
    found = sorted(p for p in folder.glob("*.safetensors"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise TextEncoderError(f"{folder}: no .safetensors weights in this text encoder folder (a .bin/.pt file is "
                               "not read: we never unpickle); download the t5gemma-b-b-ul2 folder again")
    raise TextEncoderError(f"{folder}: several .safetensors files ({', '.join(p.name for p in found)}) and no "
                           "model.safetensors; sharded text encoders are not supported, merge them into one file")


def load_t5gemma_encoder(weights: str | Path, config: T5GemmaConfig | None = None,
                         dtype: str | torch.dtype = torch.float32, device: str | torch.device = "cpu"
                         ) -> T5GemmaEncoder:
    """Strictly load a T5Gemma encoder from a .safetensors file with `encoder.*`, `model.encoder.*` (or any
    `<prefix>encoder.*`) keys, in `dtype` on `device`. Other tensors (ComfyUI's `spiece_model`, a decoder) are
    ignored; within the encoder every key must match. config: the encoder config (None: the real model's defaults);
    vocab/width/depth/MLP and head counts are taken from the tensor shapes."""
    file = SafetensorsFile(weights)
    prefix = _encoder_prefix(file.keys())
    if prefix is None:
        raise TextEncoderError(f"{file.path.name} holds no T5Gemma encoder (no '{_EMBED_KEY}' or 'model.{_EMBED_KEY}'"
                               " tensor). Give ComfyUI's t5gemma_b_b_ul2.safetensors or the model's t5gemma-b-b-ul2 "
                               "folder.")
    full = prefix + "encoder."
    shapes = {k[len(full):]: s for k, s in file.shapes.items() if k.startswith(full)}
    cfg = (config or T5GemmaConfig()).checked_against(shapes, file.path.name)
    with torch.device("meta"):
        encoder = T5GemmaEncoder(cfg)
    expected = set(encoder.state_dict())
    missing, unexpected = sorted(expected - set(shapes)), sorted(set(shapes) - expected)
    if missing or unexpected:
        raise TextEncoderError(f"{file.path.name} does not match a T5Gemma encoder with {cfg.num_hidden_layers} "
                               f"layers: {describe_key_mismatch([full + k for k in missing], [full + k for k in unexpected])}. "
                               "The file is incomplete or another model.")
    dtype = resolve_dtype(dtype)
    load_into_meta_module(encoder, file, {k: full + k for k in expected}, lambda k: dtype, device,
                          what="T5Gemma encoder")
    return encoder.eval().requires_grad_(False)


def text_encoder_dtype(dtype: torch.dtype) -> torch.dtype:
    """T5Gemma's dtype for a model loaded in `dtype`: fp32 when fp16 is asked for (Gemma-family activations exceed
    fp16's range; its output is cast to the conditioner's dtype after), else the same."""
    return torch.float32 if dtype == torch.float16 else dtype


def load_text_encoder(source: str | Path, dtype: str | torch.dtype = torch.float32,
                      device: str | torch.device = "cpu", config: T5GemmaConfig | dict | str | Path | None = None
                      ) -> tuple[T5GemmaEncoder, PromptTokenizer]:
    """(encoder, tokenizer) from a Hugging Face folder (config.json, model.safetensors, tokenizer files) or from
    ComfyUI's single file (weights + `spiece_model`; a model.safetensors inside an HF folder also works).

    A single file carries no config: `config` (a T5GemmaConfig, an HF config dict or config.json path) wins, then a
    `t5gemma_config` JSON in the file's metadata (what `write_comfyui_text_encoder` stores), then the real
    t5gemma-b-b-ul2 values (head_dim 64, query_pre_attn_scalar 64, ...) with sizes read from the tensors."""
    path = Path(source)
    if not path.exists():
        raise TextEncoderError(f"{path}: no such text encoder file or folder")
    if path.is_file() and (path.parent / "config.json").is_file() and not _has_spiece(path):
        path = path.parent  # the folder's own model.safetensors was given
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise TextEncoderError(f"{path}: no config.json; this is not a T5Gemma text encoder folder")
        if config is None:
            config = path / "config.json"
        encoder = load_t5gemma_encoder(_weights_in_folder(path), _as_config(config), dtype, device)
        return encoder, PromptTokenizer.from_folder(path)
    file = SafetensorsFile(path)
    # The tokenizer is checked first so a file without one fails before 280M parameters are read. A full ComfyUI
    # checkpoint that bundles the text encoder keeps it under a prefix (e.g. `text_encoders.<name>.`).
    spiece = sorted((k for k in file.keys() if k == SPIECE_KEY or k.endswith("." + SPIECE_KEY)), key=len)
    if not spiece:
        if _encoder_prefix(file.keys()) is None:
            load_t5gemma_encoder(path)  # raises the "holds no T5Gemma encoder" message
        raise TextEncoderError(f"{path.name} has T5Gemma weights but no '{SPIECE_KEY}' tokenizer tensor; use "
                               "ComfyUI's t5gemma_b_b_ul2.safetensors or the t5gemma-b-b-ul2 folder")
    if config is None and file.metadata.get(CONFIG_METADATA_KEY):
        config = json.loads(file.metadata[CONFIG_METADATA_KEY])
    tokenizer = PromptTokenizer.from_sentencepiece(file.read(spiece[0]).contiguous().numpy().tobytes(),
                                                   source=f"{path.name}:{spiece[0]}")
    return load_t5gemma_encoder(path, _as_config(config), dtype, device), tokenizer


def _as_config(config: T5GemmaConfig | dict | str | Path | None) -> T5GemmaConfig | None:
    if config is None or isinstance(config, T5GemmaConfig):
        return config
    if isinstance(config, str | Path):
        config = json.loads(Path(config).read_text(encoding="utf-8"))
    return T5GemmaConfig.from_hf(config)


def _has_spiece(path: Path) -> bool:
    try:
        return SPIECE_KEY in SafetensorsFile(path).keys()
    except CheckpointError:
        return False


class TextEncoderCache:
    """An LRU of encoder outputs per prompt, keyed by (prompt, max_length, dtype) here (any hashable key): a
    repeated prompt does not rerun T5. Values are tuples of tensors ((hidden [L, D], mask [L]) here) on the device
    they were computed on. Bounded by entry count and, when max_bytes is given, by the bytes of the tensors held:
    a training run composes a new prompt at almost every step (shuffled tags), so an unbounded cache would grow by
    one [L, D] embedding per step."""

    def __init__(self, size: int = 32, max_bytes: int | None = None):
        self.size, self.max_bytes = size, max_bytes
        self.entries: dict[tuple, tuple[Tensor, ...]] = {}
        self.bytes = 0
        self.lock = threading.Lock()

    def __getstate__(self):  # pickled copies start empty (tensors may live on a GPU; the lock cannot be pickled)
        return {"size": self.size, "max_bytes": self.max_bytes}

    def __setstate__(self, state):
        self.__init__(state["size"], state.get("max_bytes"))

    @staticmethod
    def _nbytes(value: tuple[Tensor, ...]) -> int:
        return sum(t.numel() * t.element_size() for t in value)

    def get(self, key) -> tuple[Tensor, ...] | None:
        with self.lock:
            value = self.entries.pop(key, None)
            if value is not None:
                self.entries[key] = value  # most recently used last
            return value

    def put(self, key, value: tuple[Tensor, ...]) -> None:
        if self.size <= 0:
            return
        with self.lock:
            old = self.entries.pop(key, None)
            if old is not None:
                self.bytes -= self._nbytes(old)
            self.entries[key] = value
            self.bytes += self._nbytes(value)
            while len(self.entries) > self.size or (
                    self.max_bytes is not None and self.bytes > self.max_bytes and len(self.entries) > 1):
                self.bytes -= self._nbytes(self.entries.pop(next(iter(self.entries))))

    def __len__(self) -> int:
        return len(self.entries)

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()
            self.bytes = 0


# --------------------------------------------------------------------------------------------------- conversion


def _pb_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _pb(field: int, value: int | float | str | bytes) -> bytes:
    """One protobuf field: ints/bools as varints, floats as fixed32, str/bytes (and sub-messages) length-prefixed."""
    if isinstance(value, float):
        return _pb_varint(field << 3 | 5) + struct.pack("<f", value)
    if isinstance(value, int):
        return _pb_varint(field << 3) + _pb_varint(value)
    data = value.encode("utf-8") if isinstance(value, str) else value
    return _pb_varint(field << 3 | 2) + _pb_varint(len(data)) + data


def sentencepiece_from_tokenizer_json(path: str | Path) -> bytes:
    """A serialized SentencePiece BPE model equivalent to a Gemma-style tokenizer.json (BPE, byte fallback, spaces
    as '▁', no pre-tokenizer, no dummy prefix), for writing ComfyUI-style single files.

    Pieces keep their ids; a merged piece scores -(rank of the first merge producing it), so SentencePiece's
    highest-score-first merging follows the merge list; `<0xNN>` pieces are BYTE, `<unk>` UNKNOWN, pad/bos/eos
    CONTROL, other added tokens USER_DEFINED. Known difference: tokenizers also matches pad/bos/eos/unk written
    literally in the text, SentencePiece never does (control pieces). ModelProto field numbers are those of
    sentencepiece_model.proto; written by hand so protobuf is not needed."""
    tok = json.loads(Path(path).read_text(encoding="utf-8"))
    model = tok["model"]
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        raise ValueError(f"{path}: only BPE tokenizers with byte fallback convert to SentencePiece")
    vocab = model["vocab"]
    rank: dict[str, int] = {}
    for r, merge in enumerate(model["merges"]):
        a, b = merge if isinstance(merge, list) else merge.split(" ", 1)
        rank.setdefault(a + b, r)
    added = {t["content"] for t in tok.get("added_tokens", [])}
    pieces = b""
    for piece, _ in sorted(vocab.items(), key=lambda kv: kv[1]):
        if piece == "<unk>":
            kind = 2  # UNKNOWN
        elif piece in ("<pad>", "<bos>", "<eos>"):
            kind = 3  # CONTROL
        elif piece in added:
            kind = 4  # USER_DEFINED
        elif re.fullmatch(r"<0x[0-9A-F]{2}>", piece):
            kind = 6  # BYTE
        else:
            kind = 1  # NORMAL
        score = -float(rank.get(piece, len(rank) + 1)) if kind == 1 else 0.0
        pieces += _pb(1, _pb(1, piece) + _pb(2, score) + _pb(3, kind))
    ids = {name: vocab.get(f"<{name}>", -1) for name in ("unk", "bos", "eos", "pad")}
    trainer = (_pb(3, 2) + _pb(4, len(vocab)) + _pb(35, 1)  # model_type BPE, vocab_size, byte_fallback
               + b"".join(_pb(40 + i, ids[n]) + _pb(45 + i, f"<{n}>") for i, n in enumerate(ids) if ids[n] >= 0))
    normalizer = _pb(1, "identity") + _pb(3, 0) + _pb(4, 0) + _pb(5, 1)  # no dummy prefix/space folding; ' ' -> '▁'
    return pieces + _pb(2, trainer) + _pb(3, normalizer)


def write_comfyui_text_encoder(folder: str | Path, out: str | Path, dtype: str | torch.dtype | None = None) -> Path:
    """Write a Hugging Face T5Gemma folder as one ComfyUI-style file: `model.encoder.*` tensors plus the
    SentencePiece model as the uint8 tensor `spiece_model` (from tokenizer.model, else converted from
    tokenizer.json). dtype: None keeps the stored dtype."""
    from safetensors.torch import save_file

    folder = Path(folder)
    file = SafetensorsFile(_weights_in_folder(folder))
    prefix = _encoder_prefix(file.keys())
    if prefix is None:
        raise TextEncoderError(f"{folder}: no T5Gemma encoder weights")
    target = resolve_dtype(dtype) if dtype is not None else None
    tensors = {"model." + k[len(prefix):]: file.read(k, target) for k in file.keys()
               if k.startswith(prefix + "encoder.")}
    spm_path = folder / "tokenizer.model"
    spm = spm_path.read_bytes() if spm_path.is_file() else sentencepiece_from_tokenizer_json(folder / "tokenizer.json")
    tensors[SPIECE_KEY] = torch.frombuffer(bytearray(spm), dtype=torch.uint8)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    save_file(tensors, str(out), metadata={"format": "pt", CONFIG_METADATA_KEY: json.dumps(config.get("encoder", config))})
    return Path(out)
