"""The SA3 DiT against the official implementation's goldens (dit.small, dit.medium: every variant and the traced
intermediates), plus properties of padding, guidance plumbing, checkpointing and the key layout."""

import json

import pytest
import torch
from conftest import REAL_CONFIGS, load_golden
from sa3_lora_studio.sa3 import dit as dit_module
from sa3_lora_studio.sa3.dit import DiffusionTransformer, DiTWrapper, apg_project, collapse_token_runs
from safetensors.torch import load_file

MODELS = {"small": "tiny-small", "medium": "tiny-medium"}

# variant -> (local cond, padding mask, extra kwargs); the calls the reference made (cases.json "variants")
VARIANTS = {
    "base": ("local_zero", "pm_full", {}),
    "inpaint": ("local_inpaint", "pm_full", {}),
    "no_padding_mask": ("local_zero", None, {}),
    "cfg3_apg": ("local_zero", "pm_full", {"cfg_scale": 3.0}),
    "cfg3_apg_empty_string_negative": ("local_zero", "pm_full", {"cfg_scale": 3.0, "negative": "empty_negative"}),
    "cfg3_apg_negative": ("local_zero", "pm_full", {"cfg_scale": 3.0, "negative": "negative"}),
    "cfg3_vanilla": ("local_zero", "pm_full", {"cfg_scale": 3.0, "apg_scale": 0.0}),
    "cfg3_apg_half": ("local_zero", "pm_full", {"cfg_scale": 3.0, "apg_scale": 0.5}),
    "cfg3_apg_inpaint_negative": ("local_inpaint", "pm_full", {"cfg_scale": 3.0, "negative": "negative"}),
    # the reference's CPU path zeroes V at padded keys; only our "zero_values" semantics reproduce it
    "quirk_partial_padding": ("local_zero", "pm_partial", {"padding_semantics": "zero_values"}),
    "quirk_partial_padding_cfg3": ("local_zero", "pm_partial", {"padding_semantics": "zero_values", "cfg_scale": 3.0}),
}


def diffusion_section(fixtures_dir, model: str) -> dict:
    return json.loads((fixtures_dir / model / "model_config.json").read_text())["model"]["diffusion"]


def build_dit(fixtures_dir, model: str) -> DiTWrapper:
    """The fixture's DiTWrapper, loaded through the public `load_model` users call (strict key match)."""
    from sa3_lora_studio import load_model

    wrapper = load_model(fixtures_dir / model).modules.model
    assert isinstance(wrapper, DiTWrapper)
    return wrapper.eval().requires_grad_(True)  # some tests take gradients (load_model freezes the base)


@pytest.fixture(scope="module")
def golden(fixtures_dir):
    return load_golden(fixtures_dir, "dit.safetensors")


@pytest.fixture(scope="module", params=list(MODELS))
def size(request):
    return request.param


@pytest.fixture(scope="module")
def dit(fixtures_dir, size):
    return build_dit(fixtures_dir, MODELS[size])


def inputs(golden, size: str) -> dict:
    return {k[len(f"dit.{size}.in."):]: v for k, v in golden.items() if k.startswith(f"dit.{size}.in.")}


def run_variant(dit, golden, size: str, variant: str) -> torch.Tensor:
    i = inputs(golden, size)
    local, mask, extra = VARIANTS[variant]
    extra = dict(extra)
    negative = extra.pop("negative", None)
    if negative:
        extra["negative_cross_attn_cond"] = i[f"{negative}_cross_attn_cond"]
        extra["negative_cross_attn_mask"] = i[f"{negative}_cross_attn_mask"]
    with torch.no_grad():
        return dit(i["x"], i["t"], i["cross_attn_cond"], i["global_cond"], i[local],
                   padding_mask=i[mask] if mask else None, cross_attn_mask=i["cross_attn_mask"], **extra)


def test_the_golden_variants_are_the_ones_this_test_runs(golden_cases):
    for size in MODELS:
        assert set(golden_cases[f"dit.{size}"]["variants"]) == set(VARIANTS)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_velocity_matches_the_reference(dit, golden, golden_cases, size, variant):
    case = golden_cases[f"dit.{size}"]
    tol = case["tolerance"]
    expected = golden[case["variants"][variant]["expected"]]
    torch.testing.assert_close(run_variant(dit, golden, size, variant), expected, atol=tol["atol"], rtol=tol["rtol"])


