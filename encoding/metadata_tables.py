"""Folder-level metadata tables: `metadata.csv`, `metadata.tsv` or `metadata.jsonl` listing many files at once.

This is the Hugging Face `audiofolder` convention (a `file_name` column, paths relative to the table's folder), and
what sample packs and spreadsheet exports ship. A table applies to the files in its folder and below. One row per
file: its other columns become metadata fields under lower-case names (`Genre` -> `genre`, `Tempo` -> `bpm`
through the tag aliases of `captions.py`), empty cells skipped. A `caption` or `text` column (the audiofolder
spelling) is also the file's `prompt` when the row has no `prompt` of its own.

Matching a file to a row, in every table from the file's folder up to the dataset root: first its exact path
relative to the table (`/` or `\\`, `./` and `a/../` folded, NFC; an absolute path inside the table's folder too),
nearest table first; then, when no table has it exactly, a loose match in the same order: case ignored, the audio
extension ignored (a list written on Windows, or before WAVs became FLACs), a bare file name without folder (a
flat list for a tree of folders; it applies to each file of that name), or the path from the dataset root instead
of from the table's folder. A loose match must be the only one in its table and its row must not name another
file that exists; the file then gets a warning saying how it matched. `tables_in_use` lists rows that name no
audio file, for the encode report.

Read as a spreadsheet writes it: UTF-8 (with or without BOM), UTF-16 with BOM, else Windows-1252 (a warning says
so); the delimiter , ; tab or | (Excel's `sep=` line honoured); blank and `#` lines before the header skipped;
extra cells in a row joined back into a last caption-like column (an unquoted comma in a caption). Each table is
parsed once per change of its size or modification time, however many files look into it.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import posixpath
import re
import stat
import threading
import unicodedata
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from .audio_io import AUDIO_EXTENSIONS

TABLE_NAMES = ("metadata.csv", "metadata.tsv", "metadata.jsonl")
# Column names that hold the file a row describes, the audiofolder spelling first (compared after `_column_key`).
KEY_COLUMNS = ("file_name", "filename", "file", "file_path", "filepath", "path", "relpath", "audio", "audio_file",
               "audio_path", "audio_filename")
CAPTION_COLUMNS = ("caption", "text")  # the first one is the prompt when there is no `prompt`
PLACEHOLDERS = frozenset({"nan", "none", "null", "n/a"})  # what spreadsheets and scripts write for "no value"


def is_placeholder(value) -> bool:
    """A metadata value that means "no value" (a spreadsheet's "NaN" or "N/A" cell): no caption, no tag."""
    return isinstance(value, str) and value.strip().lower() in PLACEHOLDERS
FREE_TEXT_COLUMNS = ("prompt", "caption", "text", "description", "comment", "comments")  # may hold the delimiter
_AUDIO_NAME = re.compile(r"\.(" + "|".join(sorted(e[1:] for e in AUDIO_EXTENSIONS)) + r")\b", re.IGNORECASE)
MAX_TABLE_BYTES = 64 << 20  # a bigger "metadata.csv" is no caption table: read nothing, warn
MAX_FIELD_CHARS = 1 << 24  # csv's default limit (128 KiB) would refuse a whole table for one long caption


@dataclass
class Row:
    line: int  # 1-based line of the row's start in the table
    key: str  # the named file, '/'-separated, relative to the table's folder
    fields: dict


@dataclass
class MetadataTable:
    """One parsed table: its rows, indexes for exact and loose matching, and problems to report."""

    path: Path
    rows: list[Row] = field(default_factory=list)
    by_relpath: dict[str, int] = field(default_factory=dict)  # exact key -> row index (the last row of a key)
    by_loose: dict[str, int | None] = field(default_factory=dict)  # loose key -> row index, None: ambiguous
    by_loose_name: dict[str, int | None] = field(default_factory=dict)  # loose bare name (rows without folder)
    problems: list[str] = field(default_factory=list)

    def exact_row(self, relpath: str) -> Row | None:
        """The row naming `relpath` ('/'-separated, relative to the table's folder) exactly, or None."""
        i = self.by_relpath.get(_path_key(relpath))
        return None if i is None else self.rows[i]

    def loose_row(self, relpath: str) -> Row | None:
        """The one row naming `relpath` up to case and audio extension, or by its bare name, when that row does not
        name another file that exists; None otherwise."""
        key = _path_key(relpath)
        for index, probe in ((self.by_loose, _loose(key)), (self.by_loose_name, _loose(PurePosixPath(key).name))):
            i = index.get(probe)
            if i is not None and not self._names_another_file(self.rows[i].key, key):
                return self.rows[i]
        return None

    def _names_another_file(self, row_key: str, relpath: str) -> bool:
        folder = self.path.parent
        try:
            return (folder / row_key).is_file() and not os.path.samefile(folder / row_key, folder / relpath)
        except OSError:
            return False


def _nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def _path_key(text: str) -> str:
    """A relative path as a table key: '/'-separated, `.`, `..` and doubled slashes folded, NFC."""
    folded = posixpath.normpath(_nfc(text.strip().replace("\\", "/")))
    return "" if folded == "." else folded


def _loose(key: str) -> str:
    """A key up to case and an audio extension."""
    stem, ext = posixpath.splitext(key)
    return (stem if ext.lower() in AUDIO_EXTENSIONS else key).casefold()


def _column_key(name: str) -> str:
    """A header as compared with KEY_COLUMNS: lower case, runs of spaces and hyphens as '_' ("File Name")."""
    return re.sub(r"[\s\-]+", "_", name.strip().lower())


def _row_key(value: str, folder: Path) -> str | None:
    """A key cell as a path relative to the table's folder; None when empty, or absolute and outside the folder."""
    text = value.strip()
    if os.path.isabs(text):
        for base, target in ((os.path.abspath(folder), os.path.abspath(text)),
                             (os.path.realpath(folder), os.path.realpath(text))):
            rel = os.path.relpath(target, base)
            if rel != os.pardir and not rel.startswith(os.pardir + os.sep):
                return _path_key(Path(rel).as_posix())
        return None
    key = _path_key(text)
    if not key or key.startswith("/") or (len(key) > 1 and key[1] == ":") or key == ".." or key.startswith("../"):
        return None  # another system's absolute path, or outside the folder: names no file here
    return key


def decoded_text(raw: bytes, problems: list[str]) -> str:
    """Text a Windows or Mac tool wrote: UTF-16 with BOM, UTF-8 (BOM or not), else Windows-1252 (else Latin-1), with
    a note in `problems` for the last two (one rule for metadata tables and text sidecars)."""
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        try:
            return raw.decode("utf-16")
        except UnicodeDecodeError:  # an odd byte count, a torn write: what decodes, with a note
            problems.append("damaged UTF-16 (undecodable bytes replaced)")
            return raw.decode("utf-16", errors="replace")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    try:
        text, name = raw.decode("cp1252"), "Windows-1252"  # a spreadsheet's export on Windows
    except UnicodeDecodeError:
        text, name = raw.decode("latin-1"), "Latin-1"  # decodes any bytes
    problems.append(f"not UTF-8; read as {name} (save it as UTF-8 if accents look wrong)")
    return text


def _csv_start(text: str, tab_separated: bool) -> tuple[str, str, int]:
    """(text from the header on, delimiter, lines skipped before it). Excel's `sep=X` line names the delimiter;
    blank and `#` lines before the header are skipped; otherwise the delimiter is the first of (csv's sniffed one,
    then , ; tab | by how often the header has them) that splits the header into a file-name column."""
    lines = text.split("\n")
    skipped, sep = 0, None
    while skipped < len(lines):
        line = lines[skipped].strip()
        if line.lower().startswith("sep=") and len(line) == 5 and sep is None:
            sep = line[4]
        elif line and not line.startswith("#"):
            break
        skipped += 1
    body = "\n".join(lines[skipped:])
    if tab_separated or sep:
        return body, "\t" if tab_separated else sep, skipped
    header = lines[skipped] if skipped < len(lines) else ""
    try:
        sniffed = [csv.Sniffer().sniff(body[:16384], delimiters=",;\t|").delimiter]
    except csv.Error:
        sniffed = []
    candidates = sniffed + sorted(",;\t|", key=lambda c: (-header.count(c), c != ","))
    for delimiter in candidates:
        if any(_column_key(cell) in KEY_COLUMNS for cell in next(csv.reader([header], delimiter=delimiter), [])):
            return body, delimiter, skipped
    return body, candidates[0], skipped


def _csv_rows(text: str, tab_separated: bool, problems: list[str]) -> list[tuple[int, dict]]:
    """(line, {column: cell}) per data row. Extra cells (an unquoted delimiter) are joined back into the last
    column when it holds free text, and reported either way."""
    body, delimiter, skipped = _csv_start(text, tab_separated)
    csv.field_size_limit(max(csv.field_size_limit(), MAX_FIELD_CHARS))
    reader = csv.DictReader(io.StringIO(body, newline=""), delimiter=delimiter)
    columns = reader.fieldnames or []
    last = columns[-1] if columns else None
    joins = last is not None and _column_key(last) in FREE_TEXT_COLUMNS
    rows, extra_lines, runaway_lines = [], [], []
    start = reader.line_num + 1  # the header is read
    for row in reader:
        extra = row.pop(None, None)
        if extra:
            extra_lines.append(start + skipped)
            if joins and isinstance(row.get(last), str):
                row[last] = delimiter.join([row[last], *extra])
        if reader.line_num > start and any(isinstance(v, str) and "\n" in v and _AUDIO_NAME.search(v)
                                           for v in row.values()):
            runaway_lines.append(start + skipped)  # a quoted cell that swallowed the next rows
        rows.append((start + skipped, {str(k): v for k, v in row.items() if k is not None and isinstance(v, str)}))
        start = reader.line_num + 1
    if runaway_lines:
        problems.append(f"{_lines(runaway_lines)} a quoted cell runs into the next rows (an unclosed quote?)")
    if extra_lines:
        where = _lines(extra_lines)
        problems.append(f"{where} more cells than columns: " + (
            f"the rest was kept in '{last}' (quote text that holds '{delimiter}')" if joins
            else f"the extra cells were dropped (quote text that holds '{delimiter}')"))
    return rows


def _lines(numbers: list[int]) -> str:
    return f"line{'s' if len(numbers) > 1 else ''} {', '.join(map(str, numbers[:5]))}{' …' if len(numbers) > 5 else ''}"


def _jsonl_rows(text: str, problems: list[str]) -> list[tuple[int, dict]]:
    rows, bad = [], []
    for line_no, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON text may hold U+2028 unescaped
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
        problems.append(f"{_lines(bad)} not JSON objects; skipped")
    return rows


def _finite(value) -> bool:
    return not isinstance(value, float) or math.isfinite(value)


def _cell_value(value):
    """A cell as a metadata value: strings stripped, numbers/bools/flat lists kept; nested objects dropped (None)."""
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value):
        return value or None
    return None


