"""Applying adapters to a SHARED base model without changing what anyone else computes.

Design (measured in bench/adapters.py): `AdaptedModel(tree, uses)` builds a *view* of the module tree: the modules on
the paths to adapted layers are shallow copies (no tensor is copied; every parameter and buffer is the base's own
object), and each adapted Linear/Conv1d is replaced, in the view only, by an `AdaptedLayer` that holds the adapters'
tensors and computes with the base weight. The base tree is never touched, so other users (other nodes, threads, a
training run) keep computing the base model, and dropping the view is the unmerge: the base weights are bit-identical
by construction. Three ways to compute an adapted layer:

- "merged" (inference default): the chained effective weight is formed once into a private tensor per layer and
  re-formed only for the layers whose adapter state (enabled, strength) changed, e.g. at an interval boundary.
  Per-step cost equals the base model's; memory is one private copy per adapted weight.
- "parametrized": recompute the chain at every forward, as the reference's torch parametrizations do (the
  reference path, for tests and the benchmark).
- "factored" (training default): a Linear's output as (x∘c)·Wᵀ + s·((x∘c)·Aᵀ)·Bᵀ, times d, never forming W + s·BA;
  the DoRA/BoRA row/column factors come from cached ‖W‖² and r-sized products (`maths.row_col_scales`). Earlier
  adapters of a stack are merged into a private base for the last one. Conv1d layers form their weight.

Two ways to run it: call the view (`stack.module(...)`, e.g. for training: robust under gradient checkpointing, whose
backward may run on other threads), or route the shared tree itself in the current thread/context only
(`with stack: model.dit(...)`, what generate() uses; other threads still compute the base). The routing is installed
once per base layer by switching it to a dispatching subclass of its class; with no active stack it computes exactly
the base layer. Measured (bench/adapters.py, tiny DiT, CPU time per step): merged 1.00x for 1 and 3 DoRA adapters,
the reference-style recompute 2.2x / 4.0x.

The view's `state_dict()` keys are the reference's parametrized keys (`<layer>.parametrizations.weight.original`,
`<layer>.parametrizations.weight.<i>.lora_A`, ...), so an optimiser or a saver sees the official names.

Gating follows the reference: adapter i on a *gated* layer (the DiT; not the seconds conditioner) is on iff
lo <= sigma <= hi (sigma = t of the first batch item) and, here also, step >= skip_first_steps; among enabled
adapters the layer filter (comma-separated lower-cased substrings with bracket ranges) disables matching layers.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..sa3.fast_linear import frozen_linear
from . import notices
from .files import LoadedAdapter, weights_fingerprint
from .maths import (
    BaseProducts,
    adapter_scale,
    base_products,
    check_adapter_type,
    delta_sq_norm,
    effective_weight,
    factored_linear,
    init_tensors,
    row_col_scales,
    svd_bases,
    tensor_names,
)
from .targets import TARGET_TYPES, filter_matches, parse_layer_filter, resolve_patterns, runs_into_a_number, select_targets
from .xs_bases import XsBasesSource, xs_bases_source_for

MODES = ("merged", "parametrized", "factored")


class AdapterMismatch(ValueError):
    """An adapter that does not fit the model it is applied to."""


@dataclass(frozen=True)
class Root:
    """A sub-module of the tree that adapter files address. path: where it is in the tree ("" = the tree itself);
    layer paths in files are relative to it. gated: interval/step gating and the layer filter act on its layers
    (the reference gates the DiT's layers, not the conditioner's). filter_strip: prefix removed from a layer path
    before layer-filter matching (the reference matches names relative to the DiffusionTransformer)."""

    path: str = ""
    gated: bool = True
    filter_strip: str = ""


@dataclass
class AdapterUse:
    """One adapter in a stack with its runtime controls. interval: (lo, hi) over sigma in [0, 1], inclusive;
    skip_first_steps: the adapter is off for sampling steps 0..N-1 (gated layers only)."""

    adapter: LoadedAdapter
    strength: float = 1.0
    interval: tuple[float, float] = (0.0, 1.0)
    skip_first_steps: int = 0
    layer_filter: str = ""

    def active_at(self, sigma: float | None, step: int | None) -> bool:
        if sigma is not None and not (self.interval[0] <= sigma <= self.interval[1]):
            return False
        return step is None or step >= self.skip_first_steps


@dataclass
class ApplyReport:
    """What applying a stack did: per adapter the number of layers applied and the file's layers that matched
    nothing, plus warnings (also issued through `notices.warn`)."""

    applied: list[int] = field(default_factory=list)
    unmatched: list[list[str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # e.g. where -xs bases came from when not the weights themselves

    def summary(self) -> str:
        parts = [f"adapter {i}: {n} layers" + (f", {len(u)} unmatched" if u else "")
                 for i, (n, u) in enumerate(zip(self.applied, self.unmatched))]
        return "; ".join(parts)


def skip_steps_interval(sigmas: Sequence[float] | Tensor, n_skip: int) -> tuple[float, float]:
    """A sigma interval that turns an adapter off for the first n_skip steps of a monotonically falling schedule
    (sigmas[i] is used at step i): (0, sigmas[n_skip]). For schedules that rise again (re-anchored first step) use
    `AdapterUse.skip_first_steps`, which counts steps."""
    sigmas = [float(s) for s in sigmas]
    if n_skip <= 0:
        return (0.0, 1.0)
    if n_skip >= len(sigmas) - 1:
        return (0.0, -1.0)  # never on
    return (0.0, sigmas[n_skip])


# ---------------------------------------------------------------------------------------------------- per layer

class AdapterSlot(nn.Module):
    """One adapter on one layer: its tensors under the reference's names (lora_A, lora_B, M_xs, magnitude...;
    -xs bases U, V as buffers) and its runtime state."""

    def __init__(self, adapter_type: str, alpha: float, rank: int, tensors: dict[str, Tensor], trainable: bool,
                 use_index: int = 0, layer: str = ""):
        super().__init__()
        self.adapter_type, self.alpha, self.rank = adapter_type, alpha, rank
        self.use_index, self.layer = use_index, layer  # which adapter of the stack; layer path as in its file
        self.trainable = trainable
        for name in tensor_names(adapter_type):
            value = tensors[name]
            if trainable:
                self.register_parameter(name, nn.Parameter(value.detach().float().clone(), requires_grad=True))
            else:
                self.register_buffer(name, value, persistent=True)
        if "U" in tensors:
            self.register_buffer("U", tensors["U"], persistent=True)
            self.register_buffer("V", tensors["V"], persistent=True)
        self.strength = 1.0
        self.enabled = True
        self.dropout_p = 0.0  # LoRA dropout (low-rank types only), active only via AdaptedModel.set_training(True)
        self.dropout_mask: Tensor | None = None  # [1, in] kept/(1-p) or 0 per input feature, for the current step
        self.detach_norm = False  # DoRA/BoRA training option: the norms get no gradient (adapters/fused.py)

    def tensors(self) -> dict[str, Tensor]:
        names = tensor_names(self.adapter_type) + (("U", "V") if self.adapter_type.endswith("-xs") else ())
        t = {n: getattr(self, n) for n in names}
        if self.dropout_mask is not None and "lora_A" in t:  # the reference's LoRA dropout: input features of A
            t["lora_A"] = t["lora_A"] * self.dropout_mask
        return t

    def draw_dropout_mask(self, generator: torch.Generator | None) -> None:
        """This step's LoRA dropout mask (none without dropout): whole input features of A dropped and the rest
        scaled by 1/(1-p), as the reference's dropout on A's input. Drawn once and kept, so a block recomputed by
        gradient checkpointing uses the same mask, whatever other threads draw from the global generator."""
        if self.dropout_p <= 0 or "lora_A" not in tensor_names(self.adapter_type):
            self.dropout_mask = None
            return
        a = self.lora_A
        keep = torch.rand(1, a.shape[1], generator=generator) >= self.dropout_p
        self.dropout_mask = (keep.to(a.dtype) / (1 - self.dropout_p)).to(a.device)

    def scale(self) -> Tensor:
        return adapter_scale(self.alpha, self.rank, self.strength)

    def state_key(self) -> tuple:
        return (self.enabled, self.strength)


class _Chain(nn.ModuleList):
    """`parametrizations.weight`: the base weight as `original` (the base's own Parameter) and the slots in order."""

    def __init__(self, original: nn.Parameter, slots: list[AdapterSlot]):
        super().__init__(slots)
        self.original = original


class AdaptedLayer(nn.Module):
    """A Linear/Conv1d of the view: the base layer's weight and bias (shared, never written) plus a chain of
    adapter slots. Unknown attributes (in_features, kernel_size, ...) are read from the base layer."""

    def __init__(self, base: nn.Module, slots: list[AdapterSlot], mode: str, streamed: bool = False):
        super().__init__()
        object.__setattr__(self, "_base", base)  # not a submodule: its tensors are registered below under official names
        self.parametrizations = nn.ModuleDict({"weight": _Chain(base.weight, slots)})
        self._parameters["bias"] = base.bias  # shared (or None); set directly: the name also exists on the base
        self.mode = mode
        self.streamed = streamed  # the base weight is lent per forward (sa3/host_streaming.py): keep no W-sized cache
        self._merged: Tensor | None = None
        self._merged_key: tuple | None = None
        self._ready: Tensor | None = None  # merged mode: the weight valid for the current state (fast path)
        self._is_conv = isinstance(base, nn.Conv1d)
        self._base_products: BaseProducts | None = None  # of the frozen part (the prefix), for the last slot
        self._products_key: tuple | None = None  # the prefix's state they were computed for
        self._scales, self._scales_key = None, None  # factored inference: the last slot's renorm factors (d, c)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_base"), name)

    @property
    def slots(self) -> list[AdapterSlot]:
        return list(self.parametrizations["weight"])

    @property
    def original(self) -> Tensor:
        return self.parametrizations["weight"].original

    @property
    def weight(self) -> Tensor:
        """The effective weight (merged cache or recomputed)."""
        return self._effective_weight(len(self.slots))

    def state_key(self) -> tuple:
        return tuple(s.state_key() for s in self.slots)

    def _chain(self, w: Tensor, slots: Sequence[AdapterSlot]) -> Tensor:
        for s in slots:
            if s.enabled:
                w = effective_weight(w, s.adapter_type, s.tensors(), s.scale(), s.detach_norm)
        return w

    def _effective_weight(self, n_slots: int) -> Tensor:
        """The chain over the first n_slots slots; merged mode caches the full chain without autograd."""
        w = self.original.detach()
        if n_slots == 0:  # never cached: a model streaming its blocks lends W anew at every forward (sa3/sibling.py)
            return w
        if self.mode == "merged" and n_slots == len(self.slots):
            key = self.state_key()
            if self._merged is None or self._merged_key != key:
                with torch.no_grad():
                    self._merged = self._chain(w, self.slots[:n_slots])
                self._merged_key = key
            self._ready = self._merged
            return self._merged
        if self.mode == "factored" and n_slots < len(self.slots) and not self.streamed:  # a stack's prefix: cached
            key = tuple(s.state_key() for s in self.slots[:n_slots])
            if self._merged is None or self._merged_key != key:
                with torch.no_grad():
                    self._merged = self._chain(w, self.slots[:n_slots])
                self._merged_key = key
            return self._merged
        return self._chain(w, self.slots[:n_slots])

    def remerge(self) -> bool:
        """Re-form the merged weight if the adapter state changed; True if it did. Slot states are changed only
        through `AdaptedModel.update` / `set_strength`, which call this, so the forward can trust `_ready`."""
        if self.mode != "merged" or self._merged_key == self.state_key():
            return False
        self._ready = None
        self._effective_weight(len(self.slots))
        return True

    def unmerge(self) -> None:
        """Drop the private merged weight (the base weight was never modified)."""
        self._merged, self._merged_key, self._base_products, self._ready = None, None, None, None
        self._products_key = None
        self._scales, self._scales_key = None, None

    def static_weight(self) -> Tensor | None:
        """The merged effective weight when this layer is static in merged mode (the fast path), else None. Lets a
        caller with its own matmul kernel (e.g. the DiT's oneDNN path) compute `x·Wᵀ + bias` for a routed layer."""
        return self._ready if self.mode == "merged" else None

    def forward(self, x: Tensor) -> Tensor:
        ready = self._ready
        if ready is not None and self.mode == "merged":  # the static case: exactly the base layer's cost
            bias = self._parameters["bias"]
            return self._base._conv_forward(x, ready, bias) if self._is_conv else frozen_linear(x, ready, bias)
        base = object.__getattribute__(self, "_base")
        slots = self.slots
        if self.mode == "factored" and isinstance(base, nn.Linear) and slots and slots[-1].enabled:
            w = self._effective_weight(len(slots) - 1)
            last = slots[-1]
            t = last.tensors()
            prefix_key = tuple(s.state_key() for s in slots[:-1])
            if self._base_products is None or self._products_key != prefix_key:  # the prefix is what they describe
                with torch.no_grad():
                    self._base_products = base_products(w.reshape(w.shape[0], -1), last.adapter_type, t)
                self._products_key = prefix_key
            scales = None
            if not last.trainable and not torch.is_grad_enabled():  # frozen tensors: the renorm factors are constant
                key = self.state_key()
                if self._scales_key != key:
                    self._scales = row_col_scales(w, last.adapter_type, t, last.scale(), self._base_products)
                    self._scales_key = key
                scales = self._scales
            return factored_linear(x, w, self.bias, last.adapter_type, t, last.scale(), self._base_products,
                                   last.detach_norm, scales)
        w = self._effective_weight(len(slots))
        if isinstance(base, nn.Conv1d):
            return base._conv_forward(x, w, self.bias)
        return frozen_linear(x, w, self.bias)  # oneDNN for a weight without gradient, as the base layers compute


# ---------------------------------------------------------------------------------------------------- dispatch

# Within `AdaptedModel.activate()`, calls to a base Linear/Conv1d in THIS thread/context are routed to its adapted
# layer; everywhere else the base layer computes exactly what it always did. The routing is installed once per base
# layer by switching its class to a dispatching subclass (as torch's parametrize does): isinstance checks, state_dict
# keys, deepcopy (a copy has another id, so it is never routed) and pickling are unaffected.
_ACTIVE: contextvars.ContextVar[dict[int, nn.Module] | None] = contextvars.ContextVar("sa3_active_adapters",
                                                                                       default=None)
_INSTALL_LOCK = threading.Lock()


class _Dispatch:
    def routed_layer(self):
        """The adapted layer this module is routed to in the current thread/context, or None (computes itself)."""
        active = _ACTIVE.get()
        return active.get(id(self)) if active is not None else None

    def forward(self, *args, **kwargs):
        active = _ACTIVE.get()
        if active is not None:
            layer = active.get(id(self))
            if layer is not None:
                return layer.forward(*args, **kwargs)  # (skips __call__: the view's layers carry no hooks)
        return super().forward(*args, **kwargs)


class DispatchLinear(_Dispatch, nn.Linear):
    """An nn.Linear that an active adapter context may route to its adapted layer."""


class DispatchConv1d(_Dispatch, nn.Conv1d):
    """An nn.Conv1d that an active adapter context may route to its adapted layer."""


_DISPATCH_CLASSES: dict[type, type] = {nn.Linear: DispatchLinear, nn.Conv1d: DispatchConv1d}


def _install_dispatch(module: nn.Module) -> None:
    with _INSTALL_LOCK:
        cls = type(module)
        if issubclass(cls, _Dispatch):
            return
        if cls not in _DISPATCH_CLASSES:  # a subclass of Linear/Conv1d: make (and cache) a routing subclass of it
            _DISPATCH_CLASSES[cls] = type(f"Dispatch{cls.__name__}", (_Dispatch, cls), {})
        module.__class__ = _DISPATCH_CLASSES[cls]


# ---------------------------------------------------------------------------------------------------- the view

def _shallow_copy(module: nn.Module) -> nn.Module:
    """A new module object sharing every tensor and child with `module`; its own child/parameter/buffer tables."""
    new = module.__class__.__new__(module.__class__)
    new.__dict__ = dict(module.__dict__)
    for table in ("_modules", "_parameters", "_buffers"):
        new.__dict__[table] = type(module.__dict__[table])(module.__dict__[table])
    return new


def _view(module: nn.Module, replacements: dict[str, nn.Module]) -> nn.Module:
    """A view of `module` with the descendants at the given dotted paths replaced (paths relative to module)."""
    if "" in replacements:
        return replacements[""]
    new = _shallow_copy(module)
    by_child: dict[str, dict[str, nn.Module]] = {}
    for path, repl in replacements.items():
        head, _, rest = path.partition(".")
        by_child.setdefault(head, {})[rest] = repl
    for head, sub in by_child.items():
        new._modules[head] = _view(module._modules[head], sub)
    return new


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def find_layer(tree: nn.Module, layer: str, roots: Sequence[Root]) -> tuple[str, nn.Module | None, Root]:
    """(full path, module, root) of an adapter file's layer in tree: the first root under which it is a
    Linear/Conv1d; ("", None, roots[0]) when none has it."""
    for root in roots:
        full = _join(root.path, layer)
        try:
            module = tree.get_submodule(full)
        except AttributeError:
            continue
        if isinstance(module, TARGET_TYPES):
            return full, module, root
    return "", None, roots[0]


def check_coverage(adapter: LoadedAdapter, name: str, applied: int, unmatched: list[str]) -> None:
    """AdapterMismatch when too few of an adapter's layers exist in the model to apply it: none, or fewer than the
    missing ones (e.g. only the conditioner's layer found: the DiT would stay as it is)."""
    if applied == 0:
        raise AdapterMismatch(
            f"{name}: none of its {len(adapter.layers)} layers (e.g. {next(iter(adapter.layers), '?')}) exists in "
            f"this model; it is for another model or another key layout")
    if len(unmatched) > applied:
        raise AdapterMismatch(
            f"{name}: only {applied} of its {len(adapter.layers)} layers exist in this model (missing e.g. "
            f"{unmatched[0]}): it is for another model, or its keys use another layout (SA3-native keys "
            f"start with 'model.' for the DiT and 'conditioners.' for the conditioner)")


def check_adapter_fits(tree: nn.Module, adapter: LoadedAdapter, name: str, roots: Sequence[Root]) -> list[str]:
    """The checks applying an adapter makes, without applying it (tree's weights may be on the meta device: shapes
    are what counts): each found layer's shapes (`check_layer_shapes`) and the coverage (`check_coverage`).
    Returns the layers that matched nothing."""
    unmatched, applied = [], 0
    for layer in adapter.layers:
        module = find_layer(tree, layer, roots)[1]
        if module is None:
            unmatched.append(layer)
            continue
        check_layer_shapes(layer, module, adapter, name)
        applied += 1
    check_coverage(adapter, name, applied, unmatched)
    return unmatched


def check_layer_shapes(layer: str, module: nn.Module, adapter: LoadedAdapter, name: str) -> None:
    """The adapter's tensors must fit the layer's 2-D weight view [out, in]; error names the first bad layer."""
    out_f, in_f = module.weight.shape[0], module.weight[0].numel()
    t, r = adapter.layers[layer], adapter.rank
    expect = {"lora_A": (r, in_f), "lora_B": (out_f, r), "M_xs": (r, r), "magnitude_r": (out_f,),
              "magnitude_c": (in_f,)}
    _, renorm = check_adapter_type(adapter.adapter_type)
    expect["magnitude"] = (out_f,) if renorm == "rows" else (in_f,)
    for key, value in t.items():
        if key in expect and tuple(value.shape) != expect[key]:
            raise AdapterMismatch(
                f"{name}: {layer}.{key} is {tuple(value.shape)}, the loaded model expects {expect[key]} "
                f"(layer weight {tuple(module.weight.shape)}). The adapter was trained on "
                f"{adapter.trained_on('another model')}; load that model or another adapter.")
    if adapter.is_xs and r > min(out_f, in_f):
        raise AdapterMismatch(f"{name}: {layer} has rank {r} > min{(out_f, in_f)}; its -xs bases cannot exist here")


def _check_mode(mode: str, trainable: bool, streamed: bool) -> None:
    """The modes a view may take: merged forms weights without autograd (not for training), and a streamed tree's
    weights exist on the device only during their block's forward, so only factored mode can use them."""
    if mode not in MODES or (trainable and mode == "merged"):
        raise ValueError(f"mode={mode!r} is unknown; use one of {MODES}")
    if streamed and mode != "factored":
        raise ValueError("a tree whose weights are streamed takes adapters in factored mode only")


class AdaptedModel:
    """A stack of adapters applied to a shared module tree, as a view (`.module`); the tree is never modified.

    tree: the module tree (for SA3 the full wrapper: `.model` = DiT wrapper, `.conditioner`).
    uses: AdapterUse per adapter, applied in order (the reference's chain W -> P0(W) -> P1(P0(W))).
    roots: the sub-modules that file layer paths are relative to (default: the tree itself, gated).
    mode: "merged" | "parametrized" | "factored" (see the module docstring; default merged, factored when
    trainable). trainable: the LAST adapter's tensors become fp32 nn.Parameters with requires_grad (the others stay
    frozen buffers); detach_norm: its DoRA/BoRA norms get no gradient (a training option, adapters/fused.py). Change
    gating/strength only through `update`, `at_sigma` and `set_strength`.
    device: where the adapter tensors go (default: each base weight's device). streamed: the tree's weights are lent
    to `device` per forward from host memory (`sa3.host_streaming`): factored mode only, and no weight-sized cache
    (a stack's prefix is formed at every forward). xs_bases: where -xs adapters trained on other weights get their
    bases (`xs_bases.xs_bases_source_for`: an SVD bases file, or the base model beside an ARC model); by default
    each -xs layer's bases come from the weight it is applied to."""

    def __init__(self, tree: nn.Module, uses: Sequence[AdapterUse | LoadedAdapter], roots: Sequence[Root] = (Root(),),
                 mode: str | None = None, trainable: bool = False, detach_norm: bool = False,
                 device: str | torch.device | None = None, streamed: bool = False,
                 xs_bases: XsBasesSource | None = None):
        mode = mode or ("factored" if trainable else "merged")
        _check_mode(mode, trainable, streamed)
        self.uses = [u if isinstance(u, AdapterUse) else AdapterUse(u) for u in uses]
        self.roots, self.mode, self.trainable, self.streamed = tuple(roots), mode, trainable, streamed
        self.report = ApplyReport()
        self.layers: dict[str, AdaptedLayer] = {}  # full path in the tree -> adapted layer (view only)
        self._gated: dict[str, str | None] = {}  # full path -> filter name (None = not gated)
        self.sigma: float | None = None
        self.step: int | None = None
        self._last_sigma: float | None = None
        self._auto_step: int | None = None
        self._signature: tuple | None = None
        self._routes: dict[int, AdaptedLayer] | None = None
        slots_by_path: dict[str, list[AdapterSlot]] = {}
        base_by_path: dict[str, nn.Module] = {}
        for i, use in enumerate(self.uses):
            a = use.adapter
            name = a.name or f"adapter {i}"
            applied, unmatched = 0, []
            bases_from = self._xs_bases_origin(tree, a, name, xs_bases) if a.is_xs else None
            own_bases = []  # layers the source has no bases for: their own weights' bases
            for layer in a.layers:
                full, module, root = self._find(tree, layer)
                if module is None:
                    unmatched.append(layer)
                    continue
                check_layer_shapes(layer, module, a, name)
                # adapter tensors live where the layer computes: its weight's device unless told (a streamed
                # weight sits in host memory between forwards)
                where = module.weight.device if device is None else torch.device(device)
                tensors = {k: v.to(where) for k, v in a.layers[layer].items()}
                if a.is_xs:  # bases from the ORIGINAL base weight (as the reference does when stacking) or a source
                    w2_shape = (module.weight.shape[0], module.weight[0].numel())
                    given = None if bases_from is None else bases_from.bases(layer, a.rank, w2_shape)
                    if bases_from is not None and given is None:
                        own_bases.append(layer)
                    u, v = given if given is not None else svd_bases(module.weight, a.rank)
                    tensors["U"], tensors["V"] = u.to(where), v.to(where)
                slot = AdapterSlot(a.adapter_type, a.alpha, a.rank, tensors, trainable and i == len(self.uses) - 1,
                                   use_index=i, layer=layer)
                slot.strength = use.strength
                slot.dropout_p = float(a.config.get("dropout") or 0.0) if slot.trainable else 0.0
                slot.detach_norm = detach_norm and slot.trainable
                slots_by_path.setdefault(full, []).append(slot)
                base_by_path[full] = module
                self._gated[full] = layer.removeprefix(root.filter_strip).lower() if root.gated else None
                applied += 1
            check_coverage(a, name, applied, unmatched)
            if unmatched:
                self._warn(f"{name}: applied to {applied} of {len(a.layers)} layers; {len(unmatched)} matched nothing "
                           f"(e.g. {unmatched[0]})")
            if own_bases:
                self.report.notes.append(f"{name}: {len(own_bases)} of its layers (e.g. {own_bases[0]}) are not in "
                                         f"{bases_from.describe()}: their bases come from these weights")
            self.report.applied.append(applied)
            self.report.unmatched.append(unmatched)
        for full, slots in slots_by_path.items():
            self.layers[full] = AdaptedLayer(base_by_path[full], slots, mode, streamed)
        self._check_layer_filters(slots_by_path)
        self.module = _view(tree, self.layers)
        self.update()

    def _layer_filter(self, use: AdapterUse) -> list[str]:
        """The use's layer_filter patterns, relative to the gated root as the names they match are: a pattern
        copied from a file's layer path (`model.transformer.layers.[0-3].`, as SA3 LoRA Info lists them) loses the
        root's prefix too."""
        strip = next((r.filter_strip for r in self.roots if r.gated and r.filter_strip), "")
        return [p.removeprefix(strip) if strip and p.startswith(strip) and p != strip else p
                for p in parse_layer_filter(use.layer_filter)]

    def _check_layer_filters(self, slots_by_path: dict[str, list[AdapterSlot]]) -> None:
        """Say when a layer_filter pattern switches off none of its adapter's layers (a typo otherwise looks like a
        filter that changes nothing)."""
        for i, use in enumerate(self.uses):
            gated = [self._gated[full] for full, slots in slots_by_path.items()
                     if self._gated[full] and any(s.use_index == i for s in slots)]
            name = use.adapter.name or f"adapter {i}"
            example = next((g for g in gated if ".layers." in g), gated[0] if gated else "")  # a block's, if any
            for pattern in self._layer_filter(use):
                longer = next((g for g in gated if runs_into_a_number(g, pattern)), None)
                if gated and not any(filter_matches(g, pattern) for g in gated):
                    self._warn(f"{name}: layer_filter {pattern!r} matches none of its layers, so it switches nothing "
                               f"off (names look like {example!r})")
                elif longer is not None:
                    self._warn(f"{name}: layer_filter {pattern!r} also switches off layers whose number goes on "
                               f"(e.g. {longer!r}): it matches as a substring, as the official filter does; end it "
                               "with '.' for that one number")

    # ------------------------------------------------------------------------------------------------ helpers
    def _find(self, tree: nn.Module, layer: str) -> tuple[str, nn.Module | None, Root]:
        return find_layer(tree, layer, self.roots)

    def _xs_bases_origin(self, tree: nn.Module, a: LoadedAdapter, name: str,
                         source: XsBasesSource | None) -> XsBasesSource | None:
        """`xs_bases_origin` for this view's tree; its note or warning goes into the report."""
        own = adapter_layer_weights(tree, a, self.roots)
        origin = xs_bases_origin(a, own, name, source)
        if origin.note:
            self.report.notes.append(origin.note)
        if origin.warning and origin.loud:
            self._warn(origin.warning)
        elif origin.warning:
            self.report.warnings.append(origin.warning)
        return origin.source

    def _warn(self, message: str) -> None:
        self.report.warnings.append(message)
        notices.warn(message, stacklevel=3)

    def slots(self, index: int) -> dict[str, AdapterSlot]:
        """The slots of adapter `index`, by full layer path."""
        return {full: s for full, layer in self.layers.items() for s in layer.slots if s.use_index == index}

    # ------------------------------------------------------------------------------------------------ runtime
    def update(self, sigma: float | Tensor | None = None, step: int | None = None) -> int:
        """Set the gating state for the next forward (sigma: t of the first batch item; step: sampling step index)
        and re-merge the layers whose state changed. Returns how many layers were re-merged."""
        if isinstance(sigma, Tensor):
            sigma = float(sigma.reshape(-1)[0])
        self.sigma, self.step = sigma, step
        # per-step fast exit: nothing to do when no adapter's on/off state, strength or filter changed
        signature = tuple((u.active_at(sigma, step), u.strength, u.layer_filter) for u in self.uses)
        if signature == self._signature:
            return 0
        self._signature = signature
        changed = 0
        filters = [self._layer_filter(u) for u in self.uses]
        for full, layer in self.layers.items():
            gated_name = self._gated[full]
            for s in layer.slots:
                i = s.use_index
                use = self.uses[i]
                s.strength = use.strength
                if gated_name is None:
                    s.enabled = True
                else:
                    s.enabled = use.active_at(sigma, step) and not any(filter_matches(gated_name, f)
                                                                       for f in filters[i])
            changed += layer.remerge()
        return changed

    def set_strength(self, index: int, strength: float) -> int:
        """Change one adapter's strength; re-merges the affected layers. Returns how many were re-merged."""
        self.uses[index].strength = float(strength)
        return self.update(self.sigma, self.step)

    def unmerge(self) -> None:
        """Drop every private merged weight (the next forward re-forms what it needs)."""
        for layer in self.layers.values():
            layer.unmerge()
        self._signature = None

    def set_mode(self, mode: str) -> None:
        _check_mode(mode, self.trainable, self.streamed)
        self.mode = mode
        for layer in self.layers.values():
            layer.mode = mode
            layer.unmerge()
        self._signature = None
        self.update(self.sigma, self.step)

    @contextlib.contextmanager
    def activate(self):
        """Route the BASE tree's adapted layers to this stack in the current thread/context only:
        `with stack.activate(): model.dit(...)` computes the adapted model; other threads and code outside the block
        compute the base model. Nested activations of several stacks: the innermost wins for a layer."""
        if self._routes is None:  # first activation: install the routing once, remember the id -> layer table
            for layer in self.layers.values():
                _install_dispatch(object.__getattribute__(layer, "_base"))
            self._routes = {id(object.__getattribute__(layer, "_base")): layer for layer in self.layers.values()}
        outer = _ACTIVE.get()
        token = _ACTIVE.set({**outer, **self._routes} if outer else self._routes)
        try:
            yield self
        finally:
            _ACTIVE.reset(token)

    def __enter__(self):
        self._activation = self.activate()
        return self._activation.__enter__()

    def __exit__(self, *exc):
        return self._activation.__exit__(*exc)

    @contextlib.contextmanager
    def at_sigma(self, sigma: float | Tensor, step: int | None = None):
        """Gate for one model evaluation at diffusion time sigma (t of the first batch item) and, if given, sampling
        step `step` (needed for `skip_first_steps`; when omitted, each new sigma value counts as a new step)."""
        if isinstance(sigma, Tensor):
            sigma = float(sigma.reshape(-1)[0])
        if step is None:
            if self._last_sigma is None or sigma != self._last_sigma:
                self._auto_step = -1 if self._auto_step is None else self._auto_step
                self._auto_step += 1
            step = self._auto_step
        self._last_sigma = sigma
        self.update(sigma, step)
        yield self

    # ------------------------------------------------------------------------------------------------ training
    def parameters(self, index: int = -1) -> list[nn.Parameter]:
        """The trainable tensors of adapter `index` (default: the last), in layer order."""
        index = index % len(self.uses)
        return [p for s in self.slots(index).values() for p in s.parameters()]

    def delta_norm(self, index: int = -1) -> float:
        """‖s·B·A‖_F over every layer of adapter `index` (the root of the sum of squares, `maths.delta_sq_norm`):
        how far the adapter has moved the weights, before DoRA/BoRA renormalisation. A new LoRA starts at 0."""
        index = index % len(self.uses)
        with torch.no_grad():  # summed where the tensors live: one device sync, not one per layer
            squares = [delta_sq_norm(s.adapter_type, s.tensors(), s.scale()) for s in self.slots(index).values()]
        return math.sqrt(float(torch.stack(squares).sum())) if squares else 0.0

    def has_dropout(self) -> bool:
        """Whether a trainable adapter of the stack has LoRA dropout (lora_config "dropout" > 0)."""
        return any(s.dropout_p > 0 for layer in self.layers.values() for s in layer.slots)

    def set_training(self, active: bool, generator: torch.Generator | None = None) -> None:
        """LoRA dropout (lora_config "dropout") on for one training step (its masks drawn now from `generator`,
        the global CPU generator when None, layer by layer in a fixed order) or off (demos, generation). Only
        adapter state changes: the shared base modules' train/eval flags are left alone."""
        for layer in self.layers.values():
            for s in layer.slots:
                if active:
                    s.draw_dropout_mask(generator)
                else:
                    s.dropout_mask = None

    def export(self, index: int = -1) -> LoadedAdapter:
        """Adapter `index` as a LoadedAdapter (detached fp32 copies), layer paths as in its file."""
        index = index % len(self.uses)
        a = self.uses[index].adapter
        layers = {}
        for s in self.slots(index).values():
            layers[s.layer] = {n: getattr(s, n).detach().float().clone() for n in tensor_names(a.adapter_type)}
        return LoadedAdapter(a.adapter_type, a.rank, a.alpha, layers, dict(a.config), dict(a.metadata), a.name)


# ---------------------------------------------------------------------------------------------------- sessions

# Where SA3-native adapter files' layer paths live in the full checkpoint tree (the official
# ConditionedDiffusionModelWrapper layout: `model` = DiT wrapper, `conditioner` = MultiConditioner). This is a fact of
# the file format; adapters/ imports nothing from sa3/. The DiT's layers are gated and filtered by names relative to
# the DiffusionTransformer (`transformer.layers.1...`); the conditioner's seconds Linear is never gated (reference).
SA3_ROOTS = (Root("model", gated=True, filter_strip="model."), Root("conditioner", gated=False))

_FILE_CACHE: dict[tuple[str, int, int], LoadedAdapter] = {}
_FILE_CACHE_LOCK = threading.Lock()


def load_adapter_cached(path) -> LoadedAdapter:
    """read_adapter_file with a small cache keyed by (path, mtime, size); the returned object is shared: don't
    modify its tensors."""
    from pathlib import Path

    from .files import read_adapter_file

    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_mtime_ns, st.st_size)
    with _FILE_CACHE_LOCK:
        if key not in _FILE_CACHE:
            if len(_FILE_CACHE) >= 16:
                _FILE_CACHE.pop(next(iter(_FILE_CACHE)))
            _FILE_CACHE[key] = read_adapter_file(p)
        return _FILE_CACHE[key]


