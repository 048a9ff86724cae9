"""Prompt / seconds conditioners against the reference goldens (cases `text.prompt_conditioner`,
`text.seconds_total_conditioner`, fp32 CPU at the cases' tolerances), key layout, the ComfyUI single-file text
encoder, the prompt cache, offloading and T5 location errors."""

import json

import pytest
import torch
from sa3_lora_studio.sa3.conditioners import (
    ConditionerError,
    MultiConditioner,
    NumberConditioner,
    PromptConditioner,
    build_conditioner,
    resolve_text_encoder,
)
from sa3_lora_studio.sa3.text import write_comfyui_text_encoder
from safetensors.torch import load_file, save_file


@pytest.fixture(scope="module")
def golden(fixtures_dir):
    return load_file(str(fixtures_dir / "golden" / "text.safetensors"))


@pytest.fixture(scope="module")
def conditioning(fixtures_dir):
    return json.loads((fixtures_dir / "tiny-small" / "model_config.json").read_text())["model"]["conditioning"]


def checkpoint_conditioner_tensors(fixtures_dir) -> dict:
    sd = load_file(str(fixtures_dir / "tiny-small" / "model.safetensors"))
    return {k[len("conditioner."):]: v for k, v in sd.items() if k.startswith("conditioner.")}


@pytest.fixture(scope="module")
def multi(fixtures_dir, conditioning):
    """The tiny-small conditioner, its T5 found through the config's repo_id/subfolder under the fixtures root."""
    multi = build_conditioner(conditioning, fixtures_dir, device="cpu", dtype="fp32")
    multi.load_state_dict(checkpoint_conditioner_tensors(fixtures_dir), strict=True)
    return multi.eval().requires_grad_(False)


def test_public_load_model_gives_the_reference_conditioning(fixtures_dir, golden, golden_cases):
    from sa3_lora_studio import load_model

    case = golden_cases["text.prompt_conditioner"]
    model = load_model(fixtures_dir / "tiny-small")
    emb, mask = model.conditioner.conditioners["prompt"](case["inputs"]["prompts"], "cpu")
    torch.testing.assert_close(emb, golden["text.prompt_embeds"], atol=2e-5, rtol=1e-4)
    assert torch.equal(mask, golden["text.prompt_mask"])


def test_state_dict_keys_are_the_official_checkpoint_keys_without_t5(multi, fixtures_dir):
    assert set(multi.state_dict()) == set(checkpoint_conditioner_tensors(fixtures_dir))
    assert set(multi.state_dict()) == {"conditioners.prompt.padding_embedding",
                                       "conditioners.seconds_total.embedder.embedding.1.weight",
                                       "conditioners.seconds_total.embedder.embedding.1.bias"}
    prompt = multi.conditioners["prompt"]
    assert prompt.has_text_encoder and isinstance(prompt.proj_out, torch.nn.Identity)
    assert not any(m is prompt.text_encoder for m in multi.modules())


def test_prompt_conditioner_matches_reference_output(multi, golden, golden_cases):
    case = golden_cases["text.prompt_conditioner"]
    emb, mask = multi.conditioners["prompt"](case["inputs"]["prompts"], "cpu")
    tol = case["tolerance"]["float"]
    assert emb.shape == golden["text.prompt_embeds"].shape and mask.dtype == torch.bool
    torch.testing.assert_close(emb, golden["text.prompt_embeds"], atol=tol["atol"], rtol=tol["rtol"])
    assert torch.equal(mask, golden["text.prompt_mask"])
    torch.testing.assert_close(multi.conditioners["prompt"].padding_embedding, golden["text.padding_embedding"])
    empty = emb[0]  # empty prompt: every position is the learned padding embedding
    assert torch.equal(empty, golden["text.padding_embedding"].expand_as(empty))


def test_pretokenized_inputs_give_the_same_output_as_strings(multi, golden):
    prompt = multi.conditioners["prompt"]
    items = [{"input_ids": i, "attention_mask": m} for i, m in zip(golden["text.input_ids"],
                                                                    golden["text.attention_mask"], strict=True)]
    emb, mask = prompt(items, "cpu")
    torch.testing.assert_close(emb, golden["text.prompt_embeds"], atol=2e-5, rtol=1e-4)


