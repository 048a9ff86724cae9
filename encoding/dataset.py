"""Pre-encoded datasets: the folder layout, and reading it (ours, the official pre-encode's, underfit's) for training.

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

Encoding a folder into this layout is `encode.py`'s job; this module holds the layout's names and
helpers and reads datasets.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..sa3.atomic import atomic_write
from .audio_io import AUDIO_EXTENSIONS
from .captions import nfc, utf8_text

MANIFEST = "dataset.json"
SILENCE = "silence.npy"
ENCODE_LOCK = ".encode.lock"  # held by the one process writing the dataset (`encode_folder`)
FORMAT = "sa3-lora-dataset"
FORMAT_VERSION = 1
# Longest file or folder name we write, in UTF-8 bytes, before ".npy"/".json": with that suffix and the atomic
# writer's temp-name decoration ("." + name + ".XXXXXXXX.tmp", 14 more) a name stays under the 255-byte NAME_MAX.
MAX_NAME_BYTES = 200


class DatasetError(ValueError):
    """A dataset problem the user can fix; the message names the file or folder and what to do."""


# ----------------------------------------------------------------------------------------------------------------
# small helpers


def utf8_safe(data):
    """data with every string (keys too) made writable as UTF-8 by `utf8_text`."""
    if isinstance(data, str):
        return utf8_text(data)
    if isinstance(data, dict):
        return {utf8_safe(k): utf8_safe(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [utf8_safe(v) for v in data]
    return data


def write_json(path: str | Path, data) -> Path:
    """Write data atomically as strict JSON in UTF-8: ValueError on NaN/Infinity (which only Python reads back);
    strings UTF-8 cannot hold (undecodable file-name bytes) are spelled `\\xNN`."""
    return atomic_write(path, json.dumps(utf8_safe(data), indent=1, ensure_ascii=False, allow_nan=False))


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


def load_manifest(out_dir: Path) -> dict | None:
    """The dataset folder's manifest (dataset.json), or None when it is missing or unreadable."""
    try:
        return json.loads((out_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


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
    manifest = load_manifest(root)
    if manifest is None or manifest.get("format") != FORMAT:
        if not root.exists():
            raise DatasetError(f"{root}: no such dataset folder")
        if not root.is_dir():
            raise DatasetError(f"{root} is a file; give the dataset folder (the one holding {MANIFEST})")
        root = _underfit_latent_root(root)
        manifest, _ = _scan_pre_encoded(root)
    entries = [f for f in manifest.get("files", []) if f.get("status") == "encoded"]
    return EncodedDataset(root, manifest, entries)
