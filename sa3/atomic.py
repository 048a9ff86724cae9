"""Atomic file writes, the one implementation used by datasets, runs, checkpoints and demos.

A temp file in the destination folder, flushed and fsynced, then `os.replace`: readers (and a process killed at any
moment) see the old file or the new one, never half of one. Temp names come from `mkstemp`, so threads and processes
writing the same path never share a temp file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

READ_ONLY_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})  # a write refused: permissions, a read-only mount


def writable_folder_problem(folder: str | Path) -> str | None:
    """Why files cannot be written into `folder` (made with its parents if missing), or None when they can: checked
    by writing and removing a probe file, which sees read-only mounts, permissions and ACLs alike. Callers ask
    before long work whose result would otherwise be lost at the end (a render, an encode)."""
    blocking = next((p for p in (Path(folder), *Path(folder).parents) if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        return f"{blocking} is a file, not a folder"
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".sa3-write-check-"):
            pass
    except OSError as e:
        return f"cannot write into {folder}: {e.strerror or e}"
    return None


def _process_umask() -> int:
    """This process's umask: from /proc on Linux (reading it changes nothing), else by setting and restoring it,
    once, at import (before the threads that write files exist)."""
    try:
        for line in open("/proc/self/status", encoding="ascii"):
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_process_umask()  # what open() gives a new file; mkstemp and safetensors' writer give 0600


def as_created_by_open(fd_or_path: int | str | Path) -> None:
    """Give a temp file the mode a plain open() would have given it, before it becomes the real file: a LoRA,
    config or dataset file readable by the other users who should read it (a ComfyUI service account, a Samba
    share), not only by this one. Nothing on Windows, where modes are not permissions."""
    if os.name != "posix":
        return
    if isinstance(fd_or_path, int):
        os.fchmod(fd_or_path, FILE_MODE)
    else:
        os.chmod(fd_or_path, FILE_MODE)


def fsync_replace(tmp: str | Path, final: str | Path) -> None:
    """Make an already written temp file durable (with the mode `open` would give it), then move it over `final`
    atomically."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    as_created_by_open(tmp)
    os.replace(tmp, final)


def atomic_write(path: str | Path, data: bytes | str | Callable[[BinaryIO], None]) -> Path:
    """Write bytes, text (UTF-8) or whatever `data(file)` writes to `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        as_created_by_open(fd)
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


class LockHeld(Exception):
    """Another process holds the lock `file_lock(path, wait=False)` asked for."""


@contextmanager
def file_lock(path: str | Path, wait: bool = True, remove: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing) against other processes: flock on POSIX, a one-byte
    msvcrt lock on Windows. For read-modify-write of files several processes share (the runs index), or work only
    one process may do at a time (wait=False: LockHeld at once when another holds it). Not reentrant: take it once
    per process (callers pair it with a thread lock).
    remove: the lock file is deleted on release (a lock in a folder users look at). On POSIX that is safe because a
    lock taken on a file that was deleted or replaced meanwhile is let go and taken again on the file now at `path`;
    on Windows it stays while another process has it open."""
    if os.name == "nt":
        try:
            with _windows_lock(path, wait):
                yield
        finally:
            if remove:  # Windows deletes no file another process has open (holding or waiting for the lock)
                with contextlib.suppress(OSError):
                    os.unlink(path)
        return
    import fcntl

    while True:
        f = open(path, "a+b")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            f.close()
            raise LockHeld(str(path)) from None
        except BaseException:
            f.close()
            raise
        try:
            held = os.fstat(f.fileno())
            now = os.stat(path)
            if (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino):
                break
        except FileNotFoundError:  # the holder before us deleted it on release: lock the one at `path` now
            pass
        f.close()
    try:
        yield
    finally:
        try:
            if remove:  # under the lock: a process that opened this file before the unlink sees it gone
                with contextlib.suppress(OSError):  # only tidiness is lost
                    os.unlink(path)
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
            f.close()


@contextmanager
def _windows_lock(path: str | Path, wait: bool) -> Iterator[None]:
    import msvcrt

    with open(path, "a+b") as f:
        f.seek(0)
        while True:
            try:  # LK_LOCK retries for ~10 s, then raises: keep waiting
                msvcrt.locking(f.fileno(), msvcrt.LK_LOCK if wait else msvcrt.LK_NBLCK, 1)
                break
            except OSError as e:
                if e.errno not in (errno.EDEADLOCK, errno.EACCES):  # held by another process: wait on
                    raise
                if not wait:
                    raise LockHeld(str(path)) from None
        try:
            yield
        finally:
            f.seek(0)
            msvcrt.locking(f.fileno(), msvcrt.LK_UNLCK, 1)
