"""Export an adapter for ComfyUI's stock LoRA loader and its native SA3 model.

ComfyUI addresses the DiT's weights as `diffusion_model.<path>` (path relative to the DiffusionTransformer, i.e. our
file path without its `model.` prefix) and its generic LoRA adapter applies, per layer (comfy/weight_adapter):
- `<x>.lora_up.weight` U [out, r], `<x>.lora_down.weight` D [r, in(, k)], `<x>.alpha` a:
  W += strength · (a / r) · (U·D) viewed as W;
- with `<x>.dora_scale` m: W' = (W + (a/r)·U·D) · m / (column norms of that + eps) when m's first dim is not
  out_features (the input-axis branch; the output-axis branch takes the norms of the ORIGINAL W, which is not DoRA),
  then blended linearly by strength;
- `<x>.diff` Δ: W += strength · Δ.
So the forms are chosen where the maths match ours exactly (up to ComfyUI's float32-eps in the norm):
lora / lora-xs -> low rank (-xs as U·M and Vᵀ); dora-cols / dora-cols-xs on a Linear (or a k=1 Conv1d) at strength 1
-> low rank + dora_scale; everything else (dora-rows, bora, their -xs, other strengths) -> the exact weight
difference `diff` = W_eff - W in fp32. The conditioner's seconds Linear has no `diffusion_model.` key in ComfyUI
and is skipped (reported).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from ..sa3.atomic import fsync_replace
from .apply import SA3_ROOTS, Root, check_layer_shapes, find_layer, xs_bases_origin
from .files import LoadedAdapter
from .maths import adapter_scale, check_adapter_type, effective_weight, svd_bases
from .xs_bases import XsBasesSource

COMFY_PREFIX = "diffusion_model."
EXPORTED_BY = "sa3_lora_studio"  # the created_by metadata of our exports


@dataclass
class ComfyExportReport:
    """How each layer was written ("lowrank", "dora", "diff") and which layers were skipped, with the reason."""

    forms: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # where -xs bases came from, or why they may differ

    def summary(self) -> str:
        """'31 layers written (28 lowrank, 3 diff); 2 skipped (e.g. conditioners.x: not a DiT layer ...)'."""
        counts = ", ".join(f"{n} {form}" for form, n in sorted(self.counts().items()))
        text = f"{len(self.forms)} layers written" + (f" ({counts})" if counts else "")
        if self.skipped:
            layer, why = next(iter(self.skipped.items()))
            text += f"; {len(self.skipped)} skipped (e.g. {layer}: {why})"
        return "\n".join([text, *self.notes])

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for form in self.forms.values():
            out[form] = out.get(form, 0) + 1
        return out


def comfy_tensors(adapter: LoadedAdapter, tree: nn.Module, strength: float = 1.0,
                  roots: Sequence[Root] = SA3_ROOTS, dit_root: str = "model",
                  dit_prefix: str = "model.", xs_bases: XsBasesSource | None = None
                  ) -> tuple[dict[str, Tensor], ComfyExportReport]:
    """The ComfyUI-keyed tensors of an adapter applied at `strength` to the weights in `tree` (for -xs bases and
    exact differences). Layers of the root `dit_root` become `diffusion_model.<path without dit_prefix>`.
    xs_bases: the model's other source of -xs bases (`apply.model_xs_bases`), chosen as generation chooses it."""
    _, renorm = check_adapter_type(adapter.adapter_type)
    report = ComfyExportReport()
    out: dict[str, Tensor] = {}
    root_by_path = {r.path: r for r in roots}
    if dit_root not in root_by_path:
        raise ValueError(f"dit_root={dit_root!r} is not one of the roots {sorted(root_by_path)}")
    dit = tree.get_submodule(dit_root) if dit_root else tree
    bases_from = None
    if adapter.is_xs:  # the bases generation would use on this model (xs_bases_origin: one rule)
        own = {layer: module.weight for layer in adapter.layers  # every root's, as the fingerprint was taken
               for module in [find_layer(tree, layer, roots)[1]] if module is not None}
        origin = xs_bases_origin(adapter, own, adapter.name or "adapter", xs_bases)
        bases_from = origin.source
        report.notes += [text for text in (origin.note, origin.warning) if text]
    for layer, t in adapter.layers.items():
        try:
            module = dit.get_submodule(layer)
        except AttributeError:
            report.skipped[layer] = "not a DiT layer (ComfyUI's SA3 LoRA keys cover diffusion_model.* only)"
            continue
        check_layer_shapes(layer, module, adapter, adapter.name or "adapter")  # another model size: a named error
        w = module.weight.detach().float().cpu()  # the file's tensors are on the CPU: no device mixing
        key = COMFY_PREFIX + layer.removeprefix(dit_prefix)
        t = dict(t)
        if adapter.is_xs:
            shape = (w.shape[0], w[0].numel())
            given = None if bases_from is None else bases_from.bases(layer, adapter.rank, shape)
            t["U"], t["V"] = given if given is not None else svd_bases(module.weight, adapter.rank)  # cached
        if "lora_A" in t:
            up, down = t["lora_B"], t["lora_A"]
        else:
            up, down = t["U"] @ t["M_xs"], t["V"].T.contiguous()
        is_conv = w.dim() == 3
        cols_ok = renorm == "cols" and strength == 1.0 and w.shape[0] != 1 and (not is_conv or w.shape[2] == 1)
        if renorm == "none" or cols_ok:
            if is_conv:
                up, down = up[:, :, None], down.reshape(down.shape[0], w.shape[1], w.shape[2])
            out[f"{key}.lora_up.weight"] = up.float().contiguous()
            out[f"{key}.lora_down.weight"] = down.float().contiguous()
            # ComfyUI scales by alpha / rank; a strength other than 1 is folded into alpha for plain low-rank types
            alpha = adapter.alpha * (strength if renorm == "none" else 1.0)
            out[f"{key}.alpha"] = torch.tensor(float(alpha))
            if cols_ok:
                out[f"{key}.dora_scale"] = t["magnitude"].float().reshape(1, -1, *([1] if is_conv else [])).contiguous()
                report.forms[layer] = "dora"
            else:
                report.forms[layer] = "lowrank"
        else:
            w_eff = effective_weight(w, adapter.adapter_type, t, adapter_scale(adapter.alpha, adapter.rank, strength))
            out[f"{key}.diff"] = (w_eff - w).contiguous()
            report.forms[layer] = "diff"
    if not out:
        raise ValueError(f"{adapter.name or 'adapter'}: no layer of it is in the DiT; nothing to export for ComfyUI")
    return out, report


