"""Encoding a folder of audio into a pre-encoded dataset (the layout `dataset.py` describes), following the plan
`scan.py` makes: each file encoded (long ones resumable chunk by chunk), in this process or one per device, the
manifest written last.

Re-runs encode new and changed audio, re-read every file's captions/tags/sidecars (so edited captions arrive
without re-encoding), and remove the outputs of files deleted from the source; outputs of files a new
include/exclude leaves out, or a whole dataset, only when asked (`prune`): see `scan.plan_encode`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import errno
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..sa3.atomic import LockHeld, atomic_write, file_lock
from .audio_io import AudioFileError, check_readable, load_audio
from .captions import ENCODER_FIELDS, lookup_metadata, table_warnings, utf8_text
from .dataset import (
    ENCODE_LOCK,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    SILENCE,
    DatasetError,
    encoder_identity,
    file_hash,
    load_manifest,
    output_relpath,
    utf8_safe,
    write_json,
)
from .partial import PartialEncode, remove_all_partials
from .scan import ScanResult, _removals, plan_encode

# How audio becomes the encoder's input (downmix, levels, damaged packets, AAC padding). Raise it when that changes:
# an earlier encode is then redone. Files encoded before it was recorded are kept, except multichannel ones (the
# downmix of 4 to 8 channels changed with version 2).
DECODE_VERSION = 3  # 3: AAC priming removed by iTunSMPB in MP4s without an edit list; 2: surround downmix
SILENCE_LATENTS = 64  # frames of encoded silence stored; loaders tile it when they need more
# Whole files go to the encoder by default: SA3Model.encode_audio already encodes long audio in the official
# 128-latent overlapping chunks (bounded memory, and latents identical to the official pre-encode, whose last chunk
# is anchored at the file's end, so any outer split would change them). An outer chunk size is for encoders that
# do not chunk themselves, or to bound the size of one call.
DEFAULT_CHUNK_LATENTS = None
DEFAULT_OVERLAP_LATENTS = 16  # context each side of an outer chunk, discarded


class EncodeStopped(Exception):
    """Raised between a long file's chunks to stop the run there: that file stays pending (not skipped). Its
    __cause__, when set, is what a progress callback raised (ComfyUI's interrupt, Ctrl-C), raised again once the
    finished work is saved."""



def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda f: np.save(f, array))



def _duration_text(seconds: float) -> str:
    """'12.3 s' under a minute, '4.5 min' above (a short dataset is not '0.0 min')."""
    return f"{seconds:.1f} s" if seconds < 60 else f"{seconds / 60:.1f} min"



# ----------------------------------------------------------------------------------------------------------------
# encoding one file


def encode_waveform(encoder, audio: np.ndarray, chunk_latents: int | None = DEFAULT_CHUNK_LATENTS,
                    overlap_latents: int = DEFAULT_OVERLAP_LATENTS,
                    on_chunk: Callable[[int, int, np.ndarray], None] | None = None,
                    finished: dict[int, np.ndarray] | None = None) -> np.ndarray:
    """audio: [2, N] float32 at encoder.sample_rate -> latents [latent_dim, ceil(N / ratio)] float32.

    The whole true length is encoded: nothing is truncated, and padding stops at the last partial frame. With
    chunk_latents, longer audio goes to the encoder in calls of that many frames, each with overlap_latents frames
    of real context on both sides that are then dropped (exact for encoders with a receptive field within the
    overlap). on_chunk(done, total, kept) after each of those chunks, else after each of the encoder's own chunks
    when its encode_audio takes on_chunk (`SA3Model.encode_audio`), with the latents that chunk contributes, kept
    [latent_dim, k]; it may raise to stop. finished: {done - 1: kept} of an earlier, stopped encode of this same
    audio with the same chunking, not computed again (`encoding.partial`)."""
    import torch

    r = int(encoder.downsampling_ratio)
    n_latents = math.ceil(audio.shape[-1] / r)
    x = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))
    if x.shape[-1] != n_latents * r:  # zero tail up to the last frame boundary (a copy: only when needed)
        x = torch.nn.functional.pad(x, (0, n_latents * r - x.shape[-1]))

    def run(lo: int, hi: int, inner: Callable[[int, int, np.ndarray], None] | None = None,
            inner_finished: dict[int, np.ndarray] | None = None) -> np.ndarray:
        extra = {}
        if (inner is not None or inner_finished) and _takes_on_chunk(encoder):  # its own chunks, [1, D, k] tensors
            if inner is not None:
                extra["on_chunk"] = lambda done, total, kept: inner(done, total, kept[0].float().cpu().numpy())
            extra["finished"] = {i: torch.from_numpy(k)[None] for i, k in (inner_finished or {}).items()}
        z = encoder.encode_audio(x[None, :, lo * r:hi * r], encoder.sample_rate, **extra)[0]
        if z.shape[-1] < hi - lo:
            raise DatasetError(f"encoder returned {z.shape[-1]} frames for {hi - lo} frames of audio")
        return z[:, :hi - lo].float().cpu().numpy()

    if chunk_latents is None or n_latents <= chunk_latents:
        return run(0, n_latents, on_chunk, finished)
    out, starts = [], range(0, n_latents, chunk_latents)
    for index, start in enumerate(starts):
        stop = min(start + chunk_latents, n_latents)
        kept = (finished or {}).get(index)
        if kept is None or kept.shape != (encoder.latent_dim, stop - start):
            lo, hi = max(0, start - overlap_latents), min(n_latents, stop + overlap_latents)
            kept = run(lo, hi)[:, start - lo:stop - lo]
        out.append(kept)
        if on_chunk is not None:
            on_chunk(index + 1, len(starts), kept)
    return np.concatenate(out, axis=1)


def _chunks_identity(ident: dict, content_hash: str, chunk_latents: int | None) -> dict:
    """What a file's kept chunks depend on besides its relpath (`encoding.partial`)."""
    return {"hash": content_hash, "encoder": ident["fingerprint"], "decode_version": DECODE_VERSION,
            "chunk_latents": chunk_latents, "overlap_latents": DEFAULT_OVERLAP_LATENTS}


def _encode_file_resuming(encoder, ident: dict, path: Path, relpath: str, root: Path, out_dir: Path, dtype: str,
                          content_hash: str, chunk_latents: int | None, decoded=None,
                          between_chunks: Callable[[int, int, int], None] | None = None) -> dict:
    """`_encode_file` continuing from the chunks an earlier, stopped encode of this file kept (`encoding.partial`),
    keeping its own as it goes; they are dropped once the file is encoded or skipped. between_chunks(done, total,
    resumed) after each chunk, resumed: how many chunks came from the earlier encode: progress, and it may raise
    EncodeStopped."""
    kept_chunks = PartialEncode(out_dir, relpath, _chunks_identity(ident, content_hash, chunk_latents))
    finished = kept_chunks.finished()
    resumed = len(finished)  # the saved chunks of this file's own chunking (its key), counted once

    def on_chunk(done: int, total: int, kept: np.ndarray) -> None:
        kept_chunks.add(done - 1, kept)
        if between_chunks is not None:
            between_chunks(done, total, resumed)
    try:
        rec = _encode_file(encoder, ident, path, relpath, root, out_dir, dtype, content_hash, chunk_latents,
                           decoded=decoded, finished=finished, on_chunk=on_chunk)
    except BaseException:  # stopped part-way: the next run starts after the last chunk
        with contextlib.suppress(OSError):  # unsaved, they are encoded again; the stop goes on
            kept_chunks.flush()
        raise
    kept_chunks.remove()
    return rec


def _takes_on_chunk(encoder) -> bool:
    """Whether encoder.encode_audio accepts on_chunk= (ours does; the encoder protocol does not require it)."""
    import inspect

    try:
        return "on_chunk" in inspect.signature(encoder.encode_audio).parameters
    except (TypeError, ValueError):
        return False


def encode_silence(encoder, n_latents: int = SILENCE_LATENTS) -> np.ndarray:
    """[1, latent_dim, n_latents] float32: the encoding of digital silence (the official silence.npy shape)."""
    if hasattr(encoder, "silence_latents"):
        z = np.asarray(encoder.silence_latents(n_latents), dtype=np.float32)
        return z.reshape(1, z.shape[-2], z.shape[-1])
    zeros = np.zeros((2, n_latents * int(encoder.downsampling_ratio)), np.float32)
    return encode_waveform(encoder, zeros)[None]


def _output_paths(out_dir: Path, relpath: str) -> tuple[Path, Path]:
    """(latents .npy, metadata .json) of a relpath, named by `output_relpath`."""
    out = output_relpath(relpath)
    return out_dir / f"{out}.npy", out_dir / f"{out}.json"


def _skipped(rec: dict, error: BaseException) -> dict:
    """rec as a skipped record, the error as its reason."""
    if isinstance(error, AudioFileError):
        return {**rec, "status": "skipped", "reason": error.reason, "detail": error.detail}
    # e.g. out of memory on one huge file: report it, keep going with the others
    return {**rec, "status": "skipped", "reason": "encoding failed", "detail": f"{type(error).__name__}: {error}"[:500]}


CAPTION_SOURCES = {"json": "JSON sidecars", "txt": ".txt sidecars", "table": "metadata tables", "tags": "embedded tags"}


def _file_metadata(path: Path, root: Path) -> tuple[dict, list[str], dict, str | None]:
    """(metadata, warnings, sources, where its caption came from: "json" | "txt" | "table" | "tags" | None) of one audio
    file by the one lookup (`captions.lookup_metadata`)."""
    warnings: list[str] = []
    sources: dict[str, str] = {}
    origins: dict[str, str] = {}
    md = lookup_metadata(path, root, warnings=warnings, sources=sources, origins=origins)
    return md, warnings, sources, origins.get("prompt") if md.get("prompt") else None


def _file_json(metadata: dict, sources: dict, encoded: dict) -> dict:
    """A file's JSON: its metadata, then the fields the encoder writes (`encoded`) and where the metadata came
    from. The encoder may write only captions.ENCODER_FIELDS: the fields prompts never see."""
    unreserved = set(encoded) - ENCODER_FIELDS
    if unreserved:  # a new encoder field must be reserved, or it reaches prompts built from "every field"
        raise RuntimeError(f"encoder fields {sorted(unreserved)} are missing from captions.ENCODER_FIELDS")
    return {**metadata, **encoded, "metadata_sources": sources}


def _encode_file(encoder, ident: dict, path: Path, relpath: str, root: Path, out_dir: Path, dtype: str,
                 content_hash: str, chunk_latents: int | None, decoded=None,
                 on_chunk: Callable[[int, int, np.ndarray], None] | None = None,
                 finished: dict[int, np.ndarray] | None = None) -> dict:
    """Decode, encode and write one file; returns its manifest record (status 'encoded' or 'skipped'). Raises
    only EncodeStopped (from on_chunk; on_chunk and finished: see `encode_waveform`): whatever else goes wrong with
    this file (bad audio, out of memory, an output it cannot write) is its skip reason, and the run goes on."""
    rec = {"relpath": relpath, "hash": content_hash}
    try:
        audio, info = decoded if decoded is not None else load_audio(path, encoder.sample_rate, 2)
        r = int(encoder.downsampling_ratio)
        if audio.shape[-1] < r:
            raise AudioFileError("too short", f"{info.seconds:.4f} s is less than one latent frame "
                                 f"({r / encoder.sample_rate:.4f} s)")
        latents = encode_waveform(encoder, audio, chunk_latents, on_chunk=on_chunk, finished=finished)
        if not np.isfinite(latents).all():
            raise AudioFileError("encoder produced NaN/inf")
        md, warnings, sources, caption = _file_metadata(path, root)
    except EncodeStopped:
        raise
    except Exception as e:
        return _skipped(rec, e)
    n = latents.shape[-1]
    npy_path, json_path = _output_paths(out_dir, relpath)
    seconds = info.seconds
    encoded = {
        "seconds_start": 0,
        "seconds_total": int(math.ceil(audio.shape[-1] / encoder.sample_rate)),  # official: ceil(len / sr)
        "padding_mask": [1] * n,
        "path": str(Path(path).absolute()),
        "relpath": relpath,
        "timestamps": [0, int(audio.shape[-1])],
        "sample_rate": int(encoder.sample_rate),
        "seconds_decoded": round(seconds, 6),
        "source_sample_rate": info.sample_rate,
        "source_channels": info.channels,
        "decoder": info.decoder,
        "content_hash": content_hash,
        "encoder_fingerprint": ident["fingerprint"],
        "latent_dtype": dtype,
        "decode_version": DECODE_VERSION,
        **({"audio_warnings": list(info.warnings)} if info.warnings else {}),
    }
    try:
        save_npy_atomic(npy_path, latents.astype(dtype))
        write_json(json_path, _file_json(md, sources, encoded))  # the JSON last: its presence means this file is done
    except (OSError, ValueError) as e:  # a name the output file system refuses, a full disk: skip this file
        return {**rec, "status": "skipped", "reason": "could not write its outputs",
                "detail": f"{utf8_text(str(npy_path.parent))}: {type(e).__name__}: {e}"[:500]}
    rec.update(status="encoded", latents=f"{output_relpath(relpath)}.npy", metadata=f"{output_relpath(relpath)}.json",
               n_latents=n, seconds=round(seconds, 6), source_sample_rate=info.sample_rate,
               source_channels=info.channels, decoder=info.decoder, caption=caption)
    if info.warnings or warnings:
        rec["warnings"] = list(info.warnings) + warnings
    return rec


def load_encoder(source: str | Path, device: str = "cpu", variant: str | None = None,
                 models_dir: str | Path | None = None):
    """An SA3Model as the encoder (pack name, model folder or checkpoint). For worker processes pass
    `functools.partial(load_encoder, source, variant=..., models_dir=...)` as encoder_factory."""
    from ..sa3.model import load_model

    return load_model(source, "fp32", device, variant=variant, models_dir=models_dir)


# ----------------------------------------------------------------------------------------------------------------
# worker processes (one per device)

_WORKER: dict = {}


def _worker_init(factory, devices, counter) -> None:
    import signal

    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle: it stops the pool

    with counter.get_lock():
        rank = counter.value
        counter.value += 1
    device = devices[rank % len(devices)]
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, len(devices))))
    try:
        _WORKER["encoder"] = factory(device)
        _WORKER["ident"] = encoder_identity(_WORKER["encoder"])
    except Exception as e:  # an initializer that raises makes Pool respawn it forever: report it on first use
        _WORKER["error"] = f"worker on {device}: could not build the encoder: {type(e).__name__}: {e}"


