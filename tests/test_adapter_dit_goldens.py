"""Adapters on the tiny-small SA3 DiT against the reference goldens (section f): every adapter type at strength 1.0
and 0.5 (velocity and adapted conditioning), the two-adapter stack, the interval gate, the layer filter and an
include/exclude adapter. fp32 CPU, tolerance from cases.json (atol 1e-4, rtol 1e-4)."""

import pytest
import torch
from sa3_lora_studio.adapters import SA3_ROOTS, AdaptedModel, AdapterUse, read_adapter_file
from safetensors.torch import load_file
from torch import nn

dit_mod = pytest.importorskip("sa3_lora_studio.sa3.dit")
from sa3_lora_studio.sa3.conditioners import NumberConditioner  # noqa: E402
from sa3_lora_studio.sa3.config import read_config  # noqa: E402

TYPES = ["lora", "dora-rows", "dora-cols", "bora", "lora-xs", "dora-rows-xs", "dora-cols-xs", "bora-xs", "dora"]
SECONDS = [1.0, 47.25]


class Tree(nn.Module):
    """The parts of the full SA3 module tree that adapters touch: `.model` (DiTWrapper) and `.conditioner`
    (`.conditioners["seconds_total"]`), with the official key names."""

    def __init__(self, config):
        super().__init__()
        self.model = dit_mod.DiTWrapper(diffusion_objective=config.diffusion["diffusion_objective"], **config.dit)
        seconds = next(c for c in config.conditioning["configs"] if c["id"] == "seconds_total")
        self.conditioner = nn.Module()
        self.conditioner.conditioners = nn.ModuleDict(
            {"seconds_total": NumberConditioner(config.conditioning["cond_dim"], **seconds["config"])})


@pytest.fixture(scope="module")
def setup(fixtures_dir, golden_cases):
    folder = fixtures_dir / "tiny-small"
    tree = Tree(read_config(folder / "model_config.json"))
    state = load_file(str(folder / "model.safetensors"))
    wanted = {k: v for k, v in state.items() if k.startswith(("model.model.", "conditioner.conditioners.seconds_total."))}
    missing, unexpected = tree.load_state_dict(wanted, strict=False)
    assert not unexpected and not missing
    tree.eval().requires_grad_(False)
    golden = load_file(str(fixtures_dir / "golden" / "lora_outputs.safetensors"))
    return tree, golden, golden_cases


def velocity(tree, golden, t, module=None):
    """The DiT velocity on the case inputs with conditioning recomputed through the (possibly adapted) seconds
    conditioner; the prompt tokens are not adapted (T5 is not a target) and are taken from the golden."""
    module = module or tree
    emb, _ = module.conditioner.conditioners["seconds_total"](SECONDS)
    cross = torch.cat([golden["lora.lora.s1.0.cross_attn_cond"][:, :-1], emb], dim=1)
    v = module.model(golden["lora.in.x"], t, cross, emb[:, 0], golden["lora.in.local_zero"],
                     padding_mask=golden["lora.in.pm_full"])
    return v, cross, emb[:, 0]


def close(a, b):
    return torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_base_velocity_matches(setup):
    tree, golden, _ = setup
    with torch.no_grad():
        v, _, _ = velocity(tree, golden, golden["lora.in.t"])
    assert close(v, golden["lora.base.v"]), (v - golden["lora.base.v"]).abs().max()


@pytest.mark.parametrize("name", TYPES)
def test_each_adapter_type_matches_at_strength_one_and_half(setup, fixtures_dir, name):
    tree, golden, cases = setup
    adapter = read_adapter_file(fixtures_dir / "golden" / "lora" / f"{name}.safetensors")
    assert adapter.adapter_type == cases["lora.adapter_types"]["types"][name]["resolved_adapter_type"]
    session = AdaptedModel(tree, [adapter], SA3_ROOTS)
    assert session.report.applied == [31]
    t = golden["lora.in.t"]
    with torch.no_grad(), session, session.at_sigma(t):  # the routed base tree, as generate() uses it
        v, cross, glob = velocity(tree, golden, t)
    errors = [(v - golden[f"lora.{name}.s1.0.v"]).abs().max().item()]
    assert close(v, golden[f"lora.{name}.s1.0.v"]), errors
    assert torch.allclose(cross, golden[f"lora.{name}.s1.0.cross_attn_cond"], atol=2e-5)
    assert torch.allclose(glob, golden[f"lora.{name}.s1.0.global_cond"], atol=2e-5)
    session.set_strength(0, 0.5)
    with torch.no_grad():
        v, _, glob = velocity(tree, golden, t, session.module)  # the explicit view
    assert close(v, golden[f"lora.{name}.s0.5.v"]), (v - golden[f"lora.{name}.s0.5.v"]).abs().max()
    assert torch.allclose(glob, golden[f"lora.{name}.s0.5.global_cond"], atol=2e-5)


