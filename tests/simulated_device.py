"""A CUDA or MPS device simulated on the CPU, to run GPU code paths on a machine without a GPU.

`Sim` wraps a CPU tensor and reports `.device` as cuda:0 / mps:0 (so device checks, `x.device.type` branches and
CUDA autocast see a GPU); `simulate(device)` computes every op on the wrapped CPU data and records what would fail
on the real device:
- DEVICE-MIX: an op given both a device tensor and a CPU tensor with dimensions (CUDA and MPS raise);
- CPU-GENERATOR-ON-DEVICE: a CPU torch.Generator drawing a device tensor (raises: wrong generator device);
- FLOAT64-ON-MPS: a float64 tensor on MPS (Metal has no float64);
- NUMPY-OF-DEVICE-TENSOR: `.numpy()` of a device tensor (raises: needs `.cpu()` first);
- MPS-UNSUPPORTED: an op MPS does not run for that dtype (MPS_INT64_UNSUPPORTED: scatter_reduce on int64 before
  macOS 15).
It cannot run autograd's backward on device tensors; forward passes (under no_grad) and inference are covered.
"""

from __future__ import annotations

import collections
import contextlib
import os
import traceback
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

MPS_INT64_UNSUPPORTED = {"aten.scatter_reduce.two", "aten.scatter_reduce_.two"}
PACK = str(Path(__file__).resolve().parents[1]) + os.sep  # this checkout: its frames locate a finding
COPY_OPS = {"aten._to_copy.default", "aten.copy_.default", "aten.lift_fresh.default", "aten.set_.source_Tensor",
            "aten._has_compatible_shallow_copy_type.default"}  # the last: Module.to's type check, computes nothing


class Findings(collections.Counter):
    """(kind, op, innermost lines of this pack) -> count."""

    def note(self, kind: str, op) -> None:
        frames = [f for f in traceback.extract_stack() if "sa3_lora_studio" in f.filename or f.filename.startswith(PACK)]
        frames = [f for f in frames if "/tests/" not in f.filename]
        self[(kind, str(op), " <- ".join(f"{f.filename.rsplit('/', 2)[-2]}/{f.filename.rsplit('/', 1)[-1]}:{f.lineno}"
                                          for f in frames[-3:][::-1]))] += 1


