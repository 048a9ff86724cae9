"""The frozen SVD bases of the -xs adapter types: U [out, r], V [in, r], the top-r singular vectors of a base
weight from an fp32 CPU SVD with the reference's sign convention (the largest-|.| entry of each U column positive),
so the bases are bit-identical to the reference's on the same LAPACK.

Why a cache: the full SVD of a real-size layer costs seconds (a [1024, 4096] weight ~5-10 s on 2 CPU threads) and a
model has ~100 adapted layers, yet the bases depend only on the frozen weight. A generation, a training start, each
round of ARC demos (the ARC model is loaded anew for each round) and an export all ask for the same ones. Entries are
found by the weight tensor itself (unchanged in place) or else by its content (shape, dtype and a BLAKE2 digest of
its bytes: ~10 ms for a 16 MB weight), and the cache keeps the most recently used bases up to CACHE_BYTES.
"""

from __future__ import annotations

import hashlib
import threading
import weakref
from collections import OrderedDict

import torch
from torch import Tensor

CACHE_BYTES = 512 << 20  # about 2-3 real models' worth of rank-16 bases

_by_content: OrderedDict[tuple, tuple[Tensor, Tensor]] = OrderedDict()  # (digest, shape, dtype, rank) -> (U, V)
_by_tensor: dict[int, tuple[weakref.ref, int, tuple]] = {}  # id(w) -> (ref, w._version, content key)
_lock = threading.Lock()


def compute_svd_bases(w: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """(U [out, r], V [in, r]) in fp32 on the CPU for a weight of any shape (viewed [out, in]); uncached."""
    u, _, vh = torch.linalg.svd(w.reshape(w.shape[0], -1).detach().cpu().float(), full_matrices=False)
    peak = u.abs().argmax(dim=0)
    signs = u[peak, torch.arange(u.shape[1])].sign()
    signs[signs == 0] = 1
    u, vh = u * signs[None, :], vh * signs[:, None]
    return u[:, :rank].contiguous(), vh[:rank, :].T.contiguous()


def _content_key(w: Tensor, rank: int) -> tuple:
    data = w.detach().cpu().contiguous()
    digest = hashlib.blake2b(data.view(torch.uint8).reshape(-1).numpy(), digest_size=20).hexdigest()
    return digest, tuple(w.shape), str(w.dtype), rank


def _remember(key: tuple, bases: tuple[Tensor, Tensor]) -> None:
    _by_content[key] = bases
    _by_content.move_to_end(key)
    total = sum(u.nbytes + v.nbytes for u, v in _by_content.values())
    while total > CACHE_BYTES and len(_by_content) > 1:
        _, (u, v) = _by_content.popitem(last=False)
        total -= u.nbytes + v.nbytes


def _forget_tensor(key: int) -> None:
    with _lock:
        entry = _by_tensor.get(key)
        if entry is not None and entry[0]() is None:
            del _by_tensor[key]


def svd_bases(w: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """`compute_svd_bases`, cached (module docstring); the returned tensors are the caller's own copies."""
    with _lock:
        seen = _by_tensor.get(id(w))
        key = seen[2] if seen is not None and seen[0]() is w and seen[1] == w._version and seen[2][3] == rank else None
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
    tensor_id = id(w)
    try:
        ref = weakref.ref(w, lambda _: _forget_tensor(tensor_id))
        with _lock:
            _by_tensor[tensor_id] = (ref, w._version, key)
    except TypeError:  # not weak-referenceable: found by content next time
        pass
    return hit[0].clone(), hit[1].clone()


__all__ = ["CACHE_BYTES", "compute_svd_bases", "svd_bases"]
