"""SAME autoencoder: parity with the reference goldens (tiny SAME-S-like and SAME-L-like checkpoints), exact sliding
window attention, latent length rules, chunked stitching, noise driven by a generator, input preparation."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from sa3_lora_studio.sa3.autoencoder import SAMEAutoencoder, band_mask, chunk_layout, prepare_audio, sliding_window_attention
from safetensors.torch import load_file

PREFIX = "pretransform.model."
MODELS = {"small": "tiny-small", "medium": "tiny-medium"}


def pretransform_config(fixtures_dir, model: str) -> dict:
    return json.loads((fixtures_dir / model / "model_config.json").read_text())["model"]["pretransform"]


def load_tiny_autoencoder(fixtures_dir, model: str, config: dict | None = None) -> SAMEAutoencoder:
    """The fixture's autoencoder through the public `load_autoencoder` (strict); with a modified `config`, the
    fixture's `pretransform.model.*` tensors loaded strictly into a module built from it."""
    if config is None:
        from sa3_lora_studio import load_autoencoder

        return load_autoencoder(fixtures_dir / model)
    ae = SAMEAutoencoder.from_config(config)
    state = {k[len(PREFIX):]: v for k, v in load_file(str(fixtures_dir / model / "model.safetensors")).items()
             if k.startswith(PREFIX)}
    ae.load_state_dict(state, strict=True)
    return ae.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def autoencoders(fixtures_dir):
    return {key: load_tiny_autoencoder(fixtures_dir, model) for key, model in MODELS.items()}


@pytest.fixture(scope="module")
def goldens(fixtures_dir):
    return load_file(str(fixtures_dir / "golden" / "autoencoder.safetensors"))


def compute_golden_outputs(ae: SAMEAutoencoder, g: dict, key: str) -> dict:
    """Every `ae.<key>.out.*` tensor, computed as each step of cases.json describes."""
    p = f"ae.{key}.in."
    wave, wave_long = g[p + "wave"], g[p + "wave_long"]
    out = {"patched": ae.pretransform.encode(wave)}
    out["encoder_out"] = ae.encoder(out["patched"])
    out["latents"] = ae.encode(wave)  # config: chunked, but 24 latents < one 128-latent chunk
    out["decoder_out"] = ae.decoder(ae.bottleneck.decode(out["latents"]))
    out["decoded"] = ae.decode(out["latents"])
    out["latents_long"] = ae.encode(wave_long, chunked=False)
    out["decoded_long"] = ae.decode(out["latents_long"], chunked=False)
    out["latents_long_chunked"] = ae.encode_chunked(wave_long, chunk_size=8, overlap=2)
    out["decoded_long_chunked"] = ae.decode_chunked(out["latents_long"], chunk_size=8, overlap=2)
    out["decoded_odd23"] = ae.decode(out["latents"][..., :23])
    out["mono1000_preprocessed"] = ae.prepare_audio(g[p + "mono1000"], 44100)
    out["mono1000_latents"] = ae.encode(out["mono1000_preprocessed"])
    out["list_preprocessed"] = ae.prepare_audio([g[p + "mono1000"], g[p + "stereo700"]], 44100)
    out["list_latents"] = ae.encode(out["list_preprocessed"])
    return out


@pytest.mark.parametrize("key", ["small", "medium"])
def test_every_autoencoder_golden_matches_the_reference(autoencoders, goldens, golden_cases, key):
    case = golden_cases[f"autoencoder.{key}"]
    tol = case["tolerance"]  # fp32 CPU, a faithful port lands near 1e-5
    with torch.no_grad():
        out = compute_golden_outputs(autoencoders[key], goldens, key)
    assert sorted(f"ae.{key}.out.{name}" for name in out) == sorted(case["expected"])
    for name, value in out.items():
        expected = goldens[f"ae.{key}.out.{name}"]
        assert value.shape == expected.shape, name
        torch.testing.assert_close(value, expected, atol=tol["atol"], rtol=tol["rtol"], msg=name)


def test_the_module_tree_has_exactly_the_checkpoint_keys(fixtures_dir):
    for model in MODELS.values():
        with torch.device("meta"):  # the loader builds on meta, then fills from the file
            ae = SAMEAutoencoder.from_config(pretransform_config(fixtures_dir, model))
        file_keys = {k[len(PREFIX):] for k in load_file(str(fixtures_dir / model / "model.safetensors"))
                     if k.startswith(PREFIX)}
        assert set(ae.state_dict()) == file_keys


@pytest.mark.parametrize("n, window, block", [
    (1, (5, 5), 128), (7, (5, 5), 128), (37, (5, 5), 8), (101, (17, 17), 16), (255, (3, 9), 32),
    (129, (0, 4), 64), (13, (40, 40), 4), (333, (17, 17), 128)])
def test_sliding_window_attention_equals_full_masked_attention(n, window, block):
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g) for _ in range(3))
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=band_mask(n, window))
    torch.testing.assert_close(sliding_window_attention(q, k, v, window, block=block), expected,
                               atol=1e-6, rtol=1e-5)


