"""The training-memory estimate: monotone in the knobs that cost memory, calibrated against a measured peak."""

import pytest
from sa3_lora_studio.sa3.config import family_defaults, read_config
from sa3_lora_studio.training.runs import RunConfig
from sa3_lora_studio.training.vram import check_fits, estimate_training_memory, free_device_memory, measure_training_peak

FACTOR = 1.6  # the calibrated estimate vs the measured peak growth (the fit is within 1.4x on every point)


@pytest.fixture(scope="module")
def small():
    return read_config(family_defaults("small-music"))


def _run(**kw):
    return RunConfig(**{"dataset": "x", "batch_size": 1, "crop_seconds": 10.0, "rank": 16, **kw})


def test_estimate_grows_with_batch_crop_and_rank(small):
    base = estimate_training_memory(small, _run())
    assert estimate_training_memory(small, _run(batch_size=2))["total"] > base["total"]
    assert estimate_training_memory(small, _run(crop_seconds=20.0))["total"] > base["total"]
    bigger = estimate_training_memory(small, _run(rank=64))
    assert bigger["adapter"] > base["adapter"] and bigger["total"] > base["total"]
    assert base["total"] == sum(base[k] for k in ("weights", "text_encoder", "adapter", "activations", "workspace"))


def test_the_crop_is_capped_at_the_models_maximum_length(small):
    """small-music's window is sample_size / 4096 latents: a longer crop trains (and is estimated) at that length."""
    longest = small.max_latents
    assert _run(crop_seconds=380.0).crop_latents(small) == longest
    assert _run(crop_seconds=10.0).crop_latents(small) == round(10.0 * small.latent_rate) < longest
    assert estimate_training_memory(small, _run(crop_seconds=380.0))["crop_latents"] == longest
    assert estimate_training_memory(small, _run(crop_seconds=380.0)) == estimate_training_memory(
        small, _run(crop_seconds=longest / small.latent_rate))


def test_estimate_shrinks_with_gradient_checkpointing_and_half_precision(small):
    base = estimate_training_memory(small, _run(crop_seconds=30.0))
    checkpointed = estimate_training_memory(small, _run(crop_seconds=30.0, gradient_checkpointing=True))
    assert checkpointed["activations"] < 0.6 * base["activations"]
    bf16 = estimate_training_memory(small, _run(crop_seconds=30.0, precision="bf16"))
    assert bf16["weights"] * 2 == base["weights"] and bf16["total"] < base["total"]
    assert bf16["adapter"] == base["adapter"]  # adapters train in fp32 whatever the base precision


def test_adapter_size_follows_the_type(small):
    sizes = {t: estimate_training_memory(small, _run(adapter_type=t))["adapter"]
             for t in ("lora", "dora-rows", "bora", "lora-xs")}
    assert sizes["lora-xs"] < sizes["lora"] < sizes["dora-rows"] < sizes["bora"]


def test_estimate_is_within_the_stated_factor_of_a_measured_tiny_peak(fixtures_dir):
    # a crop past the tiny model's own window, for activations that dwarf its weights: measured uncapped
    tiny = read_config(fixtures_dir / "tiny-small" / "model_config.json").with_overrides(sample_size=1 << 20)
    run = _run(batch_size=4, crop_seconds=0.1, rank=16)
    measured = measure_training_peak(fixtures_dir / "tiny-small", batch_size=4, crop_seconds=0.1, rank=16, steps=2)
    estimate = estimate_training_memory(tiny, run)
    assert estimate["crop_latents"] == measured["crop_latents"]
    part = estimate["adapter"] + estimate["activations"] + estimate["workspace"]  # what training adds to the model
    assert 1 / FACTOR <= part / measured["growth"] <= FACTOR, (part, measured)


def test_check_fits_warns_only_when_the_estimate_exceeds_free_memory(small):
    free = free_device_memory("cpu")
    assert free is not None and free > 0
    estimate = estimate_training_memory(small, _run())
    assert check_fits(dict(estimate, total=1), "cpu") is None
    warning = check_fits(dict(estimate, total=free * 4), "cpu")
    assert warning and "gradient checkpointing" in warning and "GB" in warning


