"""Captions and metadata for one audio file: the one lookup order used by the encoder, trainer, preview and nodes.

Sources, highest priority first; a field from a higher source overrides the same field from a lower one, and
fields from all sources are kept (so a JSON sidecar's `mood` and the file's embedded `bpm` both reach the prompt
composer):

1. JSON sidecar, first found of: `song.json` next to `song.wav`; `json/song.json` in a `json/` folder beside the
   audio; `../json/song.json` (a `json/` folder beside the audio's folder). Invalid JSON, or JSON that is not an
   object, is a warning and the next location/source is used.
2. Text sidecar, first found of `song.txt`, `song.wav.txt`, `txt/song.txt`, `../txt/song.txt`: the whole stripped
   text becomes the `prompt` field (the official SA3 convention, so a folder prepared for `pre_encode_dataset.py`
   works as-is).
3. A row of a folder-level table, `metadata.csv` / `.tsv` / `.jsonl` in the audio's folder or one above it up to
   the dataset root, nearest first (`metadata_tables.py`: the Hugging Face audiofolder convention, `file_name`
   column; a `caption` or `text` column is the prompt, and likewise in a JSON sidecar without `prompt`).
4. Embedded tags read with mutagen (ID3 in MP3/WAV/AIFF, Vorbis comments in FLAC/OGG/Opus, MP4 atoms), and a WAV's
   RIFF INFO or an AIFF's text chunks through libsndfile: title, artist, album, genre, label, date, composer, bpm,
   key, comment and any other text tag, under lower-case names.
5. Path fields: `file_stem`, `folder` (the audio's folder relative to `root`, '/'-separated, '' at the top) and
   `top_folder`.

A sidecar's name may differ from the audio's by case or Unicode form (`SONG.TXT`, a name from macOS in NFD).
Values are kept as found (strings, numbers, lists); multi-valued tags become ", "-joined strings.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import time
import unicodedata
from pathlib import Path

from .audio_io import AUDIO_EXTENSIONS
from .metadata_tables import caption_becomes_prompt, decoded_text, find_row, root_relative, tables_in_use, tables_of

log = logging.getLogger(__name__)

# Every field encode_folder writes into a file's JSON besides its metadata (encode.py refuses to write any other,
# so a new field is reserved the moment it exists and never leaks into a prompt).
ENCODER_FIELDS = frozenset({
    "seconds_total", "seconds_start", "padding_mask", "path", "relpath", "sample_rate", "timestamps",
    "seconds_decoded", "source_sample_rate", "source_channels", "decoder", "content_hash", "encoder_fingerprint",
    "latent_dtype", "metadata_sources", "audio_warnings", "decode_version",
})
# Fields sidecars cannot override and prompts never use: ours, and what official/underfit encoders write.
RESERVED_FIELDS = ENCODER_FIELDS | frozenset({
    "load_time", "latent_relpath", "n_latents", "latent_filename", "latent_crop_start", "latent_crop_length",
    "src_relpath", "audio_samples", "latent_shape",
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


def utf8_text(text: str) -> str:
    """text that UTF-8 (and so our JSON files) can hold: a name byte that was not valid UTF-8, which os.fsdecode
    turns into a lone surrogate U+DC80..U+DCFF, is spelled `\\xNN` (lossless and readable); any other lone
    surrogate becomes U+FFFD."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return "".join(f"\\x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF
                       else "\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in text)


ESCAPED_BYTE = re.compile(r"\\x[0-9a-f]{2}")  # how `utf8_text` spells a name byte that was not UTF-8


def readable_name(text: str) -> str:
    """A name spelled by `utf8_text` as people would read it, for a prompt: each run of `\\xNN` bytes decoded by the
    project's rule for legacy text (`metadata_tables.decoded_text`: Windows-1252, else Latin-1), control characters
    left out."""
    def decoded(match: re.Match) -> str:
        raw = bytes(int(escaped[2:], 16) for escaped in ESCAPED_BYTE.findall(match.group(0)))
        return "".join(c for c in decoded_text(raw, []) if not 0x80 <= ord(c) <= 0x9F)

    return re.sub(rf"(?:{ESCAPED_BYTE.pattern})+", decoded, text)


def name_text(name: str) -> str:
    """A file or folder name as it appears in relpaths, manifests and prompts: NFC, then `utf8_text`."""
    return utf8_text(nfc(name))


