"""Atomic file writes, the one implementation used by datasets, runs, checkpoints and demos.

A temp file in the destination folder, flushed and fsynced, then `os.replace`: readers (and a process killed at any
moment) see the old file or the new one, never half of one. Temp names come from `mkstemp`, so threads and processes
writing the same path never share a temp file.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO


def fsync_replace(tmp: str | Path, final: str | Path) -> None:
    """Make an already written temp file durable, then move it over `final` atomically."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


def atomic_write(path: str | Path, data: bytes | str | Callable[[BinaryIO], None]) -> Path:
    """Write bytes, text (UTF-8) or whatever `data(file)` writes to `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | Path, data: Any) -> Path:
    return atomic_write(path, json.dumps(data, indent=1, ensure_ascii=False))


@contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing) against other processes: flock on POSIX, a one-byte
    msvcrt lock on Windows. For read-modify-write of files several processes share (the runs index). Not reentrant:
    take it once per process (callers pair it with a thread lock)."""
    with open(path, "a+b") as f:
        if os.name == "nt":
            import msvcrt

            f.seek(0)
            while True:
                try:
                    msvcrt.locking(f.fileno(), msvcrt.LK_LOCK, 1)  # retries for ~10 s, then raises: keep waiting
                    break
                except OSError as e:
                    if e.errno not in (errno.EDEADLOCK, errno.EACCES):  # held by another process: wait on
                        raise
            try:
                yield
            finally:
                f.seek(0)
                msvcrt.locking(f.fileno(), msvcrt.LK_UNLCK, 1)
        else:
            import fcntl

            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
