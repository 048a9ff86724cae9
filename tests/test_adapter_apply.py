"""Applying adapters to a shared module tree: views never change the base; merged == parametrized == factored;
official chain stacking, strength, interval/step gating, layer filter; validation errors; training mode; targets."""

import threading
import warnings

import pytest
import torch
from sa3_lora_studio.adapters import (
    AdaptedModel,
    AdapterMismatch,
    AdapterUse,
    LoadedAdapter,
    Root,
    new_adapter,
    select_targets,
    skip_steps_interval,
)
from sa3_lora_studio.adapters import maths as M
from sa3_lora_studio.sa3.dit import linear
from torch import nn

TYPES = list(M.ADAPTER_TYPES)


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.self_attn = nn.Module()
        self.self_attn.to_qkv = nn.Linear(d, 3 * d, bias=False)
        self.self_attn.to_out = nn.Linear(3 * d, d)
        self.ff = nn.Linear(d, d)

    def forward(self, x):  # the DiT's own `linear` (oneDNN for plain frozen Linears on x86, as in the real model)
        attn = self.self_attn
        return x + linear(self.ff, linear(attn.to_out, torch.tanh(linear(attn.to_qkv, x))))


class Net(nn.Module):
    """Stands in for a DiT: a Conv1d and two blocks."""

    def __init__(self, d=16):
        super().__init__()
        self.preprocess_conv = nn.Conv1d(d, d, 3, padding=1)
        self.transformer = nn.Module()
        self.transformer.layers = nn.ModuleList([Block(d) for _ in range(2)])
        self.to_timestep_embed = nn.Linear(d, d)

    def forward(self, x):
        x = self.preprocess_conv(x.transpose(1, 2)).transpose(1, 2) + linear(self.to_timestep_embed, x)
        for layer in self.transformer.layers:
            x = layer(x)
        return x


class Tree(nn.Module):
    """Stands in for the full wrapper: `.model` (DiT wrapper, `.model` = DiT) and `.conditioner` (a Linear)."""

    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.model = Net()
        self.conditioner = nn.Module()
        self.conditioner.conditioners = nn.Module()
        self.conditioner.conditioners.seconds = nn.Linear(4, 16)

    def forward(self, x, s):
        return self.model.model(x + linear(self.conditioner.conditioners.seconds, s)[:, None])


ROOTS = (Root("model", gated=True, filter_strip="model."), Root("conditioner", gated=False))


@pytest.fixture
def tree():
    torch.manual_seed(0)
    t = Tree().requires_grad_(False)
    return t


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 5, 16, generator=g), torch.randn(2, 4, generator=g)


def trained(tree, adapter_type, seed=0, rank=2, **kw) -> LoadedAdapter:
    """A fresh adapter with B / M_xs randomised and magnitudes perturbed, so tests can fail."""
    a = new_adapter(tree, adapter_type, rank, alpha=2 * rank, roots=ROOTS, generator=torch.Generator().manual_seed(seed),
                    **kw)
    g = torch.Generator().manual_seed(seed + 100)
    for t in a.layers.values():
        for k in t:
            if k in ("lora_B", "M_xs"):
                t[k] = torch.randn(t[k].shape, generator=g) * 0.3
            elif k.startswith("magnitude"):
                t[k] = t[k] * (1 + 0.1 * torch.randn(t[k].shape, generator=g))
    a.name = f"{adapter_type}-{seed}"
    return a


def _reference_chain(tree, uses, gated_off=frozenset()):
    """Effective weights per full path by the pure chain (the reference semantics), for comparison."""
    out = {}
    for root in ROOTS:
        for name in select_targets(tree.get_submodule(root.path)):
            full = f"{root.path}.{name}"
            w = tree.get_submodule(full).weight.detach()
            for i, u in enumerate(uses):
                t = dict(u.adapter.layers.get(name, {}))
                if not t or (i, full) in gated_off:
                    continue
                if u.adapter.is_xs:
                    t["U"], t["V"] = M.svd_bases(tree.get_submodule(full).weight, u.adapter.rank)
                w = M.effective_weight(w, u.adapter.adapter_type, t, M.adapter_scale(u.adapter.alpha, u.adapter.rank,
                                                                                      u.strength))
            out[full] = w
    return out