def _is_file(path: Path, warnings: list[str], root: Path | None) -> bool:
    """Path.is_file that reports, instead of raising, a location it may not look into (a folder without
    execute permission raises PermissionError)."""
    try:
        return path.is_file()
    except OSError as e:
        warnings.append(f"{_shown(path, root)}: cannot look for a sidecar here ({e.strerror or e}); skipped")
        return False


def _name_key(name: str) -> str:
    """A file name as people mean it: Unicode NFC (macOS writes NFD) and without case (Windows and macOS ignore it)."""
    return unicodedata.normalize("NFC", name).casefold()


def _listed_names(folder: str) -> tuple[dict[str, str], frozenset[str]]:
    """({_name_key(name): name} of a folder's entries (the first name, in sorted order, on a tie), the exact stems of
    its audio files)."""
    try:
        names = sorted(os.listdir(folder), reverse=True)
    except OSError:
        return {}, frozenset()
    audio_stems = frozenset(Path(n).stem for n in names if Path(n).suffix.lower() in AUDIO_EXTENSIONS)
    return {_name_key(name): name for name in names}, audio_stems


@functools.lru_cache(maxsize=256)
def _cached_names(folder: str, mtime_ns: int) -> tuple[dict[str, str], frozenset[str]]:
    """`_listed_names` of a folder as it was at mtime_ns (the key that makes an edited folder be read again)."""
    return _listed_names(folder)


RECENT_NS = 2_000_000_000  # a folder changed this recently may change again within its mtime's granularity


def _names_in(folder: str, mtime_ns: int) -> tuple[dict[str, str], frozenset[str]]:
    """`_listed_names`, cached by the folder's mtime (an edited folder is read again), except for a folder edited in
    the last 2 s: filesystems stamp mtimes coarsely, so two edits that close can share one."""
    if time.time_ns() - mtime_ns < RECENT_NS:
        return _listed_names(folder)
    return _cached_names(folder, mtime_ns)


def _sidecar(cand: Path, warnings: list[str], root: Path | None) -> Path | None:
    """cand when it is a file, else the file beside it whose name differs only by case or Unicode form (`SONG.TXT`
    for `SONG.WAV`; a caption file named on Windows for audio named on macOS), else None."""
    if _is_file(cand, warnings, root):
        return cand
    try:
        mtime_ns = cand.parent.stat().st_mtime_ns
    except OSError:  # no such folder (json/, ../txt/), or one it may not look into (reported by _is_file)
        return None
    names, audio_stems = _names_in(str(cand.parent), mtime_ns)
    name = names.get(_name_key(cand.name))
    if name is None or name == cand.name or not (cand.parent / name).is_file():
        return None
    if Path(name).stem in audio_stems:  # `kick.txt` is kick.wav's when kick.wav and KICK.wav are both there
        return None
    return cand.parent / name


def _sidecar_candidates(audio: Path, ext: str) -> tuple[Path, ...]:
    """Where a sidecar of `audio` may be, in priority order: `song.ext` beside it (and `song.wav.txt`: never
    `song.wav.json`, the name of a dataset's own per-file JSON), `ext/song.ext` in a folder named after the
    extension beside it, and one folder up."""
    stem = audio.stem
    full_name = (audio.with_name(audio.name + ext),) if ext == ".txt" else ()
    return (audio.with_suffix(ext), *full_name, audio.parent / ext[1:] / f"{stem}{ext}",
            audio.parent.parent / ext[1:] / f"{stem}{ext}")


def _shown(path: Path, root: Path | None) -> str:
    """A sidecar's path for a warning: relative to the dataset root when inside it, else absolute."""
    try:
        return name_text(path.relative_to(root).as_posix()) if root is not None else name_text(str(path))
    except ValueError:
        return name_text(str(path.absolute()))


def _drop_non_finite(data: dict, where: str, warnings: list[str]) -> dict:
    """JSON sidecar fields without NaN/Infinity (Python's json reads them, strict JSON has no such values: the
    per-file JSON we write must stay readable by every JSON parser)."""
    def finite(v) -> bool:
        if isinstance(v, float):
            return math.isfinite(v)
        if isinstance(v, (list, tuple)):
            return all(map(finite, v))
        if isinstance(v, dict):
            return all(map(finite, v.values()))
        return True

    bad = sorted(k for k, v in data.items() if not finite(v))
    if bad:
        warnings.append(f"{where}: NaN/Infinity is not valid JSON; field(s) {', '.join(bad)} ignored")
    return {k: v for k, v in data.items() if k not in bad}