def as_use(item) -> AdapterUse:
    """An AdapterUse from a dict {"path" | "adapter", "strength", "interval": (lo, hi), "skip_first_steps",
    "layer_filter"}, a path, a LoadedAdapter or an AdapterUse."""
    if isinstance(item, AdapterUse):
        return item
    if isinstance(item, LoadedAdapter):
        return AdapterUse(item)
    if isinstance(item, dict):
        adapter = item.get("adapter") or load_adapter_cached(item["path"])
        interval = item.get("interval") or (0.0, 1.0)
        return AdapterUse(adapter, float(item.get("strength", 1.0)), (float(interval[0]), float(interval[1])),
                          int(item.get("skip_first_steps", 0) or 0), item.get("layer_filter", "") or "")
    return AdapterUse(load_adapter_cached(item))


class XsOrigin(NamedTuple):
    """Where an -xs adapter's bases come from (`source`, None = the weights it is applied to), and what to say."""

    source: XsBasesSource | None
    note: str | None = None
    warning: str | None = None
    loud: bool = False  # the warning also goes through notices.warn (weights that differ from the training's)


def xs_bases_origin(adapter: LoadedAdapter, own_weights: dict[str, Tensor], name: str,
                    source: XsBasesSource | None) -> XsOrigin:
    """One rule for generation, training and export: a bases file named by the model's config wins (as the official
    loader does); else the base fingerprint the file records picks the model's own weights or the source's (the base
    model beside an ARC model); a file without a fingerprint (official ones) takes the source when there is one.
    own_weights: the adapter's layers' weights in the model it is applied to."""
    kind = adapter.adapter_type
    fingerprint = adapter.metadata.get("base_fingerprint")
    if source is not None and source.file is not None:
        return XsOrigin(source, f"{name}: {kind} bases from {source.describe()}")
    if fingerprint:
        if weights_fingerprint(own_weights) == fingerprint:
            return XsOrigin(None)
        if source is not None and source.fingerprint(list(own_weights)) == fingerprint:
            return XsOrigin(source, f"{name}: {kind} bases from {source.describe()}, the weights it was trained on")
        return XsOrigin(None, warning=(
            f"{name}: this {kind} adapter was trained on other base weights "
            f"({adapter.trained_on('fingerprint ' + fingerprint)}). -xs files store no SVD bases, so "
            f"they are recomputed from these weights and the result differs from what was trained (e.g. a "
            f"base-model adapter on an ARC model without its base model beside it). Use the matching model, "
            f"or put the base model's SVD bases file in this model's config as svd_bases_path "
            f"(`sa3-lora svd-bases`), for faithful results."), loud=True)
    if source is not None:
        return XsOrigin(source, f"{name}: {kind} file without a base fingerprint; its SVD bases come from "
                                f"{source.describe()}, the model adapters are trained on")
    return XsOrigin(None, warning=f"{name}: {kind} file without a base fingerprint; its SVD bases are recomputed from "
                                  f"these weights, which is faithful only if it was trained on this same model")