def _worker_check() -> None:
    if "error" in _WORKER:
        raise DatasetError(_WORKER["error"])


def _worker_identity(_=None) -> dict:
    _worker_check()
    return _WORKER["ident"]


def _worker_silence(_=None) -> np.ndarray:
    _worker_check()
    return encode_silence(_WORKER["encoder"])


def _worker_encode(task: tuple) -> dict:
    _worker_check()
    path, relpath, root, out_dir, dtype, content_hash, chunk_latents = task
    return _encode_file_resuming(_WORKER["encoder"], _WORKER["ident"], Path(path), relpath, Path(root),
                                 Path(out_dir), dtype, content_hash, chunk_latents)


# ----------------------------------------------------------------------------------------------------------------
# the folder encoder


@dataclass
class EncodeReport:
    out_dir: Path
    encoded: list[str] = field(default_factory=list)  # encoded in this run
    reused: list[str] = field(default_factory=list)  # unchanged since a previous run
    recaptioned: list[str] = field(default_factory=list)  # reused, with captions/tags/sidecars changed since
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relpath, reason)
    removed: list[str] = field(default_factory=list)  # outputs of files no longer present / now excluded
    excluded: list[str] = field(default_factory=list)
    warnings: list[tuple[str, str]] = field(default_factory=list)  # (relpath, warning) of dataset files
    table_warnings: list[tuple[str, str]] = field(default_factory=list)  # (table relpath, warning), once per table
    captions: dict[str, int] = field(default_factory=dict)  # dataset files by caption source ("json"...; "none")
    interrupted: bool = False
    seconds: float = 0.0  # audio seconds in the dataset

    @property
    def complete(self) -> bool:
        return not self.interrupted

    @property
    def usable(self) -> int:
        """Files the dataset holds after this run."""
        return len(self.encoded) + len(self.reused)

    def summary(self) -> str:
        recaptioned = f" ({len(self.recaptioned)} with new captions or tags)" if self.recaptioned else ""
        lines = [f"{self.out_dir}: {len(self.encoded)} encoded, {len(self.reused)} unchanged{recaptioned}, "
                 f"{len(self.skipped)} skipped, {len(self.removed)} removed, {len(self.excluded)} excluded, "
                 f"{len({rel for rel, _ in self.warnings})} with warnings; {_duration_text(self.seconds)} of audio"
                 + (" (INTERRUPTED: run again to continue)" if self.interrupted else "")]
        if self.captions:
            found = [f"{self.captions[k]} from {name}" for k, name in CAPTION_SOURCES.items() if self.captions.get(k)]
            none = self.captions.get("none", 0)
            lines.append("  captions: " + ", ".join(found or ["none found"])
                         + (f"; {none} file(s) without one (tags and path only)" if none and found else ""))
        lines += [f"  skipped {rel}: {reason}" for rel, reason in self.skipped]
        lines += [f"  warning {table}: {text}" for table, text in self.table_warnings]
        lines += self._warning_lines()
        if not self.interrupted and not self.usable:
            lines.append("  no usable file: every file was skipped (reasons above); the dataset is empty")
        return "\n".join(lines)

    def _warning_lines(self, shared_by: int = 3) -> list[str]:
        """One line per warning, except that a text shared by `shared_by` files or more (the loose matches of a
        folder's metadata table) is one line naming how many files and the first few."""
        files_by_text: dict[str, list[str]] = {}
        for rel, text in self.warnings:
            files_by_text.setdefault(text, []).append(rel)
        lines = []
        for rel, text in self.warnings:
            rels = files_by_text[text]
            if len(rels) < shared_by:
                lines.append(f"  warning {rel}: {text}")
            elif rel == rels[0]:
                more = ", …" if len(rels) > 3 else ""
                lines.append(f"  warning ({len(rels)} files: {', '.join(rels[:3])}{more}): {text}")
        return lines