def _read_json_sidecar(audio: Path, root: Path | None, warnings: list[str]) -> tuple[dict, str | None]:
    for cand in _sidecar_candidates(audio, ".json"):
        cand = _sidecar(cand, warnings, root)
        if cand is None:
            continue
        shown = _shown(cand, root)
        try:
            data = json.loads(cand.read_text(encoding="utf-8-sig"))
        except (ValueError, OSError) as e:
            warnings.append(f"{shown}: invalid JSON sidecar ignored ({str(e)[:120]})")
            continue
        if not isinstance(data, dict):
            warnings.append(f"{shown}: JSON sidecar is a {type(data).__name__}, not an object; ignored")
            continue
        data = _drop_non_finite(data, shown, warnings)
        return caption_becomes_prompt({str(k): v for k, v in data.items() if v is not None and v != ""}), \
            utf8_text(str(cand))
    return {}, None


def _read_txt_sidecar(audio: Path, root: Path | None, warnings: list[str]) -> tuple[dict, str | None]:
    for cand in _sidecar_candidates(audio, ".txt"):
        cand = _sidecar(cand, warnings, root)
        if cand is None:
            continue
        try:
            raw = cand.read_bytes()
        except OSError as e:
            warnings.append(f"{_shown(cand, root)}: unreadable text sidecar ignored ({str(e)[:120]})")
            continue
        problems: list[str] = []
        text = decoded_text(raw, problems).strip()  # a caption typed in Notepad may be Windows-1252
        warnings.extend(f"{_shown(cand, root)}: {problem}" for problem in problems)
        return ({"prompt": text} if text else {}), utf8_text(str(cand))
    return {}, None


def _read_table_row(audio: Path, root: Path | None, warnings: list[str]) -> tuple[dict, str | None]:
    """The file's row in the metadata tables that apply to it (`metadata_tables.find_row`) and "<table>:<line>".
    Problems of the tables themselves (unreadable, no file-name column) are reported once per table
    (`table_warnings`), not on each file under them."""
    found = find_row(tables_of(audio, root, _ALIASES), root_relative(audio, root))
    if found is None:
        return {}, None
    table, row, exact = found
    if not exact:
        # the same text for every such file, so the encode report shows it once (the row is in the sources)
        warnings.append(f"{_shown(table.path, root)}: rows matched loosely (by case, audio extension, bare name or "
                        "path from the dataset root)")
    return dict(row.fields), f"{utf8_text(str(table.path))}:{row.line}"


def table_warnings(root: str | Path, audio_paths: list[Path]) -> list[tuple[str, str]]:
    """(table relpath, warning) for each metadata table that applies to the audio files (paths under root, as
    scanned), once per table: its own problems (unreadable, no file-name column, ...), and rows naming none of the
    files (a path written from another folder, or a file renamed since)."""
    root = Path(root)
    out = []
    for table, missing in tables_in_use(root, audio_paths, _ALIASES):
        shown = _shown(table.path, root)
        out += [(shown, problem) for problem in table.problems]
        if missing:
            out.append((shown, f"{len(missing)} of {len(table.rows)} rows name no audio file here (e.g. line "
                               f"{missing[0].line}: {missing[0].key!r}); paths are relative to the table's folder"))
    return out


def _text(value) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(s for s in (_text(v) for v in value) if s)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace").strip()
    return str(value).strip()


# Containers whose own text chunks libsndfile reads (RIFF INFO in WAV: INAM, IART, IGNR, ICMT...; AIFF's NAME, AUTH):
# what DAWs and sample editors write, where mutagen reads only an ID3 chunk
SNDFILE_TEXT_EXTENSIONS = frozenset({".wav", ".wave", ".bwf", ".w64", ".rf64", ".aif", ".aiff", ".aifc", ".caf"})
SNDFILE_SKIPPED = frozenset({"software"})  # the writing program's name, not a description of the sound


