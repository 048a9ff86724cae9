"""GPU code paths on a simulated CUDA / MPS device (tests/simulated_device.py: CPU data, GPU device checks): what
would raise on a real card — a CPU generator drawing device noise, CPU and device tensors in one op, float64 on
MPS, numpy of a device tensor — in generation (every sampler, audio-to-audio, inpainting, the real packs' decoder
noise), LoRA use of every adapter type (both memory modes, a stack, the ComfyUI export) and training (setup of a
fresh adapter, the loss under autocast, demos). Forward passes only: backward on device tensors is out of reach."""

import warnings

import pytest
import torch
from sa3_lora_studio import load_model
from sa3_lora_studio.adapters import SA3_ROOTS, new_adapter, read_adapter_file, write_adapter_file
from sa3_lora_studio.adapters.comfy_export import export_for_comfyui
from sa3_lora_studio.encoding import encode_folder
from sa3_lora_studio.encoding.toy import tone, write_audio_file
from sa3_lora_studio.sa3.generate import generate
from sa3_lora_studio.training.demos import run_demos
from sa3_lora_studio.training.events import EventLog, read_events
from sa3_lora_studio.training.runs import RunConfig
from sa3_lora_studio.training.trainer import Trainer
from simulated_device import simulate

TYPES = ["lora", "dora-rows", "dora-cols", "bora", "lora-xs", "dora-rows-xs", "dora-cols-xs", "bora-xs"]


def _on_device(model, device):
    model.modules.to(device)
    encoder = model.conditioner.conditioners["prompt"].text_encoder
    if encoder is not None:
        encoder.to(device)
    model.device = torch.device(device, 0)
    return model


def _with_decoder_noise(model):
    """The real configs decode with noise (the tiny fixture's is 0): bottleneck noise and SAME mask noise."""
    model.autoencoder.bottleneck.noise_regularize = True
    for module in model.autoencoder.modules():
        if getattr(module, "kind", None) == "decoder" and hasattr(module, "mask_noise"):
            module.mask_noise = 0.01
    return model


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory, fixtures_dir):
    cpu = load_model(fixtures_dir / "tiny-small")
    g = torch.Generator().manual_seed(0)
    folder, files = tmp_path_factory.mktemp("loras"), {}
    for adapter_type in TYPES:
        adapter = new_adapter(cpu.modules, adapter_type, 4, roots=SA3_ROOTS, preset="all", generator=g)
        for layer in adapter.layers.values():  # a trained-looking adapter: every term does work
            for name, value in layer.items():
                if name in ("lora_B", "M_xs"):
                    value.add_(0.05 * torch.randn(value.shape, generator=g))
        files[adapter_type] = write_adapter_file(folder / f"{adapter_type}.safetensors", adapter)
    return files


@pytest.mark.parametrize("device,dtype", [("cuda", "bf16"), ("mps", "fp32")])
def test_generation_in_every_mode_would_run_on_the_device(fixtures_dir, device, dtype):
    model = _with_decoder_noise(load_model(fixtures_dir / "tiny-small", dtype=dtype))
    seconds = model.config.sample_size / model.sample_rate
    wave = torch.zeros(1, 2, int(seconds * model.sample_rate)).uniform_(-0.3, 0.3)
    with warnings.catch_warnings(), simulate(device) as findings:
        warnings.simplefilter("ignore")
        _on_device(model, device)
        out, rate = generate(model, ["dusty beat", "a much longer prompt about a bell"], negative_prompt="noise",
                             duration=seconds, seed=1, steps=2, cfg_scale=3.0)
        for sampler in ("pingpong", "dpmpp", "rk4"):
            generate(model, "pad", duration=seconds, seed=2, steps=2, sampler=sampler)
        generate(model, "pad", duration=seconds, seed=3, steps=2, init_audio=(wave, 32000), init_noise_level=0.6)
        generate(model, "pad", duration=seconds, seed=4, steps=2, inpaint_audio=(wave, 44100),
                 inpaint_regions=[(seconds / 4, seconds / 2)], paste_back=True)
    assert not findings, dict(findings)
    assert out.device.type == "cpu" and torch.isfinite(out).all()