def test_latent_lengths_follow_the_attention_alignment(autoencoders):
    small, medium = autoencoders["small"], autoencoders["medium"]
    assert (small.min_length, medium.min_length) == (2, 1)
    assert small.downsampling_ratio == medium.downsampling_ratio == 32
    assert small.latent_dim == 16 and small.io_channels == 2
    z = torch.randn(1, 16, 23)
    with torch.no_grad():
        assert small.decode(z).shape == (1, 2, 24 * 32)  # chunked SAME-S pads to an even latent count
        assert medium.decode(z).shape == (1, 2, 23 * 32)
        audio = torch.randn(1, 2, 23 * 32) * 0.3
        assert small.encode(audio).shape == (1, 16, 24)
        assert medium.encode(audio).shape == (1, 16, 23)
        assert small.encode(torch.randn(1, 2, 1000) * 0.3).shape[-1] == 32  # patch, then chunk padding


def test_chunk_layout_is_the_reference_plan():
    assert chunk_layout(40, 8, 2) == [(0, (0, 7), 0), (6, (1, 7), 6), (12, (1, 7), 12), (18, (1, 7), 18),
                                      (24, (1, 7), 24), (30, (1, 7), 30), (32, (1, 8), 32)]
    assert chunk_layout(128, 128, 32) == [(0, (0, 128), 0)]
    plan = chunk_layout(300, 128, 32)
    assert [start for start, _, _ in plan] == [0, 96, 172]
    covered = sorted(i for start, (a, b), out in plan for i in range(out + a, out + b))
    assert covered[0] == 0 and covered[-1] == 299 and set(covered) == set(range(300))


@pytest.mark.parametrize("key", ["small", "medium"])
def test_chunked_equals_unchunked_when_half_the_overlap_covers_the_receptive_field(autoencoders, key):
    """Tiny depth-2 models: SAME-S mixes at most the neighbouring latent (chunk pairs, then shifted pairs) plus one
    patch through the k=3 output conv; SAME-L sees ±1 latent per block. Dropping 2 latents per inner edge covers
    both, and even chunk starts keep SAME-S's 2-latent grid, so stitching is exact. (With 1 it is not: the goldens
    pin that case.)"""
    ae = autoencoders[key]
    g = torch.Generator().manual_seed(1)
    z, audio = torch.randn(1, 16, 40, generator=g), 0.3 * torch.randn(1, 2, 40 * 32, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(ae.decode_chunked(z, 16, 4), ae.decode(z, chunked=False), atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(ae.encode_chunked(audio, 16, 4), ae.encode(audio, chunked=False),
                                   atol=2e-5, rtol=1e-4)
        assert (ae.decode_chunked(z, 16, 2) - ae.decode(z, chunked=False)).abs().max() > 1e-3


def test_encode_and_decode_follow_the_config_chunked_flag(autoencoders):
    ae = autoencoders["medium"]  # chunked: true in the config; 140 latents exceed one 128-latent chunk
    g = torch.Generator().manual_seed(2)
    z, audio = torch.randn(1, 16, 140, generator=g), 0.3 * torch.randn(1, 2, 140 * 32, generator=g)
    with torch.no_grad():
        assert torch.equal(ae.decode(z), ae.decode_chunked(z))
        assert torch.equal(ae.encode(audio), ae.encode_chunked(audio))
        assert not torch.equal(ae.decode(z), ae.decode(z, chunked=False))


def test_chunked_passes_never_run_more_than_one_chunk(autoencoders):
    ae = autoencoders["small"]
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[-1]))
             for m in (ae.encoder, ae.decoder)]
    try:
        with torch.no_grad():
            latents = ae.encode_chunked(0.3 * torch.randn(1, 2, 60 * 32 + 5), chunk_size=16, overlap=4)
            audio = ae.decode_chunked(latents, chunk_size=16, overlap=4)
    finally:
        for hook in hooks:
            hook.remove()
    assert latents.shape == (1, 16, 61) and audio.shape == (1, 2, 61 * 32)  # the 5-sample tail is padded
    assert sorted(set(seen)) == [16, 16 * 4]  # decoder: 16 latents; encoder: 16 latents x 4 patches (stride)


def test_a_chunked_encode_reports_each_chunk_and_skips_the_ones_given_as_finished(autoencoders):
    ae = autoencoders["small"]
    audio = 0.3 * torch.randn(2, 2, 61 * 32, generator=torch.Generator().manual_seed(3))  # a batch of two
    plan = chunk_layout(61, 16, 4)
    reported = {}
    with torch.no_grad():
        whole = ae.encode_chunked(audio, 16, 4, on_chunk=lambda done, total, kept: reported.update(
            {done - 1: (total, kept.clone())}))
        assert sorted(reported) == list(range(len(plan))) and {t for t, _ in reported.values()} == {len(plan)}
        assert [k.shape[-1] for _, k in reported.values()] == [right - left for _, (left, right), _ in plan]
        calls = []
        hook = ae.encoder.register_forward_pre_hook(lambda m, args: calls.append(1))
        try:
            finished = {i: kept for i, (_, kept) in reported.items() if i != 2}
            finished[0] = finished[0][..., 1:]  # a kept chunk of another shape is computed again
            again = ae.encode_chunked(audio, 16, 4, finished=finished)
        finally:
            hook.remove()
    assert len(calls) == 2 and torch.equal(again, whole)


