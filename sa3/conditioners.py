"""SA3's conditioners: the prompt (T5Gemma + learned padding) and the duration (`seconds_total`).

Key layout as in the official checkpoint, under `conditioner.`:
  conditioners.prompt.padding_embedding                 [cond_dim]
  conditioners.prompt.proj_out.{weight,bias}            only when the T5 width != cond_dim (not in the real models)
  conditioners.seconds_total.embedder.embedding.1.{weight,bias}   Linear(256 -> cond_dim)

The T5Gemma encoder and its tokenizer hang off the prompt conditioner as plain attributes, not submodules (as in
the official code): they are not in the state dict, `.to()`/`.half()` of the SA3 modules leave them alone, and
adapters never see them. `load_text_encoder` loads them; `offload_text_encoder` parks them on the CPU.
"""

from __future__ import annotations

import copy
import math
import threading
from collections.abc import Sequence
from pathlib import Path

import torch
from einops import rearrange
from torch import Tensor, nn

from .layers import ExpoFourierFeatures
from .loading import resolve_dtype
from .text import PromptTokenizer, T5GemmaConfig, T5GemmaEncoder, TextEncoderCache, load_text_encoder, text_encoder_dtype

TEXT_ENCODER_SUBFOLDER = "t5gemma-b-b-ul2"
PADDING_MODES = ("none", "zero", "learned")


class ConditionerError(ValueError):
    """A conditioning config or input cannot be used; the message says which and what to do."""