@pytest.mark.parametrize("adapter_type", TYPES)
def test_merged_equals_parametrized_equals_factored_and_the_base_is_untouched(tree, inputs, adapter_type):
    before = {k: v.clone() for k, v in tree.state_dict().items()}
    base_out = tree(*inputs)
    uses = [AdapterUse(trained(tree, adapter_type), strength=0.7)]
    outs = {mode: AdaptedModel(tree, uses, ROOTS, mode=mode).module(*inputs) for mode in ("merged", "parametrized",
                                                                                            "factored")}
    assert torch.equal(outs["merged"], outs["parametrized"])
    assert torch.allclose(outs["factored"], outs["parametrized"], atol=1e-5, rtol=1e-5)
    factored = AdaptedModel(tree, uses, ROOTS, mode="factored")
    factored.module(*inputs)
    # a single adapter keeps no reference to W (a model streaming its blocks lends W per forward: sa3/host_streaming)
    assert all(layer._merged is None for layer in factored.layers.values())
    assert not torch.allclose(outs["merged"], base_out, atol=1e-3)
    assert torch.equal(tree(*inputs), base_out)  # the shared base computes what it did
    after = tree.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_merged_weights_are_the_reference_chain_and_unmerge_keeps_the_base_bit_exact(tree):
    uses = [AdapterUse(trained(tree, "lora", 1)), AdapterUse(trained(tree, "dora-rows", 2), strength=0.5),
            AdapterUse(trained(tree, "bora-xs", 3), strength=1.5)]
    am = AdaptedModel(tree, uses, ROOTS)
    expected = _reference_chain(tree, uses)
    for full, layer in am.layers.items():
        assert torch.equal(layer.weight, expected[full]), full
        assert layer.original is tree.get_submodule(full).weight  # shared, not copied
    am.unmerge()
    assert all(layer._merged is None for layer in am.layers.values())
    for full in am.layers:
        assert not torch.equal(tree.get_submodule(full).weight, expected[full])


def test_stack_order_matters_for_renormalising_types(tree, inputs):
    a, b = trained(tree, "lora", 1), trained(tree, "dora-rows", 2)
    ab = AdaptedModel(tree, [a, b], ROOTS).module(*inputs)
    ba = AdaptedModel(tree, [b, a], ROOTS).module(*inputs)
    assert not torch.allclose(ab, ba, atol=1e-4)


def test_interval_gates_only_gated_roots_and_remerges_only_at_boundaries(tree, inputs):
    a = trained(tree, "dora-rows", 1)
    am = AdaptedModel(tree, [AdapterUse(a, interval=(0.0, 0.5))], ROOTS)
    n_layers = len(am.layers)
    assert am.update(sigma=0.7) == n_layers - 1  # every DiT layer off; the conditioner Linear stays on
    cond_only = AdaptedModel(tree, [LoadedAdapter(a.adapter_type, a.rank, a.alpha, {
        "conditioners.seconds": a.layers["conditioners.seconds"]})], ROOTS).module(*inputs)
    assert torch.equal(am.module(*inputs), cond_only)
    assert am.update(sigma=0.6) == 0  # still off: nothing to re-merge
    assert am.update(sigma=torch.tensor([0.5, 0.9])) == n_layers - 1  # inclusive bound, first batch item decides
    assert torch.equal(am.module(*inputs), AdaptedModel(tree, [a], ROOTS).module(*inputs))


def test_skip_first_steps_counts_steps_and_the_sigma_helper_matches_a_falling_schedule(tree, inputs):
    a = trained(tree, "lora", 1)
    am = AdaptedModel(tree, [AdapterUse(a, skip_first_steps=2)], ROOTS)
    full = AdaptedModel(tree, [a], ROOTS).module(*inputs)
    am.update(sigma=0.9, step=1)
    assert not torch.allclose(am.module(*inputs), full)
    am.update(sigma=0.9, step=2)
    assert torch.equal(am.module(*inputs), full)
    sigmas = [1.0, 0.8, 0.6, 0.3, 0.0]
    lo, hi = skip_steps_interval(sigmas, 2)
    assert [lo <= s <= hi for s in sigmas[:-1]] == [False, False, True, True]
    assert skip_steps_interval(sigmas, 0) == (0.0, 1.0)


