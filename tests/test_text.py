"""T5Gemma encoder and tokenizers against the reference goldens (case `text.prompt_conditioner`), plus the ComfyUI
single-file layout and loading errors. Tolerance: the case's atol 2e-5 (fp32 CPU; we match bit for bit here)."""

import json
import random

import pytest
import torch
from sa3_lora_studio.sa3.text import (
    SPIECE_KEY,
    PromptTokenizer,
    T5GemmaConfig,
    T5GemmaEncoder,
    TextEncoderError,
    attention_bias,
    load_text_encoder,
    sentencepiece_from_tokenizer_json,
    write_comfyui_text_encoder,
)
from safetensors.torch import load_file, save_file

TRICKY = ["", " ", "  double  spaces ", "trailing ", "\ttab\nnewline", "ÜNÏCÖDÉ ☕🎺 日本語", "120bpm 44.1kHz -3dB",
          "a" * 40, "with within without withhold", "The Quick BROWN fox", "under the <mask> sea",
          "pizzicato strings, legato cello; staccato!!!", "x\u0301 e\u0301 é", "lo-fi hip hop beat 85 BPM"]


@pytest.fixture(scope="module")
def t5_dir(fixtures_dir):
    return fixtures_dir / "tiny-small" / "t5gemma-b-b-ul2"


@pytest.fixture(scope="module")
def case(golden_cases):
    return golden_cases["text.prompt_conditioner"]


@pytest.fixture(scope="module")
def golden(fixtures_dir):
    return load_file(str(fixtures_dir / "golden" / "text.safetensors"))


@pytest.fixture(scope="module")
def hf(t5_dir):
    return load_text_encoder(t5_dir)


def atol(case):
    return case["tolerance"]["float"]["atol"]


def test_tokenizer_json_gives_the_reference_ids_masks_and_left_padding(hf, case, golden):
    _, tok = hf
    prompts, max_length = case["inputs"]["prompts"], case["inputs"]["max_length"]
    assert [tok.ids(p) for p in prompts] == case["tokenizers_library_ids"]
    assert [tok.ids(p, max_length) for p in prompts] == case["token_ids_unpadded"]
    ids, mask = tok.encode(prompts, max_length)
    assert ids.dtype == torch.int64 and mask.dtype == torch.bool
    assert torch.equal(ids, golden["text.input_ids"])
    assert torch.equal(mask, golden["text.attention_mask"])
    assert (tok.padding_side, tok.add_bos, tok.add_eos) == (case["observed"]["padding_side"], False, False)


def test_a_prompt_with_a_lone_surrogate_is_tokenized_as_its_utf8_encoding_would_be(hf):
    """A JSON prompt may carry "\\udce9" alone; it cannot be UTF-8 and became a TypeError deep in the tokenizer."""
    _, tok = hf
    assert tok.ids("caf\udce9 pad", 16) == tok.ids("caf? pad", 16)
    assert tok.encode(["caf\udce9 pad"], 16)[1].any()


def test_tokenizer_config_sets_padding_side_truncation_and_bos_eos(t5_dir, tmp_path):
    config = json.loads((t5_dir / "tokenizer_config.json").read_text())
    config.update(padding_side="right", add_bos_token=True, add_eos_token=True)
    tok = PromptTokenizer.from_tokenizer_json(t5_dir / "tokenizer.json", config)
    plain = PromptTokenizer.from_tokenizer_json(t5_dir / "tokenizer.json", {}).ids("dog barking next to a waterfall")
    ids, mask = tok.encode(["dog barking next to a waterfall", ""], 8)
    assert ids[0].tolist() == [2, *plain[:6], 1]  # truncation keeps BOS/EOS and cuts the text
    assert ids[1].tolist() == [2, 1, 0, 0, 0, 0, 0, 0] and mask[1].tolist() == [True] * 2 + [False] * 6


def test_sentencepiece_model_built_from_tokenizer_json_gives_identical_ids(t5_dir, case):
    from tokenizers import Tokenizer

    sp = PromptTokenizer.from_sentencepiece(sentencepiece_from_tokenizer_json(t5_dir / "tokenizer.json"))
    hf_tok = Tokenizer.from_file(str(t5_dir / "tokenizer.json"))
    words = [w.replace("▁", " ") for w in json.loads((t5_dir / "tokenizer.json").read_text())["model"]["vocab"]
             if not w.startswith("<")]
    rng = random.Random(0)
    fuzz = ["".join(rng.choice(words) for _ in range(rng.randint(1, 12))) for _ in range(300)]
    for text in case["inputs"]["prompts"] + TRICKY + fuzz:
        assert sp.ids(text) == hf_tok.encode(text, add_special_tokens=False).ids, text
    assert (sp.pad_id, sp.bos_id, sp.eos_id, sp.add_bos, sp.add_eos) == (0, 2, 1, False, False)