class PromptConditioner(nn.Module):
    """Prompts -> T5Gemma `last_hidden_state` -> optional projection -> padded positions replaced.

    output_dim: cond_dim. text_dim: the T5 width (None: equal to output_dim, as in every real SA3 model, so
    `proj_out` is the identity; `build_conditioner` reads it from the T5 config). max_length: tokens per prompt
    (256 for SA3). padding_mode: "learned" (SA3: pads get `padding_embedding`), "zero" or "none".
    The remaining official arguments (model_name, repo_id, subfolder, model_path, enable_grad) are accepted and
    kept for locating the encoder; the encoder itself comes from `load_text_encoder` / `set_text_encoder`."""

    def __init__(self, output_dim: int, max_length: int = 256, padding_mode: str = "learned",
                 project_out: bool = False, text_dim: int | None = None, model_name: str = "google/t5gemma-b-b-ul2",
                 repo_id: str | None = None, subfolder: str | None = None, model_path: str | None = None,
                 enable_grad: bool = False, cache_size: int = 32):
        super().__init__()
        if padding_mode not in PADDING_MODES:
            raise ConditionerError(f"padding_mode={padding_mode!r}; use one of {PADDING_MODES}")
        if enable_grad:
            raise ConditionerError("enable_grad=True (training the text encoder) is not supported; SA3 keeps T5 frozen")
        self.output_dim, self.max_length, self.padding_mode = output_dim, int(max_length), padding_mode
        self.text_dim = text_dim or output_dim
        self.model_name, self.repo_id, self.subfolder, self.model_path = model_name, repo_id, subfolder, model_path
        # The official rule: a projection exists iff the widths differ or it is asked for.
        if self.text_dim != output_dim or project_out:
            self.proj_out = nn.Linear(self.text_dim, output_dim)
        else:
            self.proj_out = nn.Identity()
        if padding_mode == "learned":
            self.padding_embedding = nn.Parameter(torch.randn(output_dim) * 0.02)
        # Not registered (see the module docstring): set through __dict__ so nn.Module does not adopt them.
        self.__dict__["text_encoder"] = None
        self.__dict__["tokenizer"] = None
        self.__dict__["text_encoder_source"] = None
        self.cache = TextEncoderCache(cache_size)
        self._lock = threading.RLock()

    # Copies share the frozen T5, tokenizer and cache (a deepcopy, e.g. for an EMA or a training copy, must not
    # duplicate a 280M-parameter encoder); locks are recreated.
    def __getstate__(self):
        state = dict(self.__dict__)
        state["_lock"] = None
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._lock = threading.RLock()

    def __deepcopy__(self, memo):
        for shared in (self.text_encoder, self.tokenizer, self.cache):
            if shared is not None:
                memo[id(shared)] = shared
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return new

    # --- the text encoder ---
    def set_text_encoder(self, encoder: T5GemmaEncoder, tokenizer: PromptTokenizer,
                         source: str | Path | None = None) -> None:
        """Attach a loaded encoder + tokenizer (frozen, eval). Its width must equal `text_dim`. source: the folder
        or file it came from (`text_encoder_source`, which tells whether another model may share it)."""
        width = encoder.config.hidden_size
        if width != self.text_dim:
            raise ConditionerError(f"the text encoder is {width} wide but this prompt conditioner expects "
                                   f"{self.text_dim} (cond_dim {self.output_dim}); it belongs to another model")
        with self._lock:
            self.__dict__["text_encoder"] = encoder.eval().requires_grad_(False)
            self.__dict__["tokenizer"] = tokenizer
            self.__dict__["text_encoder_source"] = Path(source) if source is not None else None
            self.cache.clear()

    def share_text_encoder(self, other: PromptConditioner) -> None:
        """Use `other`'s loaded encoder and tokenizer (one copy in memory for two models of a pack), and its lock:
        encoding moves the encoder between devices, which must not race between the two."""
        if other.text_encoder is None:
            raise ConditionerError("the other prompt conditioner has no text encoder to share")
        self.set_text_encoder(other.text_encoder, other.tokenizer, other.text_encoder_source)
        self._lock = other._lock

    def load_text_encoder(self, source: str | Path, dtype: str | torch.dtype = torch.float32,
                          device: str | torch.device = "cpu", config=None) -> None:
        """Load T5Gemma from a Hugging Face folder or ComfyUI's `t5gemma_b_b_ul2.safetensors`, in `dtype` on
        `device` (see `text.load_text_encoder`; `config` only matters for a single file of a non-standard size)."""
        self.set_text_encoder(*load_text_encoder(source, dtype=dtype, device=device, config=config), source=source)

    @property
    def has_text_encoder(self) -> bool:
        return self.text_encoder is not None

    def offload_text_encoder(self) -> None:
        """Move T5Gemma to the CPU; the next uncached prompt moves it back to the device it is asked to run on."""
        with self._lock:
            if self.text_encoder is not None:
                self.text_encoder.to("cpu")

    # --- forward ---
    def tokenize(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """B prompts -> input_ids [B, max_length] int64, attention_mask [B, max_length] bool."""
        self._require_encoder()
        return self.tokenizer.encode(list(texts), self.max_length)

    @torch.no_grad()
    def encode_tokens(self, input_ids: Tensor, attention_mask: Tensor, device=None) -> Tensor:
        """T5Gemma last_hidden_state [B, L, text_dim] in the encoder dtype, on `device` (moves the encoder there).

        When this conditioner replaces padded positions ("learned", "zero"), the encoder runs on each prompt's real
        tokens alone (SA3's tokenizer pads on the left) and the padded positions are zeros: real tokens never
        attend padded keys, and RoPE scores depend only on the distance between two tokens, so their outputs are
        the ones of a run over max_length up to rounding, while a short prompt costs a fraction of it. One prompt
        per call, because the rounding of a small product depends on its row count: a prompt's output then does
        not depend on the batch it came in (a resumed run re-encodes its prompts to the same bits)."""
        self._require_encoder()
        device = torch.device(device) if device is not None else self.text_encoder.device
        attention_mask = attention_mask.bool()
        with self._lock:
            if self.text_encoder.device != device:
                self.text_encoder.to(device)
            if self.padding_mode == "none":  # the padded positions' outputs are used: run them all
                return self.text_encoder(input_ids.to(device), attention_mask.to(device))
            hidden = torch.zeros(*input_ids.shape, self.text_encoder.config.hidden_size, device=device,
                                 dtype=self.text_encoder.dtype)
            for i, row in enumerate(attention_mask.cpu()):
                real = row.nonzero()
                if len(real):  # an empty prompt has no real token: all its positions are replaced
                    span = slice(int(real.min()), int(real.max()) + 1)
                    hidden[i, span] = self.text_encoder(input_ids[i : i + 1, span].to(device),
                                                        attention_mask[i : i + 1, span].to(device))[0]
            return hidden

    def encode_prompts(self, texts: Sequence[str], device=None) -> tuple[Tensor, Tensor]:
        """Raw T5 output for B prompts, through the cache: (hidden [B, L, text_dim], mask [B, L] bool)."""
        self._require_encoder()
        device = torch.device(device) if device is not None else self.text_encoder.device
        keys = [(text, self.max_length, self.text_encoder.dtype) for text in texts]
        found = [self.cache.get(k) for k in keys]
        todo = sorted({t for t, f in zip(texts, found, strict=True) if f is None})
        if todo:  # T5 over the prompts not cached yet (each over its own real tokens: `encode_tokens`)
            ids, mask = self.tokenize(todo)
            hidden = self.encode_tokens(ids, mask, device)
            # Own copies, made outside inference mode: a cached row must not pin the whole batch, and must stay
            # usable when a later call (training) runs with autograd on.
            with torch.inference_mode(False):
                fresh = {t: (hidden[i].clone(), mask[i].to(hidden.device).clone()) for i, t in enumerate(todo)}
            for text, value in fresh.items():
                self.cache.put((text, self.max_length, self.text_encoder.dtype), value)
            found = [f if f is not None else fresh[t] for t, f in zip(texts, found, strict=True)]
        hidden = torch.stack([h.to(device) for h, _ in found])
        mask = torch.stack([m.to(device) for _, m in found])
        return hidden, mask

    def forward(self, inputs: Sequence[str] | Sequence[dict], device=None) -> tuple[Tensor, Tensor]:
        """inputs: B prompts, or B pre-tokenized dicts {"input_ids": [L], "attention_mask": [L]}.
        Returns (emb [B, max_length, output_dim], mask [B, max_length] bool), pads replaced per padding_mode."""
        if isinstance(inputs, str):
            inputs = [inputs]
        if len(inputs) and isinstance(inputs[0], dict):
            ids = torch.stack([torch.as_tensor(x["input_ids"]) for x in inputs])
            mask = torch.stack([torch.as_tensor(x["attention_mask"]) for x in inputs]).bool()
            hidden = self.encode_tokens(ids, mask, device)
            mask = mask.to(hidden.device)
        else:
            hidden, mask = self.encode_prompts([str(x) for x in inputs], device)
        return self.project(hidden, mask)

    def project(self, hidden: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """T5 output [B, L, text_dim] + mask [B, L] -> (emb [B, L, output_dim] in this module's dtype, mask)."""
        param = next(self.parameters(), None)
        dtype = param.dtype if param is not None else hidden.dtype
        emb = self.proj_out(hidden.to(dtype))
        if self.padding_mode == "learned":
            pad = self.padding_embedding.to(device=emb.device, dtype=emb.dtype)
            emb = torch.where(mask[..., None], emb, pad.expand_as(emb))
        elif self.padding_mode == "zero":
            emb = emb * mask[..., None].to(emb.dtype)
        return emb, mask

    def _require_encoder(self) -> None:
        if self.text_encoder is None or self.tokenizer is None:
            raise ConditionerError("no text encoder loaded: give the model's t5gemma-b-b-ul2 folder or ComfyUI's "
                                   "t5gemma_b_b_ul2.safetensors (load_text_encoder / text_encoder=...)")


T5GemmaConditioner = PromptConditioner  # the official class name


class LearnedFourierFeatures(nn.Module):
    """The official "learned" number features: t [N] -> [N, dim + 1] = [t, sin(2π t w), cos(2π t w)], w `weights`
    [dim // 2]. Not used by SA3 (which uses "expo"), kept so such configs still load."""

    def __init__(self, dim: int, std: float = 16.0):
        super().__init__()
        self.weights = nn.Parameter(torch.randn(dim // 2) * std)

    def forward(self, t: Tensor) -> Tensor:
        t = t[:, None]
        angles = t * self.weights[None] * 2 * math.pi
        return torch.cat((t, angles.sin(), angles.cos()), dim=-1)


class NumberEmbedder(nn.Module):
    """`embedding` = Sequential(Fourier features, Linear(features -> output_dim)) (key `embedding.1`)."""

    def __init__(self, output_dim: int, dim: int = 256, fourier_features_type: str = "expo"):
        super().__init__()
        if fourier_features_type == "expo":
            self.embedding = nn.Sequential(ExpoFourierFeatures(dim), nn.Linear(dim, output_dim))
        elif fourier_features_type == "learned":
            self.embedding = nn.Sequential(LearnedFourierFeatures(dim), nn.Linear(dim + 1, output_dim))
        else:
            raise ConditionerError(f"fourier_features_type={fourier_features_type!r}; use 'expo' or 'learned'")

    def forward(self, x: Tensor) -> Tensor:
        """x: [B] values in [0, 1] -> [B, output_dim]."""
        features, linear = self.embedding[0], self.embedding[1]
        return linear(features(x).to(linear.weight.dtype))


class NumberConditioner(nn.Module):
    """A number (seconds_total) -> one token: clamp to [min_val, max_val], scale to [0, 1], Fourier, Linear.

    Returns (emb [B, 1, output_dim], mask ones [B, 1] float), as the official conditioner does."""

    def __init__(self, output_dim: int, min_val: float = 0, max_val: float = 384,
                 fourier_features_type: str = "expo"):
        super().__init__()
        if max_val <= min_val:
            raise ConditionerError(f"max_val={max_val} must be above min_val={min_val}")
        self.output_dim, self.min_val, self.max_val = output_dim, min_val, max_val
        self.embedder = NumberEmbedder(output_dim, fourier_features_type=fourier_features_type)

    def forward(self, values: Sequence[float] | Tensor, device=None) -> tuple[Tensor, Tensor]:
        linear = self.embedder.embedding[1]
        device = torch.device(device) if device is not None else linear.weight.device
        if linear.weight.device != device:  # the official conditioner moves itself to the asked device too
            self.embedder.to(device)
        if torch.is_tensor(values):
            x = values.detach().reshape(-1).to(device=device, dtype=torch.float32)
        else:
            x = torch.tensor([float(v) for v in values], dtype=torch.float32, device=device)
        x = (x.clamp(self.min_val, self.max_val) - self.min_val) / (self.max_val - self.min_val)
        emb = rearrange(self.embedder(x.to(linear.weight.dtype)), "b d -> b 1 d")
        return emb, torch.ones(emb.shape[0], 1, device=device)


class MultiConditioner(nn.Module):
    """All conditioners of one model in `.conditioners` (ModuleDict by id: "prompt", "seconds_total").

    conditioning: the config's `model.conditioning` dict ({"cond_dim", "configs": [{"id", "type", "config"}], ...})
    or just its `configs` list together with `cond_dim`. Types: "t5gemma" -> PromptConditioner, "number" ->
    NumberConditioner."""

    def __init__(self, conditioning: dict | Sequence[dict], cond_dim: int | None = None):
        super().__init__()
        if isinstance(conditioning, dict):
            configs = conditioning.get("configs", [])
            cond_dim = cond_dim or conditioning.get("cond_dim")
            self.default_keys = dict(conditioning.get("default_keys") or {})
            self.pre_encoded_keys = list(conditioning.get("pre_encoded_keys") or [])
        else:
            configs, self.default_keys, self.pre_encoded_keys = list(conditioning), {}, []
        if not cond_dim:
            raise ConditionerError("conditioning needs cond_dim (the width of the conditioning tokens)")
        self.cond_dim = int(cond_dim)
        self.conditioners = nn.ModuleDict({entry["id"]: make_conditioner(entry, self.cond_dim) for entry in configs})

    def forward(self, batch_metadata: Sequence[dict], device=None) -> dict[str, tuple[Tensor, Tensor]]:
        """batch_metadata: B dicts ({"prompt": str, "seconds_total": float, ...}) -> {id: (emb, mask)}."""
        out = {}
        for key, conditioner in self.conditioners.items():
            values = [_unwrap(item[self._source_key(key, item)]) for item in batch_metadata]
            if key in self.pre_encoded_keys:
                out[key] = (torch.stack([torch.as_tensor(v) for v in values]).to(device), None)
            else:
                out[key] = conditioner(values, device)
        return out

    def _source_key(self, key: str, item: dict) -> str:
        if key in item:
            return key
        if key in self.default_keys and self.default_keys[key] in item:
            return self.default_keys[key]
        raise ConditionerError(f"conditioning input has no {key!r} (keys: {sorted(item)})")


def _unwrap(value):
    """Collate functions may wrap a value in a one-element list/tuple."""
    return value[0] if isinstance(value, list | tuple) and len(value) == 1 else value


def make_conditioner(entry: dict, cond_dim: int) -> nn.Module:
    """One conditioner from a `configs` entry {"id", "type", "config"}; output width cond_dim."""
    kind, config = entry.get("type"), dict(entry.get("config") or {})
    config.pop("output_dim", None)
    if kind == "t5gemma":
        return PromptConditioner(cond_dim, **config)
    if kind == "number":
        return NumberConditioner(cond_dim, **config)
    raise ConditionerError(f"conditioner {entry.get('id')!r} has type {kind!r}; SA3 uses 't5gemma' and 'number'")


def resolve_text_encoder(entry_config: dict, text_encoder: str | Path | None = None) -> Path:
    """Where the T5Gemma encoder of a `t5gemma` conditioner entry lives.

    text_encoder: an explicit folder or file (ComfyUI's single file), used as is when it is one; otherwise a base
    folder in which the entry's `repo_id`/`subfolder` (or `model_path`) is looked up: base/repo_id/subfolder,
    base/subfolder, base."""
    sub = entry_config.get("subfolder") or TEXT_ENCODER_SUBFOLDER
    repo = entry_config.get("repo_id") or ""
    candidates = []
    if entry_config.get("model_path"):
        candidates.append(Path(entry_config["model_path"]))
    if text_encoder is not None:
        base = Path(text_encoder)
        if base.is_file() or (base / "config.json").is_file():
            return base
        candidates += [base / repo / sub, base / repo.rsplit("/", 1)[-1] / sub, base / sub]
    for candidate in candidates:
        if candidate.is_file() or (candidate / "config.json").is_file():
            return candidate
    looked = ", ".join(str(c) for c in candidates) or "(no folder given)"
    raise ConditionerError(f"T5Gemma text encoder not found; looked in {looked}. Give the model's "
                           f"{TEXT_ENCODER_SUBFOLDER} folder or ComfyUI's t5gemma_b_b_ul2.safetensors.")


def build_conditioner(conditioning_config: dict, text_encoder_dir_or_file: str | Path | None = None,
                      device: str | torch.device = "cpu", dtype: str | torch.dtype = torch.float32
                      ) -> MultiConditioner:
    """A MultiConditioner with its T5Gemma loaded, in `dtype` (T5Gemma in `text_encoder_dtype(dtype)`) on `device`
    (fresh conditioner weights: load the checkpoint's `conditioner.*` tensors into it afterwards).

    conditioning_config: `model.conditioning` of model_config.json. text_encoder_dir_or_file: see
    `resolve_text_encoder` (None: only the entry's own `model_path`). The T5 width is read from its config or
    weights, so a width != cond_dim gets its `proj_out`."""
    dtype = resolve_dtype(dtype)
    config = {**conditioning_config, "configs": [dict(e) for e in conditioning_config.get("configs", [])]}
    loaded = {}
    for entry in config["configs"]:
        if entry.get("type") == "t5gemma":
            entry["config"] = dict(entry.get("config") or {})
            path = resolve_text_encoder(entry["config"], text_encoder_dir_or_file)
            encoder, tokenizer = load_text_encoder(path, dtype=text_encoder_dtype(dtype), device=device)
            entry["config"].setdefault("text_dim", encoder.config.hidden_size)
            loaded[entry["id"]] = (encoder, tokenizer)
    multi = MultiConditioner(config).to(device=device, dtype=dtype)
    for key, (encoder, tokenizer) in loaded.items():
        multi.conditioners[key].set_text_encoder(encoder, tokenizer)
    return multi


__all__ = ["ConditionerError", "MultiConditioner", "NumberConditioner", "PromptConditioner", "T5GemmaConditioner",
           "T5GemmaConfig", "build_conditioner", "make_conditioner", "resolve_text_encoder"]