def duplicate_warnings(files: list[dict]) -> list[tuple[str, str]]:
    """(relpath, warning) for each dataset file whose bytes equal an earlier one's (manifest records, path order):
    both train, so that sound counts twice as often as the others."""
    first_with: dict[str, str] = {}
    found = []
    for f in files:
        if f.get("status") != "encoded" or not f.get("hash"):
            continue
        first = first_with.setdefault(f["hash"], f["relpath"])
        if first != f["relpath"]:
            found.append((f["relpath"], f"the same file as {first} (byte for byte): both train, so that sound "
                                        "counts twice; exclude one unless that is meant"))
    return found


def _output_stems(relpath: str) -> list[str]:
    """Where a relpath's outputs may be, without suffix: `output_relpath`, then the unshortened relpath that
    datasets written before names were shortened used for names of 201-254 bytes."""
    out = output_relpath(relpath)
    return [out] if out == relpath else [out, relpath]


def _decoded_as_now(meta: dict, relpath: str) -> bool:
    """Whether an earlier encode's decoding rules give today's audio for this file: `DECODE_VERSION`, or an older
    one whose change cannot touch it. Version 3 changed only MP4 files FFmpeg decoded (AAC priming), version 2
    only files of more than two channels (the first datasets recorded no version)."""
    version = meta.get("decode_version")
    if version == DECODE_VERSION:
        return True
    # by extension (the decoder checks the container): .aac and .alac may hold MP4 too, so they are redone as well
    mp4_by_ffmpeg = meta.get("decoder") == "pyav" and Path(relpath).suffix.lower() in (".m4a", ".mp4", ".aac", ".alac")
    stereo_or_less = (meta.get("source_channels") or 2) <= 2
    return not mp4_by_ffmpeg and (version == 2 or (version is None and stereo_or_less))