def test_seconds_total_conditioner_matches_reference_including_clamping(multi, golden, golden_cases):
    case = golden_cases["text.seconds_total_conditioner"]
    values = case["inputs"]["values"]
    emb, mask = multi.conditioners["seconds_total"](values, "cpu")
    torch.testing.assert_close(emb, golden["seconds.embeds"], **case["tolerance"])
    assert mask.dtype == torch.float32 and torch.equal(mask, golden["seconds.mask"])
    as_tensor, _ = multi.conditioners["seconds_total"](torch.tensor(values), "cpu")
    torch.testing.assert_close(as_tensor, emb, atol=0, rtol=0)
    clamped = dict(zip(values, emb, strict=True))
    assert torch.equal(clamped[500.0], clamped[384.0]) and torch.equal(clamped[-3.0], clamped[0.0])


def test_multi_conditioner_reads_batch_metadata_and_unwraps_collated_values(multi):
    out = multi([{"prompt": "dog barking", "seconds_total": 3.0}, {"prompt": ["rain"], "seconds_total": (4.0,)}],
                "cpu")
    assert out["prompt"][0].shape == (2, 16, 64) and out["seconds_total"][0].shape == (2, 1, 64)
    with pytest.raises(ConditionerError, match="seconds_total"):
        multi([{"prompt": "x"}], "cpu")


def test_comfyui_single_file_text_encoder_gives_the_same_conditioner_output(fixtures_dir, conditioning, golden,
                                                                            golden_cases, tmp_path):
    t5_dir = fixtures_dir / "tiny-small" / "t5gemma-b-b-ul2"
    path = write_comfyui_text_encoder(t5_dir, tmp_path / "t5gemma_b_b_ul2.safetensors")
    tensors = load_file(str(path))
    tensors["model.decoder.norm.weight"] = torch.ones(3)  # ComfyUI files may carry parts we do not use
    save_file(tensors, str(path), metadata=load_meta(path))
    multi = build_conditioner(conditioning, path)
    multi.load_state_dict(checkpoint_conditioner_tensors(fixtures_dir))
    emb, mask = multi.conditioners["prompt"](golden_cases["text.prompt_conditioner"]["inputs"]["prompts"], "cpu")
    torch.testing.assert_close(emb, golden["text.prompt_embeds"], atol=2e-5, rtol=1e-4)
    assert torch.equal(mask, golden["text.prompt_mask"])


def load_meta(path):
    from sa3_lora_studio.sa3.loading import SafetensorsFile

    return SafetensorsFile(path).metadata


def test_t5_runs_only_over_each_prompts_real_tokens_with_the_same_output(multi):
    """Padded positions are replaced, so T5 runs over each prompt's real tokens only; their outputs equal a run over
    the whole max_length (they never attend padded keys, and RoPE sees the same distances), and do not depend on
    the other prompts of the batch (the bits of a small product depend on its row count)."""
    prompt = multi.conditioners["prompt"]
    texts = ["a short one", "kick", "", "hat", "snare"]
    ids, mask = prompt.tokenize(texts)
    counts = mask.sum(1).tolist()
    assert max(counts) < ids.shape[1] and counts[2] == 0  # the fixture's prompts leave padding to skip
    seen = []
    hook = prompt.text_encoder.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    try:
        trimmed = prompt.encode_tokens(ids, mask)
        alone = prompt.encode_tokens(ids[1:2], mask[1:2])
    finally:
        hook.remove()
    assert seen[:-1] == [(1, c) for c in counts if c > 0]  # one call per prompt, none for the empty one
    full = prompt.text_encoder(ids, mask)
    torch.testing.assert_close(trimmed[mask], full[mask], atol=1e-5, rtol=1e-5)
    assert trimmed.shape == full.shape and not trimmed[~mask].any()
    assert torch.equal(alone[0], trimmed[1])
    assert torch.equal(prompt.project(trimmed, mask)[0][~mask], prompt.project(full, mask)[0][~mask])
    flipped = prompt.encode_tokens(ids.flip(1), mask.flip(1))  # padded on the right: the tail is skipped instead
    torch.testing.assert_close(flipped[mask.flip(1)], prompt.text_encoder(ids.flip(1), mask.flip(1))[mask.flip(1)],
                               atol=1e-5, rtol=1e-5)


def test_repeated_prompt_does_not_rerun_t5(multi):
    prompt = multi.conditioners["prompt"]
    calls = []
    hook = prompt.text_encoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        first, _ = prompt(["a cached prompt", "another one"], "cpu")
        calls.append("|")
        again, _ = prompt(["another one", "a cached prompt", "another one"], "cpu")
        calls.append("|")
        prompt(["a cached prompt", "a new one"], "cpu")
    finally:
        hook.remove()
    assert calls == [1, 1, "|", "|", 1]  # one T5 call per new prompt: the second call ran nothing, the third one
    assert torch.equal(again[1], first[0]) and torch.equal(again[0], first[1])