@pytest.mark.parametrize("device", ["cuda", "mps"])
def test_every_adapter_type_applies_and_exports_on_the_device(fixtures_dir, lora_files, tmp_path, device):
    model = load_model(fixtures_dir / "tiny-small", dtype="bf16" if device == "cuda" else "fp32")
    seconds = model.config.sample_size / model.sample_rate
    with warnings.catch_warnings(), simulate(device) as findings:
        warnings.simplefilter("ignore")
        _on_device(model, device)
        for memory in ("fast", "low"):
            for path in lora_files.values():
                generate(model, "bell", duration=seconds, seed=1, steps=2, cfg_scale=3.0, adapter_memory=memory,
                         loras=[{"path": str(path), "strength": 0.7, "interval": (0.0, 0.9)}])
            generate(model, "pad", duration=seconds, seed=1, steps=2, adapter_memory=memory,
                     loras=[{"path": str(lora_files["bora"]), "strength": 0.5},
                            {"path": str(lora_files["dora-cols-xs"]), "strength": 1.0}])
        for adapter_type, path in lora_files.items():
            export_for_comfyui(tmp_path / f"comfy-{adapter_type}.safetensors", read_adapter_file(path),
                               model.modules, strength=0.5)
    assert not findings, dict(findings)


@pytest.mark.parametrize("device,dtype,adapter_type", [("cuda", "bf16", "dora-rows"), ("cuda", "fp32", "bora"),
                                                       ("mps", "fp32", "dora-cols"), ("mps", "bf16", "lora")])
def test_a_fresh_run_encodes_sets_up_computes_its_loss_and_renders_demos_on_the_device(
        fixtures_dir, tmp_path, device, dtype, adapter_type):
    model = _with_decoder_noise(load_model(fixtures_dir / "tiny-small", dtype=dtype))
    audio = tmp_path / "audio"
    audio.mkdir()
    for i, freq in enumerate((220, 880)):
        write_audio_file(audio / f"clip{i}", tone(0.06, 44100, freq=freq), 44100, "wav16")
        (audio / f"clip{i}.txt").write_text(f"caption {i}")
    config = RunConfig.from_dict(dict(
        dataset=str(tmp_path / "dataset"), model=str(fixtures_dir / "tiny-small"), adapter_type=adapter_type, rank=4,
        steps=2, batch_size=3, crop_seconds=0.017, checkpoint_every=2, demo_every=2, seed=7, lr=1e-3,
        precision=dtype, device=device, cfg_dropout=0.5,
        demos=[{"prompt": "bell", "steps": 2}, {"prompt": "drone", "arc": True, "steps": 2}]))
    log = EventLog(tmp_path / "events.jsonl", "run")
    torch.set_autocast_cache_enabled(False)  # the autocast cache keys tensors by identity: not for wrappers
    try:
        with warnings.catch_warnings(), simulate(device) as findings:
            warnings.simplefilter("ignore")
            _on_device(model, device)
            assert encode_folder(audio, tmp_path / "dataset", encoder=model).usable == 2
            trainer = Trainer(config, tmp_path, "run", log, model_provider=lambda *spec: model)
            trainer.setup()
            with torch.no_grad():
                for p in trainer.params:
                    p.add_(0.01)
                trainer.stack.update()
                for step in range(2):
                    result, t = trainer.loss_for_batch(trainer.make_batch(step), step)
                    assert torch.isfinite(result.loss.float()).all()
            assert len(run_demos(trainer, 0)) == 2
            trainer.stack.export(0)  # what a checkpoint writes
    finally:
        torch.set_autocast_cache_enabled(True)
    assert not findings, dict(findings)
    events = read_events(tmp_path / "events.jsonl")[0]
    assert not [e for e in events if e["type"] == "error" or (e["type"] == "warning" and "not an ARC model" not in
                                                              e["message"])]