def adapter_session(model, loras, roots: Sequence[Root] = SA3_ROOTS, mode: str = "merged") -> AdaptedModel:
    """The stack for one generation: `with adapter_session(model, loras) as s:` routes the model's adapted layers in
    this thread; call `with s.at_sigma(t[0], step=i):` around each DiT evaluation. model: an object holding the
    full tree as `.modules` (SA3Model) or the tree itself. Encode the conditioning INSIDE the session: the seconds
    Linear of the conditioner is adapted too (never gated). A model streaming its DiT (`sa3.sibling`) always gets
    factored mode."""
    if isinstance(model, nn.Module):
        return AdaptedModel(model, [as_use(x) for x in loras], roots, mode=mode)
    streamed = getattr(model, "streams_dit", False)  # its DiT is lent per forward: only factored mode can use it
    uses = [as_use(x) for x in loras]
    xs_source = model_xs_bases(model) if any(u.adapter.is_xs for u in uses) else None
    return AdaptedModel(model.modules, uses, roots, mode="factored" if streamed else mode,
                        device=getattr(model, "device", None), streamed=streamed, xs_bases=xs_source)


_XS_SOURCES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its XsBasesSource (read once)


def model_xs_bases(model) -> XsBasesSource | None:
    """`xs_bases_source_for(model)`, kept per model object so a bases file is read once."""
    if model not in _XS_SOURCES:
        _XS_SOURCES[model] = xs_bases_source_for(model)
    return _XS_SOURCES[model]


