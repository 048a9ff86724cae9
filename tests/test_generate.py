"""End-to-end generation through the public API against the official `generate()` goldens (fp32 CPU, same seeds)."""

import json

import pytest
import torch
from sa3_lora_studio import load_model

CASES = ["e2e.arc_pingpong", "e2e.base_euler_cfg3", "e2e.base_euler_cfg3_batch2_negative", "e2e.arc_audio_to_audio",
         "e2e.arc_inpaint", "e2e.arc_continuation"]


@pytest.fixture(scope="module")
def e2e(fixtures_dir):
    from conftest import load_golden

    return load_golden(fixtures_dir, "e2e.safetensors")


@pytest.fixture(scope="module")
def models(fixtures_dir):
    return {name: load_model(fixtures_dir / name) for name in ("tiny-small", "tiny-small-arc")}


def _kwargs(case, e2e):
    kw = dict(case["generate_kwargs"])
    kw.pop("sample_size")  # the official cap; ours is the model's native maximum (the same 768 samples here)
    cid = case["id"]
    if "init_audio" in kw:
        kw["init_audio"] = (e2e[f"{cid}.in.init_audio"], 44100)
    if "inpaint_audio" in kw:
        kw["inpaint_audio"] = (e2e[f"{cid}.in.inpaint_audio"], 44100)
        kw["inpaint_regions"] = [(kw.pop("inpaint_mask_start_seconds"), kw.pop("inpaint_mask_end_seconds"))]
    return kw


@pytest.mark.parametrize("case_id", CASES)
@pytest.mark.filterwarnings("ignore:duration")  # the fixtures' native maximum (768 samples) is shorter than 1 s
def test_generate_matches_the_official_run(golden_cases, e2e, models, case_id):
    case = golden_cases[case_id]
    model = models[case["model"]]
    kw = _kwargs(case, e2e)
    prompt = kw.pop("prompt")
    latents, _ = model.generate(prompt, return_latents=True, **kw)
    torch.testing.assert_close(latents, e2e[f"{case_id}.latents"], atol=2e-4, rtol=1e-3)
    audio, rate = model.generate(prompt, **kw)
    expected = e2e[f"{case_id}.audio"]
    assert rate == 44100
    torch.testing.assert_close(audio, expected[..., : audio.shape[-1]], atol=2e-4, rtol=1e-3)


def test_defaults_follow_the_model_kind(models):
    from sa3_lora_studio.sa3.generate import DEFAULTS

    assert models["tiny-small-arc"].is_arc and DEFAULTS["arc"] == ("pingpong", 8, 1.0)
    assert not models["tiny-small"].is_arc and DEFAULTS["base"] == ("euler", 50, 7.0)


def test_same_seed_same_audio_and_different_seed_differs(models):
    m = models["tiny-small-arc"]
    a, _ = m.generate("rain", duration=0.01, seed=3, steps=3)
    b, _ = m.generate("rain", duration=0.01, seed=3, steps=3)
    c, _ = m.generate("rain", duration=0.01, seed=4, steps=3)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (1, 2, int(0.01 * 44100)) and a.abs().max() <= 1


def test_length_reaches_the_native_maximum_not_the_official_120_s_cap(fixtures_dir, tmp_path):
    """A medium-like model generates more latents than 120 s of audio needs (the official generate() default cap).

    The SAME stride is a config value (not in the weights), so the fixture's medium-like model is given stride 128
    (1024 samples per latent) to keep 120 s at ~5k latents, small enough for a CPU test."""
    import shutil

    folder = tmp_path / "tiny-medium"
    shutil.copytree(fixtures_dir / "tiny-medium", folder)
    shutil.copytree(fixtures_dir / "tiny-small" / "t5gemma-b-b-ul2", folder / "t5gemma-b-b-ul2")
    cfg = json.loads((folder / "model_config.json").read_text())
    pt = cfg["model"]["pretransform"]["config"]
    for part in ("encoder", "decoder"):
        pt[part]["config"]["strides"] = [128]
    pt["downsampling_ratio"] = 8 * 128
    latents_120s = 44100 * 120 // 1024
    cfg["sample_size"] = (latents_120s + 200) * 1024
    (folder / "model_config.json").write_text(json.dumps(cfg))
    model = load_model(folder)
    seconds = 118.0  # + 6 s headroom: past 120 s of latents, within the native maximum
    latents, _ = model.generate("long", duration=seconds, steps=1, seed=0, return_latents=True)
    assert latents.shape[-1] > latents_120s
    with pytest.warns(UserWarning, match="native maximum"):
        capped, _ = model.generate("too long", duration=cfg["sample_size"] / 44100 + 1, steps=1, return_latents=True)
    assert capped.shape[-1] == cfg["sample_size"] // 1024