def test_intermediates_match_the_reference_traces(dit, golden, golden_cases, size):
    case = golden_cases[f"dit.{size}"]
    model = dit.model
    hooked = {"to_cond_embed": model.to_cond_embed, "to_global_embed": model.to_global_embed,
              "to_timestep_embed": model.to_timestep_embed,
              "global_cond_embedder": model.transformer.global_cond_embedder,
              "project_out": model.transformer.project_out}
    hooked.update({f"block{i}_out": block for i, block in enumerate(model.transformer.layers)})
    seen, handles = {}, []
    for name, module in hooked.items():
        handles.append(module.register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, out)))
    try:
        run_variant(dit, golden, size, "base")
    finally:
        for h in handles:
            h.remove()
    names = [n.rsplit(".", 1)[-1] for n in case["trace"]["tensors"]]
    assert sorted(names) == sorted(hooked)
    for name in names:
        torch.testing.assert_close(seen[name], golden[f"dit.{size}.trace.{name}"], atol=1e-4, rtol=1e-4,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_module_keys_equal_the_checkpoint_keys(fixtures_dir, dit, size):
    state = load_file(str(fixtures_dir / MODELS[size] / "model.safetensors"))
    expected = {k[len("model."):] for k in state if k.startswith("model.model.")}
    assert set(dit.state_dict()) == expected


def test_all_true_padding_mask_equals_no_mask(dit, golden, size):
    i = inputs(golden, size)
    with torch.no_grad():
        for semantics in ("mask_keys", "zero_values"):
            for cfg in (1.0, 3.0):
                a = dit(i["x"], i["t"], i["cross_attn_cond"], i["global_cond"], i["local_inpaint"],
                        padding_mask=torch.ones_like(i["pm_full"]), cfg_scale=cfg, padding_semantics=semantics)
                b = dit(i["x"], i["t"], i["cross_attn_cond"], i["global_cond"], i["local_inpaint"],
                        padding_mask=None, cfg_scale=cfg, padding_semantics=semantics)
                assert torch.equal(a, b)


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_key_masking_makes_valid_frames_independent_of_padded_content(dit, golden, size, cfg_scale):
    i = inputs(golden, size)
    mask = i["pm_partial"]
    assert not mask.all() and mask.any()
    pad = ~mask[:, None, :]
    x2 = torch.where(pad, torch.randn_like(i["x"]) * 5, i["x"])
    local2 = torch.where(pad, torch.randn_like(i["local_inpaint"]), i["local_inpaint"])
    valid = mask[:, None, :].expand_as(i["x"])

    def run(x, local, semantics):
        with torch.no_grad():
            return dit(x, i["t"], i["cross_attn_cond"], i["global_cond"], local, padding_mask=mask,
                       cfg_scale=cfg_scale, padding_semantics=semantics)

    a, b = run(i["x"], i["local_inpaint"], "mask_keys"), run(x2, local2, "mask_keys")
    torch.testing.assert_close(a[valid], b[valid], atol=1e-5, rtol=1e-5)
    # the reference quirk leaks padded content into valid frames through the softmax, so the check can fail
    a, b = run(i["x"], i["local_inpaint"], "zero_values"), run(x2, local2, "zero_values")
    assert (a[valid] - b[valid]).abs().max() > 1e-3
    # and an unmasked run differs from the masked one at valid frames
    with torch.no_grad():
        unmasked = dit(i["x"], i["t"], i["cross_attn_cond"], i["global_cond"], i["local_inpaint"],
                       cfg_scale=cfg_scale)
    assert (unmasked[valid] - run(i["x"], i["local_inpaint"], "mask_keys")[valid]).abs().max() > 1e-3


def test_no_local_cond_means_zeros_and_the_zero_fast_path_matches_the_full_computation(dit, golden, size):
    i = inputs(golden, size)
    with torch.no_grad():
        none = dit(i["x"], i["t"], i["cross_attn_cond"], i["global_cond"], None)
        zeros = dit(i["x"], i["t"], i["cross_attn_cond"], i["global_cond"], i["local_zero"])
        # a zero row in item 0 only, non-zero item 1: the full per-frame path runs for the batch
        mixed = torch.stack([i["local_zero"][0], i["local_inpaint"][1]])
        full = dit(i["x"], i["t"], i["cross_attn_cond"], i["global_cond"], mixed)
    assert torch.equal(none, zeros)
    torch.testing.assert_close(full[0], zeros[0], atol=1e-5, rtol=1e-5)


def test_the_negative_mask_zeroes_padded_negative_tokens(dit, golden, size):
    i = inputs(golden, size)
    neg, neg_mask = i["negative_cross_attn_cond"], i["negative_cross_attn_mask"]
    assert not neg_mask.bool().all()
    zeroed = torch.where(neg_mask.bool()[..., None], neg, torch.zeros_like(neg))
    with torch.no_grad():
        a = dit(i["x"], i["t"], i["cross_attn_cond"], i["global_cond"], None, cfg_scale=3.0,
                negative_cross_attn_cond=neg, negative_cross_attn_mask=neg_mask)
        b = dit(i["x"], i["t"], i["cross_attn_cond"], i["global_cond"], None, cfg_scale=3.0,
                negative_cross_attn_cond=zeroed)
        # outside cfg_interval guidance is off: the plain conditional velocity comes back
        off = dit(i["x"], i["t"], i["cross_attn_cond"], i["global_cond"], None, cfg_scale=3.0, cfg_interval=(0, 0.1))
        plain = dit(i["x"], i["t"], i["cross_attn_cond"], i["global_cond"], None)
    assert torch.equal(a, b)
    assert torch.equal(off, plain)


def test_an_all_zero_context_adds_nothing_so_skipping_its_cross_attention_is_exact(dit, golden, size):
    """CFG's default uncond context is all zeros; the DiT skips those items' cross-attention. A tiny non-zero
    context (1e-30, which is computed) must give the same velocity, per item and in a mixed batch."""
    i = inputs(golden, size)
    cond = i["cross_attn_cond"]
    zero, tiny = torch.zeros_like(cond), torch.full_like(cond, 1e-30)
    with torch.no_grad():
        for ctx_skip, ctx_full in [(zero, tiny), (torch.stack([cond[0], zero[1]]), torch.stack([cond[0], tiny[1]]))]:
            skipped = dit(i["x"], i["t"], ctx_skip, i["global_cond"], i["local_inpaint"])
            computed = dit(i["x"], i["t"], ctx_full, i["global_cond"], i["local_inpaint"])
            torch.testing.assert_close(skipped, computed, atol=1e-5, rtol=1e-5)
    # with a context the output does differ (so the comparison above can fail)
    assert (skipped - dit(i["x"], i["t"], cond, i["global_cond"], i["local_inpaint"]).detach()).abs().max() > 1e-3

    def grads(ctx):  # training's CFG dropout zeroes some items' contexts: the gradients must agree too
        dit.zero_grad()
        dit(i["x"], i["t"], ctx, i["global_cond"], i["local_inpaint"]).square().mean().backward()
        return {n: p.grad.clone() for n, p in dit.named_parameters()}

    try:
        g_skip, g_full = grads(ctx_skip), grads(ctx_full)
    finally:
        dit.zero_grad(set_to_none=True)
    for name in g_skip:
        torch.testing.assert_close(g_skip[name], g_full[name], atol=1e-6, rtol=1e-4, msg=name)


def run_weights(first: torch.Tensor, bias: torch.Tensor, length: int, dtype=torch.float32) -> torch.Tensor:
    """[B, length]: the total attention weight e^bias (bias taken in `dtype`, as SDPA takes it) each context
    position receives from the keys `collapse_token_runs` gave it."""
    weights = bias[:, 0, 0].to(dtype).double().exp()
    return torch.zeros(first.shape[0], length, dtype=torch.float64).scatter_add_(1, first, weights)


def test_collapse_token_runs_finds_each_run_and_its_length():
    a, b, pad = torch.randn(3, 4).unbind(0)
    cond = torch.stack([torch.stack([a, b, pad, pad, pad, a, b, a]), torch.stack([a, pad, pad, pad, pad, pad, b, a])])
    first, bias = collapse_token_runs(cond)
    assert first.shape == bias.shape[::3] and bias.shape[1:3] == (1, 1)
    assert first[0, :6].tolist() == [0, 1, 2, 5, 6, 7] and first[1, :4].tolist() == [0, 1, 6, 7]
    # each run's weight is its length, on its first token; the runs of 3 and 5 each take a second key
    assert first.shape[1] == 7 and first[0, 6] == 2 and first[1, 6] == 1  # after each item's runs
    torch.testing.assert_close(run_weights(first, bias, 8)[0], torch.tensor([1.0, 1, 3, 0, 0, 1, 1, 1], dtype=torch.float64))
    torch.testing.assert_close(run_weights(first, bias, 8)[1], torch.tensor([1.0, 5, 0, 0, 0, 0, 1, 1], dtype=torch.float64))
    assert bias[1, 0, 0, 4:6].eq(float("-inf")).all()  # filler slots of the item with fewer keys
    first32, bias32 = collapse_token_runs(cond, half_precision_bias=False)  # fp32 holds log(n): one key per run
    assert first32.tolist() == [[0, 1, 2, 5, 6, 7], [0, 1, 6, 7, 0, 0]]
    torch.testing.assert_close(run_weights(first32, bias32, 8), run_weights(first, bias, 8))
    assert collapse_token_runs(torch.stack([torch.stack([a, b, a, b])])) is None  # equal tokens, not adjacent
    assert collapse_token_runs(torch.stack([torch.stack([a, b, pad, pad])])) is None  # 3 runs, 4 keys: no saving


def test_collapsed_run_weights_hold_in_half_precision_biases():
    """SDPA takes the bias in the query's dtype: a bf16 log(n) alone would put a run's weight up to 1.6% off."""
    pad, token = torch.randn(2, 3).unbind(0)
    lengths = torch.arange(1, 700)
    cond = torch.stack([torch.stack([token] + [pad] * int(n) + [token] * (700 - int(n))) for n in lengths])
    first, bias = collapse_token_runs(cond)
    for dtype, tolerance in [(torch.float32, 1e-6), (torch.bfloat16, 6e-4), (torch.float16, 6e-4)]:
        weight = run_weights(first, bias, 701, dtype)[:, 1]  # the pad run starts at position 1
        assert ((weight / lengths - 1).abs().max()) < tolerance, dtype
        assert bias[:, 0, 0, :2].to(dtype).float().equal(bias[:, 0, 0, :2]), dtype  # the coarse keys are exact


def test_repeated_padding_tokens_are_attended_once_with_the_same_values_and_gradients(dit, golden, size, monkeypatch):
    """A short prompt's padded positions all hold the padding embedding; the DiT attends each run once with a
    log-length bias. Against the same contexts attended token by token: a mixed batch with two prompt lengths, one
    with an all-zero (skipped) context beside it, with guidance, and with gradient checkpointing."""
    i = inputs(golden, size)
    cond = i["cross_attn_cond"]
    length = cond.shape[1]
    pad = torch.randn(cond.shape[2], generator=torch.Generator().manual_seed(3))

    def padded(item: int, n_prompt: int) -> torch.Tensor:
        pads = [pad] * (length - 1 - n_prompt)
        return torch.stack(pads + [cond[item, j] for j in range(n_prompt)] + [cond[item, -1]])  # seconds token last

    n_short, n_long = 2, (length - 1) // 2
    collapsed = torch.stack([padded(0, n_short), padded(1, n_long)])
    assert collapse_token_runs(collapsed)[1].shape[-1] < length

    collapse = dit_module.collapse_token_runs

    def run(ctx, mode: str, **kw):
        """mode: "off" (token by token), "one key" (fp32: a run's bias is log n) or "split" (as in half precision)."""
        with monkeypatch.context() as patch:
            if mode == "off":
                patch.setattr(dit_module, "collapse_token_runs", lambda cond, **_: None)
            elif mode == "split":
                patch.setattr(dit_module, "collapse_token_runs", lambda cond, **_: collapse(cond, True))
            dit.zero_grad()
            v = dit(i["x"], i["t"], ctx, i["global_cond"], i["local_inpaint"], **kw)
            v.square().mean().backward()
        return v.detach(), {n: p.grad.clone() for n, p in dit.named_parameters() if p.grad is not None}

    one_skipped = torch.stack([collapsed[0], torch.zeros_like(collapsed[1])])
    try:
        for ctx, kw, checkpointing in [(collapsed, {}, False), (one_skipped, {}, False),
                                       (collapsed, {"cfg_scale": 3.0}, False), (collapsed, {}, True)]:
            dit.gradient_checkpointing = checkpointing
            vb, gb = run(ctx, "off", **kw)
            for mode in ("one key", "split"):
                va, ga = run(ctx, mode, **kw)
                torch.testing.assert_close(va, vb, atol=1e-5, rtol=1e-5)
                assert ga.keys() == gb.keys() and ga
                for name in ga:
                    scale = float(gb[name].abs().max())  # fp32 summation-order noise, relative to the gradient's size
                    torch.testing.assert_close(ga[name], gb[name], atol=1e-5 * scale, rtol=1e-4, msg=f"{mode} {name}")
    finally:
        dit.gradient_checkpointing = False
        dit.zero_grad(set_to_none=True)
    seen = []  # the collapsed context really is shorter: the keys/values are projected for each key once
    attn = dit.model.transformer.layers[0].cross_attn
    handle = attn.register_forward_pre_hook(lambda m, args, kw: seen.append(kw["context"].shape[1]), with_kwargs=True)
    try:
        with torch.no_grad():
            plain = dit(i["x"], i["t"], collapsed, i["global_cond"], i["local_inpaint"])
    finally:
        handle.remove()
    assert seen == [collapse_token_runs(collapsed, half_precision_bias=False)[1].shape[-1]]  # one key a run in fp32
    # the runs' lengths count: one pad instead of many gives another velocity (so the comparisons can fail)
    single = torch.stack([torch.stack([pad, *collapsed[0, -n_short - 1:]])] * 2)
    with torch.no_grad():
        assert (dit(i["x"], i["t"], single, i["global_cond"], i["local_inpaint"])[0] - plain[0]).abs().max() > 1e-4


def test_gradient_checkpointing_gives_the_same_output_and_gradients(dit, golden, size):
    i = inputs(golden, size)
    model = dit.model

    def loss_and_grads(checkpointing: bool):
        model.gradient_checkpointing = checkpointing
        model.zero_grad()
        v = model.velocity(i["x"], i["t"], i["cross_attn_cond"], i["global_cond"], i["local_inpaint"], i["pm_partial"])
        v.square().mean().backward()
        return v.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    try:
        v0, g0 = loss_and_grads(False)
        v1, g1 = loss_and_grads(True)
    finally:
        model.gradient_checkpointing = False
        model.zero_grad(set_to_none=True)
    assert torch.equal(v0, v1)
    assert g0.keys() == g1.keys() and len(g0) == len(list(model.parameters()))
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-6, rtol=1e-5, msg=name)