class Sim(torch.Tensor):
    """A CPU tensor (`inner`) that says it lives on the simulated device."""

    device_now = torch.device("cuda", 0)

    @staticmethod
    def __new__(cls, inner: torch.Tensor):
        r = torch.Tensor._make_wrapper_subclass(cls, inner.shape, strides=inner.stride(),
                                                storage_offset=inner.storage_offset(), dtype=inner.dtype,
                                                layout=inner.layout, device=Sim.device_now,
                                                requires_grad=inner.requires_grad)
        r.inner = inner
        return r

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __repr__(self):
        return f"Sim({self.inner!r})"

    def item(self):
        return self.inner.item()

    def tolist(self):
        return self.inner.tolist()

    def __float__(self):
        return float(self.inner)

    def __int__(self):
        return int(self.inner)

    def __bool__(self):
        return bool(self.inner)

    def __index__(self):
        return self.inner.__index__()

    def __format__(self, spec):
        return self.inner.__format__(spec)

    def numpy(self, *args, **kwargs):
        _FINDINGS.note("NUMPY-OF-DEVICE-TENSOR", "Tensor.numpy")
        return self.inner.numpy(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return NotImplemented


_FINDINGS = Findings()


def _unwrap(a):
    return a.inner if isinstance(a, Sim) else a


def _on_sim(device) -> bool:
    return device is not None and torch.device(device).type == Sim.device_now.type


def _wrap(o):
    if isinstance(o, torch.Tensor) and not isinstance(o, Sim):
        if Sim.device_now.type == "mps" and o.dtype == torch.float64:
            _FINDINGS.note("FLOAT64-ON-MPS", "a result")
        with torch.inference_mode(False):
            return Sim(o)
    return o


class _Dispatch(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        flat = tree_flatten((args, kwargs))[0]
        sims = [a for a in flat if isinstance(a, Sim)]
        cpus = [a for a in flat if isinstance(a, torch.Tensor) and not isinstance(a, Sim)]
        name = str(func)
        out_on_sim = _on_sim(kwargs["device"]) if kwargs.get("device") is not None else bool(sims)
        if sims and any(c.dim() > 0 for c in cpus) and name not in COPY_OPS and "index" not in name:
            _FINDINGS.note("DEVICE-MIX", func)
        generator = kwargs.get("generator")
        if generator is not None and generator.device.type == "cpu" and out_on_sim:
            _FINDINGS.note("CPU-GENERATOR-ON-DEVICE", func)
        if Sim.device_now.type == "mps" and name in MPS_INT64_UNSUPPORTED and sims and sims[0].dtype == torch.int64:
            _FINDINGS.note("MPS-UNSUPPORTED", func)
        if _on_sim(kwargs.get("device")):
            kwargs["device"] = torch.device("cpu")
        out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
        returns = func._schema.returns
        if (returns and returns[0].alias_info is not None and returns[0].alias_info.is_write and args
                and isinstance(args[0], Sim)):
            return args[0]  # an in-place op returns its (simulated) self
        return tree_map(_wrap, out) if out_on_sim else out


def _to_args(args, kwargs):
    device, dtype = kwargs.get("device"), kwargs.get("dtype")
    for a in args:
        if isinstance(a, torch.Tensor):
            device, dtype = a.device, a.dtype
        elif isinstance(a, torch.dtype):
            dtype = a
        elif isinstance(a, (str, torch.device)):
            device = a
    return (None if device is None else torch.device(device)), dtype


class _Functions(TorchFunctionMode):
    """Moves between the CPU and the simulated device, factories that name it, and indexing of simulated tensors."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.to:
            source, *rest = args
            device, dtype = _to_args(rest, kwargs)
            inner = _unwrap(source)
            to_sim = _on_sim(device) if device is not None else isinstance(source, Sim)
            with torch._C.DisableTorchFunction():
                out = inner.to(dtype=dtype or inner.dtype, copy=kwargs.get("copy", False))
            if out is inner and to_sim == isinstance(source, Sim):
                return source
            if not to_sim:
                return out
            return _wrap(out if out is not inner else (inner.detach() if not inner.requires_grad else inner.view_as(inner)))
        if func in (torch.as_tensor, torch.asarray) and args and isinstance(args[0], torch.Tensor):
            device = kwargs.get("device") or args[0].device
            return self.__torch_function__(torch.Tensor.to, types, (args[0],),
                                           {"device": device, "dtype": kwargs.get("dtype") or args[0].dtype})
        if func in (torch.tensor, torch.as_tensor, torch.asarray) and _on_sim(kwargs.get("device")):
            kwargs["device"] = "cpu"
            with torch._C.DisableTorchFunction():
                return _wrap(func(*args, **kwargs))
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and any(
                isinstance(a, Sim) for a in tree_flatten((args, kwargs))[0]):
            target = args[0]
            with torch._C.DisableTorchFunction():
                if func is torch.Tensor.__setitem__:
                    value = args[2]
                    if isinstance(target, Sim) and isinstance(value, torch.Tensor) and not isinstance(value, Sim) \
                            and value.dim() > 0:
                        _FINDINGS.note("DEVICE-MIX", "setitem of a CPU tensor")
                    _unwrap(target).__setitem__(tree_map(_unwrap, args[1]), _unwrap(value))
                    return None
                out = _unwrap(target).__getitem__(tree_map(_unwrap, args[1]))
            return _wrap(out) if isinstance(target, Sim) else out
        try:
            return func(*args, **kwargs)
        except RuntimeError as e:  # a CUDA-only op path of torch itself (no CUDA build here): compute on the CPU
            if not any(isinstance(a, Sim) for a in tree_flatten((args, kwargs))[0]) or \
                    ("not linked with support" not in str(e) and "unexpected device type" not in str(e)):
                raise
            with torch._C.DisableTorchFunction():
                return tree_map(_wrap, func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs)))


@contextlib.contextmanager
def simulate(device: str = "cuda"):
    """Run the body as if `device` ("cuda" or "mps") were there; yields the Findings (empty = nothing would fail).
    Move models with `module.to(device)` inside the body."""
    Sim.device_now = torch.device(device, 0)
    _FINDINGS.clear()
    overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)  # module.to() must hold Sim parameters
    lazy_init = torch.cuda._lazy_init
    torch.cuda._lazy_init = lambda: None  # CUDA autocast asks for it
    try:
        with _Functions(), _Dispatch():
            yield _FINDINGS
    finally:
        torch.cuda._lazy_init = lazy_init
        torch.__future__.set_overwrite_module_params_on_conversion(overwrite)