def test_layer_filter_disables_matching_gated_layers_case_insensitively(tree):
    a = trained(tree, "lora", 1)
    with pytest.warns(UserWarning, match="layer_filter 'seconds' matches none of its layers"):  # none in this tree
        am = AdaptedModel(tree, [AdapterUse(a, layer_filter="transformer.layers.[1-1]., TO_TIMESTEP_EMBED, seconds")],
                          ROOTS)
    off = {full for full, layer in am.layers.items() if not layer.slots[0].enabled}
    assert off == {"model.model.to_timestep_embed", "model.model.transformer.layers.1.self_attn.to_qkv",
                   "model.model.transformer.layers.1.self_attn.to_out", "model.model.transformer.layers.1.ff"}
    # a pattern as SA3 LoRA Info lists the file's layers (with the DiT root's "model.") works the same
    import warnings

    from sa3_lora_studio.adapters.files import grouped_layer_names
    from sa3_lora_studio.adapters.targets import expand_pattern

    listed = next(g for g in grouped_layer_names(a.layers) if "self_attn.to_qkv" in g)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "matches none" notice
        copied = AdaptedModel(tree, [AdapterUse(a, layer_filter=listed)], ROOTS)
    assert {full for full, layer in copied.layers.items() if not layer.slots[0].enabled} == {
        f"model.{name}" for name in expand_pattern(listed)}


def test_a_layer_filter_that_switches_nothing_off_or_more_blocks_than_written_says_so(tree):
    from sa3_lora_studio.adapters.targets import filter_matches, runs_into_a_number

    a = trained(tree, "lora", 1)
    with pytest.warns(UserWarning, match="layer_filter 'nonexistent_layer' matches none of its layers, so it "
                                         "switches nothing off"):
        am = AdaptedModel(tree, [AdapterUse(a, layer_filter="nonexistent_layer")], ROOTS)
    assert all(layer.slots[0].enabled for layer in am.layers.values())
    # the official substring rule stays ("layers.1" is blocks 1 and 10-19); what it also takes is pointed out
    assert filter_matches("transformer.layers.12.ff", "layers.1")
    assert runs_into_a_number("transformer.layers.12.ff", "layers.1")
    assert not runs_into_a_number("transformer.layers.1.ff", "layers.1")
    assert not runs_into_a_number("transformer.layers.12.ff", "layers.1.")
    assert runs_into_a_number("transformer.layers.10.ff", "layers.[0-1]")


def test_strength_is_per_adapter_and_lora_blends_linearly(tree, inputs):
    a = trained(tree, "lora", 1)
    am = AdaptedModel(tree, [a], ROOTS)
    w1 = {k: v.weight.clone() for k, v in am.layers.items()}
    assert am.set_strength(0, 0.5) == len(am.layers)
    for k, layer in am.layers.items():
        w0 = tree.get_submodule(k).weight
        assert torch.allclose(layer.weight, w0 + 0.5 * (w1[k] - w0), atol=1e-6)
    am.set_strength(0, 0.0)
    assert torch.equal(am.module(*inputs), tree(*inputs))


def test_views_for_different_users_do_not_interfere_across_threads(tree, inputs):
    base_out = tree(*inputs)
    adapters = [trained(tree, t, i) for i, t in enumerate(["lora", "dora-cols", "bora"])]
    expected = [AdaptedModel(tree, [a], ROOTS).module(*inputs) for a in adapters]
    results, errors = {}, []

    def user(i):
        try:
            for _ in range(5):
                out = AdaptedModel(tree, [adapters[i]], ROOTS).module(*inputs) if i < 3 else tree(*inputs)
                results.setdefault(i, []).append(out)
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=user, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    for i in range(3):
        assert all(torch.equal(o, expected[i]) for o in results[i])
    assert all(torch.equal(o, base_out) for o in results[3])


def test_shape_mismatch_names_the_first_layer(tree):
    a = trained(tree, "dora-rows", 1)
    other = Tree()
    other.model.model.transformer.layers[0].self_attn.to_qkv = nn.Linear(16, 40, bias=False)
    with pytest.raises(AdapterMismatch, match=r"transformer\.layers\.0\.self_attn\.to_qkv\.lora_B is \(48, 2\).*"
                                              r"expects \(40, 2\).*trained on another model"):
        AdaptedModel(other, [a], ROOTS)
    # the model it was trained on, as our metadata or underfit's lora_config names it
    for metadata, config, said in (({"base_pack": "sa3-medium"}, {}, "sa3-medium"),
                                   ({}, {"base_model": "sa3-small-sfx"}, "sa3-small-sfx")):
        named = LoadedAdapter(a.adapter_type, a.rank, a.alpha, a.layers, config=config, metadata=metadata)
        with pytest.raises(AdapterMismatch, match=f"trained on {said}; load that model"):
            AdaptedModel(other, [named], ROOTS)


