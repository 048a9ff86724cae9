"""Loading the official layouts through the public `load_model`, and every way a wrong file is refused clearly."""

import json
import shutil

import pytest
import torch
from sa3_lora_studio import load_model
from sa3_lora_studio.sa3.loading import CheckpointError, SafetensorsFile
from safetensors.torch import load_file, save_file


def _copy_model(fixtures_dir, tmp_path, name="tiny-small"):
    dst = tmp_path / name
    shutil.copytree(fixtures_dir / name, dst)
    return dst


def test_hub_folder_loads_strictly_with_identical_tensors(fixtures_dir):
    model = load_model(fixtures_dir / "tiny-small")
    stored = load_file(str(fixtures_dir / "tiny-small" / "model.safetensors"))
    ours = model.modules.state_dict()
    assert set(ours) == set(stored)
    for key, value in stored.items():
        assert torch.equal(ours[key], value), key
    assert model.config.objective == "rectified_flow" and not model.is_arc
    assert load_model(fixtures_dir / "tiny-small-arc").is_arc


@pytest.mark.parametrize("dtype, expected", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_low_precision_loads_keep_rope_and_fp16_autoencoder_in_fp32(fixtures_dir, dtype, expected):
    model = load_model(fixtures_dir / "tiny-small", dtype=dtype)
    assert model.dit.transformer.project_in.weight.dtype == expected
    assert model.dit.transformer.rotary_pos_emb.inv_freq.dtype == torch.float32
    ae_dtype = next(model.autoencoder.parameters()).dtype
    assert ae_dtype == (torch.float32 if dtype == "fp16" else expected)


def test_missing_key_is_named(fixtures_dir, tmp_path):
    folder = _copy_model(fixtures_dir, tmp_path)
    sd = load_file(str(folder / "model.safetensors"))
    del sd["model.model.transformer.layers.0.self_attn.to_qkv.weight"]
    save_file(sd, str(folder / "model.safetensors"))
    missing = r"model.safetensors.*1 missing key\(s\): model.model.transformer.layers.0.self_attn"
    with pytest.raises(CheckpointError, match=missing):
        load_model(folder)


def test_unexpected_key_is_named(fixtures_dir, tmp_path):
    folder = _copy_model(fixtures_dir, tmp_path)
    sd = load_file(str(folder / "model.safetensors"))
    sd["model.model.transformer.layers.7.extra.weight"] = torch.zeros(2)
    save_file(sd, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"1 unexpected key\(s\): model.model.transformer.layers.7.extra.weight"):
        load_model(folder)


def test_wrong_shape_names_tensor_and_both_shapes(fixtures_dir, tmp_path):
    folder = _copy_model(fixtures_dir, tmp_path)
    cfg = json.loads((folder / "model_config.json").read_text())
    cfg["model"]["diffusion"]["config"]["num_memory_tokens"] = 5
    (folder / "model_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"memory_tokens has shape \(4, 128\).*expects \(5, 128\)"):
        load_model(folder)


def test_pickle_checkpoint_is_refused_without_unpickling(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"a": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointError, match="pickle.*never unpickle"):
        load_model(path)
    raw = tmp_path / "raw.safetensors"
    raw.write_bytes(b"\x80\x04\x95" + b"\x00" * 32)
    with pytest.raises(CheckpointError, match="pickle"):
        SafetensorsFile(raw)


@pytest.mark.parametrize("length, starts", [(0x180, b"\x80\x01"), (0x4B50, b"PK")])
def test_a_safetensors_header_length_that_starts_like_a_pickle_or_zip_still_loads(tmp_path, length, starts):
    """The header length's first byte is 0x80 (a pickle's) for about one file in 32; "PK" (a zip's) is rarer."""
    value = torch.arange(6, dtype=torch.float32).view(2, 3)
    header = json.dumps({"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}).encode()
    path = tmp_path / "odd.safetensors"
    path.write_bytes(length.to_bytes(8, "little") + header.ljust(length) + value.numpy().tobytes())
    assert path.read_bytes().startswith(starts)
    assert torch.equal(load_file(str(path))["w"], value)  # the safetensors library reads it
    f = SafetensorsFile(path)
    assert f.shapes["w"] == (2, 3) and torch.equal(f.read("w"), value)


def test_truncated_file_says_download_again(fixtures_dir, tmp_path):
    data = (fixtures_dir / "tiny-small" / "model.safetensors").read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.*[Dd]ownload"):
        load_model(cut)
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty or truncated"):
        load_model(tmp_path / "empty.safetensors")


def test_lora_file_passed_as_model_gets_its_own_message(fixtures_dir):
    with pytest.raises(CheckpointError, match="LoRA/adapter file, not a model"):
        load_model(fixtures_dir / "golden" / "lora" / "dora-rows.safetensors")


def test_unknown_source_name_lists_packs():
    with pytest.raises(CheckpointError, match="sa3-medium, sa3-small-music"):
        load_model("not-a-pack-or-file")


def test_comfyui_single_file_checkpoint_loads_like_the_folder(fixtures_dir, tmp_path):
    """ComfyUI keeps one .safetensors per model (no JSON; config inferred from the tensors) and the text encoder as
    one file with the SentencePiece model inside: both give the same outputs as the Hub-layout folder."""
    from sa3_lora_studio.sa3.text import write_comfyui_text_encoder

    single = tmp_path / "stable_audio_3_tiny_base.safetensors"
    shutil.copy(fixtures_dir / "tiny-small" / "model.safetensors", single)
    te_file = tmp_path / "t5gemma_b_b_ul2.safetensors"
    write_comfyui_text_encoder(fixtures_dir / "tiny-small" / "t5gemma-b-b-ul2", te_file)
    folder_model = load_model(fixtures_dir / "tiny-small")
    # What the weights do not determine must be given for a non-standard model (the real families have defaults):
    # the SAME stride, the text length and the decoder's sin(πx) blocks.
    file_model = load_model(single, same_stride=4, text_encoder=te_file, prompt_max_length=16,
                            **{"model.pretransform.config.decoder.config.sinusoidal_blocks": [2]})
    assert file_model.config.objective == "rectified_flow"
    for key, value in folder_model.modules.state_dict().items():
        assert torch.equal(file_model.modules.state_dict()[key], value), key
    prompts, seconds = ["dog barking next to a waterfall", ""], [3.0, 10.0]
    a, b = folder_model.encode_text(prompts, seconds), file_model.encode_text(prompts, seconds)
    torch.testing.assert_close(b.cross_attn_cond, a.cross_attn_cond, atol=2e-5, rtol=0)
    x = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(file_model.velocity(x, 0.4, b, cfg_scale=3.0), folder_model.velocity(x, 0.4, a, cfg_scale=3.0),
                               atol=1e-4, rtol=1e-4)
    audio = torch.randn(1, 2, 32 * 8, generator=torch.Generator().manual_seed(1)) * 0.3
    z = folder_model.encode_audio(audio, 44100)
    assert torch.equal(file_model.encode_audio(audio, 44100), z)
    assert torch.equal(file_model.decode_latents(z), folder_model.decode_latents(z))


def test_a_resaved_file_without_rope_buffers_loads_with_the_official_frequencies(fixtures_dir, tmp_path):
    folder = _copy_model(fixtures_dir, tmp_path)
    sd = load_file(str(folder / "model.safetensors"))
    dropped = [k for k in sd if k.endswith("inv_freq")]
    assert dropped
    save_file({k: v for k, v in sd.items() if k not in dropped}, str(folder / "model.safetensors"))
    reference = load_model(fixtures_dir / "tiny-small").modules.state_dict()
    for key, value in load_model(folder).modules.state_dict().items():
        assert torch.equal(value, reference[key]), key


def test_a_custom_single_file_warns_what_it_guessed_and_a_json_beside_it_says_instead(fixtures_dir, tmp_path):
    """The weights do not hold the SAME stride, the sample rate or base/ARC: a file of a non-pack architecture is
    loaded with guesses named in a warning, and `<name>.json` beside it (the folder's model_config.json) is read."""
    import warnings

    single = tmp_path / "my_model.safetensors"
    shutil.copy(fixtures_dir / "tiny-small" / "model.safetensors", single)
    with pytest.warns(UserWarning, match=r"my_model.safetensors is not one of the SA3 packs.*SAME stride 16.*"
                                         r"my_model.json"):
        guessed = load_model(single)
    assert guessed.downsampling_ratio != load_model(fixtures_dir / "tiny-small").downsampling_ratio  # wrong guess
    (tmp_path / "my_model.json").write_text('{"description": "notes another UI keeps per checkpoint"}')
    with pytest.warns(UserWarning, match="my_model.json beside the checkpoint is not its model_config.json"):
        assert load_model(single).downsampling_ratio == guessed.downsampling_ratio
    shutil.copy(fixtures_dir / "tiny-small" / "model_config.json", tmp_path / "my_model.json")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        told = load_model(single)
    folder = load_model(fixtures_dir / "tiny-small")
    assert told.config.raw == folder.config.raw and told.downsampling_ratio == folder.downsampling_ratio


def test_the_autoencoder_runs_at_the_models_sample_rate(tmp_path):
    import copy

    from sa3_lora_studio.sa3.model import load_autoencoder
    from sa3_lora_studio.sa3.tiny import TINY_CONFIG, write_tiny_model

    config = copy.deepcopy(TINY_CONFIG)
    config["sample_rate"] = 48000
    folder = write_tiny_model(tmp_path / "model48k", config=config, text_encoder=False)
    assert load_model(folder).autoencoder.sample_rate == 48000
    ae = load_autoencoder(folder)
    assert ae.sample_rate == 48000 and ae.prepare_audio(torch.zeros(2, 4800), 48000).shape[-1] == 4800


def test_fp16_keeps_the_text_encoder_in_fp32_and_its_prompts_equal_the_fp32_models(fixtures_dir):
    """Gemma-family activations exceed fp16's range: under fp16 T5Gemma stays fp32 (like the SAME autoencoder), and
    its output is cast to the conditioner's dtype only after."""
    from sa3_lora_studio import load_model

    fp16, fp32 = load_model(fixtures_dir / "tiny-small", dtype="fp16"), load_model(fixtures_dir / "tiny-small")
    t5_16 = fp16.conditioner.conditioners["prompt"].text_encoder
    assert next(t5_16.parameters()).dtype == torch.float32
    assert next(load_model(fixtures_dir / "tiny-small", dtype="bf16").conditioner.conditioners["prompt"]
                .text_encoder.parameters()).dtype == torch.bfloat16
    prompts = ["a dusty breakbeat", ""]
    ids, mask = fp16.conditioner.conditioners["prompt"].tokenize(prompts)
    torch.testing.assert_close(fp16.conditioner.conditioners["prompt"].encode_tokens(ids, mask),
                               fp32.conditioner.conditioners["prompt"].encode_tokens(ids, mask), rtol=0, atol=0)
