"""The frozen SVD bases of the -xs adapter types: U [out, r], V [in, r], the top-r singular vectors of a base
weight from an fp32 CPU SVD with the reference's sign convention (the largest-|.| entry of each U column positive),
so the bases are bit-identical to the reference's on the same LAPACK.

Why a cache: the full SVD of a real-size layer costs 0.3-0.8 s, and 1-10 s for the wide [1024, 4096] one (it varies
run to run), on 2 CPU threads of the bench VM (`python bench/xs_bases.py`); a model has ~100 adapted layers, yet the
bases depend only on the frozen weight. A generation, a training start, each round of ARC demos (the ARC model is
loaded anew for each round) and an export all ask for the same ones. Entries are found by the weight tensor itself
(unchanged in place) or else by its content (shape, dtype and a BLAKE2 digest of its bytes: 5-50 ms for a 4-32 MB
weight, same bench), and the cache keeps the most recently used bases up to CACHE_BYTES.
"""

from __future__ import annotations

import hashlib
import pickle
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor

CACHE_BYTES = 512 << 20  # about 2-3 real models' worth of rank-16 bases

_by_content: OrderedDict[tuple, tuple[Tensor, Tensor]] = OrderedDict()  # (digest, shape, dtype, rank) -> (U, V)
_by_tensor: dict[int, tuple[weakref.ref, tuple, tuple]] = {}  # id(w) -> (ref, `_identity(w)`, content key)
_cached_bytes = 0  # sum of the cached bases' sizes
_lock = threading.Lock()


def _canonical(u: Tensor, vh: Tensor) -> tuple[Tensor, Tensor]:
    """(U, V = Vhᵀ) with each pair's sign chosen so the largest-|.| entry of the U column is positive (0: +)."""
    peak = u.abs().argmax(dim=0)
    signs = u[peak, torch.arange(u.shape[1])].sign()
    signs[signs == 0] = 1
    return u * signs[None, :], (vh * signs[:, None]).T


