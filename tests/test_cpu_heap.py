"""training/cpu_heap.py: while a CPU run trains, step-sized blocks come from the heap and stay there when freed (so
re-allocating them takes no page faults); the last release returns them to the system. Read from glibc's own
counters (mallinfo2) in fresh processes: allocator settings are process-wide, and fault counts depend on the heap's
layout, these counters do not."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc malloc only")

SCRIPT = r"""
import ctypes, sys, torch
from sa3_lora_studio.training.cpu_heap import keep_heap, release_heap

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                    "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
MB = 2**20

def resident_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 // MB

def step_blocks(mb_each=8):
    # a step's pattern: 96 MB of blocks below 32 MB allocated and written; returns MB in mmap'd chunks meanwhile
    blocks = [torch.empty(mb_each * MB // 4).fill_(1.0) for _ in range(96 // mb_each)]
    mapped = libc.mallinfo2().hblkhd // MB
    del blocks
    return mapped

out = [step_blocks()]  # glibc's defaults: the first 8 MB blocks are mmap'd (given back on free)
for action in sys.argv[1:]:
    {"keep": keep_heap, "release": release_heap}[action]()
    resident = resident_mb()  # right after the action: what a release handed back shows here
    # 24 MB blocks: above the threshold glibc raised to 8 MB on its own after the first round, below the kept 32 MB
    mapped = step_blocks(24)
    # mmap'd MB while the blocks lived; free MB the heap holds after they were freed; resident MB after the action
    out += [mapped, libc.mallinfo2().fordblks // MB, resident]
print(" ".join(map(str, out)))
"""


def _measure(*actions: str) -> list[int]:
    done = subprocess.run([sys.executable, "-c", SCRIPT, *actions], capture_output=True, text=True, timeout=120)
    if "mallinfo2" in done.stderr:
        pytest.skip("glibc older than 2.33 (no mallinfo2)")
    assert done.returncode == 0, done.stderr
    return [int(v) for v in done.stdout.split()]


def test_kept_heap_holds_step_blocks_and_the_last_release_returns_them():
    default_mapped, *rest = _measure("keep", "keep", "release", "release")
    kept, twice, one_left, released = (rest[i:i + 3] for i in range(0, 12, 3))
    assert default_mapped >= 8  # MB: under glibc's defaults a fresh process mmaps these blocks
    assert kept[0] < 24  # kept: even 24 MB blocks come from the heap...
    assert min(kept[1], twice[1], one_left[1]) >= 96  # ...and stay in it, free, after being freed, while held
    assert one_left[2] - released[2] >= 64  # the last release handed the held memory back (resident MB)
