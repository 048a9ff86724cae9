"""ComfyUI export: applying the exported file with ComfyUI's documented LoRA arithmetic (re-implemented here) gives
our effective weights, for every adapter type, on Linear and Conv1d layers."""

import pytest
import torch
from sa3_lora_studio.adapters import AdaptedModel, AdapterUse, Root, new_adapter
from sa3_lora_studio.adapters import maths as M
from sa3_lora_studio.adapters.comfy_export import export_for_comfyui
from safetensors.torch import load_file
from torch import nn

ROOTS = (Root("model", gated=True, filter_strip="model."), Root("conditioner", gated=False))


def comfy_apply(weights: dict[str, torch.Tensor], lora: dict[str, torch.Tensor], strength: float = 1.0) -> dict:
    """ComfyUI's generic LoRA patching (comfy/weight_adapter/lora.py + base.weight_decompose, fp32, no function
    hook), for keys `diffusion_model.<path>.{lora_up.weight, lora_down.weight, alpha, dora_scale, diff}`."""
    out = {}
    for key, weight in weights.items():
        x = "diffusion_model." + key
        weight = weight.clone()
        if f"{x}.diff" in lora:
            weight += strength * lora[f"{x}.diff"].float()
        elif f"{x}.lora_up.weight" in lora:
            mat1, mat2 = lora[f"{x}.lora_up.weight"].float(), lora[f"{x}.lora_down.weight"].float()
            alpha = lora[f"{x}.alpha"].item() / mat2.shape[0] if f"{x}.alpha" in lora else 1.0
            lora_diff = torch.mm(mat1.flatten(start_dim=1), mat2.flatten(start_dim=1)).reshape(weight.shape)
            dora_scale = lora.get(f"{x}.dora_scale")
            if dora_scale is None:
                weight += (strength * alpha) * lora_diff
            else:
                lora_diff = lora_diff * alpha
                weight_calc = weight + lora_diff
                if dora_scale.shape[0] == weight_calc.shape[0]:  # output axis: norms of the original weight
                    norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True).reshape(
                        weight.shape[0], *[1] * (weight.dim() - 1))
                else:
                    norm = (weight_calc.transpose(0, 1).reshape(weight_calc.shape[1], -1).norm(dim=1, keepdim=True)
                            .reshape(weight_calc.shape[1], *[1] * (weight_calc.dim() - 1)).transpose(0, 1))
                norm = norm + torch.finfo(weight.dtype).eps
                weight_calc = weight_calc * (dora_scale.float() / norm)
                weight = weight + strength * (weight_calc - weight) if strength != 1.0 else weight_calc
        out[key] = weight
    return out


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.to_qkv = nn.Linear(12, 24, bias=False)
        self.transformer.ff = nn.Linear(24, 12)
        self.preprocess_conv = nn.Conv1d(12, 12, 1, bias=False)
        self.wide_conv = nn.Conv1d(12, 6, 3, padding=1)


class Tree(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.model = Net()
        self.conditioner = nn.Module()
        self.conditioner.seconds = nn.Linear(4, 12)


@pytest.mark.parametrize("adapter_type", list(M.ADAPTER_TYPES))
@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_comfyui_arithmetic_on_the_export_reproduces_our_effective_weights(tmp_path, adapter_type, strength):
    torch.manual_seed(0)
    tree = Tree().requires_grad_(False)
    a = new_adapter(tree, adapter_type, 2, alpha=3, roots=ROOTS, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    for t in a.layers.values():
        for k in t:
            if k in ("lora_B", "M_xs"):
                t[k] = torch.randn(t[k].shape, generator=g) * 0.3
            elif k.startswith("magnitude"):
                t[k] = t[k] * (1 + 0.1 * torch.randn(t[k].shape, generator=g))
    report = export_for_comfyui(tmp_path / "comfy.safetensors", a, tree, strength=strength, roots=ROOTS)
    assert report.skipped.keys() == {"seconds"}
    summary = report.summary()  # what the export node shows: counts, not the report's repr
    assert summary.startswith(f"{len(report.forms)} layers written (") and "; 1 skipped (e.g. seconds: " in summary
    assert "ComfyExportReport" not in summary
    lora = load_file(str(tmp_path / "comfy.safetensors"))
    assert all(k.startswith("diffusion_model.") for k in lora)
    dit = tree.model.model
    base = {name: m.weight.detach().clone() for name, m in dit.named_modules() if isinstance(m, nn.Linear | nn.Conv1d)}
    comfy = comfy_apply(base, lora)
    ours = AdaptedModel(tree, [AdapterUse(a, strength=strength)], ROOTS).layers
    for name, w in comfy.items():
        assert torch.allclose(w, ours[f"model.model.{name}"].weight, atol=2e-6, rtol=1e-5), name
    if adapter_type in ("lora", "lora-xs"):
        assert set(report.forms.values()) == {"lowrank"}
    if adapter_type == "dora-cols" and strength == 1.0:
        assert report.forms["model.transformer.to_qkv"] == "dora" and report.forms["model.wide_conv"] == "diff"
    if adapter_type in ("dora-rows", "bora"):
        assert set(report.forms.values()) == {"diff"}


def test_exporting_for_a_model_of_another_size_names_the_layer():
    from sa3_lora_studio.adapters import AdapterMismatch

    torch.manual_seed(0)
    a = new_adapter(Tree().requires_grad_(False), "lora", 2, roots=ROOTS)
    wider = Tree().requires_grad_(False)
    wider.model.model.transformer.to_qkv = nn.Linear(12, 36, bias=False)
    with pytest.raises(AdapterMismatch, match=r"model.transformer.to_qkv.lora_B is \(24, 2\), the loaded model expects "
                                              r"\(36, 2\)"):
        export_for_comfyui("unused.safetensors", a, wider, roots=ROOTS)
