"""Adapter files: the SA3-native safetensors layout (read and write), the official trainer's Lightning `.ckpt`
(read, safely), and the `LoadedAdapter` data object they produce.

On disk (as the official `save_lora_safetensors` writes it): keys
`<layer path>.parametrizations.weight.0.<name>` with the layer path relative to the DiT wrapper
(`model.transformer.layers.3.self_attn.to_qkv`) or the conditioner (`conditioners.seconds_total.embedder.embedding.1`),
name in lora_A/lora_B/M_xs/magnitude/magnitude_r/magnitude_c, every float tensor fp16, and header metadata
`{"lora_config": json.dumps({rank, alpha, adapter_type, dropout, include, exclude})}`. We add our own string keys
(`EXTRA_METADATA_KEYS`) beside it; other readers ignore them. -xs files carry no SVD bases (they are recomputed from
the weights the file is applied to), so we record a fingerprint of the base weights they were trained on.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from ..sa3.loading import file_kind
from ..sa3.packs import PACKS
from .maths import TRAINABLE_NAMES, check_adapter_type, resolve_adapter_type, tensor_names

EXTRA_METADATA_KEYS = ("base_pack", "base_fingerprint", "step", "epoch", "trigger_words", "created_by")
CONFIG_KEYS = ("rank", "alpha", "adapter_type", "dropout", "include", "exclude")  # the official lora_config order
_KEY = re.compile(r"^(?P<layer>.+)\.parametrizations\.weight\.(?P<index>\d+)\.(?P<name>[A-Za-z_]+)$")


class AdapterFileError(ValueError):
    """A file that is not a readable adapter (wrong format, unsafe pickle, no adapter tensors)."""


@dataclass
class LoadedAdapter:
    """One adapter: resolved type, rank, alpha and per-layer tensors (fp32) keyed by layer path, as in the files.

    layers: {"model.transformer.layers.0.self_attn.to_qkv": {"lora_A": [r, in], "lora_B": [out, r]}, ...}.
    config: the lora_config dict as read (include/exclude/dropout kept for the writer); metadata: the other
    header keys (strings)."""

    adapter_type: str
    rank: int
    alpha: float
    layers: dict[str, dict[str, Tensor]]
    config: dict = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    name: str = ""

    def __post_init__(self):
        check_adapter_type(self.adapter_type)
        for layer, tensors in self.layers.items():
            missing = set(tensor_names(self.adapter_type)) - set(tensors)
            if missing:
                raise AdapterFileError(f"{self.name or 'adapter'}: layer {layer} lacks {sorted(missing)} "
                                       f"needed by adapter_type {self.adapter_type!r}")

    @property
    def scaling(self) -> float:
        """alpha / rank (times the strength at use)."""
        return self.alpha / self.rank

    @property
    def is_xs(self) -> bool:
        return self.adapter_type.endswith("-xs")

    def lora_config(self) -> dict:
        """The lora_config we write: the one read (order and extra keys kept), or the official key set."""
        base = {"rank": self.rank, "alpha": self.alpha, "adapter_type": self.adapter_type, "dropout": 0.0,
                "include": None, "exclude": None}
        if not self.config:
            return base
        out = dict(self.config)
        for k in ("rank", "alpha"):  # make missing values explicit only if they were missing
            out.setdefault(k, base[k])
        # A legacy "dora" read as dora-cols (from [1, in] magnitudes) is written with 1-D magnitudes, which every
        # reader takes for rows under "dora": it gets its resolved name. "dora" meaning rows stays as it was read.
        if not (out.get("adapter_type") == "dora" and self.adapter_type == "dora-rows"):
            out["adapter_type"] = self.adapter_type
        return out

    def trained_on(self, otherwise: str) -> str:
        """The model the file says it was trained on: our `base_pack` metadata, underfit's lora_config `base_model`,
        else `otherwise`."""
        return str(self.metadata.get("base_pack") or self.config.get("base_model") or otherwise)

    def info(self) -> dict:
        """A summary for display (SA3 LoRA Info): type, rank, alpha, layer counts, size, and our metadata."""
        n_params = sum(v.numel() for t in self.layers.values() for v in t.values())
        meta = dict(self.metadata)
        if "trigger_words" in meta:
            try:
                meta["trigger_words"] = json.loads(meta["trigger_words"])
            except ValueError:
                pass
        return {"name": self.name, "adapter_type": self.adapter_type, "rank": self.rank, "alpha": self.alpha,
                "n_layers": len(self.layers), "n_params": n_params,
                "dit_layers": sum(1 for k in self.layers if k.startswith("model.")),
                "conditioner_layers": sum(1 for k in self.layers if k.startswith("conditioners.")),
                "include": self.config.get("include"), "exclude": self.config.get("exclude"),
                "layers": grouped_layer_names(self.layers),
                **{k: meta[k] for k in EXTRA_METADATA_KEYS if k in meta}}

    def state_dict(self, index: int = 0) -> dict[str, Tensor]:
        """Tensors under their official checkpoint keys (the U/V bases of -xs types are never included)."""
        return {f"{layer}.parametrizations.weight.{index}.{name}": t[name]
                for layer, t in self.layers.items() for name in tensor_names(self.adapter_type)}


def grouped_layer_names(names) -> list[str]:
    """Layer paths with their block numbers gathered into ranges, in first-seen order:
    ["model.transformer.layers.[0-19].self_attn.to_qkv", ...], each usable as a layer_filter or include pattern."""
    groups: dict[tuple[str, str], list[int]] = {}
    for name in names:
        m = re.match(r"^(.*?\.layers\.)(\d+)(\..*)$", name)
        if m is None:
            groups.setdefault((name, ""), [])
        else:
            groups.setdefault((m[1], m[3]), []).append(int(m[2]))
    out = []
    for (head, tail), numbers in groups.items():
        if not numbers:
            out.append(head)
            continue
        numbers = sorted(set(numbers))
        start = numbers[0]
        for a, b in zip(numbers, numbers[1:] + [None]):
            if b != a + 1:  # one entry per run of numbers: a range the pattern syntax reads ([a-b], no commas)
                out.append(f"{head}{start}{tail}" if start == a else f"{head}[{start}-{a}]{tail}")
                start = b
    return out


# ---------------------------------------------------------------------------------------------------- parsing

def infer_rank(state: dict[str, Tensor]) -> int:
    """The rank the reference infers: from the first lora_A [r, in], lora_B [out, r] or M_xs [r, r] in key order."""
    for key, value in state.items():
        if key.endswith(".lora_A") or key.endswith(".M_xs"):
            return int(value.shape[0])
        if key.endswith(".lora_B"):
            return int(value.shape[1])
    raise AdapterFileError("no lora_A / lora_B / M_xs tensors to infer the rank from")


def _positive_number(value, field_name: str, where: str, kind: type, allow_zero: bool = False):
    """A lora_config number as `kind`, or AdapterFileError naming the file and field (a string, NaN, zero rank)."""
    try:
        number = kind(value)
        ok = not isinstance(value, (bool, str)) and number == number and abs(number) != float("inf")
        ok = ok and (kind is not int or number == value)  # a rank of 4.7 is not silently 4
        ok = ok and (number > 0 or (allow_zero and number == 0))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise AdapterFileError(f"{where}: lora_config {field_name}={value!r} is not a usable number "
                               f"({'>= 0' if allow_zero else '> 0'})")
    return number


def adapter_from_state(state: dict[str, Tensor], config: dict | None = None, metadata: dict | None = None,
                       name: str = "", where: str | None = None) -> LoadedAdapter:
    """Build a LoadedAdapter from checkpoint-keyed tensors and a lora_config dict (rank/alpha inferred if absent).
    name: the adapter's; where: what errors call it (its file path; default the name)."""
    config = dict(config or {})
    state = {k: v for k, v in state.items() if _KEY.match(k) and k.rsplit(".", 1)[1] in TRAINABLE_NAMES}
    where = where or name or "file"
    if not state:
        raise AdapterFileError(f"{where}: no adapter tensors (keys '<layer>.parametrizations.weight.0."
                               f"lora_A' ...); is this a full model checkpoint rather than a LoRA?")
    try:
        adapter_type = resolve_adapter_type(config.get("adapter_type"), state)
    except ValueError as e:
        raise AdapterFileError(f"{where}: lora_config: {e}") from None
    rank = config.get("rank")
    rank = _positive_number(rank, "rank", where, int) if rank is not None else infer_rank(state)
    if rank != infer_rank(state):  # else its layers look like another model's, which is not what is wrong
        raise AdapterFileError(f"{where}: lora_config says rank {rank}, but its tensors have rank {infer_rank(state)}: "
                               "its metadata does not belong to these tensors")
    alpha = config.get("alpha")
    alpha = _positive_number(alpha, "alpha", where, float, allow_zero=True) if alpha is not None else rank
    bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise AdapterFileError(f"{where}: tensor {bad} holds NaN or infinite values (a diverged training run, or a "
                               "damaged file): use an earlier checkpoint")
    layers: dict[str, dict[str, Tensor]] = {}
    indices = set()
    for key, value in state.items():
        m = _KEY.match(key)
        indices.add(m["index"])
        value = value.float() if value.is_floating_point() else value
        if m["name"].startswith("magnitude") and value.dim() == 2:
            value = value.reshape(-1)  # legacy [1, fan_in] / [fan_out, 1] magnitudes, squeezed as the reference does
        layers.setdefault(m["layer"], {})[m["name"]] = value
    if len(indices) > 1:
        raise AdapterFileError(f"{name or 'file'}: keys use several parametrization indices {sorted(indices)}; "
                               f"an adapter file holds one adapter at index 0")
    return LoadedAdapter(adapter_type, rank, alpha, layers, config, dict(metadata or {}), name)