def test_text_encoder_is_not_moved_or_cast_with_the_module_and_offloads_to_cpu(fixtures_dir, conditioning):
    multi = build_conditioner(conditioning, fixtures_dir)
    prompt = multi.conditioners["prompt"]
    multi.to(torch.float64)
    assert prompt.text_encoder.dtype == torch.float32 and prompt.padding_embedding.dtype == torch.float64
    emb, _ = prompt(["dog"], "cpu")
    assert emb.dtype == torch.float64
    prompt.offload_text_encoder()
    assert prompt.text_encoder.device.type == "cpu"


def test_bf16_build_puts_text_encoder_in_bf16(fixtures_dir, conditioning):
    multi = build_conditioner(conditioning, fixtures_dir, dtype="bf16")
    prompt = multi.conditioners["prompt"]
    emb, mask = prompt(["", "dog barking next to a waterfall"], "cpu")
    assert prompt.text_encoder.dtype == torch.bfloat16 and emb.dtype == torch.bfloat16
    assert torch.isfinite(emb.float()).all()


def test_projection_exists_when_t5_width_differs_from_cond_dim(fixtures_dir, conditioning):
    narrow = {**conditioning, "cond_dim": 32}
    multi = build_conditioner(narrow, fixtures_dir)
    assert multi.conditioners["prompt"].proj_out.weight.shape == (32, 64)
    assert "conditioners.prompt.proj_out.weight" in multi.state_dict()
    emb, _ = multi.conditioners["prompt"](["dog"], "cpu")
    assert emb.shape == (1, 16, 32)
    model_side = MultiConditioner(conditioning)  # no T5 at build time: width assumed = cond_dim
    with pytest.raises(ConditionerError, match="64 wide but this prompt conditioner expects 32"):
        MultiConditioner(narrow).conditioners["prompt"].load_text_encoder(fixtures_dir / "tiny-small" / "t5gemma-b-b-ul2")
    assert isinstance(model_side.conditioners["prompt"].proj_out, torch.nn.Identity)


def test_number_conditioner_structure_and_learned_variant():
    number = NumberConditioner(48)
    assert set(number.state_dict()) == {"embedder.embedding.1.weight", "embedder.embedding.1.bias"}
    assert number.embedder.embedding[1].in_features == 256
    learned = NumberConditioner(48, max_val=10, fourier_features_type="learned")
    emb, mask = learned([1.0, 20.0], None)
    assert emb.shape == (2, 1, 48) and mask.shape == (2, 1)


def test_missing_text_encoder_and_bad_locations_give_clear_errors(conditioning, tmp_path):
    prompt = MultiConditioner(conditioning).conditioners["prompt"]
    with pytest.raises(ConditionerError, match="no text encoder loaded"):
        prompt(["dog"], "cpu")
    entry = conditioning["configs"][0]["config"]
    with pytest.raises(ConditionerError, match="text encoder not found; looked in .*t5gemma-b-b-ul2"):
        resolve_text_encoder(entry, tmp_path)
    with pytest.raises(ConditionerError, match="type 'clap'"):
        MultiConditioner({"cond_dim": 8, "configs": [{"id": "x", "type": "clap", "config": {}}]})


def test_prompt_conditioner_accepts_the_official_config_keys():
    prompt = PromptConditioner(768, model_name="google/t5gemma-b-b-ul2", max_length=256, padding_mode="learned",
                               repo_id="stabilityai/stable-audio-3-medium-base", subfolder="t5gemma-b-b-ul2")
    assert prompt.padding_embedding.shape == (768,) and prompt.max_length == 256


def test_copies_share_the_frozen_text_encoder_but_not_the_parameters(multi):
    import copy
    import pickle

    clone = copy.deepcopy(multi)
    prompt, cloned = multi.conditioners["prompt"], clone.conditioners["prompt"]
    assert cloned.text_encoder is prompt.text_encoder and cloned.padding_embedding is not prompt.padding_embedding
    restored = pickle.loads(pickle.dumps(multi))
    emb, _ = restored.conditioners["prompt"](["dog barking next to a waterfall"], "cpu")
    torch.testing.assert_close(emb, prompt(["dog barking next to a waterfall"], "cpu")[0], atol=0, rtol=0)
