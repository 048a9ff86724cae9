"""Adapter files: reference files read, rewritten identically; our metadata; Lightning .ckpt read safely."""

import json

import pytest
import torch
from sa3_lora_studio.adapters import (
    EXTRA_METADATA_KEYS,
    AdaptedModel,
    AdapterFileError,
    Root,
    adapter_from_state,
    new_adapter,
    read_adapter_file,
    write_adapter_file,
)
from sa3_lora_studio.adapters.maths import ADAPTER_TYPES
from safetensors import safe_open
from torch import nn

GOLDEN_FILES = [*ADAPTER_TYPES, "dora", "dora-legacy-2d-cols", "lora-include-exclude"]


def _raw(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.mark.parametrize("name", GOLDEN_FILES)
def test_reference_files_read_and_rewrite_to_the_same_keys_tensors_and_lora_config(fixtures_dir, golden_cases, tmp_path,
                                                                                     name):
    src = fixtures_dir / "golden" / "lora" / f"{name}.safetensors"
    adapter = read_adapter_file(src)
    types = golden_cases["lora.adapter_types"]["types"]
    if name in types:
        assert adapter.adapter_type == types[name]["resolved_adapter_type"]
        if "n_adapted_layers" in types[name]:
            assert len(adapter.layers) == types[name]["n_adapted_layers"]
    assert (adapter.rank, adapter.alpha, adapter.scaling) == (4, 8, 2.0)
    out = write_adapter_file(tmp_path / "again.safetensors", adapter)
    (a, meta_a), (b, meta_b) = _raw(src), _raw(out)
    if name == "dora-legacy-2d-cols":
        # we store magnitudes 1-D, as the current reference writes them; under "dora" every reader would then take
        # them for rows, so the file names its resolved type
        a = {k: v.reshape(-1) if k.endswith("magnitude") else v for k, v in a.items()}
        meta_a = {"lora_config": meta_a["lora_config"].replace('"adapter_type": "dora"', '"adapter_type": "dora-cols"')}
        again = read_adapter_file(out)
        assert again.adapter_type == "dora-cols" and again.layers.keys() == adapter.layers.keys()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) and b[k].dtype == torch.float16 for k in a)
    assert meta_b == meta_a  # {"lora_config": same JSON string}


def test_include_exclude_file_lists_the_reference_layers(fixtures_dir, golden_cases):
    case = golden_cases["lora.include_exclude"]
    adapter = read_adapter_file(fixtures_dir / "golden" / "lora" / "lora-include-exclude.safetensors")
    assert sorted(adapter.layers) == sorted(case["observed"]["adapted_layers"])
    assert adapter.config["include"] == case["include"] and adapter.config["exclude"] == case["exclude"]


