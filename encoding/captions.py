"""Captions and metadata for one audio file: the one lookup order used by the encoder, trainer, preview and nodes.

Sources, highest priority first; a field from a higher source overrides the same field from a lower one, and
fields from all sources are kept (so a JSON sidecar's `mood` and the file's embedded `bpm` both reach the prompt
composer):

1. JSON sidecar, first found of: `song.json` next to `song.wav`; `json/song.json` in a `json/` folder beside the
   audio; `../json/song.json` (a `json/` folder beside the audio's folder). Invalid JSON, or JSON that is not an
   object, is a warning and the next location/source is used.
2. Text sidecar, first found of `song.txt`, `txt/song.txt`, `../txt/song.txt`: the whole stripped text becomes the
   `prompt` field (the official SA3 convention, so a folder prepared for `pre_encode_dataset.py` works as-is).
3. Embedded tags read with mutagen (ID3 in MP3/WAV/AIFF, Vorbis comments in FLAC/OGG/Opus, MP4 atoms): title,
   artist, album, genre, label, date, composer, bpm, key, comment and any other text tag, under lower-case names.
4. Path fields: `file_stem`, `folder` (the audio's folder relative to `root`, '/'-separated, '' at the top) and
   `top_folder`.

Values are kept as found (strings, numbers, lists); multi-valued tags become ", "-joined strings.
"""

from __future__ import annotations

import json
import logging
import unicodedata
from pathlib import Path

log = logging.getLogger(__name__)

# Fields the encoder writes itself; sidecars cannot override them and prompts never use them.
RESERVED_FIELDS = frozenset({
    "seconds_total", "seconds_start", "padding_mask", "path", "relpath", "sample_rate", "timestamps", "load_time",
    "latent_relpath", "seconds_decoded", "source_sample_rate", "source_channels", "decoder", "content_hash",
    "metadata_sources", "n_latents", "latent_filename", "latent_crop_start", "latent_crop_length", "src_relpath",
    "audio_samples", "latent_shape",
})
PATH_FIELDS = ("file_stem", "folder", "top_folder")

_ID3_FRAMES = {
    "TIT2": "title", "TPE1": "artist", "TPE2": "album_artist", "TALB": "album", "TCON": "genre", "TPUB": "label",
    "TDRC": "date", "TYER": "date", "TCOM": "composer", "TBPM": "bpm", "TKEY": "key", "TEXT": "lyricist",
    "TIT1": "grouping", "TIT3": "subtitle", "TMOO": "mood", "TLAN": "language", "TRCK": "tracknumber",
}
_MP4_ATOMS = {
    "\xa9nam": "title", "\xa9ART": "artist", "aART": "album_artist", "\xa9alb": "album", "\xa9gen": "genre",
    "\xa9day": "date", "\xa9wrt": "composer", "tmpo": "bpm", "\xa9cmt": "comment", "\xa9grp": "grouping",
    "\xa9lyr": "lyrics", "trkn": "tracknumber",
}
# Vorbis-comment / freeform spellings of the same fields.
_ALIASES = {
    "organization": "label", "publisher": "label", "initialkey": "key", "tempo": "bpm", "year": "date",
    "albumartist": "album_artist", "description": "comment", "comments": "comment",
}


def nfc(text: str) -> str:
    """Unicode NFC: the one spelling of a name used in relpaths and manifests (macOS writes NFD)."""
    return unicodedata.normalize("NFC", text)


def _read_json_sidecar(audio: Path, warnings: list[str]) -> tuple[dict, str | None]:
    stem = audio.stem
    for cand in (audio.with_suffix(".json"), audio.parent / "json" / f"{stem}.json",
                 audio.parent.parent / "json" / f"{stem}.json"):
        if not cand.is_file():
            continue
        try:
            data = json.loads(cand.read_text(encoding="utf-8-sig"))
        except (ValueError, OSError) as e:
            warnings.append(f"{cand.name}: invalid JSON sidecar ignored ({str(e)[:120]})")
            continue
        if not isinstance(data, dict):
            warnings.append(f"{cand.name}: JSON sidecar is a {type(data).__name__}, not an object; ignored")
            continue
        return {str(k): v for k, v in data.items() if v is not None and v != ""}, str(cand)
    return {}, None