def test_an_adapter_matching_nothing_is_an_error_and_a_partial_match_is_reported(tree):
    a = trained(tree, "lora", 1)
    foreign = LoadedAdapter("lora", 2, 2, {f"other.{k}": v for k, v in a.layers.items()}, name="foreign")
    with pytest.raises(AdapterMismatch, match="foreign: none of its"):
        AdaptedModel(tree, [foreign], ROOTS)
    partial = LoadedAdapter("lora", 2, 2, {**a.layers, "model.gone.layer": a.layers["model.to_timestep_embed"]},
                            name="partial")
    with pytest.warns(UserWarning, match=f"partial: applied to {len(a.layers)} of {len(a.layers) + 1} layers"):
        am = AdaptedModel(tree, [partial], ROOTS)
    assert am.report.applied == [len(a.layers)] and am.report.unmatched == [["model.gone.layer"]]


def test_xs_adapter_on_other_base_weights_warns_and_still_applies(tree):
    a = trained(tree, "dora-rows-xs", 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AdaptedModel(tree, [a], ROOTS)  # same weights: silent
    torch.manual_seed(5)
    arc = Tree()
    with pytest.warns(UserWarning, match="trained on other base weights.*recomputed"):
        am = AdaptedModel(arc, [a], ROOTS)
    assert am.report.applied == [len(a.layers)]


@pytest.mark.parametrize("adapter_type", TYPES)
def test_trainable_adapter_starts_as_identity_and_gets_gradients_only_in_its_tensors(tree, inputs, adapter_type):
    a = new_adapter(tree, adapter_type, 2, roots=ROOTS)
    am = AdaptedModel(tree, [a], ROOTS, trainable=True)
    out = am.module(*inputs)
    assert torch.allclose(out, tree(*inputs), atol=1e-5)
    params = am.parameters()
    assert params and all(p.requires_grad and p.dtype == torch.float32 for p in params)
    out.square().mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert all(p.grad is None for p in tree.parameters())
    exported = am.export()
    assert exported.layers.keys() == a.layers.keys()


def test_trainable_on_top_of_a_frozen_adapter_chains_like_the_reference(tree, inputs):
    frozen, last = trained(tree, "dora-rows", 1), trained(tree, "dora-cols", 2)
    ref = AdaptedModel(tree, [frozen, last], ROOTS, mode="parametrized").module(*inputs)
    am = AdaptedModel(tree, [frozen, last], ROOTS, trainable=True)
    assert torch.allclose(am.module(*inputs), ref, atol=1e-5)
    assert len(am.parameters()) == sum(len(t) for t in last.layers.values())


def test_target_selection_uses_include_exclude_brackets_and_presets(tree):
    dit = tree.model
    assert select_targets(dit, include=["transformer.layers.[0-1].self_attn"], exclude=["to_out"]) == [
        "model.transformer.layers.0.self_attn.to_qkv", "model.transformer.layers.1.self_attn.to_qkv"]
    assert "model.preprocess_conv" in select_targets(dit)
    assert select_targets(dit, preset="underfit-default") == [
        f"model.transformer.layers.{i}.{n}" for i in range(2) for n in ("self_attn.to_qkv", "self_attn.to_out", "ff")]
    with pytest.raises(ValueError, match="preset"):
        select_targets(dit, preset="nope")
    with pytest.raises(ValueError, match=r"range \[0-99999999\] spans more than"):  # a typo must not fill the memory
        select_targets(dit, include=["transformer.layers.[0-99999999]"])


def test_activation_routes_the_base_tree_only_in_this_thread(tree, inputs):
    import copy

    base_out = tree(*inputs)
    am = AdaptedModel(tree, [trained(tree, "dora-rows", 1)], ROOTS)
    adapted = am.module(*inputs)
    seen = {}
    with am.activate():
        assert torch.equal(tree(*inputs), adapted)
        other = threading.Thread(target=lambda: seen.update(out=tree(*inputs)))
        other.start()
        other.join()
        clone = copy.deepcopy(tree)
        assert torch.equal(clone(*inputs), base_out)  # a copy of the base is a different model: never routed
    assert torch.equal(seen["out"], base_out)
    assert torch.equal(tree(*inputs), base_out)
    assert isinstance(tree.model.model.to_timestep_embed, nn.Linear)
    assert tree.state_dict().keys() == Tree().state_dict().keys()


def test_session_dicts_gate_by_sigma_and_counted_steps(tree, inputs, tmp_path):
    from sa3_lora_studio.adapters import adapter_session, read_adapter_file, write_adapter_file

    a = trained(tree, "lora", 1)
    path = write_adapter_file(tmp_path / "a.safetensors", a)
    full = AdaptedModel(tree, [read_adapter_file(path)], ROOTS).module(*inputs)
    session = adapter_session(tree, [{"path": str(path), "strength": 1.0, "interval": (0.0, 0.5),
                                      "skip_first_steps": 0}], roots=ROOTS)
    with session:
        with session.at_sigma(torch.tensor([0.9, 0.1])):
            off = tree(*inputs)
        with session.at_sigma(0.4):
            on = tree(*inputs)
    assert not torch.allclose(off, full) and torch.equal(on, full)
    skip = adapter_session(tree, [{"path": str(path), "skip_first_steps": 2}], roots=ROOTS)
    with skip:
        outs = []
        for sigma in (1.0, 0.8, 0.6, 0.4):
            with skip.at_sigma(sigma):
                outs.append(tree(*inputs))
    assert [torch.equal(o, full) for o in outs] == [False, False, True, True]


def test_lora_dropout_acts_only_in_training_steps(tree, inputs):
    a = new_adapter(tree, "lora", 2, roots=ROOTS, dropout=0.5)
    for t in a.layers.values():
        t["lora_B"] = torch.randn(t["lora_B"].shape) * 0.3
    am = AdaptedModel(tree, [a], ROOTS, trainable=True)
    ref = am.module(*inputs)
    assert torch.equal(am.module(*inputs), ref)
    am.set_training(True)
    torch.manual_seed(3)
    assert not torch.allclose(am.module(*inputs), ref)
    am.set_training(False)
    assert torch.equal(am.module(*inputs), ref)


@pytest.mark.parametrize("adapter_type", ["dora-rows", "bora", "dora-cols-xs"])
def test_factored_inference_keeps_a_frozen_adapters_renorm_factors_until_its_state_changes(tree, inputs, adapter_type,
                                                                                          monkeypatch):
    import sa3_lora_studio.adapters.apply as apply

    calls = []
    real = apply.row_col_scales
    monkeypatch.setattr(apply, "row_col_scales", lambda *a, **k: calls.append(1) or real(*a, **k))
    uses = [AdapterUse(trained(tree, adapter_type))]
    view = AdaptedModel(tree, uses, ROOTS, mode="factored")
    linears = sum(isinstance(layer._base, nn.Linear) for layer in view.layers.values())
    with torch.no_grad():
        first = view.module(*inputs)
        assert len(calls) == linears
        assert torch.equal(view.module(*inputs), first) and len(calls) == linears  # kept
        view.set_strength(0, 0.4)
        weaker = view.module(*inputs)
        assert len(calls) == 2 * linears  # the strength changed the factors
    fresh = AdaptedModel(tree, [AdapterUse(uses[0].adapter, strength=0.4)], ROOTS, mode="parametrized")
    with torch.no_grad():
        assert torch.allclose(weaker, fresh.module(*inputs), atol=1e-5)


def test_an_xs_rank_above_a_small_layer_names_the_layers_and_both_ways_out(tree):
    """The seconds Linear is [16, 4]: -xs rank 8 cannot hold it; excluding it (as the message says) works."""
    with pytest.raises(ValueError, match=r"rank 8 is above .* 1 targeted layer.*conditioners.seconds \(4\).*"
                                         r"Use rank <= 4, or exclude those layers \(exclude=\['conditioners.seconds'\]\)"):
        new_adapter(tree, "bora-xs", 8, roots=ROOTS)
    assert new_adapter(tree, "bora-xs", 8, roots=ROOTS, exclude=["conditioners.seconds"]).layers


def test_lora_dropout_masks_are_drawn_once_per_step_from_the_given_generator(tree, inputs):
    a = new_adapter(tree, "lora", 2, roots=ROOTS, dropout=0.5)
    for t in a.layers.values():
        t["lora_B"] = torch.randn(t["lora_B"].shape) * 0.3
    am = AdaptedModel(tree, [a], ROOTS, trainable=True)
    assert am.has_dropout()
    am.set_training(True, torch.Generator().manual_seed(1))
    first = am.module(*inputs)
    torch.rand(100)  # another thread's draw from the global generator changes nothing
    assert torch.equal(am.module(*inputs), first)  # one mask for the step: a recomputed block sees it again
    am.set_training(True, torch.Generator().manual_seed(1))
    assert torch.equal(am.module(*inputs), first)  # the same seed, the same masks (a resumed run)
    am.set_training(True, torch.Generator().manual_seed(2))
    assert not torch.equal(am.module(*inputs), first)
    am.set_training(False)
    assert not AdaptedModel(tree, [new_adapter(tree, "lora", 2, roots=ROOTS)], ROOTS, trainable=True).has_dropout()