def parse_table(path: Path, aliases: dict[str, str]) -> MetadataTable:
    """Read one table (never raises: problems are listed on the result). aliases: column-name spellings that
    mean a known field (the embedded-tag aliases, compared without spaces, '_' and '-')."""
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
    text = decoded_text(raw, table.problems)
    try:
        rows = _jsonl_rows(text, table.problems) if path.suffix.lower() == ".jsonl" else \
            _csv_rows(text, path.suffix.lower() == ".tsv", table.problems)
    except csv.Error as e:
        table.problems.append(f"not a readable table ({e}); ignored")
        return table
    columns = {str(c) for _, row in rows for c in row}
    by_key = {_column_key(c): c for c in sorted(columns)}
    key_column = next((by_key[k] for k in KEY_COLUMNS if k in by_key), None)
    if key_column is None:
        if rows:
            table.problems.append(f"no column names the audio files (expected one of {', '.join(KEY_COLUMNS[:4])} "
                                  "…); ignored")
        return table
    duplicates, non_finite = [], []
    for line, row in rows:
        key = _row_key(str(row.get(key_column) or ""), path.parent)
        if key is None:
            continue
        fields: dict = {}
        for column, cell in row.items():
            name = str(column).strip().lower()
            value = _cell_value(cell)
            if column == key_column or not name or value is None:
                continue
            if not _finite(value) or (isinstance(value, list) and not all(map(_finite, value))):
                non_finite += [line] if line not in non_finite[-1:] else []  # our per-file JSON is strict JSON
                continue
            fields[aliases.get(re.sub(r"[\s_\-]+", "", name), name)] = value
        caption_becomes_prompt(fields)
        if key in table.by_relpath:
            duplicates.append(key)
        table.by_relpath[key] = len(table.rows)
        for index, loose in ((table.by_loose, _loose(key)),
                             (table.by_loose_name, _loose(key) if "/" not in key else None)):
            if loose is None:
                continue
            if loose not in index or (index[loose] is not None and table.rows[index[loose]].key == key):
                index[loose] = len(table.rows)  # new, or the same file again (its last row)
            else:
                index[loose] = None  # two files: ambiguous, never matched loosely
        table.rows.append(Row(line, key, fields))
    if duplicates:
        table.problems.append(f"{len(duplicates)} file(s) listed twice (e.g. {duplicates[0]}); the last row is used")
    if non_finite:
        table.problems.append(f"{_lines(non_finite)} NaN/Infinity is not valid JSON; those cells are ignored")
    return table