# ---------------------------------------------------------------------------------------------------- new adapters

def check_xs_rank(weights: dict[str, Tensor], rank: int) -> None:
    """An -xs adapter's frozen bases are the top `rank` singular vectors of each weight [out, in...]: every targeted
    layer needs rank <= min(out, in). ValueError naming the layers that are too small and both ways out."""
    small = {name: min(w.shape[0], w[0].numel()) for name, w in weights.items() if rank > min(w.shape[0], w[0].numel())}
    if small:
        names = sorted(small, key=small.get)
        raise ValueError(f"rank {rank} is above what {len(small)} targeted layer(s) can hold for an -xs adapter "
                         f"(rank <= min(out, in)): {', '.join(f'{n} ({small[n]})' for n in names[:6])}"
                         f"{' ...' if len(names) > 6 else ''}. Use rank <= {min(small.values())}, or exclude "
                         f"those layers (exclude={names[:6]!r})")


def adapter_layer_weights(tree: nn.Module, adapter: LoadedAdapter, roots: Sequence[Root]) -> dict[str, Tensor]:
    """{layer: the tree's weight} for the adapter's layers the tree has: what its base fingerprint is taken of."""
    return {layer: module.weight for layer in adapter.layers for module in [find_layer(tree, layer, roots)[1]]
            if module is not None}


