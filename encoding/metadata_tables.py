"""Folder-level metadata tables: `metadata.csv`, `metadata.tsv` or `metadata.jsonl` listing many files at once.

This is the Hugging Face `audiofolder` convention (a `file_name` column, paths relative to the table's folder), and
what sample packs and spreadsheet exports ship. A table applies to the files in its folder and below; the nearest
table that names a file wins. One row per file: its other columns become metadata fields under lower-case names
(`Genre` -> `genre`, `Tempo` -> `bpm` through the tag aliases of `captions.py`), empty cells skipped. A `caption`
or `text` column (the audiofolder spelling) is also the file's `prompt` when the table has no `prompt` column.

Rows are matched by the file's path relative to the table (`/` or `\\`, NFC), or by its bare file name when the
table has exactly one row with that name and no folder part (a flat list for a tree of folders). Each table is
parsed once per change of its size or modification time, whatever the number of files under it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import threading
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

TABLE_NAMES = ("metadata.csv", "metadata.tsv", "metadata.jsonl")
# Column names that hold the file a row describes, the audiofolder spelling first.
KEY_COLUMNS = ("file_name", "filename", "file", "file_path", "filepath", "path", "relpath", "audio", "audio_file",
               "audio_path", "audio_filename")
CAPTION_COLUMNS = ("caption", "text")  # become `prompt` when there is no `prompt` column
MAX_TABLE_BYTES = 256 << 20  # a bigger "metadata.csv" is not a caption table: read nothing, warn


@dataclass
class MetadataTable:
    """One parsed table: rows by their file's NFC relative path (and by bare name), plus problems to report."""

    path: Path
    by_relpath: dict[str, tuple[int, dict]] = field(default_factory=dict)  # relpath -> (line, fields)
    by_name: dict[str, tuple[int, dict] | None] = field(default_factory=dict)  # None: two rows share the name
    problems: list[str] = field(default_factory=list)

    def row_for(self, relpath: str) -> tuple[int, dict] | None:
        """(line number, fields) of the row naming `relpath` ('/'-separated, relative to the table), or None."""
        key = _nfc(relpath)
        return self.by_relpath.get(key) or self.by_name.get(PurePosixPath(key).name)


def _nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def _row_key(value: str, folder: Path) -> str | None:
    """A key cell as a '/'-separated path relative to the table's folder; None when empty or absolute outside it."""
    text = value.strip()
    if os.path.isabs(text):
        try:
            text = Path(text).relative_to(folder).as_posix()
        except ValueError:
            return None
    text = _nfc(text.replace("\\", "/"))
    while text.startswith("./"):
        text = text[2:]
    if not text or text.startswith("/") or (len(text) > 1 and text[1] == ":"):  # another system's absolute path
        return None
    return text


def _decoded(raw: bytes, problems: list[str]) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    for encoding in ("cp1252", "latin-1"):  # a spreadsheet's export on Windows; latin-1 never fails
        try:
            text = raw.decode(encoding)
        except UnicodeDecodeError:
            continue
        problems.append(f"not UTF-8; read as {'Windows-1252' if encoding == 'cp1252' else 'Latin-1'} (save it as "
                        "UTF-8 if accents look wrong)")
        return text
    raise AssertionError("latin-1 decodes any bytes")


def _csv_rows(text: str, tab_separated: bool) -> list[tuple[int, dict]]:
    """(line, {column: cell}) per data row. The delimiter is the one of , ; tab | the header line uses most (a
    European spreadsheet writes ';'), ',' when it has none (a one-column table)."""
    header = text.split("\n", 1)[0]
    delimiter = "\t" if tab_separated else max(",;\t|", key=lambda c: (header.count(c), c == ","))
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    rows = []
    for row in reader:
        rows.append((reader.line_num, {str(k): v for k, v in row.items() if k is not None and isinstance(v, str)}))
    return rows


def _jsonl_rows(text: str, problems: list[str]) -> list[tuple[int, dict]]:
    rows, bad = [], []
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            bad.append(line_no)
            continue
        if isinstance(obj, dict):
            rows.append((line_no, obj))
        else:
            bad.append(line_no)
    if bad:
        problems.append(f"line(s) {', '.join(map(str, bad[:5]))}{' …' if len(bad) > 5 else ''} are not JSON "
                        "objects; skipped")
    return rows