def test_inpainting_on_a_model_without_an_inpainting_input_says_so(tmp_path):
    """Official-architecture models may lack the inpaint conditioning; the source must not be silently ignored."""
    import copy

    from sa3_lora_studio.sa3.tiny import TINY_CONFIG, write_tiny_model

    config = copy.deepcopy(TINY_CONFIG)
    config["model"]["diffusion"]["local_add_cond_ids"] = []
    config["model"]["diffusion"]["config"]["local_add_cond_dim"] = None
    model = load_model(write_tiny_model(tmp_path / "plain", config=config))
    source = (0.3 * torch.sin(torch.arange(8192) / 44100 * 2 * torch.pi * 220)).repeat(2, 1)
    with pytest.raises(ValueError, match="no inpainting input.*init_audio"):
        model.generate("pad", duration=0.1, steps=1, inpaint_audio=(source, 44100), inpaint_regions=[(0.02, 0.05)])
    with pytest.warns(UserWarning, match="the init audio lasts 0.186 s but the output 0.1 s"):  # as the user is told
        assert model.generate("pad", duration=0.1, steps=1, init_audio=(source, 44100),
                              init_noise_level=0.5)[0].isfinite().all()


def test_inpainting_from_latents_equals_inpainting_the_audio_they_encode(models):
    model = models["tiny-small"]
    source = (0.3 * torch.sin(torch.arange(8192) / 44100 * 2 * torch.pi * 220)).repeat(2, 1)
    kw = dict(duration=0.015, seed=4, steps=2, inpaint_regions=[(0.005, 0.01)])
    n_latents = round(0.015 * model.config.latent_rate) + 2  # more than the output: cropped as the audio is
    latents = model.encode_audio(source[:, :n_latents * model.downsampling_ratio], 44100, chunked=False)[0]
    from_audio, _ = model.generate("pad", inpaint_audio=(source, 44100), **kw)
    from_latents, _ = model.generate("pad", inpaint_latents=latents, **kw)
    assert torch.allclose(from_audio, from_latents, atol=1e-5)
    with pytest.raises(ValueError, match="not both"):
        model.generate("pad", inpaint_audio=(source, 44100), inpaint_latents=latents, **kw)
    with pytest.raises(ValueError, match="inpaint_latents of shape"):
        model.generate("pad", inpaint_latents=latents[:3], **kw)