class _Tree(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.transformer = nn.Module()
        self.model.transformer.layers = nn.ModuleList([nn.Linear(8, 12), nn.Linear(12, 8)])
        self.model.preprocess_conv = nn.Conv1d(8, 8, 1, bias=False)
        self.conditioners = nn.Module()
        self.conditioners.seconds = nn.Linear(4, 8)


@pytest.mark.parametrize("adapter_type", list(ADAPTER_TYPES))
def test_written_file_has_the_official_writer_key_set_and_round_trips(tmp_path, adapter_type):
    torch.manual_seed(0)
    tree = _Tree()
    adapter = new_adapter(tree, adapter_type, rank=2, alpha=4)
    # what the reference saves: parametrized state-dict names with 'parametrizations' 4th from last and a trainable leaf
    view = AdaptedModel(tree, [adapter], trainable=True).module
    leaves = {"lora_A", "lora_B", "M_xs", "magnitude", "magnitude_r", "magnitude_c"}
    official = {k for k in view.state_dict()
                if len(k.split(".")) >= 4 and k.split(".")[-4] == "parametrizations" and k.split(".")[-1] in leaves}
    path = write_adapter_file(tmp_path / "a.safetensors", adapter, base_pack="tiny", step=400, epoch=3,
                              trigger_words=["zzq"], created_by="sa3_lora_studio")
    tensors, meta = _raw(path)
    assert set(tensors) == official
    assert json.loads(meta["lora_config"]) == {"rank": 2, "alpha": 4, "adapter_type": adapter_type, "dropout": 0.0,
                                               "include": None, "exclude": None}
    assert list(json.loads(meta["lora_config"])) == ["rank", "alpha", "adapter_type", "dropout", "include", "exclude"]
    assert set(meta) == {"lora_config", *EXTRA_METADATA_KEYS}
    assert meta["step"] == "400" and json.loads(meta["trigger_words"]) == ["zzq"]
    back = read_adapter_file(path)
    assert back.metadata == {k: v for k, v in meta.items() if k != "lora_config"}
    again = write_adapter_file(tmp_path / "b.safetensors", back)
    t2, meta2 = _raw(again)
    assert meta2 == meta and all(torch.equal(tensors[k], t2[k]) for k in tensors)
    for layer, t in back.layers.items():
        for k, v in t.items():
            assert torch.equal(v, adapter.layers[layer][k].half().float())


def test_missing_rank_and_alpha_are_inferred_as_the_reference_does():
    state = {"a.parametrizations.weight.0.lora_A": torch.zeros(3, 5),
             "a.parametrizations.weight.0.lora_B": torch.zeros(7, 3)}
    adapter = adapter_from_state(state, {})
    assert (adapter.adapter_type, adapter.rank, adapter.alpha) == ("lora", 3, 3)
    xs = adapter_from_state({"a.parametrizations.weight.0.M_xs": torch.zeros(2, 2)}, {"adapter_type": "lora-xs",
                                                                                       "alpha": 6})
    assert (xs.rank, xs.alpha, xs.scaling) == (2, 6, 3.0)


def test_lightning_ckpt_is_read_with_weights_only(tmp_path):
    state = {"model.x.parametrizations.weight.0.lora_A": torch.randn(2, 4),
             "model.x.parametrizations.weight.0.lora_B": torch.randn(3, 2)}
    torch.save({"state_dict": state, "lora_config": {"rank": 2, "alpha": 2, "adapter_type": "lora"}},
               tmp_path / "run-step=100.ckpt")
    adapter = read_adapter_file(tmp_path / "run-step=100.ckpt")
    assert adapter.name == "run-step=100" and torch.equal(adapter.layers["model.x"]["lora_A"], state[
        "model.x.parametrizations.weight.0.lora_A"])


class _Evil:
    def __reduce__(self):
        return (print, ("this would run at unpickling",))


def test_ckpt_with_arbitrary_objects_is_refused_with_a_clear_message(tmp_path):
    torch.save({"state_dict": {}, "callback": _Evil()}, tmp_path / "bad.ckpt")
    with pytest.raises(AdapterFileError, match="refusing to load.*weights_only"):
        read_adapter_file(tmp_path / "bad.ckpt")


def test_files_that_are_no_adapter_say_what_they_are(tmp_path):
    import soundfile as sf

    sf.write(tmp_path / "kick.wav", torch.zeros(100, 2).numpy(), 44100)
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    for name in ("kick.wav", "notes.ckpt"):
        with pytest.raises(AdapterFileError, match="not an adapter file: neither safetensors nor a PyTorch"):
            read_adapter_file(tmp_path / name)
    torch.save({"state_dict": {}}, tmp_path / "whole.ckpt")
    data = (tmp_path / "whole.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterFileError, match="cut.ckpt: a damaged PyTorch checkpoint"):
        read_adapter_file(tmp_path / "cut.ckpt")
    torch.save({"step": 4, "adapter": [torch.zeros(2)], "adapter_names": ["x.lora_A"], "optimizer": {}},
               tmp_path / "run-step=000004.state.pt")  # what a training run writes beside its LoRA
    (tmp_path / "run-step=000004.safetensors").write_bytes(b"")
    with pytest.raises(AdapterFileError, match=r"training state.*beside it: run-step=000004\.safetensors"):
        read_adapter_file(tmp_path / "run-step=000004.state.pt")
    (tmp_path / "run-step=000004.state.pt").rename(tmp_path / "state.pt")  # renamed: no file of its name beside it
    with pytest.raises(AdapterFileError, match=r"state\.pt is a training state .*the LoRA is the "
                                               r"<run>-step=<S>\.safetensors file of the same step"):
        read_adapter_file(tmp_path / "state.pt")


def test_files_without_adapter_tensors_are_errors(tmp_path):
    torch.save({"state_dict": {"model.x.weight": torch.zeros(2, 2)}}, tmp_path / "full.ckpt")
    with pytest.raises(AdapterFileError, match="no adapter tensors"):
        read_adapter_file(tmp_path / "full.ckpt")
    with pytest.raises(FileNotFoundError):
        read_adapter_file(tmp_path / "nothing.safetensors")


def test_fresh_adapter_records_the_base_fingerprint_and_roots_prefix_paths():
    torch.manual_seed(0)
    tree = _Tree()
    a = new_adapter(tree, "lora-xs", 2, roots=(Root("model"), Root("conditioners", gated=False)))
    assert set(a.layers) == {"transformer.layers.0", "transformer.layers.1", "preprocess_conv", "seconds"}
    assert len(a.metadata["base_fingerprint"]) == 16


def test_info_summarises_type_rank_layers_and_our_metadata(fixtures_dir, tmp_path):
    adapter = read_adapter_file(fixtures_dir / "golden" / "lora" / "dora-rows.safetensors")
    path = write_adapter_file(tmp_path / "x.safetensors", adapter, base_pack="small-base", step=1200,
                              trigger_words=["zzq"])
    info = read_adapter_file(path).info()
    assert info["adapter_type"] == "dora-rows" and info["rank"] == 4 and info["n_layers"] == 31
    assert (info["dit_layers"], info["conditioner_layers"]) == (30, 1)
    assert info["base_pack"] == "small-base" and info["step"] == "1200" and info["trigger_words"] == ["zzq"]


def _rewritten(src, dst, change_state=None, config=None):
    """src's tensors (changed by change_state) with `config` as its lora_config text (None: no lora_config)."""
    from safetensors.torch import save_file

    state, meta = _raw(src)
    if change_state:
        change_state(state)
    save_file(state, str(dst), metadata=None if config is None else {"lora_config": config})
    return dst


@pytest.mark.parametrize("adapter_type", ["dora-rows", "dora-cols", "bora", "dora-rows-xs", "bora-xs"])
def test_a_file_without_lora_config_reads_as_the_type_its_tensors_name(fixtures_dir, tmp_path, adapter_type):
    src = fixtures_dir / "golden" / "lora" / f"{adapter_type}.safetensors"
    original = read_adapter_file(src)
    bare = read_adapter_file(_rewritten(src, tmp_path / "bare.safetensors"))
    assert (bare.adapter_type, bare.rank) == (adapter_type, original.rank) and bare.layers.keys() == original.layers.keys()


def test_bad_values_and_metadata_in_a_file_are_refused_naming_the_file(fixtures_dir, tmp_path):
    src = fixtures_dir / "golden" / "lora" / "lora.safetensors"

    def poison(state):
        key = next(k for k in state if k.endswith("lora_B"))
        state[key] = state[key].clone()
        state[key].view(-1)[0] = float("nan")

    with pytest.raises(AdapterFileError, match=r"nan\.safetensors|nan: tensor .*lora_B holds NaN"):
        read_adapter_file(_rewritten(src, tmp_path / "nan.safetensors", poison, json.dumps({"rank": 4, "alpha": 8})))
    for text, why in [("{not json", "not valid JSON"), ("[4, 8]", "list, not a JSON object"),
                      (json.dumps({"rank": 0}), "rank=0 is not a usable number"),
                      (json.dumps({"rank": 4.7}), "rank=4.7 is not a usable number"),
                      (json.dumps({"rank": 4, "alpha": "8"}), "alpha='8' is not a usable number"),
                      (json.dumps({"rank": 8, "alpha": 8}), "says rank 8, but its tensors have rank 4"),
                      (json.dumps({"adapter_type": "loha"}), "lora_config: adapter_type='loha' is unknown")]:
        with pytest.raises(AdapterFileError, match=f"bad.*{why}"):
            read_adapter_file(_rewritten(src, tmp_path / "bad.safetensors", config=text))
    adapter = read_adapter_file(src)
    next(iter(adapter.layers.values()))["lora_B"][0, 0] = 1e6  # beyond fp16: written as inf, read as NaN audio
    with pytest.raises(ValueError, match="diverged.safetensors: not written: .*lora_B holds NaN, infinite or beyond"):
        write_adapter_file(tmp_path / "diverged.safetensors", adapter)


def test_a_safetensors_file_under_another_suffix_reads_and_a_comfyui_export_is_named(fixtures_dir, tmp_path):
    import shutil

    from safetensors.torch import save_file

    src = fixtures_dir / "golden" / "lora" / "bora.safetensors"
    for name in ("upper.SAFETENSORS", "short.sft", "no_suffix"):
        shutil.copy(src, tmp_path / name)
        assert read_adapter_file(tmp_path / name).adapter_type == "bora"
    save_file({"diffusion_model.x.lora_up.weight": torch.zeros(2, 1), "diffusion_model.x.lora_down.weight":
               torch.zeros(1, 2)}, str(tmp_path / "comfy.safetensors"))
    with pytest.raises(AdapterFileError, match="comfy.safetensors is a LoRA in ComfyUI's format"):
        read_adapter_file(tmp_path / "comfy.safetensors")


def test_underfits_step_epoch_and_base_model_in_lora_config_are_written_anew(tmp_path):
    """underfit resumes from the step and epoch inside lora_config and names the model by base_model: a file we
    write from one of its files must not carry the old ones (a base_pack that is no pack leaves base_model)."""
    state = {"model.x.parametrizations.weight.0.lora_A": torch.randn(2, 4),
             "model.x.parametrizations.weight.0.lora_B": torch.randn(3, 2)}
    config = {"rank": 2, "alpha": 2, "adapter_type": "lora", "step": 100, "epoch": 1, "base_model": "sa3-small-sfx"}
    adapter = adapter_from_state(state, config)
    for base_pack, model in (("sa3-medium", "sa3-medium"), ("my-finetune/base", "sa3-small-sfx")):
        write_adapter_file(tmp_path / "a.safetensors", adapter, base_pack=base_pack, step=150, epoch=2)
        written = read_adapter_file(tmp_path / "a.safetensors")
        assert (written.config["step"], written.config["epoch"], written.config["base_model"]) == (150, 2, model)
        assert (written.metadata["step"], written.metadata["base_pack"]) == ("150", base_pack)
    plain = adapter_from_state(state, {"rank": 2, "alpha": 2, "adapter_type": "lora"})
    write_adapter_file(tmp_path / "b.safetensors", plain, base_pack="sa3-medium", step=5, epoch=0)
    assert set(read_adapter_file(tmp_path / "b.safetensors").config) == {"rank", "alpha", "adapter_type"}


def test_info_lists_the_adapted_layers_as_patterns_that_expand_back_to_them(fixtures_dir):
    from sa3_lora_studio.adapters.files import grouped_layer_names
    from sa3_lora_studio.adapters.targets import expand_pattern

    names = ([f"model.transformer.layers.{i}.self_attn.to_qkv" for i in range(12)]
             + [f"model.transformer.layers.{i}.ff" for i in (0, 1, 2, 5, 7, 8)] + ["model.to_timestep_embed"])
    grouped = grouped_layer_names(names)
    assert grouped == ["model.transformer.layers.[0-11].self_attn.to_qkv", "model.transformer.layers.[0-2].ff",
                       "model.transformer.layers.5.ff", "model.transformer.layers.[7-8].ff", "model.to_timestep_embed"]
    assert sorted(n for g in grouped for n in expand_pattern(g)) == sorted(names)
    adapter = read_adapter_file(fixtures_dir / "golden" / "lora" / "lora.safetensors")
    assert sorted(n for g in adapter.info()["layers"] for n in expand_pattern(g)) == sorted(adapter.layers)