def _cell_value(value):
    """A cell as a metadata value: strings stripped, numbers/bools/lists kept, nested objects and non-finite
    numbers dropped (our per-file JSON is strict)."""
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, bool) or isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value):
        return value or None
    return None


def parse_table(path: Path, aliases: dict[str, str]) -> MetadataTable:
    """Read one table (never raises: problems are listed on the result). aliases: column-name spellings that
    mean a known field (the embedded-tag aliases)."""
    table = MetadataTable(path)
    try:
        size = path.stat().st_size
        if size > MAX_TABLE_BYTES:
            table.problems.append(f"{size / 2**20:.0f} MB is too big for a metadata table; ignored")
            return table
        raw = path.read_bytes()
    except OSError as e:
        table.problems.append(f"unreadable ({e.strerror or e}); ignored")
        return table
    text = _decoded(raw, table.problems)
    try:
        rows = _jsonl_rows(text, table.problems) if path.suffix.lower() == ".jsonl" else \
            _csv_rows(text, tab_separated=path.suffix.lower() == ".tsv")
    except csv.Error as e:
        table.problems.append(f"not a readable table ({e}); ignored")
        return table
    columns = {str(c) for _, row in rows for c in row}
    by_lower = {c.strip().lower(): c for c in sorted(columns)}
    key_column = next((by_lower[k] for k in KEY_COLUMNS if k in by_lower), None)
    if key_column is None:
        if rows:
            table.problems.append(f"no column names the audio files (expected one of {', '.join(KEY_COLUMNS[:4])} "
                                  "…); ignored")
        return table
    has_prompt = "prompt" in by_lower
    duplicates = []
    for line, row in rows:
        key = _row_key(str(row.get(key_column) or ""), path.parent)
        if key is None:
            continue
        fields: dict = {}
        for column, value in row.items():
            name = str(column).strip().lower()
            value = _cell_value(value)
            if column == key_column or not name or value is None:
                continue
            fields[aliases.get(name, name)] = value
        if not has_prompt:
            caption = next((fields[c] for c in CAPTION_COLUMNS if isinstance(fields.get(c), str)), None)
            if caption:
                fields["prompt"] = caption
        if key in table.by_relpath:
            duplicates.append(key)
        table.by_relpath[key] = (line, fields)
        if "/" not in key:
            name = PurePosixPath(key).name
            table.by_name[name] = None if name in table.by_name else (line, fields)
    table.by_name = {k: v for k, v in table.by_name.items() if v is not None}
    if duplicates:
        table.problems.append(f"{len(duplicates)} file(s) listed twice (e.g. {duplicates[0]}); the last row is used")
    return table


_CACHE: dict[str, tuple[tuple[int, int], MetadataTable]] = {}
_LOCK = threading.Lock()


def cached_table(path: Path, aliases: dict[str, str]) -> MetadataTable | None:
    """The parsed table at `path`, re-read only when its size or modification time changed; None when absent."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not os.path.isfile(path):
        return None
    stamp, key = (st.st_size, st.st_mtime_ns), os.fspath(path)
    with _LOCK:
        hit = _CACHE.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
    table = parse_table(Path(path), aliases)
    with _LOCK:
        if len(_CACHE) >= 256:
            _CACHE.clear()
        _CACHE[key] = (stamp, table)
    return table


def tables_for(audio: Path, root: Path | None) -> list[tuple[Path, str]]:
    """(table folder, audio's relpath from it) for every folder from the audio's own up to root (inclusive),
    nearest first; only the audio's folder when root is None or not above it."""
    folders = [audio.parent]
    if root is not None:
        try:
            rel_parts = audio.parent.relative_to(root).parts
        except ValueError:
            rel_parts = None
        if rel_parts is not None:
            folders = [root.joinpath(*rel_parts[:i]) for i in range(len(rel_parts), -1, -1)]
    out = []
    for folder in folders:
        rel = audio.relative_to(folder).as_posix()
        out.append((folder, rel))
    return out


__all__ = ["CAPTION_COLUMNS", "KEY_COLUMNS", "TABLE_NAMES", "MetadataTable", "cached_table", "parse_table",
           "tables_for"]