def _read_txt_sidecar(audio: Path, warnings: list[str]) -> tuple[dict, str | None]:
    stem = audio.stem
    for cand in (audio.with_suffix(".txt"), audio.parent / "txt" / f"{stem}.txt",
                 audio.parent.parent / "txt" / f"{stem}.txt"):
        if not cand.is_file():
            continue
        try:
            text = cand.read_text(encoding="utf-8-sig").strip()
        except (UnicodeDecodeError, OSError) as e:
            warnings.append(f"{cand.name}: unreadable text sidecar ignored ({str(e)[:120]})")
            continue
        return ({"prompt": text} if text else {}), str(cand)
    return {}, None


def _text(value) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(s for s in (_text(v) for v in value) if s)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace").strip()
    return str(value).strip()


def read_tags(path: str | Path) -> dict:
    """Embedded text tags via mutagen, normalised to lower-case field names. {} when there are none or on error."""
    try:
        import mutagen

        f = mutagen.File(str(path))
    except Exception:
        return {}
    if f is None or not getattr(f, "tags", None):
        return {}
    tags = f.tags
    out: dict[str, str] = {}

    def put(key: str, value) -> None:
        key = _ALIASES.get(key.lower().strip(), key.lower().strip())
        text = _text(value)
        if key and text and key not in out:
            out[key] = text

    if hasattr(tags, "getall"):  # ID3, also inside WAV and AIFF
        for frame in tags.values():
            fid = frame.FrameID
            if fid in _ID3_FRAMES:
                put(_ID3_FRAMES[fid], [str(t) for t in frame.text])
            elif fid == "TXXX":
                put(frame.desc, [str(t) for t in frame.text])
            elif fid == "COMM" and not frame.desc:
                put("comment", [str(t) for t in frame.text])
    elif type(tags).__name__ == "MP4Tags":
        for atom, value in tags.items():
            if atom in _MP4_ATOMS:
                if atom == "trkn":
                    value = [str(v[0]) for v in value]
                put(_MP4_ATOMS[atom], value)
            elif atom.startswith("----:"):
                put(atom.rsplit(":", 1)[-1], [bytes(v) for v in value])
    else:  # Vorbis comments (FLAC, OGG, Opus) and other dict-like tag blocks
        try:
            items = list(tags.items()) if hasattr(tags, "items") else list(tags)
        except Exception:
            items = []
        for key, value in items:
            if isinstance(key, str) and key.lower() not in ("metadata_block_picture", "coverart", "encoder"):
                put(key, value)
    return out


def path_fields(audio_path: str | Path, root: str | Path | None) -> dict:
    """file_stem, folder (relative to root, '/'-separated) and top_folder of an audio path."""
    audio = Path(audio_path)
    try:
        rel_parent = audio.parent.relative_to(root) if root is not None else Path()
    except ValueError:
        rel_parent = Path()
    parts = [nfc(p) for p in rel_parent.parts]
    return {"file_stem": nfc(audio.stem), "folder": "/".join(parts), "top_folder": parts[0] if parts else ""}


def lookup_metadata(audio_path: str | Path, root: str | Path | None = None, *, warnings: list[str] | None = None,
                    sources: dict[str, str] | None = None) -> dict:
    """All metadata for one audio file, in the documented order (module docstring).

    audio_path: the audio file; root: the dataset folder (for path fields). Appends human-readable problems
    (invalid sidecars) to `warnings` and, per source used, {source: where} to `sources`. Never raises on bad
    sidecars or tags."""
    audio = Path(audio_path)
    warns: list[str] = [] if warnings is None else warnings
    layers: list[tuple[str, dict, str | None]] = []
    layers.append(("path", path_fields(audio, root), None))
    tags = read_tags(audio)
    layers.append(("tags", tags, str(audio) if tags else None))
    layers.append(("txt", *_read_txt_sidecar(audio, warns)))
    layers.append(("json", *_read_json_sidecar(audio, warns)))
    merged: dict = {}
    for name, fields, where in layers:  # lowest priority first: later layers override
        if fields:
            merged.update({k: v for k, v in fields.items() if k not in RESERVED_FIELDS})
            if sources is not None:
                sources[name] = where or ""
    for w in warns:
        log.warning("%s: %s", audio.name, w)
    return merged
