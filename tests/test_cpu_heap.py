"""training/cpu_heap.py: while a CPU run trains, re-allocating a step's worth of freed memory takes no page faults;
afterwards glibc trims again. Measured in fresh processes (allocator settings are process-wide)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc malloc only")

SCRIPT = r"""
import resource, sys, torch
from sa3_lora_studio.training.cpu_heap import keep_heap, release_heap

def faults_per_round():
    # a step's pattern: many mid-size blocks (below 32 MB) allocated, written, all freed
    def one_round():
        blocks = [torch.empty(2 << 20).fill_(1.0) for _ in range(12)]  # 12 x 8 MB
        del blocks
    one_round()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        one_round()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 3

out = [faults_per_round()]
for action in sys.argv[1:]:
    {"keep": keep_heap, "release": release_heap}[action]()
    out.append(faults_per_round())
print(" ".join(map(str, out)))
"""


def _faults(*actions: str) -> list[int]:
    done = subprocess.run([sys.executable, "-c", SCRIPT, *actions], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [int(v) for v in done.stdout.split()]


def test_kept_heap_reuses_freed_pages_and_the_last_release_trims_again():
    default, kept, kept_twice, still_kept, released = _faults("keep", "keep", "release", "release")
    pages_per_round = 12 * 8 * 2**20 // 4096
    assert default > pages_per_round // 2  # glibc's defaults give the 96 MB back and fault it in again
    assert max(kept, kept_twice, still_kept) < pages_per_round // 20  # two holders, then one released
    assert released > pages_per_round // 2  # the last holder restored trimming