def _sndfile_text_chunks(path: Path) -> dict[str, str]:
    """{field: text} of the container's own text chunks (`SNDFILE_TEXT_EXTENSIONS`), {} on any error. RIFF INFO has
    no declared encoding and Windows tools write their code page: each chunk's bytes go through `decoded_text`, the
    rule sidecars and tables use, where soundfile's own reader would turn every non-UTF-8 accent into U+FFFD."""
    try:
        import soundfile as sf

        with sf.SoundFile(str(path)) as f:
            raw = _sndfile_raw_strings(sf, f)
            if raw is None:  # a soundfile without the C string access: its UTF-8 reading
                return {k: v for k, v in f.copy_metadata().items() if k not in SNDFILE_SKIPPED}
            return {k: decoded_text(v, []) for k, v in raw.items() if k not in SNDFILE_SKIPPED}
    except Exception:
        return {}


def _sndfile_raw_strings(sf, f) -> dict[str, bytes] | None:
    """{field: bytes} of libsndfile's text fields of an open SoundFile, or None when this soundfile version does not
    expose libsndfile's string call (it is not public API)."""
    lib, ffi, kinds = getattr(sf, "_snd", None), getattr(sf, "_ffi", None), getattr(sf, "_str_types", None)
    handle = getattr(f, "_file", None)
    if lib is None or ffi is None or not isinstance(kinds, dict) or handle is None:
        return None
    out = {}
    for name, kind in kinds.items():
        data = lib.sf_get_string(handle, kind)
        if data:
            out[name] = ffi.string(data)
    return out


def read_tags(path: str | Path) -> dict:
    """Embedded text tags, normalised to lower-case field names: via mutagen, plus a WAV's RIFF INFO or an AIFF's
    text chunks (an ID3 tag wins over them). {} when there are none or on error."""
    out: dict[str, str] = {}

    def put(key: str, value) -> None:
        key = _ALIASES.get(key.lower().strip(), key.lower().strip())
        text = _text(value)
        if key and text and key not in out:
            out[key] = text

    try:
        import mutagen

        f = mutagen.File(str(path))
    except Exception:
        f = None
    if f is not None and getattr(f, "tags", None):
        _put_mutagen_tags(f.tags, put)
    if Path(path).suffix.lower() in SNDFILE_TEXT_EXTENSIONS:
        for key, value in _sndfile_text_chunks(Path(path)).items():
            put(key, value)
    return out


def _put_mutagen_tags(tags, put) -> None:
    """Each text tag of a mutagen tag block through put(key, value)."""
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


def path_fields(audio_path: str | Path, root: str | Path | None) -> dict:
    """file_stem, folder (relative to root, '/'-separated) and top_folder of an audio path."""
    audio = Path(audio_path)
    try:
        rel_parent = audio.parent.relative_to(root) if root is not None else Path()
    except ValueError:
        rel_parent = Path()
    parts = [name_text(p) for p in rel_parent.parts]
    return {"file_stem": name_text(audio.stem), "folder": "/".join(parts), "top_folder": parts[0] if parts else ""}


def lookup_metadata(audio_path: str | Path, root: str | Path | None = None, *, warnings: list[str] | None = None,
                    sources: dict[str, str] | None = None, origins: dict[str, str] | None = None) -> dict:
    """All metadata for one audio file, in the documented order (module docstring).

    audio_path: the audio file; root: the dataset folder (for path fields). Appends human-readable problems
    (invalid or unreachable sidecars, named by their path relative to root) to `warnings` and, per source used,
    {source: where} to `sources`, and {field: the source it came from} to `origins` (e.g. origins["prompt"] is
    "json", "txt" or "table"). Never raises on bad sidecars, tags or folders it may not look into."""
    audio = Path(audio_path)
    root = Path(root) if root is not None else None
    warns: list[str] = [] if warnings is None else warnings
    layers: list[tuple[str, dict, str | None]] = []
    layers.append(("path", path_fields(audio, root), None))
    tags = read_tags(audio)
    layers.append(("tags", tags, utf8_text(str(audio)) if tags else None))
    layers.append(("table", *_read_table_row(audio, root, warns)))
    layers.append(("txt", *_read_txt_sidecar(audio, root, warns)))
    layers.append(("json", *_read_json_sidecar(audio, root, warns)))
    merged: dict = {}
    for name, fields, where in layers:  # lowest priority first: later layers override
        if fields:
            kept = {k: v for k, v in fields.items() if k not in RESERVED_FIELDS}
            merged.update(kept)
            if origins is not None:
                origins.update(dict.fromkeys(kept, name))
            if sources is not None:
                sources[name] = where or ""
    for w in warns:
        log.debug("%s: %s", name_text(audio.name), w)  # the dataset report lists them with the file
    return merged