def trained_on_fingerprint(tree: nn.Module, adapter: LoadedAdapter, roots: Sequence[Root],
                           xs_source: XsBasesSource | None = None) -> str:
    """The base fingerprint a file of `adapter` trained on `tree` records: of the weights its -xs bases come from
    (`xs_bases_origin`: a base model beside an ARC one), else of the tree's own weights of its layers; never the one
    a continued file brought from the model it was made on."""
    own = adapter_layer_weights(tree, adapter, roots)
    if adapter.is_xs:
        source = xs_bases_origin(adapter, own, "", xs_source).source
        given = None if source is None else source.fingerprint(list(own))  # None: a bases file (it holds no weights)
        if given:
            return given
    return weights_fingerprint(own)


def target_weights(tree: nn.Module, roots: Sequence[Root], include: Sequence[str] | None,
                   exclude: Sequence[str] | None) -> dict[str, Tensor]:
    """The weights an adapter with these (resolved, `resolve_patterns`) patterns adapts, by layer path relative to
    its root; AdapterMismatch when none matches (e.g. a typo in a pattern)."""
    weights: dict[str, Tensor] = {}
    for root in roots:
        sub = tree.get_submodule(root.path) if root.path else tree
        for name in select_targets(sub, include, exclude):
            weights[name] = sub.get_submodule(name).weight
    if not weights:
        example = next((n for r in roots for n in select_targets(tree.get_submodule(r.path) if r.path else tree)), "")
        raise AdapterMismatch(f"no Linear/Conv1d layer matches include={include} exclude={exclude}"
                              + (f"; layer names look like {example!r}" if example else ""))
    return weights