def test_inference_fast_path_equals_the_autograd_path(dit, golden, size):
    i = inputs(golden, size)
    with torch.no_grad():
        fast = dit(i["x"], i["t"], i["cross_attn_cond"], i["global_cond"], i["local_inpaint"])
    slow = dit(i["x"], i["t"], i["cross_attn_cond"], i["global_cond"], i["local_inpaint"]).detach()
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


def test_bfloat16_weights_run_with_fp32_time_and_stay_close_to_fp32(fixtures_dir, golden, size):
    i = inputs(golden, size)
    half = build_dit(fixtures_dir, MODELS[size]).to(torch.bfloat16)
    assert half.model.transformer.rotary_pos_emb.inv_freq.dtype == torch.bfloat16  # moved by .to(); recomputed
    half.model.transformer.rotary_pos_emb.inv_freq = half.model.transformer.rotary_pos_emb.compute_inv_freq()
    args = (i["x"], i["t"], i["cross_attn_cond"], i["global_cond"], i["local_inpaint"])
    with torch.no_grad():
        v = half(*args, padding_mask=i["pm_partial"], cfg_scale=3.0)
        expected = build_dit(fixtures_dir, MODELS[size])(*args, padding_mask=i["pm_partial"], cfg_scale=3.0)
    assert v.dtype == torch.float32  # guidance promotes to fp32 (t is fp32), as the reference does
    rel = (v - expected).norm() / expected.norm()
    assert rel < 0.1, rel


