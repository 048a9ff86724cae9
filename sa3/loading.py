"""Strict, low-memory checkpoint reading.

`SafetensorsFile` parses the safetensors header itself and reads each tensor's bytes straight into a tensor of the
target dtype's size (no mmap of the whole file, no second full copy), so peak RAM while loading is the model in its
final dtype plus one tensor. Modules are built on the `meta` device and receive the loaded tensors by assignment.

Errors name the file and say what to do: a pickle, a truncated file, a LoRA passed as a model, missing or unexpected
keys (first few + counts), shape mismatches.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint file cannot be used as asked; the message names the file and the fix."""


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise CheckpointError(f"dtype={dtype!r} is not supported; use one of fp32, bf16, fp16") from None


def file_kind(head: bytes) -> str | None:
    """"safetensors", "zip" (a PyTorch archive), "pickle", "audio" or None (unknown) from a file's first 9 bytes.
    A safetensors file starts with its header's length (8 bytes, little-endian) and then the header's '{': the
    length's first byte alone can be anything (0x80, a pickle's first byte, for about one file in 32), so the '{'
    decides first."""
    if head[8:9] == b"{":
        return "safetensors"
    if head[:2] == b"PK":
        return "zip"
    if head[:1] == b"\x80":
        return "pickle"
    if head[:4] == b"RIFF" or head[:4] == b"fLaC" or head[:3] == b"ID3":
        return "audio"
    return None


def _sniff_wrong_format(path: Path, head: bytes) -> str | None:
    """What else the file is, from its first 9 bytes (`file_kind`), or None."""
    return {"zip": "is a zip/PyTorch pickle archive (.ckpt/.pt), not safetensors. Model checkpoints must be "
                   ".safetensors; we never unpickle model files",
            "pickle": "is a Python pickle, not safetensors; we never unpickle model files",
            "audio": "is an audio file, not a model checkpoint"}.get(file_kind(head))