_CACHE: OrderedDict[str, tuple[tuple[int, int], MetadataTable]] = OrderedDict()  # least recently used first
CACHE_TABLES = 64
_LOCK = threading.Lock()


def cached_table(path: Path, aliases: dict[str, str]) -> MetadataTable | None:
    """The parsed table at `path`, re-read only when its size or modification time changed; None when absent."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    stamp, key = (st.st_size, st.st_mtime_ns), os.fspath(path)
    with _LOCK:
        hit = _CACHE.get(key)
        if hit is not None and hit[0] == stamp:
            _CACHE.move_to_end(key)
            return hit[1]
    table = parse_table(Path(path), aliases)
    with _LOCK:
        _CACHE[key] = (stamp, table)
        _CACHE.move_to_end(key)
        while len(_CACHE) > CACHE_TABLES:  # the least recently used goes, not the whole cache
            _CACHE.popitem(last=False)
    return table


def _comparable(audio: Path, root: Path) -> tuple[Path, Path]:
    """Both absolute when one of them is (a relative root with absolute scanned paths, or the reverse)."""
    if audio.is_absolute() != root.is_absolute():
        return Path(os.path.abspath(audio)), Path(os.path.abspath(root))
    return audio, root


def root_relative(audio: Path, root: Path | None) -> str | None:
    """audio's path from the dataset root, None when it is not under root."""
    if root is None:
        return None
    audio, root = _comparable(Path(audio), Path(root))
    try:
        return audio.relative_to(root).as_posix()
    except ValueError:
        return None