def test_encoder_matches_reference_embeddings_every_layer_and_last_hidden_state(hf, golden, case):
    encoder, _ = hf
    ids, mask = golden["text.input_ids"], golden["text.attention_mask"]
    layer_outs = []
    hooks = [layer.register_forward_hook(lambda m, i, o: layer_outs.append(o)) for layer in encoder.layers]
    try:
        with torch.no_grad():
            scaled = encoder.embed(ids)
            last = encoder(ids, mask)
    finally:
        for h in hooks:
            h.remove()
    torch.testing.assert_close(scaled, golden["text.t5_embeddings_scaled"], atol=atol(case), rtol=0)
    assert len(layer_outs) == len([k for k in golden if k.startswith("text.t5_layer_out.")])
    for i, out in enumerate(layer_outs):  # pad positions included: the fully padded row must not be NaN
        torch.testing.assert_close(out, golden[f"text.t5_layer_out.{i}"], atol=atol(case), rtol=0)
    torch.testing.assert_close(last, golden["text.t5_last_hidden_state"], atol=atol(case), rtol=0)


def test_empty_prompt_stays_finite_in_half_precision(t5_dir, golden):
    for dtype in (torch.float16, torch.bfloat16):
        encoder, _ = load_text_encoder(t5_dir, dtype=dtype)
        with torch.no_grad():
            out = encoder(golden["text.input_ids"], golden["text.attention_mask"])
        assert out.dtype == dtype and torch.isfinite(out).all()


def test_config_reads_the_t5gemma_encoder_subconfig_and_defaults_are_the_real_model(t5_dir):
    cfg = T5GemmaConfig.from_hf(json.loads((t5_dir / "config.json").read_text()))
    assert (cfg.hidden_size, cfg.head_dim, cfg.query_pre_attn_scalar, cfg.attn_logit_softcapping) == (64, 32, 48, 50)
    assert cfg.layer_types == ("sliding_attention", "full_attention")
    real = T5GemmaConfig()
    assert (real.vocab_size, real.hidden_size, real.num_hidden_layers, real.num_attention_heads, real.head_dim,
            real.intermediate_size, real.query_pre_attn_scalar) == (256000, 768, 12, 12, 64, 2048, 64)
    assert real.layer_types == ("sliding_attention", "full_attention") * 6
    flat = T5GemmaConfig.from_hf({"hidden_size": 96, "num_hidden_layers": 3, "rope_theta": 500.0})
    assert (flat.hidden_size, flat.num_hidden_layers, flat.rope_theta) == (96, 3, 500.0)


def test_sliding_layers_only_see_keys_inside_the_window():
    mask = torch.tensor([[False, True, True, True, True]])
    bias = attention_bias(mask, window=2, dtype=torch.float32)[0, 0]
    visible = bias == 0
    assert visible[2].tolist() == [False, True, True, True, False]  # |i - j| < 2, key 0 padded
    assert not visible[:, 0].any() and bias.min() == torch.finfo(torch.float32).min


def test_grouped_query_attention_and_other_sizes_build_and_run():
    cfg = T5GemmaConfig(vocab_size=50, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16)
    encoder = T5GemmaEncoder(cfg)
    ids = torch.randint(1, 50, (2, 7))
    out = encoder(ids, torch.ones(2, 7, dtype=torch.bool))
    assert out.shape == (2, 7, 48)
    assert encoder.layers[0].self_attn.k_proj.weight.shape == (32, 48)


