"""A long file's finished encoder chunks, kept on disk until the file is done, so a stopped encode resumes there.

On a CPU the SAME-L encoder runs at about 0.7x real time (README, "Encoding"): a two-hour live set takes hours, and
without this a Ctrl-C, a ComfyUI cancel or a crash near its end would start that file again from zero. Chunks are
computed independently from the same decoded audio, so the resumed latents equal an uninterrupted encode's.

Layout: `<dataset>/.partial/<key>/chunks-<first>-<last>.npz`, one archive per save holding `c<index>` arrays
(float32 [latent_dim, k], the latents each chunk contributes). The key hashes everything the latents depend on
(the file's relpath and content hash, the encoder's fingerprint, the decoding version, the chunking), so chunks of
another version of the file or of another encoder are never used. Saves are batched (`SAVE_EVERY_SECONDS`): on a GPU a
chunk is quick, and an fsync after each could cost more than the work it keeps; a hard kill loses at most that
much, a Ctrl-C or a cancel nothing (`flush` runs on the way out).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np

from ..sa3.atomic import atomic_write

PARTIAL_DIR = ".partial"
SAVE_EVERY_SECONDS = 10.0


class PartialEncode:
    """The finished chunks of one file's encode (module docstring). `finished()` what an earlier run left, `add`
    each new chunk, `flush` on the way out of a stopped encode, `remove` when the file is done either way."""

    def __init__(self, out_dir: Path, relpath: str, identity: dict):
        key = hashlib.sha256(json.dumps({"relpath": relpath, **identity}, sort_keys=True).encode()).hexdigest()
        self.folder = Path(out_dir) / PARTIAL_DIR / key[:32]
        self.pending: dict[int, np.ndarray] = {}
        self.saved: set[int] = set()  # chunk indices on disk already (read back by `finished`, or flushed)
        self.last_save = time.monotonic()

    def finished(self) -> dict[int, np.ndarray]:
        """{chunk index: kept latents [latent_dim, k] float32} saved by earlier runs; a damaged archive (a power
        cut after the rename) is passed over and its chunks are encoded again."""
        found: dict[int, np.ndarray] = {}
        if not self.folder.is_dir():
            return found
        for archive in sorted(self.folder.glob("chunks-*.npz")):
            try:
                with np.load(archive) as data:
                    found.update({int(name[1:]): np.asarray(data[name], np.float32) for name in data.files})
            except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
                continue
        self.saved.update(found)
        return found

    def add(self, index: int, kept: np.ndarray) -> None:
        """Keep chunk `index` (0-based); saved with the others once SAVE_EVERY_SECONDS have passed."""
        if index in self.saved:  # a chunk `finished` gave back: on disk already
            return
        self.pending[index] = np.asarray(kept, np.float32)
        if time.monotonic() - self.last_save >= SAVE_EVERY_SECONDS:
            try:
                self.flush()
            except OSError:  # a full disk: the chunks stay in memory, the file's encode goes on, a later save retries
                self.last_save = time.monotonic()

    def flush(self) -> None:
        """Save the chunks not saved yet (one archive, written atomically)."""
        if not self.pending:
            return
        first, last = min(self.pending), max(self.pending)
        arrays = {f"c{index}": kept for index, kept in self.pending.items()}
        atomic_write(self.folder / f"chunks-{first:06d}-{last:06d}.npz", lambda f: np.savez(f, **arrays))
        self.saved.update(self.pending)
        self.pending.clear()
        self.last_save = time.monotonic()

    def remove(self) -> None:
        """Forget this file's chunks (it is encoded, or skipped); the .partial folder goes when it is empty."""
        self.pending.clear()
        shutil.rmtree(self.folder, ignore_errors=True)
        try:
            self.folder.parent.rmdir()
        except OSError:  # other files' chunks are still there, or it was never made
            pass


def remove_all_partials(out_dir: Path) -> None:
    """Drop every kept chunk in a dataset folder (a complete encode: what is left belongs to changed files)."""
    shutil.rmtree(Path(out_dir) / PARTIAL_DIR, ignore_errors=True)
