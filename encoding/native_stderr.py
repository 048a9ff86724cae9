"""Send what native libraries write straight to the process's stderr (file descriptor 2) to a log file.

Why: decoders inside libsndfile/FFmpeg (libmpg123 above all) print resync notes and errors for damaged files
directly to fd 2, past Python, so they land in the middle of the progress bar and after the summary, although the
encode report already names each damaged file and what was lost. Python's own `sys.stderr` keeps the terminal.
Meant for the command line only: fd 2 is process-wide, so in ComfyUI it would hide other threads' output too.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from pathlib import Path


def _flush_c_stdio() -> None:
    """fflush(NULL): hand buffered native output to the descriptor it was meant for before fd 2 changes."""
    if os.name == "nt":  # no process-wide C library handle there (CDLL(None) is a TypeError)
        return
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError, TypeError):  # no C library to call: nothing buffered we can reach
        pass


def _writes_to_fd2(stream) -> bool:
    try:
        return stream.fileno() == 2
    except (AttributeError, OSError, ValueError):  # a replaced stream (pytest's capture, an IDE console)
        return False


class Captured:
    """What `native_stderr_to` caught: `bytes` appended to the log during the block (set when it ends)."""

    bytes = 0


@contextlib.contextmanager
def native_stderr_to(log: Path):
    """Within the block, fd 2 appends to `log` (a log this block made, or found empty as a killed run leaves it, and
    nothing was written to is removed again);
    Python's own writes still reach the original stderr (`sys.stderr` is pointed at a copy of it when it wrote to
    fd 2). Yields `Captured`."""
    captured = Captured()
    try:
        original = os.dup(2)
    except OSError:  # no fd 2 (a detached process): nothing to redirect
        yield captured
        return
    fd = terminal = None
    python_stderr = sys.stderr
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
        size_before = (log.stat().st_size or None) if log.exists() else None  # an empty one: a killed run's
        python_stderr.flush()
        _flush_c_stdio()
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        if _writes_to_fd2(python_stderr):
            terminal = os.fdopen(os.dup(original), "w", encoding=python_stderr.encoding or "utf-8",
                                 errors="backslashreplace", buffering=1)
        os.dup2(fd, 2)
        if terminal is not None:
            sys.stderr = terminal
        yield captured
    finally:
        if terminal is not None:
            terminal.flush()
        _flush_c_stdio()
        os.dup2(original, 2)
        os.close(original)
        if fd is not None:
            os.close(fd)
        if terminal is not None:
            sys.stderr = python_stderr
            terminal.close()
        if fd is not None:
            size_after = log.stat().st_size if log.exists() else 0
            captured.bytes = size_after - (size_before or 0)
            if size_before is None and size_after == 0:
                log.unlink()
