"""A second model of a pack loaded beside a first one, holding in memory only what differs.

The ARC variant of a pack has its own DiT and conditioner weights, but the same SAME autoencoder and the same T5Gemma
text encoder as the base model (the post-training leaves both frozen). Loading it whole beside a training run would
add a second autoencoder and text encoder; `load_sibling` loads its DiT and conditioner and shares the rest with the
loaded model, after checking that those parts are really equal (tensor by tensor for the autoencoder, same file or
same bytes for the text encoder). A part that differs is loaded for the sibling alone, so the result always equals
`load_model` of the same source.

On an accelerator, `stream_dit=True` keeps the sibling's DiT blocks in host memory and lends them to the device one
block at a time (`host_streaming`): the sibling then adds about one block to device memory instead of a whole DiT.
"""

from __future__ import annotations

import filecmp
import os
import weakref
from pathlib import Path

import torch

from .host_streaming import place_around_blocks, stream_from_host
from .model import SA3Model, build_modules, load_weights, loaded_dtype, locate_checkpoint
from .text import text_encoder_dtype

PRETRANSFORM = "pretransform."  # the SAME autoencoder's keys in a full checkpoint (`SA3Modules.pretransform`)


# pretransform module -> {(checkpoint, size, mtime, dtype): equal?}: a run loads its ARC sibling for every round of
# demos, and need not read the SAME weights again for an answer it has
_AUTOENCODER_CHECKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _same_autoencoder(base: SA3Model, loc) -> bool:
    """The checkpoint's SAME tensors, loaded as `base` loads them, equal base's (config and every tensor)."""
    if loc.config.pretransform != base.config.pretransform:
        return False
    stat = loc.file.path.stat()
    key = (str(loc.file.path.resolve()), stat.st_size, stat.st_mtime_ns, base.dtype)
    known = _AUTOENCODER_CHECKS.setdefault(base.modules.pretransform, {})
    if key not in known:
        known[key] = _equal_autoencoder_tensors(base, loc)
    return known[key]


def _equal_autoencoder_tensors(base: SA3Model, loc) -> bool:
    state = base.modules.pretransform.state_dict()
    keys = [PRETRANSFORM + k for k in state]
    if set(keys) != {k for k in loc.file.keys() if k.startswith(PRETRANSFORM)}:
        return False
    if any(tuple(loc.file.shapes[k]) != tuple(state[k[len(PRETRANSFORM):]].shape) for k in keys):
        return False
    for key, tensor in loc.file.read_many(keys, lambda k: loaded_dtype(k, base.dtype)):
        if not torch.equal(tensor, state[key[len(PRETRANSFORM):]].cpu()):
            return False
    return True


TEXT_ENCODER_FILES = (".safetensors", ".json", ".model")  # weights (+ index), configs, tokenizers; not READMEs


def _weight_files(source: Path) -> list[Path]:
    """The files that make a text encoder: the file itself, or a folder's weights, configs and tokenizer."""
    if source.is_file():
        return [source]
    return sorted(p for p in source.iterdir() if p.is_file() and p.name.endswith(TEXT_ENCODER_FILES))


def same_text_encoder(a: Path | None, b: Path | None) -> bool:
    """Two text encoder sources hold the same encoder: the same path, the same files (links into one Hub cache) or
    files of equal bytes (`filecmp` remembers a comparison while the files' size and time stay the same)."""
    if a is None or b is None or not a.exists() or not b.exists():
        return False
    if os.path.samefile(a, b):
        return True
    files_a, files_b = _weight_files(a), _weight_files(b)
    if [p.name for p in files_a] != [p.name for p in files_b]:
        return False
    return all(os.path.samefile(x, y) or filecmp.cmp(x, y, shallow=False) for x, y in zip(files_a, files_b))


def load_sibling(base: SA3Model, source: str | Path, variant: str | None = "arc", *,
                 models_dir: str | Path | None = None, download: bool = False,
                 stream_dit: bool | None = None) -> SA3Model:
    """The model at `source` (pack name + variant, folder or file, as `load_model` takes them) in base's dtype and
    on its device, sharing base's SAME autoencoder and text encoder when they are equal to its own.

    stream_dit: keep the DiT blocks in host memory and lend them to the device per block (default: when base is on
    an accelerator). The returned model's `shared_parts` names what it shares ("autoencoder", "text encoder");
    `source` naming base's own checkpoint returns base itself."""
    loc = locate_checkpoint(source, variant=variant, models_dir=models_dir, download=download)
    if base.source and Path(base.source).exists() and os.path.samefile(loc.path, base.source):
        return base  # the same checkpoint: nothing to load (e.g. ARC demos of a run whose model is a plain folder)
    device = base.device
    stream = device.type != "cpu" if stream_dit is None else stream_dit
    modules = build_modules(loc.config)
    shared_parts = []
    shared_keys = frozenset()
    if _same_autoencoder(base, loc):
        modules.pretransform = base.modules.pretransform
        shared_keys = frozenset(PRETRANSFORM + k for k in base.modules.pretransform.state_dict())
        shared_parts.append("autoencoder")
    load_weights(modules, loc.file, base.dtype, "cpu" if stream else device, shared=shared_keys)
    modules.eval().requires_grad_(False)
    if stream:
        blocks = modules.model.model.transformer.layers
        place_around_blocks(modules, blocks, device)
        stream_from_host(blocks, device)
    model = SA3Model(loc.config, modules, base.dtype, device, source=str(loc.path), pack=loc.pack,
                     variant=loc.variant)
    model.streams_dit = stream
    prompt = model.conditioner.conditioners["prompt"]
    base_prompt = base.conditioner.conditioners["prompt"]
    own = loc.text_encoder
    if base_prompt.text_encoder is not None and (own is None or same_text_encoder(own, base_prompt.text_encoder_source)):
        prompt.share_text_encoder(base_prompt)
        shared_parts.append("text encoder")
    elif own is not None:
        prompt.load_text_encoder(own, dtype=text_encoder_dtype(base.dtype), device=device)
    model.shared_parts = tuple(shared_parts)
    return model


__all__ = ["load_sibling", "same_text_encoder"]
