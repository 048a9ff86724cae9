"""How much host memory is free: the one reading used by the VRAM check (CPU runs) and the audio decoder (files too
long to decode in the memory left)."""

from __future__ import annotations

import re


def available_host_memory() -> int | None:
    """Bytes the kernel says can be allocated without swapping (Linux `MemAvailable`); None when unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            text = f.read()
        return int(re.search(r"MemAvailable:\s+(\d+) kB", text).group(1)) * 1024
    except (OSError, AttributeError):
        return None