def _read_lora_config(text: str | None, where: str) -> dict:
    """The `lora_config` metadata as a dict ({} when absent); AdapterFileError naming the file when malformed."""
    if text is None:
        return {}
    try:
        config = json.loads(text)
    except ValueError as e:
        raise AdapterFileError(f"{where}: its lora_config metadata is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise AdapterFileError(f"{where}: its lora_config metadata is {type(config).__name__}, not a JSON object")
    return config


def read_adapter_file(path: str | Path) -> LoadedAdapter:
    """Read a `.safetensors` (SA3-native) or the official trainer's Lightning `.ckpt` adapter file.

    `.ckpt` files are opened with `torch.load(weights_only=True)`: tensors and plain types only, never arbitrary
    pickled objects."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such adapter file")
    with open(path, "rb") as f:
        kind = file_kind(f.read(9))
    if path.suffix.lower() in (".safetensors", ".sft") or kind == "safetensors":
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                state = {k: f.get_tensor(k) for k in f.keys()}
                metadata = dict(f.metadata() or {})
        except Exception as e:  # the safetensors library's own errors name no file
            raise AdapterFileError(f"{path.name}: not a readable safetensors file ({e}); download or copy it "
                                   "again") from None
        config = _read_lora_config(metadata.pop("lora_config", None), path.name)
        if not any(_KEY.match(k) for k in state) and any(k.endswith((".lora_up.weight", ".diff")) for k in state):
            raise AdapterFileError(f"{path.name} is a LoRA in ComfyUI's format (lora_up/lora_down or diff keys, as "
                                   "SA3 Export LoRA for ComfyUI writes) for ComfyUI's own LoRA loader; SA3 Load LoRA "
                                   "reads the SA3-native file it was exported from")
        return adapter_from_state(state, config, metadata, path.stem, str(path))
    if kind not in ("zip", "pickle"):  # neither torch's zip format nor a legacy pickle
        raise AdapterFileError(f"{path.name} is not an adapter file: neither safetensors nor a PyTorch checkpoint "
                               f"{'(it is audio) ' if kind == 'audio' else ''}(an SA3 LoRA is a .safetensors file, "
                               "or the official trainer's .ckpt)")
    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only met an object that is no tensor or plain type
        raise AdapterFileError(
            f"{path.name}: refusing to load: it is not a tensors-only checkpoint (torch.load(weights_only=True) "
            f"said: {str(e).splitlines()[0][:200]}). Unpickling arbitrary objects can run code. If you trust the "
            f"file, convert it with the official convert_lora_ckpt_to_safetensors() and load the .safetensors.") from e
    except Exception as e:  # truncated or damaged: EOFError, IndexError, zipfile errors, ...
        raise AdapterFileError(f"{path.name}: a damaged PyTorch checkpoint ({type(e).__name__}: {e}); download or "
                               "copy it again") from None
    if isinstance(ckpt, dict) and "adapter_names" in ckpt and "optimizer" in ckpt:
        beside = path.with_name(path.name.removesuffix(".state.pt") + ".safetensors")
        lora = (f"the .safetensors file beside it: {beside.name}" if beside.is_file() and beside != path else
                "the <run>-step=<S>.safetensors file of the same step, in the run's checkpoints folder")
        raise AdapterFileError(f"{path.name} is a training state (optimiser and data position, for resuming); the "
                               f"LoRA is {lora}")
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise AdapterFileError(f"{path.name}: expected a dict with 'state_dict' (the official trainer's LoRA .ckpt)")
    config = ckpt.get("lora_config") or {}
    return adapter_from_state(ckpt["state_dict"], dict(config), {}, path.stem, str(path))


def write_adapter_file(path: str | Path, adapter: LoadedAdapter, **extra: object) -> Path:
    """Write the SA3-native safetensors: official keys and fp16 tensors, `lora_config` metadata as the official
    writer produces it, plus our metadata keys (EXTRA_METADATA_KEYS, strings; lists/dicts as JSON). A lora_config
    read with underfit's `step` / `epoch` / `base_model` in it gets the ones given here (base_model: when base_pack
    is one of the packs, the names underfit knows)."""
    unknown = set(extra) - set(EXTRA_METADATA_KEYS)
    if unknown:
        raise ValueError(f"unknown metadata keys {sorted(unknown)}; use {EXTRA_METADATA_KEYS}")
    metadata = {k: v for k, v in adapter.metadata.items() if k != "lora_config"}
    for k, v in extra.items():
        if v is not None:
            metadata[k] = v if isinstance(v, str) else json.dumps(v)
    config = adapter.lora_config()
    for k in ("step", "epoch"):  # underfit keeps these inside lora_config and resumes from them: never left stale
        if k in config and isinstance(extra.get(k), int):
            config[k] = extra[k]
    if "base_model" in config and extra.get("base_pack") in PACKS:  # underfit's name for the pack trained on
        config["base_model"] = extra["base_pack"]
    metadata["lora_config"] = json.dumps(config)
    state = adapter.state_dict()
    fp16_max = torch.finfo(torch.float16).max
    bad = next((k for k, v in state.items() if v.is_floating_point()
                and not (torch.isfinite(v).all() and v.abs().max() <= fp16_max)), None)
    if bad is not None:  # fp16 would store an infinity: every reader would make NaN audio from it
        raise ValueError(f"{Path(path).name}: not written: {bad} holds NaN, infinite or beyond-fp16 values "
                         f"(|x| > {fp16_max:g}); the training diverged (lower the learning rate)")
    tensors = {k: (v.half() if v.is_floating_point() else v).contiguous().cpu() for k, v in state.items()}
    path = Path(path)
    save_file(tensors, str(path), metadata=metadata)
    return path


def weights_fingerprint(weights: Mapping[str, Tensor]) -> str:
    """A short hash identifying base weights (the layers an adapter touches): names, shapes and an evenly strided
    sample of up to 65536 fp32 values per tensor, so a multi-GB model hashes in well under a second."""
    h = hashlib.sha256()
    for name in sorted(weights):
        tensor = weights[name]  # once: a lazy mapping reads it from disk
        w = tensor.detach().reshape(-1)
        step = max(1, w.numel() // 65536)
        h.update(f"{name}:{tuple(tensor.shape)}".encode())
        h.update(w[::step].float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
