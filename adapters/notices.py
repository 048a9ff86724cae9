"""Warnings for the user of one call (a source longer than the output, an inpaint region past its end, a LoRA
trained on other weights), collected for the caller that asks for them.

Python's warnings print each distinct message once per process: in a ComfyUI session the second identical
generation would say nothing. A ComfyUI node therefore collects the notices of its own call (`collected()`) and
shows them on the node and in the console every time; without a collector (CLI, scripts, tests) a notice is an
ordinary `warnings.warn`. The collector is a context variable: each thread has its own, so a background training
run's notices never land in a generation's list.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from contextvars import ContextVar

_collector: ContextVar[list[str] | None] = ContextVar("sa3_notices", default=None)


def warn(message: str, stacklevel: int = 2) -> None:
    """Tell the user `message`: into the active collector of this thread, else through `warnings.warn` (stacklevel
    as there, counted from the caller of this function)."""
    found = _collector.get()
    if found is not None:
        found.append(message)
    else:
        warnings.warn(message, stacklevel=stacklevel + 1)


@contextlib.contextmanager
def collected() -> Iterator[list[str]]:
    """The notices issued in this thread inside the block, in order (the caller shows them)."""
    found: list[str] = []
    token = _collector.set(found)
    try:
        yield found
    finally:
        _collector.reset(token)


__all__ = ["collected", "warn"]