def test_apg_projection_splits_a_vector_into_parallel_and_orthogonal_parts():
    torch.manual_seed(0)
    v0, v1 = torch.randn(3, 4, 10), torch.randn(3, 4, 10)
    parallel, orthogonal = apg_project(v0, v1)
    torch.testing.assert_close(parallel + orthogonal, v0)
    assert (orthogonal * v1).sum(dim=[1, 2]).abs().max() < 1e-4
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[1, 7:] = False
    parallel, orthogonal = apg_project(v0, v1, mask)
    assert orthogonal[1, :, 7:].abs().max() == 0
    assert (orthogonal * v1 * mask[:, None]).sum(dim=[1, 2]).abs().max() < 1e-4


@pytest.mark.parametrize("embed_dim,num_heads,differential", [(96, 3, False), (192, 3, True), (256, 2, True)])
def test_other_sizes_build_and_run(embed_dim, num_heads, differential):
    """Nothing depends on the fixture sizes: head dims 32 (RoPE on all 32 dims) and 128 (RoPE on 64 of 128)."""
    torch.manual_seed(0)
    config = dict(io_channels=8, embed_dim=embed_dim, depth=3, num_heads=num_heads, cond_token_dim=24,
                  global_cond_dim=20, local_add_cond_dim=9, num_memory_tokens=5, global_cond_type="adaLN",
                  timestep_features_type="expo", norm_type="rms_norm",
                  attn_kwargs={"qk_norm": "rms", "differential": differential}, ff_kwargs={"mult": 2.5},
                  transformer_type="continuous_transformer", patch_size=1)
    dit = DiffusionTransformer(**config).eval()
    head_dim = embed_dim // num_heads
    assert dit.transformer.rotary_pos_emb.inv_freq.shape == (max(head_dim // 2, 32) // 2,)
    assert dit.transformer.layers[0].ff.ff[2].in_features == int(embed_dim * 2.5)
    x, t = torch.randn(2, 8, 13), torch.tensor([0.9, 0.2])
    with torch.no_grad():
        v = dit(x, t, torch.randn(2, 7, 24), torch.randn(2, 20), torch.randn(2, 9, 13),
                padding_mask=torch.arange(13)[None] < torch.tensor([[13], [9]]), cfg_scale=4.0)
    assert v.shape == x.shape and torch.isfinite(v).all()


@pytest.mark.parametrize("name,n_tensors,n_params", [("sa3-sm-music.json", 438, 459_130_880),
                                                    ("sa3-medium.json", 522, 1_453_170_176)])
def test_real_configs_give_the_official_tensor_and_parameter_counts(name, n_tensors, n_params):
    path = REAL_CONFIGS / name
    if not path.exists():
        pytest.skip(f"{path} not found")
    section = json.loads(path.read_text())["model"]["diffusion"]
    with torch.device("meta"):
        wrapper = DiTWrapper(diffusion_objective=section["diffusion_objective"], **section["config"])
    assert len(wrapper.state_dict()) == n_tensors
    assert sum(p.numel() for p in wrapper.parameters()) == n_params


def test_unsupported_features_are_refused_with_the_field_named():
    with pytest.raises(ValueError, match="prepend_cond_dim"):
        DiffusionTransformer(embed_dim=128, num_heads=2, global_cond_dim=8, prepend_cond_dim=8)
    with pytest.raises(ValueError, match="padding_semantics"):
        dit = DiffusionTransformer(io_channels=4, embed_dim=64, depth=1, num_heads=1, global_cond_dim=8)
        dit(torch.zeros(1, 4, 3), torch.ones(1), None, torch.zeros(1, 8), padding_semantics="varlen")


def test_frozen_linear_equals_f_linear_for_strided_weights_and_biases():
    import torch.nn.functional as F
    from sa3_lora_studio.sa3.fast_linear import frozen_linear

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 8, generator=g)
    w = torch.randn(12, 16, generator=g)[:, ::2]  # a strided weight [12, 8]
    for bias in (None, torch.randn(24, generator=g)[::2], torch.randn(1, generator=g).expand(12)):
        expected = F.linear(x, w, bias)
        assert torch.allclose(frozen_linear(x, w, bias), expected, atol=1e-5)
        assert torch.allclose(frozen_linear(x, w.t().contiguous().t(), bias), expected, atol=1e-5)