def test_legacy_2d_column_dora_matches(setup, fixtures_dir):
    tree, golden, _ = setup
    adapter = read_adapter_file(fixtures_dir / "golden" / "lora" / "dora-legacy-2d-cols.safetensors")
    with torch.no_grad():
        v, _, _ = velocity(tree, golden, golden["lora.in.t"], AdaptedModel(tree, [adapter], SA3_ROOTS).module)
    assert close(v, golden["lora.dora-legacy-2d-cols.s1.0.v"])


def test_two_adapter_stack_chains_like_the_reference(setup, fixtures_dir):
    tree, golden, _ = setup
    files = [read_adapter_file(fixtures_dir / "golden" / "lora" / f"{n}.safetensors") for n in ("lora", "dora-rows")]
    session = AdaptedModel(tree, files, SA3_ROOTS)
    with torch.no_grad():
        v, _, _ = velocity(tree, golden, golden["lora.in.t"], session.module)
        assert close(v, golden["lora.stack.v"])
        session.set_strength(1, 0.5)
        v, _, _ = velocity(tree, golden, golden["lora.in.t"], session.module)
    assert close(v, golden["lora.stack.idx1_s0.5.v"])


def test_interval_gates_the_dit_but_not_the_seconds_conditioner(setup, fixtures_dir):
    tree, golden, _ = setup
    adapter = read_adapter_file(fixtures_dir / "golden" / "lora" / "lora.safetensors")
    session = AdaptedModel(tree, [AdapterUse(adapter, interval=(0.0, 0.5))], SA3_ROOTS)
    with torch.no_grad(), session:
        for i, label in enumerate(("t0.7", "t0.3")):
            t = golden["lora.interval.t"][i]
            with session.at_sigma(t):
                v, _, _ = velocity(tree, golden, t)
            assert close(v, golden[f"lora.interval.{label}.v"]), label


def test_layer_filter_disables_the_reference_layers(setup, fixtures_dir, golden_cases):
    tree, golden, _ = setup
    adapter = read_adapter_file(fixtures_dir / "golden" / "lora" / "lora.safetensors")
    session = AdaptedModel(tree, [AdapterUse(adapter, layer_filter="transformer.layers.1., TO_TIMESTEP_EMBED")],
                           SA3_ROOTS)
    off = sorted(full.removeprefix("model.model.") for full, layer in session.layers.items()
                 if not layer.slots[0].enabled)
    assert off == sorted(golden_cases["lora.layer_filter"]["observed"]["disabled_layers"])
    with torch.no_grad():
        v, _, _ = velocity(tree, golden, golden["lora.in.t"], session.module)
    assert close(v, golden["lora.layer_filter.v"])


def test_include_exclude_adapter_matches(setup, fixtures_dir):
    tree, golden, _ = setup
    adapter = read_adapter_file(fixtures_dir / "golden" / "lora" / "lora-include-exclude.safetensors")
    session = AdaptedModel(tree, [adapter], SA3_ROOTS)
    assert session.report.applied == [5]
    with torch.no_grad():
        v, _, _ = velocity(tree, golden, golden["lora.in.t"], session.module)
    assert close(v, golden["lora.include_exclude.v"])


@pytest.mark.parametrize("mode", ["parametrized", "factored"])
def test_unmerged_modes_match_the_merged_result_on_the_dit(setup, fixtures_dir, mode):
    tree, golden, _ = setup
    adapter = read_adapter_file(fixtures_dir / "golden" / "lora" / "bora.safetensors")
    with torch.no_grad():
        v, _, _ = velocity(tree, golden, golden["lora.in.t"], AdaptedModel(tree, [adapter], SA3_ROOTS, mode=mode).module)
    assert close(v, golden["lora.bora.s1.0.v"])