def _reusable(out_dir: Path, relpath: str, content_hash: str, ident: dict, dtype: str) -> tuple[dict, dict] | None:
    """(manifest record, file JSON) of a finished earlier encode of this exact content with this encoder and
    decoding rules (`DECODE_VERSION`), read from its per-file JSON (so a run killed before its manifest was
    written still resumes)."""
    for out in _output_stems(relpath):
        try:
            if not (out_dir / f"{out}.npy").is_file():
                continue
            meta = json.loads((out_dir / f"{out}.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict):
            break
    else:
        return None
    if (not _decoded_as_now(meta, relpath) or meta.get("content_hash") != content_hash
            or meta.get("encoder_fingerprint") != ident["fingerprint"] or meta.get("latent_dtype", "float32") != dtype):
        return None
    rec = {"relpath": relpath, "hash": content_hash, "status": "encoded", "latents": f"{out}.npy",
           "metadata": f"{out}.json", "n_latents": len(meta.get("padding_mask", [])),
           "seconds": meta.get("seconds_decoded", meta.get("seconds_total")),
           "source_sample_rate": meta.get("source_sample_rate"), "source_channels": meta.get("source_channels"),
           "decoder": meta.get("decoder")}
    return rec, meta


def _refresh_metadata(out_dir: Path, path: Path, root: Path, rec: dict, meta: dict) -> tuple[dict, bool]:
    """Re-read a reused file's captions, tags and sidecars (cheap: no decoding) and rewrite its JSON when they
    changed, so edited captions reach the dataset without re-encoding. Returns (rec with the file's warnings (its
    audio's, kept from the encode, and its sidecars', current), whether its captions or tags changed)."""
    md, warnings, sources, caption = _file_metadata(path, root)
    rec = {**rec, "caption": caption}
    encoded = {k: v for k, v in meta.items() if k in ENCODER_FIELDS and k != "metadata_sources"}
    encoded["path"] = str(Path(path).absolute())  # the source folder may have moved
    fresh = _file_json(md, sources, encoded)
    changed = {k: v for k, v in utf8_safe(fresh).items() if k != "path"} != \
        {k: v for k, v in meta.items() if k != "path"}
    if utf8_safe(fresh) != meta:
        try:
            write_json(out_dir / rec["metadata"], fresh)
        except (OSError, ValueError) as e:
            warnings.append(f"its captions changed but {rec['metadata']} could not be updated ({e})")
    warnings = list(meta.get("audio_warnings") or []) + warnings
    return ({**rec, "warnings": warnings} if warnings else rec), changed


def _remove_outputs(out_dir: Path, relpath: str) -> None:
    """Delete a file's outputs and the folders that leaves empty; best effort (the manifest no longer lists them,
    so a file that cannot be deleted is never used)."""
    try:
        for stem in _output_stems(relpath):
            for suffix in (".npy", ".json"):
                (out_dir / f"{stem}{suffix}").unlink(missing_ok=True)
        d = (out_dir / output_relpath(relpath)).parent
        while d != out_dir and d.is_dir() and not any(d.iterdir()):  # tidy emptied folders
            d.rmdir()
            d = d.parent
    except OSError:
        pass


def _calling_back(callback: Callable, *args):
    """callback(*args); whatever it raises comes out as EncodeStopped from it (`encode_folder` saves, then re-raises
    the original): a caller's progress bar must not become a file's skip reason."""
    try:
        return callback(*args)
    except BaseException as e:
        raise EncodeStopped() from e


def encode_folder(folder: str | Path, out_dir: str | Path, encoder=None, *, encoder_factory: Callable | None = None,
                  devices: list[str] | None = None, include=(), exclude=(), dtype: str = "float32",
                  force: bool = False, prune: bool = False, progress: Callable[[dict], None] | None = None,
                  should_stop: Callable[[], bool] | None = None, chunk_latents: int | None = DEFAULT_CHUNK_LATENTS,
                  model_info: dict | None = None, planned: tuple[ScanResult, list[str]] | None = None,
                  file_progress: Callable[[dict], None] | None = None) -> EncodeReport:
    """Encode every audio file under `folder` into the dataset folder `out_dir` (module docstring for the layout).

    encoder: an object with encode_audio(waveform [B, 2, N], sample_rate) -> [B, D, T], latent_dim, sample_rate,
      downsampling_ratio (e.g. an SA3Model); or encoder_factory(device) -> encoder with `devices` (one worker
      process per entry, e.g. ["cuda:0", "cuda:1"] or ["cpu", "cpu"]), files shared out among them; the output
      is the same as with one process.
    include/exclude: globs or explicit relpaths (see `matches`). dtype: "float32" | "float16" for the latents.
    force: re-encode everything (and allow what prune allows); otherwise files whose content hash (and encoder
      and dtype) are unchanged are kept, their captions/tags/sidecars re-read, and outputs of files deleted from
      the source are removed.
    prune: also remove earlier outputs when the dataset came from another folder, none of its files is left, or
      include/exclude now leave some out (refused otherwise, as a likely mistake: see `plan_encode`, which runs
      first and raises DatasetError).
    progress(event): called per file with {"i", "n", "relpath", "status", "reason"?, "seconds"?}.
    file_progress(event): within a long file, after each of its chunks, {"i", "n", "relpath", "done", "total"}
      (chunks; i counts the file being encoded), and "resumed": how many of them a stopped encode had saved, when
      any. Only with one encoder in this process (not encoder_factory).
    should_stop(): polled between files, and between a long file's chunks (with one encoder in this process);
      when it returns True (or on KeyboardInterrupt) the finished files and an incomplete manifest are kept, and a
      re-run continues from there (a file stopped between its chunks is encoded again then). An exception raised
      by progress or file_progress (ComfyUI's cancel raises from its progress bar) also keeps them, then goes on.
    planned: what `plan_encode` returned for these same arguments, when the caller ran it already (the CLI does,
      before loading the model), so the folder is not scanned twice.
    Bad files are skipped with a reason (report.skipped and the manifest); the rest is still encoded. Caveats on
    files that were encoded (damaged audio, fitted levels, bad sidecars) are their "warnings"."""
    folder, out_dir = Path(folder), Path(out_dir)
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype={dtype!r}: use 'float32' or 'float16'")
    if (encoder is None) == (encoder_factory is None):
        raise ValueError("give exactly one of encoder= or encoder_factory=")
    scan, gone = planned or plan_encode(folder, out_dir, include, exclude, prune=prune or force)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DatasetError(f"{out_dir}: cannot create the dataset folder ({e.strerror or e})") from None
    writer = contextlib.ExitStack()  # this process alone writes the dataset until the encode ends
    try:
        writer.enter_context(file_lock(out_dir / ENCODE_LOCK, wait=False, remove=True))
    except LockHeld:
        raise DatasetError(f"{out_dir}: another encode is writing this dataset now (in another process); wait for "
                           "it to end, or encode into another folder. Nothing was changed.") from None
    except OSError as e:  # a filesystem without locks (some network and FUSE mounts): encode as before, unguarded
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
    with writer:
        if planned is not None:  # planned before the lock (and the model load): another encode may have written since
            present = {rel for _, rel in scan.files} | {rel for rel, _ in scan.problems}
            gone = _removals(out_dir, folder, present, set(scan.excluded), prune or force)
        return _encode_locked(folder, out_dir, encoder, encoder_factory, devices, scan, gone, include, exclude,
                              dtype, force, progress, should_stop, chunk_latents, model_info, file_progress)


def _encode_locked(folder: Path, out_dir: Path, encoder, encoder_factory, devices, scan: ScanResult,
                   gone: list[str], include, exclude, dtype: str, force: bool, progress, should_stop,
                   chunk_latents: int | None, model_info: dict | None, file_progress) -> EncodeReport:
    """encode_folder's work, while it holds the dataset's writer lock."""
    report = EncodeReport(out_dir=out_dir, excluded=scan.excluded)
    old = load_manifest(out_dir) or {}
    old_files = {f["relpath"]: f for f in old.get("files", []) if isinstance(f, dict) and "relpath" in f}

    pool = None
    if encoder_factory is not None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")  # CUDA and fork do not mix
        devices = list(devices or ["cpu"])
        pool = ctx.Pool(len(devices), initializer=_worker_init,
                        initargs=(encoder_factory, devices, ctx.Value("i", 0)))
    try:
        ident = pool.apply(_worker_identity) if pool else encoder_identity(encoder)
        silence_path = out_dir / SILENCE
        if force or not silence_path.is_file() or old.get("encoder", {}).get("fingerprint") != ident["fingerprint"]:
            silence = pool.apply(_worker_silence) if pool else encode_silence(encoder)
            try:
                save_npy_atomic(silence_path, silence.astype(dtype))
            except OSError as e:
                raise DatasetError(f"{silence_path}: cannot write to the dataset folder ({e})") from None

        # Hash files and decide what is already done; reused files get their metadata re-read.
        def stamp(st: os.stat_result) -> dict:
            """What says a file is unchanged without reading it: size, mtime, and the inode's change time, which
            `cp -p`, `rsync -a` or unzip cannot set back (a same-length take copied over keeps size and mtime). On
            Windows st_ctime is the creation time instead: there the first two decide, as before."""
            return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}

        records: dict[str, dict] = {}
        todo: list[tuple[Path, str, str]] = []
        for path, rel in scan.files:
            try:
                check_readable(path)
                now = stamp(os.stat(path))
                prev = old_files.get(rel, {})
                if prev.get("hash") and all(prev.get(k) == v for k, v in now.items()):
                    h = prev["hash"]  # the same stamp: trust the recorded hash (a dataset from before ctime: read once)
                else:
                    h = file_hash(path)
            except AudioFileError as e:
                records[rel] = {"relpath": rel, "status": "skipped", "reason": e.reason, "detail": e.detail}
                continue
            except OSError as e:
                records[rel] = {"relpath": rel, "status": "skipped", "reason": "unreadable", "detail": str(e)}
                continue
            done = None if force else _reusable(out_dir, rel, h, ident, dtype)
            if done is not None:
                refreshed, recaptioned = _refresh_metadata(out_dir, path, folder, *done)
                records[rel] = {**refreshed, **now}
                report.reused.append(rel)
                if recaptioned:
                    report.recaptioned.append(rel)
            else:
                todo.append((path, rel, h))
                prev_encoded = (prev.get("status") == "encoded" and prev.get("hash") == h and prev.get("latents")
                                and old.get("encoder", {}).get("fingerprint") == ident["fingerprint"]
                                and (out_dir / prev["latents"]).is_file())
                if prev_encoded:  # re-encoded (force, another storage dtype): its latents serve until replaced, so
                    # a run can train on the dataset meanwhile and a cancel leaves it as usable as before
                    records[rel] = {**prev, **now}
                else:
                    records[rel] = {"relpath": rel, "hash": h, **now, "status": "pending"}
        for rel, reason in scan.problems:
            records.setdefault(rel, {"relpath": rel, "status": "skipped", "reason": reason})

        # Outputs of files that disappeared or are now excluded go away (plan_encode refused a likely mistake).
        for rel in gone:
            _remove_outputs(out_dir, rel)
            report.removed.append(rel)

        manifest = {
            "format": FORMAT, "version": FORMAT_VERSION, "complete": False,
            "source_folder": str(folder.absolute()), "include": [str(p) for p in include],
            "exclude": [str(p) for p in exclude], "encoder": ident, "model": model_info or {},
            "latent_dim": ident["latent_dim"], "sample_rate": ident["sample_rate"],
            "downsampling_ratio": ident["downsampling_ratio"],
            "latent_rate": ident["sample_rate"] / ident["downsampling_ratio"], "dtype": dtype, "silence": SILENCE,
            "created": old.get("created") or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

        def flush(complete: bool) -> None:
            files = [records[k] for k in sorted(records)]
            enc = [f for f in files if f["status"] == "encoded"]
            report.seconds = float(sum(f.get("seconds") or 0 for f in enc))
            manifest.update(
                complete=complete, updated=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), files=files,
                totals={"files": len(files), "encoded": len(enc),
                        "skipped": sum(f["status"] == "skipped" for f in files),
                        "pending": sum(f["status"] == "pending" for f in files), "excluded": len(scan.excluded),
                        "with_warnings": len({f["relpath"] for f in enc if f.get("warnings")}
                                             | {w["relpath"] for w in manifest.get("dataset_warnings", [])
                                                if "relpath" in w}),  # the files the report warns about
                        "seconds": round(report.seconds, 3), "minutes": round(report.seconds / 60, 3),
                        "n_latents": sum(int(f.get("n_latents") or 0) for f in enc)})
            write_json(out_dir / MANIFEST, manifest)

        def summarise() -> None:  # the report's lists, and what it says beyond each file's own warnings (copies,
            # metadata tables) into the manifest for `dataset inspect`
            in_order = [records[k] for k in sorted(records)]
            report.skipped = [(f["relpath"], f["reason"]) for f in in_order if f["status"] == "skipped"]
            copies = duplicate_warnings(in_order)
            report.warnings = [(f["relpath"], w) for f in in_order if f["status"] == "encoded"
                               for w in f.get("warnings", [])] + copies
            report.table_warnings = table_warnings(folder, [p for p, _ in scan.files]
                                                   + [folder / r for r in scan.excluded])
            report.captions = dict(collections.Counter(f.get("caption") or "none" for f in in_order
                                                       if f["status"] == "encoded"))
            manifest["dataset_warnings"] = (
                [{"relpath": rel, "warning": text} for rel, text in copies]
                + [{"table": table, "warning": text} for table, text in report.table_warnings])

        flush(False)
        n, last_flush = len(todo), time.monotonic()

        def between_chunks(i: int, rel: str) -> Callable[[int, int, int], None]:
            def on_chunk(done: int, total: int, resumed: int) -> None:
                if file_progress is not None:
                    _calling_back(file_progress, {"i": i, "n": n, "relpath": rel, "done": done, "total": total,
                                                  **({"resumed": resumed} if resumed else {})})
                if done < total and should_stop is not None and _calling_back(should_stop):
                    raise EncodeStopped()
            return on_chunk

        def finish(i: int, rec: dict) -> None:
            nonlocal last_flush
            prev = records[rec["relpath"]]
            records[rec["relpath"]] = {**rec, **{k: prev.get(k) for k in ("size", "mtime_ns", "ctime_ns")}}
            if rec["status"] == "encoded":
                report.encoded.append(rec["relpath"])
            else:
                _remove_outputs(out_dir, rec["relpath"])  # a file that went bad must not keep stale latents
            if progress is not None:
                _calling_back(progress, {"i": i, "n": n, "relpath": rec["relpath"], "status": rec["status"],
                                         **({"reason": rec["reason"]} if "reason" in rec else {}),
                                         **({"seconds": rec["seconds"]} if "seconds" in rec else {})})
            if time.monotonic() - last_flush > 10:
                flush(False)
                last_flush = time.monotonic()

        try:
            if pool is not None:
                tasks = [(str(p), rel, str(folder), str(out_dir), dtype, h, chunk_latents) for p, rel, h in todo]
                for i, rec in enumerate(pool.imap_unordered(_worker_encode, tasks)):
                    finish(i + 1, rec)
                    if should_stop is not None and should_stop():
                        report.interrupted = True
                        break
            else:
                # Decode the next file on a thread while the encoder works on this one.
                with concurrent.futures.ThreadPoolExecutor(1) as ex:
                    def decode(k):
                        try:
                            return load_audio(todo[k][0], encoder.sample_rate, 2)
                        except Exception as e:  # this file's skip reason, not the run's end
                            return e
                    ahead = ex.submit(decode, 0) if todo else None
                    for i, (path, rel, h) in enumerate(todo):
                        if should_stop is not None and should_stop():
                            report.interrupted = True
                            break
                        decoded = ahead.result()
                        ahead = ex.submit(decode, i + 1) if i + 1 < n else None
                        if isinstance(decoded, Exception):
                            rec = _skipped({"relpath": rel, "hash": h}, decoded)
                        else:
                            rec = _encode_file_resuming(encoder, ident, path, rel, folder, out_dir, dtype, h,
                                                        chunk_latents, decoded, between_chunks(i + 1, rel))
                        finish(i + 1, rec)
                    if ahead is not None:
                        ahead.cancel()
        except KeyboardInterrupt:
            report.interrupted = True
            summarise()  # the files finished so far are a dataset `dataset inspect` reads, warnings included
            flush(False)
            raise
        except EncodeStopped as stop:
            report.interrupted = True
            if stop.__cause__ is not None:  # a callback's exception: saved as for Ctrl-C, then passed on
                summarise()
                flush(False)
                raise stop.__cause__ from None
        summarise()
        complete = not report.interrupted and not any(f["status"] == "pending" for f in records.values())
        flush(complete)
        if complete:  # chunks kept for files that changed or left since they were stopped
            remove_all_partials(out_dir)
        return report
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