def test_check_fits_does_not_count_an_already_loaded_model_twice(small):
    free = free_device_memory("cpu")
    estimate = estimate_training_memory(small, _run())
    loaded = estimate["weights"] + estimate["text_encoder"]
    fits_once_loaded = dict(estimate, weights=free, total=free + loaded // 2 + estimate["text_encoder"])
    assert check_fits(fits_once_loaded, "cpu")  # counted from scratch it exceeds free memory
    assert check_fits(fits_once_loaded, "cpu", loaded=True) is None


def test_the_text_encoder_counts_at_its_own_size_when_known(small):
    real = estimate_training_memory(small, _run())
    tiny = estimate_training_memory(small, _run(), text_encoder_params=1_000_000)
    assert tiny["text_encoder"] == 4_000_000 and real["text_encoder"] > 1e9
    assert real["total"] - tiny["total"] == real["text_encoder"] - tiny["text_encoder"]
    # the precision's size, except fp16, which keeps T5Gemma in fp32 (sa3.text.text_encoder_dtype)
    sizes = {p: estimate_training_memory(small, _run(precision=p), text_encoder_params=1_000_000)["text_encoder"]
             for p in ("fp32", "bf16", "fp16")}
    assert sizes == {"fp32": 4_000_000, "bf16": 2_000_000, "fp16": 4_000_000}


def test_the_node_counts_the_loaded_text_encoder(fixtures_dir):
    from sa3_lora_studio import load_model
    from sa3_lora_studio.nodes.training_nodes import memory_warning

    model = load_model(fixtures_dir / "tiny-small")
    encoder = model.conditioner.conditioners["prompt"].text_encoder
    assert model.text_encoder_parameters == sum(p.numel() for p in encoder.parameters()) < 10**7
    assert memory_warning(model, _run(crop_seconds=0.01)) is None  # a tiny model with its tiny T5 fits


def test_the_benchmarks_floor_step_is_the_frozen_dits_input_gradient_and_the_step_beside_it_trains(fixtures_dir):
    """bench/train_step.py's floor: forward + backward of the frozen DiT for its input alone (no weight gets a
    gradient); the training step built on the same random inputs helper still trains."""
    import torch
    from sa3_lora_studio.training.vram import build_random_dit_tree, make_floor_step, make_training_step

    config = read_config(fixtures_dir / "tiny-small" / "model_config.json")
    tree = build_random_dit_tree(config)
    floor = make_floor_step(tree, config, batch=2, crop_latents=8)
    inputs = []
    real_forward = tree.model.model.forward

    def forward(x, *args, **kwargs):  # catch the input the floor differentiates
        inputs.append(x)
        return real_forward(x, *args, **kwargs)

    tree.model.model.forward = forward
    floor()
    del tree.model.model.forward
    (x,) = inputs
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0  # the input's gradient
    assert all(p.grad is None for p in tree.parameters())
    step, forward = make_training_step(tree, config, "dora-rows", 2, 2, 8)
    losses = [step() for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[2] != losses[0]
    forward()


def test_the_adapter_is_estimated_at_its_full_rank_and_a_continued_file_at_its_own_size(tmp_path, small):
    """LoRA trains at the rank asked even above a layer's size (rank 2000 on 1024-wide layers: every layer's A and B
    are that tall); a run continuing a file trains that file's tensors, whatever the config's type and rank say."""
    import torch
    from safetensors.torch import save_file

    ranks = [estimate_training_memory(small, _run(adapter_type="lora", rank=r))["adapter"] for r in (1000, 2000)]
    assert ranks[1] == 2 * ranks[0]
    source = tmp_path / "continued.safetensors"
    save_file({"a.lora_A": torch.zeros(8, 1000, dtype=torch.float16),
               "a.lora_B": torch.zeros(300, 8, dtype=torch.float16)}, str(source))
    continued = estimate_training_memory(small, _run(continue_from=str(source)))
    assert continued["adapter"] == (8 * 1000 + 300 * 8) * 16  # fp32 values, gradients and two AdamW moments
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    assert estimate_training_memory(small, _run(continue_from=str(broken))) == estimate_training_memory(small, _run())