def test_comfyui_single_file_with_model_prefix_extra_keys_and_fp16_loads_like_the_folder(hf, t5_dir, golden, tmp_path):
    encoder, tok = hf
    path = write_comfyui_text_encoder(t5_dir, tmp_path / "t5gemma_b_b_ul2.safetensors", dtype="fp16")
    tensors = load_file(str(path))
    assert all(k.startswith("model.encoder.") for k in tensors if k != SPIECE_KEY)
    tensors["model.decoder.embed_tokens.weight"] = torch.zeros(2, 2)  # extra parts are ignored
    config = json.loads((t5_dir / "config.json").read_text())["encoder"]
    save_file(tensors, str(path))  # no metadata now: the config comes from the argument
    single, single_tok = load_text_encoder(path, dtype="fp32", config=config)
    ids, mask = single_tok.encode(["dog barking next to a waterfall", "", "café ☕ groove at 120 bpm"], 16)
    assert torch.equal(ids, tok.encode(["dog barking next to a waterfall", "", "café ☕ groove at 120 bpm"], 16)[0])
    assert single.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(single(ids, mask), encoder(ids, mask), atol=5e-2, rtol=0)  # fp16-stored weights


def test_missing_encoder_key_is_reported_by_name(t5_dir, tmp_path):
    tensors = load_file(str(t5_dir / "model.safetensors"))
    del tensors["encoder.layers.1.mlp.up_proj.weight"]
    tensors["encoder.layers.0.self_attn.q_norm.weight"] = torch.zeros(4)
    (tmp_path / "te").mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "te" / name).write_bytes((t5_dir / name).read_bytes())
    save_file(tensors, str(tmp_path / "te" / "model.safetensors"))
    with pytest.raises(TextEncoderError, match=r"missing key.*layers\.1\.mlp\.up_proj.*unexpected key.*q_norm"):
        load_text_encoder(tmp_path / "te")


def test_a_file_that_is_not_a_text_encoder_is_rejected_clearly(fixtures_dir, t5_dir, tmp_path):
    with pytest.raises(TextEncoderError, match="holds no T5Gemma encoder"):
        load_text_encoder(fixtures_dir / "tiny-small" / "model.safetensors")
    save_file(load_file(str(t5_dir / "model.safetensors")), str(tmp_path / "bare.safetensors"))
    with pytest.raises(TextEncoderError, match="no 'spiece_model'"):
        load_text_encoder(tmp_path / "bare.safetensors")
    with pytest.raises(TextEncoderError, match="no such"):
        load_text_encoder(tmp_path / "nothing-here")


def test_text_encoder_bundled_under_a_prefix_in_a_checkpoint_is_found(hf, t5_dir, tmp_path):
    path = write_comfyui_text_encoder(t5_dir, tmp_path / "te.safetensors")
    tensors = {f"text_encoders.t5gemma.{k}": v for k, v in load_file(str(path)).items()}
    tensors["model.model.some_dit_weight"] = torch.zeros(2)
    save_file(tensors, str(tmp_path / "checkpoint.safetensors"))
    config = json.loads((t5_dir / "config.json").read_text())
    encoder, tok = load_text_encoder(tmp_path / "checkpoint.safetensors", config=config)
    ids, mask = tok.encode(["dog barking next to a waterfall"], 16)
    with torch.no_grad():
        assert torch.equal(encoder(ids, mask), hf[0](ids, mask))


def test_text_encoder_cache_evicts_the_least_recently_used_by_count_and_by_bytes():
    from sa3_lora_studio.sa3.text import TextEncoderCache

    def value(n):  # n float32 values and an n-long bool mask: 5n bytes
        return torch.zeros(n), torch.zeros(n, dtype=torch.bool)

    cache = TextEncoderCache(size=3)
    for key in "abcd":
        cache.put(key, value(1))
    assert list(cache.entries) == ["b", "c", "d"]
    cache.get("b")  # now the most recently used
    cache.put("e", value(1))
    assert list(cache.entries) == ["d", "b", "e"]

    cache = TextEncoderCache(size=100, max_bytes=50)
    cache.put("a", value(4))  # 20 bytes
    cache.put("b", value(4))
    cache.put("a", value(4))  # replacing counts its bytes once
    assert cache.bytes == 40 and list(cache.entries) == ["b", "a"]
    cache.put("c", value(2))  # 50 bytes: still within
    cache.put("d", value(2))  # 60 > 50: "b" goes
    assert list(cache.entries) == ["a", "c", "d"] and cache.bytes == 40
    cache.put("big", value(100))  # larger than the budget alone: kept, everything older goes
    assert list(cache.entries) == ["big"] and cache.bytes == 500
    cache.clear()
    assert cache.bytes == 0 and len(cache) == 0