class SafetensorsFile:
    """Header-parsed view of a .safetensors file. `shapes`, `dtypes`, `metadata`; `read(key, dtype, device)`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(9)
                wrong = _sniff_wrong_format(self.path, head)
                if wrong:
                    raise CheckpointError(f"{self.path.name} {wrong}.")
                head = head[:8]
                f.seek(8)
                if len(head) < 8:
                    raise CheckpointError(f"{self.path.name} is empty or truncated ({size} bytes); download it again.")
                (header_len,) = struct.unpack("<Q", head)
                if header_len > min(size - 8, _MAX_HEADER):
                    raise CheckpointError(f"{self.path.name} is not a valid safetensors file (header length "
                                          f"{header_len} exceeds the file size {size}); it is truncated or another format.")
                header = json.loads(f.read(header_len))
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{self.path.name}: the safetensors header is not valid JSON; "
                                  "the file is damaged or not safetensors.") from None
        self.metadata: dict = header.pop("__metadata__", None) or {}
        self._data_start = 8 + header_len
        self._entries = header
        data_size = size - self._data_start
        for key, entry in header.items():
            if entry["dtype"] not in _ST_DTYPES:
                raise CheckpointError(f"{self.path.name}: tensor {key} has unsupported dtype {entry['dtype']}")
            end = entry["data_offsets"][1]
            if end > data_size:
                raise CheckpointError(f"{self.path.name} is truncated: tensor {key} ends at byte {end} of the data but "
                                      f"only {data_size} bytes are present. Download the file again.")

    def keys(self) -> list[str]:
        return list(self._entries)

    @property
    def shapes(self) -> dict[str, tuple]:
        return {k: tuple(e["shape"]) for k, e in self._entries.items()}

    def dtype_of(self, key: str) -> torch.dtype:
        return _ST_DTYPES[self._entries[key]["dtype"]]

    def read(self, key: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
             handle=None) -> torch.Tensor:
        """One tensor, read from disk into fresh memory and converted to `dtype` on `device`."""
        entry = self._entries[key]
        start, end = entry["data_offsets"]
        stored = _ST_DTYPES[entry["dtype"]]
        out = torch.empty(entry["shape"], dtype=stored)
        if end > start:
            buf = out.view(-1).view(torch.uint8).numpy() if out.numel() else None
            close = handle is None
            f = handle or open(self.path, "rb")
            try:
                f.seek(self._data_start + start)
                got = f.readinto(memoryview(buf))
            finally:
                if close:
                    f.close()
            if got != end - start:
                raise CheckpointError(f"{self.path.name}: short read for {key}; the file is truncated.")
        if dtype is not None and out.is_floating_point() and dtype != stored:
            out = out.to(dtype)
        return out.to(device) if str(device) != "cpu" else out

    def read_many(self, keys: Iterable[str], dtype_for: Callable[[str], torch.dtype | None], device="cpu"):
        with open(self.path, "rb") as handle:
            for key in keys:
                yield key, self.read(key, dtype_for(key), device, handle=handle)


LORA_MARKERS = ("parametrizations.weight.", "lora_A", "lora_B", "lora_up", "lora_down", "M_xs")


def looks_like_adapter(keys: Iterable[str], metadata: Mapping) -> bool:
    if "lora_config" in metadata:
        return True
    keys = list(keys)
    return bool(keys) and sum(any(m in k for m in LORA_MARKERS) for k in keys) > len(keys) // 2


def describe_key_mismatch(missing: list[str], unexpected: list[str], limit: int = 5) -> str:
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            shown = ", ".join(keys[:limit]) + (f", … ({len(keys) - limit} more)" if len(keys) > limit else "")
            parts.append(f"{len(keys)} {label} key(s): {shown}")
    return "; ".join(parts)


def load_into_meta_module(module: nn.Module, file: SafetensorsFile, key_map: Mapping[str, str],
                          dtype_for: Callable[[str], torch.dtype | None], device="cpu", what: str = "model",
                          computed: frozenset[str] = frozenset()) -> None:
    """Fill a module built on the meta device from `file`, strictly.

    key_map: {module state_dict key: file key}. Every module key must be present with the right shape, and every
    file key listed in key_map's values is read once. Tensors are assigned (not copied into) the module.
    computed: module keys the caller has already filled (e.g. RoPE frequencies a re-saved file dropped)."""
    expected = {k: v for k, v in module.state_dict(keep_vars=True).items() if k not in computed}
    missing = [k for k in expected if k not in key_map or key_map[k] not in file.shapes]
    if missing:
        raise CheckpointError(f"{file.path.name} does not match the {what}: "
                              f"{describe_key_mismatch([key_map.get(k, k) for k in missing], [])}. "
                              "The file is for another model or incomplete.")
    shapes = file.shapes
    for k, tensor in expected.items():
        if tuple(shapes[key_map[k]]) != tuple(tensor.shape):
            raise CheckpointError(f"{file.path.name}: {key_map[k]} has shape {tuple(shapes[key_map[k]])}, "
                                  f"the {what} expects {tuple(tensor.shape)}. The config does not match the weights.")
    inverse = {v: k for k, v in key_map.items() if k in expected}
    state = {}
    for file_key, tensor in file.read_many(inverse, lambda fk: dtype_for(inverse[fk]), device):
        state[inverse[file_key]] = tensor
    result = module.load_state_dict(state, strict=False, assign=True)
    if set(result.missing_keys) - set(computed) or result.unexpected_keys:
        raise RuntimeError(f"internal: {what} keys not loaded: {sorted(set(result.missing_keys) - set(computed))[:5]}")
    leftovers = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if leftovers:
        raise RuntimeError(f"internal: {what} tensors not provided by the checkpoint and not computed: {leftovers[:5]}")


def check_unexpected(file: SafetensorsFile, used: set[str], allowed_extra: Callable[[str], bool] = lambda k: False,
                     what: str = "model") -> None:
    unexpected = [k for k in file.keys() if k not in used and not allowed_extra(k)]
    if unexpected:
        raise CheckpointError(f"{file.path.name} has tensors the {what} does not use: "
                              f"{describe_key_mismatch([], unexpected)}. Is it a different model version?")
