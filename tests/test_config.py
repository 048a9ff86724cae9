"""Config parsing and inference of the config from a bare state dict (ComfyUI single files have no JSON)."""

import copy
import json

import pytest
from sa3_lora_studio.sa3.config import (
    WEIGHT_DETERMINED,
    ConfigError,
    family_defaults,
    get_path,
    infer_config,
    read_config,
)
from sa3_lora_studio.sa3.loading import SafetensorsFile

FIXTURE_MODELS = ["tiny-small", "tiny-small-arc", "tiny-medium"]


def _width(cfg: dict, part: str) -> int:
    c = get_path(cfg, f"model.pretransform.config.{part}.config")
    return c["channels"] * c["c_mults"][-1]


@pytest.mark.parametrize("name", FIXTURE_MODELS)
def test_inferred_config_recovers_every_weight_determined_field(fixtures_dir, name):
    truth = json.loads((fixtures_dir / name / "model_config.json").read_text())
    shapes = SafetensorsFile(fixtures_dir / name / "model.safetensors").shapes
    inferred = infer_config(shapes, objective=truth["model"]["diffusion"]["diffusion_objective"]).raw
    for path in WEIGHT_DETERMINED:
        expected = get_path(truth, path)
        if expected is None and path.endswith("differential"):
            expected = False
        if expected is None and path.endswith("ff_kwargs.mult"):
            expected = 4
        assert get_path(inferred, path) == expected, path
    for part in ("encoder", "decoder"):
        assert _width(inferred, part) == _width(truth, part)
    # SAME-S (chunked, k=3 output mapping) vs SAME-L (sliding window) is told apart from the weights
    truth_sliding = "sliding_window" in truth["model"]["pretransform"]["config"]["decoder"]["config"]
    assert ("sliding_window" in get_path(inferred, "model.pretransform.config.decoder.config")) == truth_sliding


@pytest.mark.parametrize("family", ["small-music", "small-sfx", "medium"])
def test_real_family_shapes_infer_back_to_the_family_defaults(family):
    """Random-free check at real size: shapes computed from the real config give back that config's values."""
    from sa3_lora_studio.sa3.model import build_modules

    truth = read_config(family_defaults(family))
    modules = build_modules(truth)
    shapes = {k: tuple(v.shape) for k, v in modules.state_dict().items()}
    inferred = infer_config(shapes, objective="rectified_flow")
    assert inferred.family == ("small-music" if family.startswith("small") else family)
    for path in WEIGHT_DETERMINED:
        want = get_path(truth.raw, path)
        if want is None:
            continue
        assert get_path(inferred.raw, path) == want, path
    assert inferred.sample_size == truth.sample_size
    assert inferred.downsampling_ratio == 4096 and inferred.latent_dim == 256
    assert set(shapes) == set(build_modules(inferred).state_dict())  # the inferred config rebuilds the same tensors


def test_objective_comes_from_the_file_name_when_not_given(fixtures_dir):
    shapes = SafetensorsFile(fixtures_dir / "tiny-small" / "model.safetensors").shapes
    assert infer_config(shapes, source="stable_audio_3_medium_base.safetensors").objective == "rectified_flow"
    assert infer_config(shapes, source="stable_audio_3_medium.safetensors").objective == "rf_denoiser"
    assert infer_config(shapes, objective="rectified_flow", source="x.safetensors").objective == "rectified_flow"


def test_overrides_replace_fields_that_weights_do_not_determine(fixtures_dir):
    shapes = SafetensorsFile(fixtures_dir / "tiny-small" / "model.safetensors").shapes
    cfg = infer_config(shapes, objective="rf_denoiser", same_stride=4, sample_size=32 * 100)
    assert cfg.downsampling_ratio == 32 and cfg.latent_alignment == 2
    assert cfg.sample_size == 3200 and cfg.max_latents == 100
    assert cfg.with_overrides(objective="rectified_flow").is_arc is False


def test_a_config_without_model_section_is_refused_with_its_name(tmp_path):
    bad = tmp_path / "model_config.json"
    bad.write_text(json.dumps({"sample_rate": 44100}))
    with pytest.raises(ConfigError, match="model_config.json.*'model' section"):
        read_config(bad)
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="invalid JSON"):
        read_config(tmp_path)


@pytest.mark.parametrize("path, value, named", [
    ("model.diffusion.config.num_heads", 3, "embed_dim=64 is not a multiple of num_heads=3"),
    ("model.diffusion.config.cond_token_dim", 48, "cond_token_dim=48 but conditioning.cond_dim is 32"),
    ("model.diffusion.config.global_cond_dim", 48, "global_cond_dim=48 but conditioning.cond_dim is 32"),
    ("model.diffusion.config.local_add_cond_dim", 5, r"local_add_cond_dim=5 but .*io_channels \+ 1\) is 9"),
    ("model.pretransform.config.downsampling_ratio", 64, "downsampling_ratio=64 but .* strides is 32"),
    ("model.pretransform.config.bottleneck.config.dim", 16, "bottleneck dim=16 but pretransform.config.latent_dim is 8"),
    ("model.pretransform.config.encoder.config.in_channels", 8, "in_channels=8 but .* audio channels is 16"),
    ("model.pretransform.config.encoder.config.dim_heads", 6, "dim_heads=6 does not divide its widths"),
])
def test_sections_that_disagree_are_refused_naming_both_fields(path, value, named):
    from sa3_lora_studio.sa3.config import ConfigError, set_path
    from sa3_lora_studio.sa3.tiny import TINY_CONFIG

    read_config(TINY_CONFIG)  # consistent as written
    raw = copy.deepcopy(TINY_CONFIG)
    set_path(raw, path, value)
    with pytest.raises(ConfigError, match=named):
        read_config(raw)


def test_a_field_of_the_wrong_type_is_a_config_error():
    from sa3_lora_studio.sa3.config import ConfigError
    from sa3_lora_studio.sa3.tiny import TINY_CONFIG

    raw = copy.deepcopy(TINY_CONFIG)
    raw["model"]["diffusion"]["config"]["num_heads"] = "two"
    with pytest.raises(ConfigError, match="wrong type"):
        read_config(raw)
