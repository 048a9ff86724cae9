"""Adapter maths: reference effective weights (bit parity), fresh-init identity, factored forms, type resolution."""

import json

import pytest
import torch
from sa3_lora_studio.adapters import maths as M
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

TYPES = list(M.ADAPTER_TYPES)
GOLDEN_FILES = TYPES + ["dora", "dora-legacy-2d-cols"]
# the three layers whose effective weights the reference stored, as (golden name, layer path in the file)
W_EFF_LAYERS = {
    "to_local_embed0": "model.transformer.layers.0.to_local_embed.0",
    "preprocess_conv": "model.preprocess_conv",
    "seconds_linear_rows0to7": "conditioners.seconds_total.embedder.embedding.1",
}


def _base_key(layer: str) -> str:
    return ("model." if layer.startswith("model.") else "conditioner.") + layer + ".weight"


def _layer_tensors(state: dict, layer: str) -> dict:
    prefix = layer + ".parametrizations.weight.0."
    return {k[len(prefix):]: (v.float().reshape(-1) if "magnitude" in k else v.float())
            for k, v in state.items() if k.startswith(prefix)}


@pytest.mark.parametrize("name", [t for t in GOLDEN_FILES if t != "dora-legacy-2d-cols"])
def test_effective_weights_equal_the_reference_bit_for_bit(fixtures_dir, golden_cases, name):
    case = golden_cases["lora.adapter_types"]["types"][name]
    base = load_file(str(fixtures_dir / "tiny-small" / "model.safetensors"))
    golden = load_file(str(fixtures_dir / "golden" / "lora_outputs.safetensors"))
    with safe_open(str(fixtures_dir / "golden" / "lora" / f"{name}.safetensors"), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
        config = json.loads(f.metadata()["lora_config"])
    adapter_type = M.resolve_adapter_type(config["adapter_type"], state)
    assert adapter_type == case["resolved_adapter_type"]
    for short, layer in W_EFF_LAYERS.items():
        w = base[_base_key(layer)]
        t = _layer_tensors(state, layer)
        if adapter_type.endswith("-xs"):
            t["U"], t["V"] = M.svd_bases(w, config["rank"])
        w_eff = M.effective_weight(w, adapter_type, t, M.adapter_scale(config["alpha"], config["rank"], 1.0))
        expected = golden[f"lora.{name}.s1.0.W_eff.{short}"]
        assert torch.equal(w_eff[: expected.shape[0]], expected), (name, short)


def test_legacy_dora_with_2d_column_magnitudes_resolves_to_dora_cols(fixtures_dir):
    with safe_open(str(fixtures_dir / "golden" / "lora" / "dora-legacy-2d-cols.safetensors"), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    assert M.resolve_adapter_type("dora", state) == "dora-cols"
    assert M.resolve_adapter_type("dora", {"x.magnitude": torch.ones(5, 1)}) == "dora-rows"
    assert M.resolve_adapter_type("dora", {"x.magnitude": torch.ones(5)}) == "dora-rows"
    assert M.resolve_adapter_type(None) == "lora"
    with pytest.raises(ValueError, match="unknown"):
        M.resolve_adapter_type("loha")


def test_a_file_without_a_type_gets_the_one_its_tensors_name():
    """No lora_config type: the reference would apply a DoRA/BoRA file as plain LoRA (magnitudes dropped)."""
    def named(*names, magnitude=None):
        magnitude = torch.ones(4) if magnitude is None else magnitude
        return {f"l.parametrizations.weight.0.{n}": (magnitude if n == "magnitude" else torch.ones(2, 2)) for n in names}

    assert M.resolve_adapter_type(None, named("lora_A", "lora_B")) == "lora"
    assert M.resolve_adapter_type(None, named("lora_A", "lora_B", "magnitude")) == "dora-rows"
    assert M.resolve_adapter_type(None, named("lora_A", "lora_B", "magnitude", magnitude=torch.ones(1, 4))) == "dora-cols"
    assert M.resolve_adapter_type(None, named("lora_A", "lora_B", "magnitude_r", "magnitude_c")) == "bora"
    assert M.resolve_adapter_type(None, named("M_xs")) == "lora-xs"
    assert M.resolve_adapter_type(None, named("M_xs", "magnitude_r", "magnitude_c")) == "bora-xs"
    assert M.resolve_adapter_type("", named("M_xs", "magnitude")) == "dora-rows-xs"
    with pytest.raises(ValueError, match="unknown"):
        M.resolve_adapter_type("loha")


def _layer(kind: str, out_f: int, in_f: int) -> nn.Module:
    torch.manual_seed(out_f * 31 + in_f)
    return nn.Linear(in_f, out_f) if kind == "linear" else nn.Conv1d(in_f, out_f, 3, padding=1)


CASES = [(t, kind, rank) for t in TYPES for kind in ("linear", "conv1d") for rank in (1, 4)]


def _randomised(t: dict, gen: torch.Generator) -> dict:
    """A trained-looking adapter: B / M_xs random (so a test can fail), magnitudes perturbed."""
    out = dict(t)
    for k in ("lora_B", "M_xs"):
        if k in out:
            out[k] = torch.randn(out[k].shape, generator=gen) * 0.3
    for k in ("magnitude", "magnitude_r", "magnitude_c"):
        if k in out:
            out[k] = out[k] * (1 + 0.1 * torch.randn(out[k].shape, generator=gen))
    return out


@pytest.mark.parametrize("adapter_type,kind,rank", CASES)
def test_fresh_adapter_is_identity(adapter_type, kind, rank):
    layer = _layer(kind, 12, 7)
    t = M.init_tensors(adapter_type, layer.weight, rank, torch.Generator().manual_seed(0))
    w_eff = M.effective_weight(layer.weight.detach(), adapter_type, t, M.adapter_scale(rank * 2, rank, 1.0))
    assert torch.allclose(w_eff, layer.weight, atol=1e-6, rtol=1e-6)
    if "lora_A" in t:  # Kaiming-uniform(a=√5) bound = 1/sqrt(fan_in)
        assert t["lora_A"].abs().max() <= 1 / (layer.weight[0].numel() ** 0.5) and t["lora_A"].abs().sum() > 0


@pytest.mark.parametrize("adapter_type,kind,rank", CASES)
def test_strength_zero_equals_no_adapter(adapter_type, kind, rank):
    layer = _layer(kind, 9, 6)
    t = _randomised(M.init_tensors(adapter_type, layer.weight, rank), torch.Generator().manual_seed(1))
    w = layer.weight.detach()
    assert torch.equal(M.effective_weight(w, adapter_type, t, M.adapter_scale(4, rank, 0.0)), w)
    assert not torch.allclose(M.effective_weight(w, adapter_type, t, M.adapter_scale(4, rank, 1.0)), w)


@pytest.mark.parametrize("adapter_type,kind,rank", CASES)
def test_the_adapters_size_is_the_norm_of_its_low_rank_update(adapter_type, kind, rank):
    layer = _layer(kind, 10, 6)
    t = _randomised(M.init_tensors(adapter_type, layer.weight, rank), torch.Generator().manual_seed(3))
    w = layer.weight.detach()
    if adapter_type.endswith("-xs"):
        t["U"], t["V"] = M.svd_bases(w.reshape(w.shape[0], -1), rank)
        update = t["U"] @ t["M_xs"] @ t["V"].T
    else:
        update = t["lora_B"] @ t["lora_A"]
    scale = M.adapter_scale(2 * rank, rank, 0.5)
    assert float(M.delta_sq_norm(adapter_type, t, scale)) == pytest.approx(float((scale * update).square().sum()),
                                                                          rel=1e-5)
    if adapter_type in ("lora", "lora-xs"):  # no renormalisation: it is how far the layer's weight moved
        moved = M.effective_weight(w, adapter_type, t, scale) - w
        assert float(M.delta_sq_norm(adapter_type, t, scale)) == pytest.approx(float(moved.square().sum()), rel=1e-4)


@pytest.mark.parametrize("adapter_type", TYPES)
@pytest.mark.parametrize("strength", [1.0, 0.5, 2.0])
def test_factored_linear_equals_the_formed_weight(adapter_type, strength):
    """The cheap exact form (no W + s·BA formed; norms from ‖W‖², W·Aᵀ, B(AAᵀ)Bᵀ) matches the reference form."""
    layer = _layer("linear", 24, 16)
    gen = torch.Generator().manual_seed(2)
    t = _randomised(M.init_tensors(adapter_type, layer.weight, 4), gen)
    if adapter_type.endswith("-xs"):
        t["U"], t["V"] = M.svd_bases(layer.weight, 4)
    x = torch.randn(3, 5, 16, generator=gen)
    scale = M.adapter_scale(8, 4, strength)
    w = layer.weight.detach()
    ref = nn.functional.linear(x, M.effective_weight(w, adapter_type, t, scale), layer.bias)
    cached = M.base_products(w, adapter_type, t)
    got = M.factored_linear(x, w, layer.bias, adapter_type, t, scale, cached)
    assert torch.allclose(got, ref, atol=2e-5, rtol=1e-5)
    assert torch.allclose(M.factored_linear(x, w, layer.bias, adapter_type, t, scale), ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("adapter_type", TYPES)
@pytest.mark.parametrize("fused", [True, False], ids=["fused-node", "autograd"])
@pytest.mark.parametrize("cached", [True, False], ids=["cached", "uncached"])
@pytest.mark.parametrize("detach_norm", [False, True], ids=["exact", "detached"])
def test_factored_linear_gradients_equal_the_formed_weights(adapter_type, fused, cached, detach_norm, monkeypatch):
    """Training runs the factored form: the gradients of every trainable tensor and of the input match the ones
    through the reference's formed weight, both with the fused CPU node (W·Aᵀ rows riding along, hand-written
    backward) and with plain autograd (GPU, half precision), with the layer's cached base products (for -xs: W·V and
    Uᵀ·W, so P and Q come into the node and their gradients go back through M_xs) and without; and with the norms
    detached (the training option), against the formed weight whose norms are detached."""
    if not fused:
        monkeypatch.setattr(M, "fused_applies", lambda *args: False)
    else:  # BoRA squares W in row blocks: make it several blocks of uneven size (40 rows of 24 fp32 = 7+7+...+5)
        from sa3_lora_studio.adapters import fused as F

        monkeypatch.setattr(F, "BLOCK_BYTES", 7 * 24 * 4)
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(40, 24, generator=gen)
    bias = torch.randn(40, generator=gen)
    t = _randomised(M.init_tensors(adapter_type, w, 4), gen)
    if adapter_type.endswith("-xs"):
        t["U"], t["V"] = M.svd_bases(w, 4)
    x = torch.randn(2, 7, 24, generator=gen)
    upstream = torch.randn(2, 7, 40, generator=gen)
    scale = M.adapter_scale(8, 4, 1.5)
    products = M.base_products(w, adapter_type, t) if cached else M.base_products(w)
    xs_renorm = adapter_type.endswith("-xs") and adapter_type != "lora-xs"
    assert (products.w_v is not None or products.ut_w is not None) == (cached and xs_renorm)  # P/Q really come in
    grads, outputs = [], []
    for form, detach in (("formed", detach_norm), ("factored", detach_norm), ("formed", not detach_norm)):
        leaves = {k: v.clone().requires_grad_(k in M.TRAINABLE_NAMES) for k, v in t.items()}
        xi = x.clone().requires_grad_(True)
        if form == "formed":
            y = nn.functional.linear(xi, M.effective_weight(w, adapter_type, leaves, scale, detach), bias)
        else:
            y = M.factored_linear(xi, w, bias, adapter_type, leaves, scale, products, detach)
        (y * upstream).sum().backward()
        outputs.append(y.detach())
        grads.append({"x": xi.grad, **{k: v.grad for k, v in leaves.items() if v.requires_grad}})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[1][name], grads[0][name], atol=1e-4, rtol=1e-4), name
    assert torch.allclose(outputs[1], outputs[2], atol=1e-5, rtol=1e-5)  # detaching changes no value
    if M.check_adapter_type(adapter_type)[1] != "none":  # ... but the gradients of the direction tensors
        trained = "M_xs" if adapter_type.endswith("-xs") else "lora_B"
        assert not torch.allclose(grads[0][trained], grads[2][trained], atol=1e-4, rtol=1e-4)


def test_weighted_column_norms_are_blockwise_exact(monkeypatch):
    from sa3_lora_studio.adapters import fused as F

    monkeypatch.setattr(F, "BLOCK_BYTES", 1024 * 6 * 4)  # blocks of 1024 rows
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(2500, 6, generator=gen)  # more rows than one block
    g2 = torch.rand(2500, generator=gen).requires_grad_(True)
    got = M._weighted_col_sq(g2, w)
    upstream = torch.randn(6, generator=gen)
    (got * upstream).sum().backward()
    g2_ref = g2.detach().clone().requires_grad_(True)
    ref = g2_ref @ (w * w)
    (ref * upstream).sum().backward()
    assert torch.allclose(got, ref, rtol=1e-5) and torch.allclose(g2.grad, g2_ref.grad, rtol=1e-5)


def test_svd_bases_are_sign_canonical_and_orthonormal():
    w = torch.randn(10, 6, generator=torch.Generator().manual_seed(3))
    u, v = M.svd_bases(w, 4)
    assert u.shape == (10, 4) and v.shape == (6, 4)
    assert torch.allclose(u.T @ u, torch.eye(4), atol=1e-5) and torch.allclose(v.T @ v, torch.eye(4), atol=1e-5)
    peaks = u[u.abs().argmax(0), torch.arange(4)]
    assert (peaks > 0).all()
    u2, _ = M.svd_bases(-w, 4)  # the convention removes the SVD's sign freedom
    assert torch.allclose(u2.abs(), u.abs(), atol=1e-5)


def test_svd_bases_are_computed_once_per_weight_content_and_per_rank(monkeypatch):
    from sa3_lora_studio.adapters import xs_bases

    xs_bases.clear_cache()  # nothing cached by earlier tests
    calls = []
    real = xs_bases.compute_svd_bases
    monkeypatch.setattr(xs_bases, "compute_svd_bases", lambda w, r: calls.append(r) or real(w, r))
    w = torch.randn(24, 16, generator=torch.Generator().manual_seed(11))
    u, v = M.svd_bases(w, 4)
    ref_u, ref_v = real(w, 4)
    assert torch.equal(u, ref_u) and torch.equal(v, ref_v)  # the cache changes no bit
    u.zero_()  # the caller's own copy: the cache keeps its bases
    again_u, _ = M.svd_bases(w, 4)
    copy_u, _ = M.svd_bases(w.clone(), 4)  # same content in another tensor (an ARC model loaded anew, an export)
    assert torch.equal(again_u, ref_u) and torch.equal(copy_u, ref_u) and calls == [4]
    M.svd_bases(w, 2)  # another rank: its own entry
    assert calls == [4, 2]
    w.mul_(2).add_(1)  # changed in place (a weight swap): found neither by tensor nor by content
    changed_u, _ = M.svd_bases(w, 4)
    assert calls == [4, 2, 4] and torch.equal(changed_u, real(w, 4)[0])
    M.svd_bases(w.to(torch.bfloat16), 4)  # another dtype's bytes: another entry
    assert calls == [4, 2, 4, 4]


def test_svd_bases_cache_keeps_the_most_recent_within_its_byte_budget(monkeypatch):
    from sa3_lora_studio.adapters import xs_bases

    xs_bases.clear_cache()
    monkeypatch.setattr(xs_bases, "CACHE_BYTES", 3 * (8 + 6) * 2 * 4)  # three entries of rank-2 bases of [8, 6]
    calls = []
    real = xs_bases.compute_svd_bases
    monkeypatch.setattr(xs_bases, "compute_svd_bases", lambda w, r: calls.append(1) or real(w, r))
    weights = [torch.randn(8, 6, generator=torch.Generator().manual_seed(100 + i)) for i in range(4)]
    for w in weights:
        M.svd_bases(w.clone(), 2)  # fresh tensors: only the content can find them again
    M.svd_bases(weights[3].clone(), 2)
    M.svd_bases(weights[1].clone(), 2)
    assert len(calls) == 4
    M.svd_bases(weights[0].clone(), 2)  # the oldest was dropped to stay within the budget
    assert len(calls) == 5
    M.svd_bases(weights[1].clone(), 2)  # used recently, so kept (a first-in-first-out cache would have dropped it)
    assert len(calls) == 5


@pytest.mark.parametrize("adapter_type", ["dora-rows", "dora-cols", "bora", "dora-rows-xs", "bora-xs"])
def test_half_precision_norms_keep_no_copy_of_the_weight_for_the_backward_and_match_fp32_maths(adapter_type):
    """A bf16 base with fp32 factors (GPU training, ComfyUI's default dtype): autograd may keep W itself, never a
    W-sized converted copy (one per adapted layer until the backward); the norms' gradients are those of the same
    maths on W taken to fp32."""
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(96, 64, generator=g) / 8).to(torch.bfloat16)
    t = {k: (v if k in ("U", "V") else v.clone().requires_grad_(True))
         for k, v in M.init_tensors(adapter_type, w, 4, generator=g).items()}
    with torch.no_grad():
        for k in ("lora_B", "M_xs"):
            if k in t:
                t[k].add_(0.1 * torch.randn(t[k].shape, generator=g))
    saved = []

    def pack(tensor):
        if tensor.numel() >= w.numel() and tensor.untyped_storage().data_ptr() != w.untyped_storage().data_ptr():
            saved.append((tuple(tensor.shape), tensor.dtype))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        d, c = M.row_col_scales(w, adapter_type, t, 0.7, M.base_products(w, adapter_type, t))
    assert saved == []
    loss = sum((f * torch.linspace(0.5, 1.5, f.numel())).sum() for f in (d, c) if f is not None)
    grads = torch.autograd.grad(loss, [v for v in t.values() if v.requires_grad])
    t32 = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in t.items()}
    w32 = w.float()
    d32, c32 = M.row_col_scales(w32, adapter_type, t32, 0.7, M.base_products(w32, adapter_type, t32))
    loss32 = sum((f * torch.linspace(0.5, 1.5, f.numel())).sum() for f in (d32, c32) if f is not None)
    for got, want in zip(grads, torch.autograd.grad(loss32, [v for v in t32.values() if v.requires_grad])):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_svd_bases_work_in_inference_mode_see_data_swaps_and_survive_collection_inside_the_cache(monkeypatch):
    """ComfyUI runs nodes under inference mode (tensors there have no version counter); `.data =` and
    `Module.to(dtype)` change a weight without bumping it; a weight the cache saw may be collected by the cyclic
    GC while this thread holds the cache's lock (its weakref callback must not wait on that lock)."""
    import gc

    from sa3_lora_studio.adapters import xs_bases

    xs_bases.clear_cache()
    with torch.inference_mode():
        w = torch.randn(12, 8, generator=torch.Generator().manual_seed(4))
        assert torch.equal(M.svd_bases(w, 3)[0], xs_bases.compute_svd_bases(w, 3)[0])
        assert torch.equal(M.svd_bases(w, 3)[0], xs_bases.compute_svd_bases(w, 3)[0])
    layer = nn.Linear(8, 12)
    M.svd_bases(layer.weight, 3)
    layer.to(torch.bfloat16)  # swaps .data: same tensor object, same version counter, other bytes
    assert torch.equal(M.svd_bases(layer.weight, 3)[0], xs_bases.compute_svd_bases(layer.weight, 3)[0])

    class Holder:
        pass
    threshold = gc.get_threshold()
    gc.set_threshold(3)
    try:
        for _ in range(300):
            h = Holder()
            h.me, h.t = h, torch.randn(4, 4)
            M.svd_bases(h.t, 2)
            del h  # cyclic garbage: freed by the collector at some later allocation, maybe inside the lock
            M.svd_bases(w, 2)
    finally:
        gc.set_threshold(*threshold)