def test_decode_noise_is_driven_by_the_generator(fixtures_dir):
    """Real SAME-S configs set bottleneck noise_regularize (1e-3 · running_std in eval) and decoder mask_noise 0.01
    on the learned tokens; both draw from `generator` (the global RNG without one, as the reference)."""
    config = copy.deepcopy(pretransform_config(fixtures_dir, "tiny-small"))
    config["config"]["bottleneck"]["config"]["noise_regularize"] = True
    clean = load_tiny_autoencoder(fixtures_dir, "tiny-small")
    bottleneck_noise = load_tiny_autoencoder(fixtures_dir, "tiny-small", config)
    config["config"]["decoder"]["config"]["mask_noise"] = 0.01
    both_noises = load_tiny_autoencoder(fixtures_dir, "tiny-small", config)
    z = torch.randn(2, 16, 6, generator=torch.Generator().manual_seed(3))
    std = clean.bottleneck.running_std
    with torch.no_grad():
        noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(7))
        expected = clean.pretransform.decode(clean.decoder(z * std + noise * std * 1e-3))
        torch.testing.assert_close(bottleneck_noise.decode(z, generator=torch.Generator().manual_seed(7)), expected,
                                   atol=1e-6, rtol=0)
        a = both_noises.decode(z, generator=torch.Generator().manual_seed(7))
        b = both_noises.decode(z, generator=torch.Generator().manual_seed(7))
        c = both_noises.decode(z, generator=torch.Generator().manual_seed(8))
        torch.manual_seed(7)
        d = both_noises.decode(z)
    assert torch.equal(a, b) and torch.equal(a, d) and not torch.equal(a, c) and not torch.equal(a, expected)


def test_prepare_audio_resamples_with_soxr_and_sets_channels():
    t = torch.arange(48000) / 48000
    sine = torch.sin(2 * math.pi * 1000 * t)
    out = prepare_audio(sine, 48000, 44100, channels=2, multiple_of=32)
    assert out.shape == (1, 2, 44128)
    assert torch.equal(out[0, 0], out[0, 1])
    resampled = out[0, 0, :44100]
    spectrum = torch.fft.rfft(resampled[2000:42000]).abs()
    assert abs(spectrum.argmax().item() * 44100 / 40000 - 1000) < 2  # still a 1 kHz tone
    assert prepare_audio(torch.randn(4, 100), 44100, 44100, channels=2).shape == (1, 2, 100)
    stereo = torch.randn(2, 100)
    torch.testing.assert_close(prepare_audio(stereo, 44100, 44100, channels=1)[0, 0], stereo.mean(0))
    batch = prepare_audio(torch.randn(3, 1, 50), [44100, 44100, 44100], 44100, channels=2, multiple_of=32)
    assert batch.shape == (3, 2, 64)


def test_a_surround_source_is_mixed_to_stereo_like_the_dataset_encoder_mixes_it():
    """Audio-to-audio and inpainting sources with 6 channels keep their centre and surrounds (not cut to L/R)."""
    import numpy as np
    from sa3_lora_studio.encoding.audio_io import downmix

    surround = torch.randn(6, 640, generator=torch.Generator().manual_seed(0)) * 0.2
    mixed = prepare_audio(surround, 44100, 44100, channels=2)[0]
    torch.testing.assert_close(mixed, torch.from_numpy(downmix(surround.numpy().astype(np.float32))))
    assert not torch.allclose(mixed, surround[:2])


def test_prepare_audio_lends_one_aligned_signal_instead_of_copying_it():
    """A long file's samples are not copied again on their way into the encoder; anything that needs a change
    (padding, batching, resampling) still gets its own tensor."""
    x = torch.randn(2, 3 * 4096)
    lent = prepare_audio(x, 44100, 44100, 2, 4096)
    assert lent.shape == (1, 2, 3 * 4096) and lent.data_ptr() == x.data_ptr()
    padded = prepare_audio(x[:, :-5], 44100, 44100, 2, 4096)
    assert padded.shape == (1, 2, 3 * 4096) and padded[..., -5:].abs().sum() == 0
    assert torch.equal(padded[0, :, :-5], x[:, :-5]) and padded.data_ptr() != x.data_ptr()
    batch = prepare_audio([x, x[:, :4096]], 44100, 44100, 2, 4096)
    assert batch.shape == (2, 2, 3 * 4096) and batch.data_ptr() != x.data_ptr()