def test_session_on_a_loaded_model_matches_through_encode_text_and_velocity(fixtures_dir, golden_cases):
    """The path generate() takes: load_model, adapter_session(model, [{"path", "strength"}]), conditioning encoded
    inside the session (the seconds Linear is adapted), one velocity per step under at_sigma."""
    try:
        from sa3_lora_studio import load_model

        model = load_model(fixtures_dir / "tiny-small")
    except ImportError as e:  # parts of the engine not landed yet
        pytest.skip(f"load_model unavailable: {e}")
    from sa3_lora_studio.adapters import adapter_session

    golden = load_file(str(fixtures_dir / "golden" / "lora_outputs.safetensors"))
    prompts = ["dog barking next to a waterfall", "a very long prompt about an orchestral trumpet fanfare in a large "
               "hall with a cinematic riser, whoosh and impact hit, followed by rain falling on a tin roof"]
    path = fixtures_dir / "golden" / "lora" / "dora-rows.safetensors"
    session = adapter_session(model, [{"path": str(path), "strength": 0.5}])
    t = golden["lora.in.t"]
    with torch.no_grad(), session:
        cond = model.encode_text(prompts, SECONDS)
        with session.at_sigma(t):
            v = model.velocity(golden["lora.in.x"], t, cond, golden["lora.in.local_zero"], golden["lora.in.pm_full"])
    assert close(v, golden["lora.dora-rows.s0.5.v"]), (v - golden["lora.dora-rows.s0.5.v"]).abs().max()
    with torch.no_grad():  # outside the session the same shared model is the base model
        v0 = model.velocity(golden["lora.in.x"], t, model.encode_text(prompts, SECONDS), golden["lora.in.local_zero"],
                            golden["lora.in.pm_full"])
    assert close(v0, golden["lora.base.v"])


def test_target_selection_on_the_dit_matches_the_reference_counts_and_lists(setup, golden_cases):
    from sa3_lora_studio.adapters import new_adapter

    tree, _, _ = setup
    everything = new_adapter(tree, "lora", 4, roots=SA3_ROOTS)
    assert len(everything.layers) == golden_cases["lora.adapter_types"]["types"]["lora"]["n_adapted_layers"]
    case = golden_cases["lora.include_exclude"]
    picked = new_adapter(tree, "lora", 4, roots=SA3_ROOTS, include=case["include"], exclude=case["exclude"])
    assert sorted(picked.layers) == sorted(case["observed"]["adapted_layers"])
    underfit = new_adapter(tree, "dora-rows", 4, roots=SA3_ROOTS, preset="underfit-default")
    blocks = {"self_attn.to_qkv", "self_attn.to_out", "cross_attn.to_q", "cross_attn.to_kv", "cross_attn.to_out",
              "ff.ff.0.proj", "ff.ff.2"}
    depth = len(tree.model.model.transformer.layers)
    expected = [f"model.transformer.layers.{i}.{n}" for i in range(depth) for n in blocks]
    assert sorted(underfit.layers) == sorted(expected + ["conditioners.seconds_total.embedder.embedding.1"])
    assert underfit.config["include"] is None and "to_local_embed" in underfit.config["exclude"]  # what files record


@pytest.mark.parametrize("prefix", ["", "diffusion_model."])
def test_a_file_whose_dit_keys_use_another_layout_is_refused_not_applied_to_the_conditioner_only(setup, fixtures_dir,
                                                                                                prefix):
    """Without 'model.' (or with ComfyUI's 'diffusion_model.') only the seconds conditioner's layer would match."""
    from sa3_lora_studio.adapters import AdapterMismatch, LoadedAdapter

    tree = setup[0]
    adapter = read_adapter_file(fixtures_dir / "golden" / "lora" / "lora.safetensors")
    relaid = {(prefix + k.removeprefix("model.") if k.startswith("model.") else k): v for k, v in adapter.layers.items()}
    moved = LoadedAdapter(adapter.adapter_type, adapter.rank, adapter.alpha, relaid, adapter.config, name="relaid")
    with pytest.raises(AdapterMismatch, match=r"relaid: only 1 of its \d+ layers exist in this model"):
        AdaptedModel(tree, [moved], SA3_ROOTS)