def test_paste_back_keeps_the_sources_own_samples_outside_the_regions_whatever_the_seed(models):
    """Not the autoencoder's round trip of them: a musician expects the untouched parts untouched; inside the
    region the take, crossfaded in just inside its edges."""
    from sa3_lora_studio.sa3.generate import PASTE_FADE_SECONDS

    model = models["tiny-small"]
    rate = model.sample_rate
    source = (0.3 * torch.sin(torch.arange(8192) / rate * 2 * torch.pi * 220)).repeat(2, 1)
    region = (0.004, 0.009)
    kw = dict(duration=0.015, steps=2, inpaint_audio=(source, rate), inpaint_regions=[region], paste_back=True)
    takes = [model.generate("pad", seed=seed, **kw)[0][0] for seed in (3, 4)]
    start, end = (int(x * rate) for x in region)
    fade = int(PASTE_FADE_SECONDS * rate)
    n = takes[0].shape[-1]
    for take in takes:
        assert torch.equal(take[:, :start], source[:, :start]) and torch.equal(take[:, end:n], source[:, end:n])
    f = min(fade, (end - start) // 2)  # a region shorter than two fades fades over its halves
    middle = (start + end) // 2
    for take in takes:  # the take at the region's middle; a blend of both near its edges
        assert not torch.allclose(take[:, middle], source[:, middle], atol=1e-4)
        assert (take[:, start:start + f] - source[:, start:start + f]).abs().max() > 0
    assert not torch.allclose(takes[0][:, start:end], takes[1][:, start:end])  # the regenerated part is the take's
    plain = model.generate("pad", seed=3, **{**kw, "paste_back": False})[0][0]
    assert not torch.allclose(plain[:, :start], source[:, :start], atol=1e-3)  # without it: the model's own


def test_nan_or_infinite_settings_and_regions_past_the_end_are_refused_by_name(models):
    model = models["tiny-small"]
    source = (0.3 * torch.sin(torch.arange(8192) / 44100 * 2 * torch.pi * 220)).repeat(2, 1)
    for kwargs, named in [({"cfg_scale": float("nan")}, "cfg_scale=nan"), ({"duration": float("inf")}, "duration=inf"),
                          ({"loras": [{"path": "x.safetensors", "strength": float("nan")}]}, "lora_strength"),
                          ({"inpaint_audio": (source, 44100), "inpaint_regions": [(5.0, 6.0)]}, "starts after the output"),
                          # past the asked duration though inside the model's window: the output's end is 0.01 s
                          ({"inpaint_audio": (source, 44100), "inpaint_regions": [(0.02, 0.03)]},
                           r"starts after the output's end \(0\.01 s\)"),
                          ({"inpaint_audio": (source, 44100), "inpaint_regions": [(0.0, float("inf"))]}, "both finite")]:
        with pytest.raises(ValueError, match=named):
            model.generate("pad", **{"duration": 0.01, "steps": 1, **kwargs})


@pytest.mark.parametrize("sampler, evaluations", [("euler", 1), ("pingpong", 1), ("dpmpp", 1), ("rk4", 4)])
def test_skip_first_steps_counts_sampler_steps_not_model_evaluations(models, fixtures_dir, monkeypatch, sampler,
                                                                     evaluations):
    """rk4 evaluates four times per step, the last at the next step's sigma: all four belong to the same step."""
    from sa3_lora_studio.adapters.apply import AdaptedModel

    seen = []
    original = AdaptedModel.update

    def record(self, sigma=None, step=None):
        seen.append(step)
        return original(self, sigma, step)

    monkeypatch.setattr(AdaptedModel, "update", record)
    lora = {"path": str(fixtures_dir / "golden" / "lora" / "lora.safetensors"), "strength": 1.0, "skip_first_steps": 1}
    models["tiny-small"].generate("pad", duration=0.01, steps=3, sampler=sampler, cfg_scale=1.0, loras=[lora],
                                  adapter_memory="low")
    assert [s for s in seen if s is not None] == [i for i in range(3) for _ in range(evaluations)]


def test_a_batch_of_source_clips_gives_one_output_per_clip(models):
    """An AUDIO batch (e.g. a batch generated before) feeds audio-to-audio item by item; one clip serves all."""
    model = models["tiny-small-arc"]
    t = torch.arange(8192) / 44100
    clips = torch.stack([(0.3 * torch.sin(2 * torch.pi * f * t)).repeat(2, 1) for f in (220, 880)])  # [2, 2, N]
    kw = {"duration": 0.015, "steps": 2, "seed": 5, "init_noise_level": 0.6}
    both, _ = model.generate("pad", init_audio={"waveform": clips, "sample_rate": 44100}, **kw)
    first, _ = model.generate("pad", init_audio={"waveform": clips[:1], "sample_rate": 44100}, batch_size=2, **kw)
    assert both.shape[0] == 2 and first.shape[0] == 2
    torch.testing.assert_close(both[0], first[0], atol=1e-4, rtol=0)  # item 0: same clip, same noise
    assert (both[1] - first[1]).abs().max() > 1e-2  # item 1 started from the other clip
    with pytest.raises(ValueError, match="2 clips but batch_size is 3"):
        model.generate("pad", init_audio={"waveform": clips, "sample_rate": 44100}, batch_size=3, **kw)


def test_audio_that_is_not_finite_is_refused_with_what_to_do_not_written(models, fixtures_dir, monkeypatch):
    """A diverged adapter (trained with far too high a learning rate) makes NaN audio: no format holds it (WAV
    writing fails deep in soundfile), so generation says so and names the likely cause."""
    model = models["tiny-small"]
    real = type(model).decode_latents

    def nan_audio(self, latents, **kwargs):
        return real(self, latents, **kwargs) * float("nan")
    monkeypatch.setattr(type(model), "decode_latents", nan_audio)
    lora = {"path": str(fixtures_dir / "golden" / "lora" / "lora.safetensors"), "strength": 1.0}
    with pytest.raises(ValueError, match="not finite .*diverged in training .*lower learning rate"):
        model.generate("pad", duration=0.01, steps=2, loras=[lora])
    with pytest.raises(ValueError, match="not finite .*try fp32"):
        model.generate("pad", duration=0.01, steps=2)


def test_regions_read_seconds_minutes_and_decimal_commas_and_name_what_they_cannot_read():
    from sa3_lora_studio.sa3.generate import parse_regions

    assert parse_regions("4.0-8.0, 16-20") == [(4.0, 8.0), (16.0, 20.0)]
    assert parse_regions("1s-2.5s; 0:01:02-0:01:04") == [(1.0, 2.5), (62.0, 64.0)]
    assert parse_regions("1:04-1:08.5, 4–6") == [(64.0, 68.5), (4.0, 6.0)]  # an en dash as typed on a Mac
    assert parse_regions("1,5-2,5; 4-6") == [(1.5, 2.5), (4.0, 6.0)]  # ';' between regions: decimal commas
    for text, said in (("1,0-1,5", "a decimal comma\\? separate regions with ';'"), ("0:61-1:10", "m:ss"),
                       ("3-2", "need 0 <= start < end"), ("a-b", "is not 'start-end'")):
        with pytest.raises(ValueError, match=said):
            parse_regions(text)