def new_adapter(tree: nn.Module, adapter_type: str, rank: int, alpha: float | None = None,
                roots: Sequence[Root] = (Root(),), include: Sequence[str] | None = None,
                exclude: Sequence[str] | None = None, preset: str | None = None, dropout: float = 0.0,
                generator: torch.Generator | None = None) -> LoadedAdapter:
    """A fresh adapter initialised exactly as the reference does (an identity until trained) on every Linear/Conv1d
    of each root matching include/exclude (or a named preset; see targets.PRESETS). alpha defaults to rank.
    -xs bases are not stored; the base weights' fingerprint is recorded in metadata for the -xs warning."""
    check_adapter_type(adapter_type)
    alpha = rank if alpha is None else alpha
    include, exclude = resolve_patterns(include, exclude, preset)
    weights = target_weights(tree, roots, include, exclude)
    if adapter_type.endswith("-xs"):
        check_xs_rank(weights, rank)
    layers: dict[str, dict[str, Tensor]] = {}
    for name, w in weights.items():
        layers[name] = init_tensors(adapter_type, w, rank, generator, bases=False)
    config = {"rank": rank, "alpha": alpha, "adapter_type": adapter_type, "dropout": dropout, "include": include,
              "exclude": exclude}
    metadata = {"base_fingerprint": weights_fingerprint(weights)}
    return LoadedAdapter(adapter_type, rank, alpha, layers, config, metadata)


def merged_state(view_layers: dict[str, AdaptedLayer]) -> dict[str, Tensor]:
    """Full-path -> effective weight of every adapted layer (a copy), e.g. for export or inspection."""
    return {full: layer.weight.detach().clone() for full, layer in view_layers.items()}


__all__ = ["SA3_ROOTS", "AdaptedLayer", "AdaptedModel", "AdapterMismatch", "AdapterSlot", "AdapterUse", "ApplyReport",
           "DispatchConv1d", "DispatchLinear", "MODES", "Root", "adapter_session", "as_use", "check_adapter_fits",
           "find_layer", "load_adapter_cached", "merged_state", "model_xs_bases", "new_adapter",
           "skip_steps_interval", "trained_on_fingerprint", "xs_bases_origin"]
