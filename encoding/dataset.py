"""Pre-encoded datasets: encode a folder of audio to latents, import official/underfit datasets, open for training.

Layout of a dataset folder DIR (readable by the official `PreEncodedDataset` as-is):

    DIR/<relpath>.npy     latents [latent_dim, T] (float32 or float16), T = ceil(samples_at_44.1k / ratio)
    DIR/<relpath>.json    official fields (prompt if any, seconds_total, seconds_start, padding_mask at latent
                          rate, path, relpath, sample_rate, timestamps) + all metadata fields + ours
                          (seconds_decoded, source_sample_rate, source_channels, decoder, content_hash, ...)
    DIR/silence.npy       [1, latent_dim, N]: the encoding of digital silence, used to pad
    DIR/dataset.json      the manifest: encoder used, latent rate, every file with hash/status/reason, totals,
                          and "complete": true only once everything above is written (atomic replace)

<relpath> keeps the audio extension (`a.wav.npy`, `a.flac.npy`), so same-stem files never collide. Relpaths are
'/'-separated and Unicode NFC; name bytes that are not UTF-8 are spelled `\\xNN` (`captions.name_text`). A name
longer than MAX_NAME_BYTES is shortened on disk (`output_relpath`); the manifest maps each relpath to its files
("latents", "metadata"). `seconds_total` follows the official convention (ceil of the decoded length, an integer);
the exact decoded duration is `seconds_decoded`. Every JSON file is strict UTF-8 JSON (no NaN/Infinity).

Re-runs encode new and changed audio, re-read every file's captions/tags/sidecars (so edited captions arrive
without re-encoding), and remove the outputs of files deleted from the source; outputs of files a new
include/exclude leaves out, or a whole dataset, only when asked (`prune`): see `plan_encode`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import errno
import fnmatch
import hashlib
import json
import math
import os
import random
import shlex
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..sa3.atomic import LockHeld, atomic_write, file_lock, writable_folder_problem
from .audio_io import AUDIO_EXTENSIONS, AudioFileError, check_readable, load_audio
from .captions import ENCODER_FIELDS, lookup_metadata, name_text, nfc, table_warnings, utf8_text
from .partial import PartialEncode, remove_all_partials

MANIFEST = "dataset.json"
# How audio becomes the encoder's input (downmix, levels, damaged packets, AAC padding). Raise it when that changes:
# an earlier encode is then redone. Files encoded before it was recorded are kept, except multichannel ones (the
# downmix of 4 to 8 channels changed with version 2).
DECODE_VERSION = 3  # 3: AAC priming removed by iTunSMPB in MP4s without an edit list; 2: surround downmix
SILENCE = "silence.npy"
ENCODE_LOCK = ".encode.lock"  # held by the one process writing the dataset (`encode_folder`)
FORMAT = "sa3-lora-dataset"
FORMAT_VERSION = 1
SILENCE_LATENTS = 64  # frames of encoded silence stored; loaders tile it when they need more
# Whole files go to the encoder by default: SA3Model.encode_audio already encodes long audio in the official
# 128-latent overlapping chunks (bounded memory, and latents identical to the official pre-encode, whose last chunk
# is anchored at the file's end, so any outer split would change them). An outer chunk size is for encoders that
# do not chunk themselves, or to bound the size of one call.
DEFAULT_CHUNK_LATENTS = None
DEFAULT_OVERLAP_LATENTS = 16  # context each side of an outer chunk, discarded
# Longest file or folder name we write, in UTF-8 bytes, before ".npy"/".json": with that suffix and the atomic
# writer's temp-name decoration ("." + name + ".XXXXXXXX.tmp", 14 more) a name stays under the 255-byte NAME_MAX.
MAX_NAME_BYTES = 200


class DatasetError(ValueError):
    """A dataset problem the user can fix; the message names the file or folder and what to do."""


class EncodeStopped(Exception):
    """Raised between a long file's chunks to stop the run there: that file stays pending (not skipped). Its
    __cause__, when set, is what a progress callback raised (ComfyUI's interrupt, Ctrl-C), raised again once the
    finished work is saved."""


# ----------------------------------------------------------------------------------------------------------------
# small helpers


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda f: np.save(f, array))


def _utf8_safe(data):
    """data with every string (keys too) made writable as UTF-8 by `utf8_text`."""
    if isinstance(data, str):
        return utf8_text(data)
    if isinstance(data, dict):
        return {_utf8_safe(k): _utf8_safe(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_utf8_safe(v) for v in data]
    return data


def write_json(path: str | Path, data) -> Path:
    """Write data atomically as strict JSON in UTF-8: ValueError on NaN/Infinity (which only Python reads back);
    strings UTF-8 cannot hold (undecodable file-name bytes) are spelled `\\xNN`."""
    return atomic_write(path, json.dumps(_utf8_safe(data), indent=1, ensure_ascii=False, allow_nan=False))


def fit_name(name: str, max_bytes: int = MAX_NAME_BYTES) -> str:
    """name when its UTF-8 form has at most max_bytes, else its start (cut at a character boundary) + "~" + 12 hex
    digits of its sha256 + its extension: deterministic, and distinct names stay distinct."""
    raw = name.encode("utf-8")
    if len(raw) <= max_bytes:
        return name
    stem, ext = os.path.splitext(name)
    ext = ext if len(ext.encode("utf-8")) <= 16 else ""
    tag = "~" + hashlib.sha256(raw).hexdigest()[:12]
    room = max_bytes - len(tag) - len(ext.encode("utf-8"))
    return stem.encode("utf-8")[:room].decode("utf-8", "ignore") + tag + ext


def output_relpath(relpath: str) -> str:
    """Where a file's outputs go in the dataset folder, without the ".npy"/".json" suffix: its relpath with every
    name longer than MAX_NAME_BYTES shortened by `fit_name`."""
    return "/".join(fit_name(part) for part in relpath.split("/"))


def ignored_entry(name: str, is_dir: bool) -> bool:
    """Folder entries a scan never looks at: macOS AppleDouble files (`._song.wav`) and hidden folders."""
    return name.startswith("._") or (is_dir and name.startswith("."))


def _duration_text(seconds: float) -> str:
    """'12.3 s' under a minute, '4.5 min' above (a short dataset is not '0.0 min')."""
    return f"{seconds:.1f} s" if seconds < 60 else f"{seconds / 60:.1f} min"


def folder_signature(folder: str | Path, skip: tuple[str | Path, ...] = ()) -> str:
    """A digest of every file's relpath, size and modification time under folder, walked as `scan_folder` walks it
    (symlinked folders followed once, hidden folders left out, folders in `skip` such as a dataset written inside
    it too), by stat only, so a caller (ComfyUI's cache) can tell whether an encode could find anything new: audio
    or a sidecar added, edited or removed. A missing folder counts as empty. Sidecars outside the folder
    (`../json/`) are not covered."""
    skipped = {os.path.realpath(p) for p in skip}
    seen: set[str] = set()
    h = hashlib.sha256()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a symlink loop or a second link to a folder already walked
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not ignored_entry(d, is_dir=True)
                         and os.path.realpath(os.path.join(root, d)) not in skipped)
        for name in sorted(files):
            path = os.path.join(root, name)
            try:
                st = os.stat(path)
            except OSError:
                continue
            rel = os.path.relpath(path, folder)
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def file_hash(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """sha256 of a file's bytes, as 'sha256:<hex>'."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return f"sha256:{h.hexdigest()}"


def matches(relpath: str, patterns) -> bool:
    """True when relpath equals a pattern, or matches it as a glob (on the relpath, or on the file name for
    patterns without '/'). Exact names are compared first, so names with [brackets] work as explicit entries."""
    name = relpath.rsplit("/", 1)[-1]
    for p in patterns:
        exact = name_text(str(p))  # a relpath copied from a manifest may hold "\\xNN"
        p = exact.replace("\\", "/")
        if relpath in (exact, p) or name in (exact, p) or fnmatch.fnmatchcase(relpath, p):
            return True
        if "/" not in p and fnmatch.fnmatchcase(name, p):
            return True
        if p.endswith("/") and relpath.startswith(p):  # a folder
            return True
    return False


def item_seconds(meta: dict, padding_mask, latent_rate: float) -> float:
    """The seconds_total an item is conditioned on: its metadata's, else the length of its real latent frames
    (padding_mask: 1 = real) at latent_rate frames per second."""
    return float(meta.get("seconds_total") or padding_mask.sum() / latent_rate)


def encoder_identity(encoder) -> dict:
    """What the manifest records about the encoder, with a fingerprint that changes when its weights do."""
    ident = {
        "name": str(getattr(encoder, "pack", None) or getattr(encoder, "source", None) or type(encoder).__name__),
        "latent_dim": int(encoder.latent_dim),
        "downsampling_ratio": int(encoder.downsampling_ratio),
        "sample_rate": int(encoder.sample_rate),
    }
    fp = getattr(encoder, "fingerprint", None)
    if fp is None and getattr(encoder, "autoencoder", None) is not None:
        fp = _autoencoder_digest(encoder.autoencoder, exact=True)
    ident["fingerprint"] = str(fp if fp is not None else ident["name"])
    # which autoencoder, whatever precision it was loaded in: training refuses another one's latents
    weights = getattr(encoder, "fingerprint", None)
    if weights is None and getattr(encoder, "autoencoder", None) is not None:
        weights = _autoencoder_digest(encoder.autoencoder, exact=False)
    ident["weights"] = str(weights if weights is not None else ident["name"])
    return ident


def _autoencoder_digest(autoencoder, exact: bool) -> str:
    """Names, shapes and a sample of each tensor: cheap, and different for any other checkpoint. exact: the values
    as loaded (a bf16 load differs from an fp32 one: its latents differ too); else rounded to bf16, which a load of
    the same file in fp32, bf16 or fp16 (the autoencoder then stays fp32) gives alike."""
    import torch

    h = hashlib.sha256()
    for k, v in autoencoder.state_dict().items():
        flat = v.detach().reshape(-1)[:64].float()
        flat = flat if exact else flat.to(torch.bfloat16).float()
        h.update(f"{k}{tuple(v.shape)}".encode())
        h.update(flat.cpu().numpy().tobytes())
    return h.hexdigest()[:24]


# ----------------------------------------------------------------------------------------------------------------
# scanning


@dataclass
class ScanResult:
    files: list[tuple[Path, str]] = field(default_factory=list)  # (path as found, NFC '/' relpath)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (relpath, reason) found while walking
    excluded: list[str] = field(default_factory=list)
    ignored: dict[str, int] = field(default_factory=dict)  # extension -> number of files that are not audio


def scan_folder(folder: str | Path, include=(), exclude=(), skip: tuple[Path, ...] = ()) -> ScanResult:
    """Every audio file under `folder` (by extension), sorted by relpath. Follows symlinks; directory loops are
    reported once and not entered; AppleDouble `._*` files and hidden folders are ignored. include: when given,
    only matching relpaths; exclude: matching relpaths are left out (see `matches`). Two names that differ only in
    Unicode normalisation (NFC/NFD) have one relpath: the NFC-spelled one is kept, the other is a problem."""
    folder = Path(folder)
    res = ScanResult()
    seen_dirs = set()
    skip_real = {os.path.realpath(s) for s in skip}
    found = []  # (relpath, relpath as spelled on disk, path)

    def walk(d: Path, rel: str, raw_rel: str) -> None:
        try:
            st = d.stat()
        except OSError as e:
            res.problems.append((rel or ".", f"unreadable folder ({e.strerror})"))
            return
        key = (st.st_dev, st.st_ino)
        if key in seen_dirs:
            res.problems.append((rel, "symlink loop or second link to a folder already scanned"))
            return
        seen_dirs.add(key)
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as e:
            res.problems.append((rel or ".", f"unreadable folder ({e.strerror})"))
            return
        for e in entries:
            r = f"{rel}/{name_text(e.name)}" if rel else name_text(e.name)
            raw = f"{raw_rel}/{utf8_text(e.name)}" if raw_rel else utf8_text(e.name)
            if e.name.startswith(".") and ignored_entry(e.name, e.is_dir()):  # is_dir() only then: it may raise
                continue
            try:
                is_dir = e.is_dir()  # follows symlinks
            except OSError:
                is_dir = False
            ext = os.path.splitext(e.name)[1].lower()
            if is_dir:
                if os.path.realpath(e.path) in skip_real:
                    continue
                walk(Path(e.path), r, raw)
            elif ext in AUDIO_EXTENSIONS:
                found.append((r, raw, Path(e.path)))
            else:
                res.ignored[ext or "(none)"] = res.ignored.get(ext or "(none)", 0) + 1

    walk(folder, "", "")
    kept: dict[str, str] = {}
    for rel, raw, path in sorted(found, key=lambda x: (x[0], x[1] != x[0], x[1])):  # the NFC spelling first
        if rel in kept:
            res.problems.append((raw, f"differs from {kept[rel]!r} only in Unicode normalisation (accents stored as "
                                      "combining characters, NFD) so both would be one dataset file; rename or "
                                      "remove one of them"))
        elif (include and not matches(rel, include)) or (exclude and matches(rel, exclude)):
            kept[rel] = raw
            res.excluded.append(rel)
        else:
            kept[rel] = raw
            res.files.append((path, rel))
    return res


def _nothing_to_encode(folder: Path, scan: ScanResult, include, exclude) -> str:
    """Why a scan selected no file, and what to check."""
    if scan.excluded:
        return (f"{folder}: none of its {len(scan.excluded)} audio files is selected by include={list(include)} "
                f"exclude={list(exclude)}; patterns match relpaths such as {scan.excluded[0]!r} or file names")
    msg = f"{folder}: no audio files found"
    if scan.ignored:
        kinds = ", ".join(f"{n} {ext}" for ext, n in sorted(scan.ignored.items(), key=lambda kv: -kv[1])[:6])
        msg += f" ({sum(scan.ignored.values())} other files ignored: {kinds})"
    if scan.problems:
        msg += f"; {len(scan.problems)} entries could not be used (first: {scan.problems[0][0]}: {scan.problems[0][1]})"
    return (msg + f". Audio is recognised by extension: {' '.join(sorted(AUDIO_EXTENSIONS))}. If the folder is on "
            "an external drive, check that it is mounted.")


def _same_folder(a: str | Path, b: str | Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _removals(out_dir: Path, folder: Path, present: set[str], excluded: set[str], prune: bool) -> list[str]:
    """Relpaths of earlier encoded files a run over `present` would remove (gone from the source, or now
    excluded). DatasetError when that may not be what the user wants, as encoded latents can be hours of work: the
    dataset came from another folder, none of its files is left (an unmounted drive, a typo in include), or this
    run's include/exclude leave out encoded files that are still in the folder (`excluded`); prune=True allows it."""
    old = _load_manifest(out_dir) or {}
    encoded = [f["relpath"] for f in old.get("files", [])
               if isinstance(f, dict) and f.get("status") == "encoded" and isinstance(f.get("relpath"), str)]
    gone = sorted(r for r in encoded if r not in present)
    if not gone or prune:
        return gone
    source = old.get("source_folder")
    moved = isinstance(source, str) and not _same_folder(source, folder)
    left_out = [r for r in gone if r in excluded]
    if moved or len(gone) == len(encoded):
        why = f"was encoded from {source}" if moved else "has none of its files in this run"
        removed = gone
    elif left_out:
        why, removed = "has files this run's include/exclude leave out, though they are still in the folder", left_out
    else:
        return gone  # deleted from the source: their outputs follow
    shown = ", ".join(removed[:3]) + (f" and {len(removed) - 3} more" if len(removed) > 3 else "")
    raise DatasetError(f"{out_dir}: this dataset of {len(encoded)} encoded files {why}, so encoding {folder} "
                       f"into it would remove {len(removed)} of them ({shown}). Nothing was changed. Encode into "
                       "another folder, or remove them: `sa3-lora encode --prune`, `prune` on SA3 Encode Audio "
                       "Folder, prune=True in Python.")


def plan_encode(folder: str | Path, out_dir: str | Path, include=(), exclude=(),
                prune: bool = False) -> tuple[ScanResult, list[str]]:
    """Everything about an encode that is checked before an encoder is needed: returns (the scan, relpaths of
    earlier outputs this run removes). DatasetError naming the folder when the source is not a folder, `out_dir`
    is a file, no audio file is selected (with the extensions recognised and what was ignored), the run would
    remove earlier outputs by mistake (`_removals`), or `out_dir` cannot be written (it is made here)."""
    folder, out_dir = Path(folder), Path(out_dir)
    if not folder.exists():
        raise DatasetError(f"{folder}: no such folder; give the folder that holds the audio files")
    if not folder.is_dir():
        raise DatasetError(f"{folder} is a file; give the folder that holds the audio (pick files with include)")
    if out_dir.exists() and not out_dir.is_dir():
        raise DatasetError(f"{out_dir} is a file; the dataset is written to a folder: give a new or existing dataset folder")
    scan = scan_folder(folder, include, exclude, skip=(out_dir,))
    if not scan.files:
        raise DatasetError(_nothing_to_encode(folder, scan, include, exclude))
    present = {rel for _, rel in scan.files} | {rel for rel, _ in scan.problems}
    removals = _removals(out_dir, folder, present, set(scan.excluded), prune)
    problem = writable_folder_problem(out_dir)
    if problem:
        raise DatasetError(f"{out_dir}: {problem}; give a dataset folder you can write to")
    return scan, removals


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


def _load_manifest(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


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
    changed = {k: v for k, v in _utf8_safe(fresh).items() if k != "path"} != \
        {k: v for k, v in meta.items() if k != "path"}
    if _utf8_safe(fresh) != meta:
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
    old = _load_manifest(out_dir) or {}
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


# ----------------------------------------------------------------------------------------------------------------
# reading a dataset (ours, official pre_encode_dataset.py output, underfit)


@dataclass
class EncodedDataset:
    """An encoded dataset on disk. entries: manifest records of usable files (status 'encoded'), each with
    'relpath', 'latents', 'metadata' (paths relative to root), 'n_latents', 'seconds'."""

    root: Path
    manifest: dict
    entries: list[dict]

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def latent_dim(self) -> int:
        return int(self.manifest["latent_dim"])

    @property
    def sample_rate(self) -> int:
        return int(self.manifest.get("sample_rate", 44100))

    @property
    def downsampling_ratio(self) -> int | None:
        return self.manifest.get("downsampling_ratio")

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    @property
    def skipped(self) -> list[dict]:
        return [f for f in self.manifest.get("files", []) if f.get("status") == "skipped"]

    @property
    def total_seconds(self) -> float:
        return float(sum(e.get("seconds") or 0 for e in self.entries))

    def identity(self) -> str:
        """A fingerprint of what the dataset holds (each entry's relpath and content hash, or its latent count when
        no hash was recorded, and the encoder's): the same for the dataset moved or copied to another folder, which
        a run stopped before the move may resume on."""
        h = hashlib.sha256(str((self.manifest.get("encoder") or {}).get("fingerprint", "")).encode())
        for e in self.entries:
            h.update(json.dumps([e["relpath"], e.get("hash") or e.get("n_latents")]).encode())
        return h.hexdigest()

    def files_problem(self) -> str | None:
        """What to say when latent or metadata files the manifest lists are not in the folder (a partial copy) or a
        latent file's header does not match its size (a truncated copy), for a training run to refuse it before it
        starts; None when all are there. Reads headers only (memory-mapped), not the latents."""
        missing, damaged = [], []
        for e in self.entries:
            missing += [e[key] for key in ("latents", "metadata") if not (self.root / e[key]).is_file()]
            if e["latents"] not in missing:
                try:
                    np.load(self.root / e["latents"], mmap_mode="r")
                except (OSError, ValueError, EOFError):
                    damaged.append(e["latents"])
        if missing:
            return (f"{len(missing)} of the files {self.root} lists are not there (e.g. {missing[0]}): copy the whole "
                    "dataset folder, or encode the audio into it again (the files already there are kept)")
        if damaged:
            return (f"{len(damaged)} latent file(s) in {self.root} are damaged (e.g. {damaged[0]}: shorter than its "
                    "header says, as a copy cut off part-way leaves it): copy it again, or encode the audio again "
                    "with force")
        return None

    def latents(self, i: int) -> np.ndarray:
        """[latent_dim, T] as stored (float32 or float16). DatasetError naming the file when it is unreadable, of
        another width than the dataset's, or holds NaN/inf (a disk error or a bad encode: re-encode that file)."""
        path = self.root / self.entries[i]["latents"]
        try:
            z = np.load(path)
        except (OSError, ValueError, EOFError) as e:
            raise DatasetError(f"{path}: unreadable latent file ({e}); re-encode it or remove it from the dataset") from None
        z = z[0] if z.ndim == 3 else z
        if z.ndim != 2 or (self.latent_dim is not None and z.shape[0] != self.latent_dim):
            raise DatasetError(f"{path}: latents of shape {list(z.shape)}, expected [{self.latent_dim}, T]; re-encode it")
        checked = self.__dict__.setdefault("_finite_checked", set())  # once per file: training reads it every step
        if i not in checked:
            if not np.isfinite(z).all():
                raise DatasetError(f"{path}: latents hold NaN or inf values; re-encode it or remove it from the dataset")
            checked.add(i)
        return z

    def metadata(self, i: int) -> dict:
        """The file's metadata dict (a shallow copy: callers may set keys). Read from disk once; training asks every
        step."""
        cache = self.__dict__.setdefault("_metadata_cache", {})
        if i not in cache:
            cache[i] = json.loads((self.root / self.entries[i]["metadata"]).read_text(encoding="utf-8"))
        return dict(cache[i])

    def silence(self) -> np.ndarray | None:
        """[latent_dim, N] encoded silence, or None when the dataset has none."""
        if "_silence" not in self.__dict__:  # read once: every padded training item needs it
            p = self.root / self.manifest.get("silence", SILENCE)
            z = np.load(p) if p.is_file() else None
            self.__dict__["_silence"] = None if z is None else z.reshape(z.shape[-2], z.shape[-1])
        return self.__dict__["_silence"]

    def item(self, i: int, latent_crop_length: int | None = None, random_crop: bool = False,
             rng: random.Random | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
        """One training example with the official PreEncodedDataset crop/pad rules.

        Returns (latents [latent_dim, L] float32, padding_mask [L] int64 (1 = real frame), metadata with
        `latent_crop_start`). Longer than L: cropped at 0, or with random_crop at a start drawn from
        rng.randint(0, last_valid - L) (last_valid = index of the last 1 in the mask) when there is room. Shorter:
        padded with the dataset's encoded silence (tiled; zeros when it has none), mask 0 there."""
        z = self.latents(i).astype(np.float32)
        meta = self.metadata(i)
        mask = [int(bool(m)) for m in meta.get("padding_mask") or [1] * z.shape[1]]
        start = 0
        if latent_crop_length is not None:
            n, length = z.shape[1], int(latent_crop_length)
            if n > length:
                last = len(mask) - 1 - mask[::-1].index(1) if 1 in mask else 0
                if random_crop and last > length:
                    start = (rng or random).randint(0, last - length)
                z, mask = z[:, start:start + length], mask[start:start + length]
            elif n < length:
                pad = length - n
                silence = self.silence()
                if silence is not None and silence.shape[0] == z.shape[0]:
                    reps = -(-pad // silence.shape[1])
                    fill = np.tile(silence.astype(np.float32), (1, reps))[:, :pad]
                else:
                    fill = np.zeros((z.shape[0], pad), np.float32)
                z, mask = np.concatenate([z, fill], axis=1), mask[:n] + [0] * pad
            meta["latent_crop_length"] = length
        meta["latent_crop_start"] = start
        return z, np.asarray(mask, dtype=np.int64), meta

    def prompt_items(self) -> list[tuple[str, dict]]:
        """[(relpath, metadata)] for prompt composition and previews."""
        return [(e["relpath"], self.metadata(i)) for i, e in enumerate(self.entries)]


def _audio_hint(root: Path) -> str:
    """When a folder given as a dataset holds audio files (the folder to encode, not the encoded one): how to
    encode it. '' otherwise."""
    try:
        audio = next((p for p in root.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file()), None)
    except OSError:
        return ""
    if audio is None:
        return ""
    return (f". It holds audio ({audio.name}): encode it into a dataset first (SA3 Encode Audio Folder, or "
            f"`sa3-lora encode {shlex.quote(str(root))} --pack PACK --out DATASET`) and train on that dataset")


def _scan_pre_encoded(root: Path) -> tuple[dict, list[dict]]:
    """Find .npy + .json pairs under root (official or underfit layout) and describe them as manifest records."""
    details: dict = {}
    for cand in (root / "details.json", root.parent / "details.json"):
        if cand.is_file():
            try:
                details = json.loads(cand.read_text(encoding="utf-8"))
                break
            except ValueError:
                pass
    files, latent_dim = [], None
    for npy in sorted(root.rglob("*.npy")):
        rel_npy = nfc(npy.relative_to(root).as_posix())
        if npy.name == SILENCE or any(part.startswith(".") for part in npy.relative_to(root).parts):
            continue
        rel = rel_npy[:-4]
        rec = {"relpath": rel, "latents": rel_npy, "metadata": f"{rel}.json"}
        js = npy.with_suffix(".json")
        try:
            meta = json.loads(js.read_text(encoding="utf-8"))
            z = np.load(npy, mmap_mode="r")
            shape = z.shape[1:] if z.ndim == 3 else z.shape
            if len(shape) != 2:
                raise ValueError(f"latents have shape {z.shape}, expected [latent_dim, T]")
            if latent_dim is None:
                latent_dim = int(shape[0])
            elif shape[0] != latent_dim:
                raise ValueError(f"latent_dim {shape[0]} differs from the dataset's {latent_dim}")
        except (OSError, ValueError) as e:
            files.append({**rec, "status": "skipped", "reason": "unreadable pre-encoded pair", "detail": str(e)})
            continue
        mask = meta.get("padding_mask") or [1] * int(shape[1])
        n_valid = int(sum(1 for m in mask if m))
        files.append({**rec, "status": "encoded", "n_latents": n_valid, "hash": file_hash(npy),
                      "seconds": meta.get("seconds_decoded", meta.get("seconds_total")),
                      "source_relpath": meta.get("src_relpath") or meta.get("relpath")})
    if latent_dim is None:
        raise DatasetError(f"{root}: no .npy + .json latent pairs found (nor a {MANIFEST})" + _audio_hint(root))
    ratio = details.get("downsampling_ratio") or (4096 if latent_dim == 256 else None)  # every SAME model is 4096x
    sr = int(details.get("sample_rate", 44100))
    manifest = {
        "format": FORMAT, "version": FORMAT_VERSION, "complete": True, "imported_from": str(root.absolute()),
        "origin": "underfit" if details else "official-pre-encode",
        "encoder": {"name": str(details.get("model", "unknown")), "latent_dim": latent_dim,
                    "downsampling_ratio": ratio, "sample_rate": sr, "fingerprint": "imported"},
        "model": {k: details[k] for k in ("model", "scale", "half") if k in details},
        "latent_dim": latent_dim, "sample_rate": sr, "downsampling_ratio": ratio,
        "latent_rate": sr / ratio if ratio else None, "silence": SILENCE, "files": files,
    }
    enc = [f for f in files if f["status"] == "encoded"]
    secs = sum(float(f.get("seconds") or 0) for f in enc)
    manifest["totals"] = {"files": len(files), "encoded": len(enc), "skipped": len(files) - len(enc),
                          "pending": 0, "excluded": 0, "seconds": round(secs, 3), "minutes": round(secs / 60, 3),
                          "n_latents": sum(f["n_latents"] for f in enc)}
    return manifest, files


def _underfit_latent_root(src: Path) -> Path:
    """underfit keeps latents in <dataset>/latents/<model>/; accept the dataset folder or the latents folder."""
    lat = src / "latents"
    if lat.is_dir() and not any(src.glob("*.npy")):
        models = [d for d in sorted(lat.iterdir()) if d.is_dir()]
        if len(models) == 1:
            return models[0]
        if models:
            raise DatasetError(f"{src}: latents for several models ({', '.join(d.name for d in models)}); "
                               f"import one of the folders under {lat}")
    return src


def import_dataset(src: str | Path, out_dir: str | Path | None = None) -> EncodedDataset:
    """Adopt a dataset made by the official `pre_encode_dataset.py` or by underfit, without re-encoding.

    Writes a dataset.json describing the existing .npy/.json pairs into `src` (or, with out_dir, hard-links or
    copies the pairs and silence.npy into out_dir first and writes the manifest there)."""
    src = _underfit_latent_root(Path(src))
    manifest, _ = _scan_pre_encoded(src)
    root = src
    if out_dir is not None:
        root = Path(out_dir)
        for f in manifest["files"] + [{"latents": SILENCE}]:
            for key in ("latents", "metadata"):
                if key in f and (src / f[key]).is_file():
                    dst = root / f[key]
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    dst.unlink(missing_ok=True)
                    try:
                        os.link(src / f[key], dst)
                    except OSError:
                        shutil.copy2(src / f[key], dst)
    write_json(root / MANIFEST, manifest)
    return load_dataset(root)


def load_dataset(path: str | Path) -> EncodedDataset:
    """Open an encoded dataset folder: ours (dataset.json), or an official/underfit one (described on the fly,
    nothing written). Raises DatasetError when there is nothing usable."""
    root = Path(path)
    manifest = _load_manifest(root)
    if manifest is None or manifest.get("format") != FORMAT:
        if not root.exists():
            raise DatasetError(f"{root}: no such dataset folder")
        if not root.is_dir():
            raise DatasetError(f"{root} is a file; give the dataset folder (the one holding {MANIFEST})")
        root = _underfit_latent_root(root)
        manifest, _ = _scan_pre_encoded(root)
    entries = [f for f in manifest.get("files", []) if f.get("status") == "encoded"]
    return EncodedDataset(root, manifest, entries)