def table_folders(audio: Path, root: Path | None) -> list[tuple[Path, str]]:
    """(folder, audio's relpath from it) for every folder from the audio's own up to root (inclusive), nearest
    first; only the audio's folder when root is None or not above it."""
    if root is not None:
        audio, root = _comparable(audio, root)
    folders = [audio.parent]
    if root is not None:
        try:
            rel_parts = audio.parent.relative_to(root).parts
        except ValueError:
            rel_parts = None
        if rel_parts is not None:
            folders = [root.joinpath(*rel_parts[:i]) for i in range(len(rel_parts), -1, -1)]
    return [(folder, audio.relative_to(folder).as_posix()) for folder in folders]


def tables_of(audio: Path, root: Path | None, aliases: dict[str, str]) -> list[tuple[MetadataTable, str]]:
    """(table, audio's relpath from the table's folder) of every table that applies to `audio`, nearest first."""
    out = []
    for folder, rel in table_folders(audio, root):
        for name in TABLE_NAMES:
            table = cached_table(folder / name, aliases)
            if table is not None:
                out.append((table, rel))
    return out


def _loose_or_root_relative(table: MetadataTable, rel: str, root_rel: str | None) -> Row | None:
    """A loose row for rel, or the row naming the file by its path from the dataset root instead of from the
    table's folder (`train/metadata.csv` listing `train/a.wav`, a common slip)."""
    return table.loose_row(rel) or (table.exact_row(root_rel) if root_rel not in (None, rel) else None)


def find_row(tables: list[tuple[MetadataTable, str]], root_rel: str | None = None) -> tuple[MetadataTable, Row, bool] | None:
    """(table, row, exact) for a file: an exact row in the nearest table that has one, else a loose row likewise.
    root_rel: the file's path from the dataset root, for `_loose_or_root_relative`."""
    for exact in (True, False):
        for table, rel in tables:
            row = table.exact_row(rel) if exact else _loose_or_root_relative(table, rel, root_rel)
            if row is not None:
                return table, row, exact
    return None


def tables_in_use(root: Path, audio_paths: list[Path], aliases: dict[str, str]) -> list[tuple[MetadataTable, list[Row]]]:
    """(table, rows naming no audio file under its folder) for every table that applies to one of audio_paths
    (files under root, the scan's list), in the order first met."""
    under: dict[Path, tuple[MetadataTable, list[tuple[str, str | None]]]] = {}
    for audio in map(Path, audio_paths):
        root_rel = root_relative(audio, root)
        for table, rel_to_table in tables_of(audio, root, aliases):
            under.setdefault(table.path, (table, []))[1].append((rel_to_table, root_rel))
    out = []
    for table, rels in under.values():
        hit = {id(row) for rel, root_rel in rels
               for row in (table.exact_row(rel), _loose_or_root_relative(table, rel, root_rel)) if row is not None}
        out.append((table, [row for row in table.rows if id(row) not in hit and table.exact_row(row.key) is row]))
    return out


def caption_becomes_prompt(fields: dict) -> dict:
    """A row's or sidecar's caption under another common name (`CAPTION_COLUMNS`, first found) becomes its
    `prompt` when it has none; moved, not copied, so the tags source does not say it again as `Text: ...`. In place;
    returns fields."""
    if "prompt" not in fields or is_placeholder(fields["prompt"]):
        name = next((c for c in CAPTION_COLUMNS if isinstance(fields.get(c), str) and fields[c].strip()
                     and not is_placeholder(fields[c])), None)
        if name is not None:
            fields["prompt"] = fields.pop(name)
    return fields


__all__ = ["CAPTION_COLUMNS", "KEY_COLUMNS", "PLACEHOLDERS", "TABLE_NAMES", "MetadataTable", "Row", "cached_table",
           "caption_becomes_prompt", "find_row", "is_placeholder", "parse_table", "root_relative", "table_folders",
           "tables_in_use", "tables_of"]