def compute_svd_bases(w: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """(U [out, r], V [in, r]) in fp32 on the CPU for a weight of any shape (viewed [out, in]); uncached."""
    u, _, vh = torch.linalg.svd(w.reshape(w.shape[0], -1).detach().cpu().float(), full_matrices=False)
    u, v = _canonical(u, vh)
    return u[:, :rank].contiguous(), v[:, :rank].contiguous()


def _content_key(w: Tensor, rank: int) -> tuple:
    data = w.detach().cpu().contiguous()
    digest = hashlib.blake2b(data.view(torch.uint8).reshape(-1).numpy(), digest_size=20).hexdigest()
    return digest, tuple(w.shape), str(w.dtype), rank


def _remember(key: tuple, bases: tuple[Tensor, Tensor]) -> None:
    """Keep bases under key, dropping the least recently used beyond CACHE_BYTES (call with _lock held)."""
    global _cached_bytes
    old = _by_content.pop(key, None)
    if old is not None:
        _cached_bytes -= old[0].nbytes + old[1].nbytes
    _by_content[key] = bases
    _cached_bytes += bases[0].nbytes + bases[1].nbytes
    while _cached_bytes > CACHE_BYTES and len(_by_content) > 1:
        _, (u, v) = _by_content.popitem(last=False)
        _cached_bytes -= u.nbytes + v.nbytes


def clear_cache() -> None:
    """Forget every cached basis (tests; a process that wants the memory back)."""
    global _cached_bytes
    with _lock:
        _by_content.clear()
        _by_tensor.clear()
        _fingerprints.clear()
        _bases_files.clear()
        _cached_bytes = 0


def _forget_tensor(key: int, ref: weakref.ref) -> None:
    """A weight the cache saw was freed. Takes no lock: the garbage collector may run this inside a `with _lock`
    block of this same thread (a plain Lock would deadlock); dict operations are atomic."""
    entry = _by_tensor.get(key)
    if entry is not None and entry[0] is ref:
        _by_tensor.pop(key, None)


def _identity(w: Tensor) -> tuple | None:
    """What must be unchanged for the by-tensor entry to hold: storage, dtype, shape, device and (outside inference
    mode) the in-place version counter; None for an inference tensor that has no counter (found by content)."""
    if w.is_inference():
        return None
    return (w._version, w.data_ptr(), w.dtype, tuple(w.shape), str(w.device))


def svd_bases(w: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """`compute_svd_bases`, cached (module docstring); the returned tensors are the caller's own copies. Works in
    and out of inference mode (ComfyUI runs nodes in it)."""
    identity = _identity(w)
    with _lock:
        seen = _by_tensor.get(id(w))
    key = None
    if seen is not None and identity is not None and seen[0]() is w and seen[1] == identity and seen[2][3] == rank:
        key = seen[2]
    if key is None:
        key = _content_key(w, rank)
    with _lock:
        hit = _by_content.get(key)
        if hit is not None:
            _by_content.move_to_end(key)
    if hit is None:
        hit = compute_svd_bases(w, rank)
        with _lock:
            _remember(key, hit)
    if identity is not None:
        tensor_id = id(w)
        try:
            ref = weakref.ref(w, lambda dead: _forget_tensor(tensor_id, dead))
        except TypeError:  # not weak-referenceable: found by content next time
            ref = None
        if ref is not None:
            _by_tensor[tensor_id] = (ref, identity, key)  # atomic; outside the lock (see _forget_tensor)
    return hit[0].clone(), hit[1].clone()


# ---------------------------------------------------------------------------------------------------- other sources
# An -xs adapter is faithful only with the bases of the weights it was trained on. A base-trained adapter used on
# the ARC model would otherwise get the ARC weights' bases. Two sources give the right ones instead: an official
# SVD bases file (`svd_bases_path` in a model_config.json, as the official loader reads it), and the pack's base
# variant on disk beside an ARC model (`<name>/base/` next to `<name>/arc/`), read lazily layer by layer.

class XsBasesError(ValueError):
    """An SVD bases file that is missing, unreadable or does not fit the model; the message names file and key."""


def bases_file_key(layer: str) -> str:
    """A layer's key in an SVD bases file: the base checkpoint's key of its weight (the DiT under `model.`, the
    conditioner under `conditioner.`), as the official loader looks it up. layer: as in SA3-native adapter files."""
    return ("model." if layer.startswith("model.") else "conditioner.") + layer + ".weight"


def read_svd_bases_file(path: Path) -> dict[str, tuple[Tensor, Tensor]]:
    """An official/underfit SVD bases file -> {checkpoint key: (U [out, k], V [in, k])} (k >= the ranks it serves).
    The file is `torch.save({key: {"U", "V", "S"?, "shape"?}})`, read with weights_only (no arbitrary objects)."""
    path = Path(path)
    if not path.is_file():
        raise XsBasesError(f"SVD bases file {path} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):  # torch words every failure alike; this one is no refusal
            raise XsBasesError(f"SVD bases file {path} could not be read as a torch.save dict of tensors (damaged, "
                               f"or another format)") from None
        raise XsBasesError(f"SVD bases file {path} holds Python objects besides tensors and plain containers; they "
                           f"are not loaded (unpickling them could run code)") from None
    except Exception as e:  # a truncated file, another format
        raise XsBasesError(f"SVD bases file {path} could not be read as a torch.save dict of tensors: "
                           f"{type(e).__name__}: {e}") from None
    if not isinstance(data, dict):
        raise XsBasesError(f"SVD bases file {path} holds a {type(data).__name__}, not {{weight key: {{'U', 'V'}}}}")
    out = {}
    for key, entry in data.items():
        if not (isinstance(key, str) and key.startswith(("model.", "conditioner."))):
            continue  # the official loader reads these two prefixes only
        u, v = (entry.get("U"), entry.get("V")) if isinstance(entry, dict) else (None, None)
        if not (torch.is_tensor(u) and torch.is_tensor(v) and u.dim() == 2 and v.dim() == 2
                and u.shape[1] == v.shape[1]):
            raise XsBasesError(f"SVD bases file {path}: {key} needs 'U' [out, k] and 'V' [in, k] tensors")
        out[key] = (u.float(), v.float())
    if not out:
        raise XsBasesError(f"SVD bases file {path} has no 'model.*' or 'conditioner.*' entries")
    return out


def write_svd_bases_file(path: Path, weights: Iterable[tuple[str, Tensor]], columns: int) -> Path:
    """Bases of each (checkpoint key, W) to an official-format file: {key: {"U": fp32 [out, k], "V": fp32 [in, k],
    "S": fp32 [k], "shape": [...]}} with k = min(columns, out, in), signs canonical; any -xs rank up to k can use
    it. weights may be a generator (one weight in memory at a time). Written to a temp file and renamed."""
    path = Path(path)
    data = {}
    for key, w in weights:
        w2 = w.detach().reshape(w.shape[0], -1).cpu().float()
        u, s, vh = torch.linalg.svd(w2, full_matrices=False)
        k = min(columns, s.shape[0])
        u, v = _canonical(u, vh)
        data[key] = {"U": u[:, :k].contiguous(), "V": v[:, :k].contiguous(), "S": s[:k].contiguous(),
                     "shape": list(w.shape)}
    tmp = path.with_name(path.name + ".partial")
    torch.save(data, tmp)
    tmp.replace(path)
    return path


class XsBasesSource:
    """Where an -xs adapter's bases come from for one model, other than that model's own weights: an SVD bases file
    (`file`) or the base checkpoint of the same pack (`base_checkpoint`, a safetensors file in the official layout).
    Both are read lazily, once."""

    def __init__(self, *, file: Path | None = None, base_checkpoint: Path | None = None, origin: str = ""):
        if (file is None) == (base_checkpoint is None):
            raise ValueError("give one of file and base_checkpoint")
        self.file = None if file is None else Path(file)
        self.base_checkpoint = None if base_checkpoint is None else Path(base_checkpoint)
        self.origin = origin  # where the file was named (e.g. "svd_bases_path in .../model_config.json")
        self._file_bases: dict[str, tuple[Tensor, Tensor]] | None = None
        self._checkpoint = None  # sa3.loading.SafetensorsFile of base_checkpoint: its header parsed once
        self._lock = threading.Lock()

    def _base_file(self):
        from ..sa3.loading import SafetensorsFile

        with self._lock:
            if self._checkpoint is None:
                self._checkpoint = SafetensorsFile(self.base_checkpoint)
            return self._checkpoint

    def describe(self) -> str:
        if self.file is not None:
            return f"the SVD bases file {self.file}" + (f" ({self.origin})" if self.origin else "")
        return f"the base model {self.base_checkpoint.parent}"

    def base_weight(self, layer: str) -> Tensor | None:
        """The base checkpoint's weight of a layer (None: not in it, or this source is a file)."""
        if self.base_checkpoint is None:
            return None
        checkpoint, key = self._base_file(), bases_file_key(layer)
        return checkpoint.read(key) if key in checkpoint.shapes else None

    def fingerprint(self, layers: list[str]) -> str | None:
        """`files.weights_fingerprint` of the base checkpoint's weights of these layers (those it has), read one at a
        time, and kept per (file, its size and time, layers): an ARC model loaded anew for each demo round asks
        again; None for a file source (it holds no weights)."""
        if self.base_checkpoint is None:
            return None
        from .files import weights_fingerprint

        st = self.base_checkpoint.stat()
        key = (str(self.base_checkpoint), st.st_mtime_ns, st.st_size, tuple(sorted(layers)))
        with _lock:
            known = _fingerprints.get(key)
        if known is not None:
            return known
        present = self._base_file().shapes
        here = [layer for layer in layers if bases_file_key(layer) in present]
        found = weights_fingerprint(_LazyWeights(self, here))
        with _lock:
            _fingerprints[key] = found
        return found

    def bases(self, layer: str, rank: int, shape: tuple[int, int]) -> tuple[Tensor, Tensor] | None:
        """(U [out, rank], V [in, rank]) for a layer whose weight is viewed as shape = (out, in); None when this
        source has no such layer. A file entry of another shape or with fewer than rank columns is an error."""
        if self.base_checkpoint is not None:
            w = self.base_weight(layer)
            if w is None or tuple(w.reshape(w.shape[0], -1).shape) != tuple(shape):
                return None
            return svd_bases(w, rank)
        with self._lock:
            if self._file_bases is None:
                self._file_bases = _bases_file_cached(self.file)
        key = bases_file_key(layer)
        entry = self._file_bases.get(key)
        if entry is None:
            return None
        u, v = entry
        if (u.shape[0], v.shape[0]) != tuple(shape):
            raise XsBasesError(f"SVD bases file {self.file}: {key} has bases for a [{u.shape[0]}, {v.shape[0]}] "
                               f"weight, the model's is {list(shape)}: the file is for another model")
        if u.shape[1] < rank:
            raise XsBasesError(f"SVD bases file {self.file}: {key} holds {u.shape[1]} basis vectors; this adapter "
                               f"has rank {rank} (write the file with more columns)")
        return u[:, :rank].clone(), v[:, :rank].clone()


class _LazyWeights(Mapping):
    """layer -> the base checkpoint's weight, read when asked and not kept (a whole DiT would not fit twice)."""

    def __init__(self, source: XsBasesSource, layers: list[str]):
        self.source, self.layers = source, layers

    def __getitem__(self, layer: str) -> Tensor:
        return self.source.base_weight(layer)

    def __iter__(self):
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)


_fingerprints: dict[tuple, str] = {}  # (base checkpoint, mtime, size, layers) -> fingerprint
_bases_files: OrderedDict[tuple, dict] = OrderedDict()  # (file, mtime, size) -> read_svd_bases_file's, newest last


def _bases_file_cached(path: Path) -> dict[str, tuple[Tensor, Tensor]]:
    """`read_svd_bases_file`, kept for the last few files (an ARC model loaded anew each demo round names the same
    file each time)."""
    try:
        st = Path(path).stat()
    except OSError:
        return read_svd_bases_file(path)  # says what is wrong with it
    key = (str(path), st.st_mtime_ns, st.st_size)
    with _lock:
        known = _bases_files.get(key)
    if known is None:
        known = read_svd_bases_file(path)
        with _lock:
            _bases_files[key] = known
            while len(_bases_files) > 4:
                _bases_files.popitem(last=False)
    return known


def xs_bases_source_for(model) -> XsBasesSource | None:
    """The bases source of an SA3 model (anything with `.config.raw`, `.config.is_arc` and `.source`): the file its
    config names in `svd_bases_path` (relative to the config's folder, else as given), else for an ARC model in the
    packs' layout (`<name>/arc/`) the complete `<name>/base/` beside it, else None (its own weights)."""
    config = getattr(model, "config", None)
    source = Path(getattr(model, "source", None) or ".")
    folder = source if source.is_dir() else source.parent
    named = (getattr(config, "raw", None) or {}).get("svd_bases_path")
    if named:
        path = Path(named).expanduser()
        if not path.is_absolute() and (folder / path).exists():
            path = folder / path
        return XsBasesSource(file=path, origin=f"svd_bases_path in {folder / 'model_config.json'}")
    if getattr(config, "is_arc", False) and source.is_dir() and source.name == "arc":
        base = source.parent / "base"
        from ..sa3.packs import is_complete

        if is_complete(base):
            return XsBasesSource(base_checkpoint=base / "model.safetensors")
    return None


__all__ = ["CACHE_BYTES", "XsBasesError", "XsBasesSource", "bases_file_key", "clear_cache", "compute_svd_bases",
           "read_svd_bases_file", "svd_bases", "write_svd_bases_file", "xs_bases_source_for"]
