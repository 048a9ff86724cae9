"""What an encode would do, before any model loads: the audio files under a folder (include/exclude applied, hidden
and AppleDouble entries left out, symlinked folders followed once) and, against an existing dataset folder, which
earlier outputs would be removed (`plan_encode`)."""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..sa3.atomic import writable_folder_problem
from .audio_io import AUDIO_EXTENSIONS
from .captions import name_text, utf8_text
from .dataset import (
    DatasetError,
    ignored_entry,
    load_manifest,
)


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
    old = load_manifest(out_dir) or {}
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