def export_for_comfyui(path: str | Path, adapter: LoadedAdapter, tree: nn.Module, strength: float = 1.0,
                       roots: Sequence[Root] = SA3_ROOTS, dtype: torch.dtype = torch.float32,
                       xs_bases: XsBasesSource | None = None) -> ComfyExportReport:
    """Write `comfy_tensors` to a safetensors file for ComfyUI's `LoraLoaderModelOnly`. dtype: float type on disk
    (fp32 default so `diff` layers stay exact; fp16 halves the size); xs_bases as for `comfy_tensors`."""
    tensors, report = comfy_tensors(adapter, tree, strength, roots, xs_bases=xs_bases)
    tensors = {k: v.to(dtype) if v.is_floating_point() and not k.endswith(".alpha") else v for k, v in tensors.items()}
    metadata = {"created_by": EXPORTED_BY, "sa3_adapter_type": adapter.adapter_type,
                "sa3_strength": str(float(strength))}
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")  # a cut-off write never leaves half a file under the real name
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        fsync_replace(tmp, path)  # with the mode open() gives (safetensors' writer makes it 0600)
    finally:
        tmp.unlink(missing_ok=True)
    return report


def is_comfy_export(path: str | Path) -> bool:
    """True when `path` is a file `export_for_comfyui` wrote (its metadata says so): one a new export may replace."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception:  # not a safetensors file at all
        return False
    return metadata.get("created_by") == EXPORTED_BY and "sa3_strength" in metadata
