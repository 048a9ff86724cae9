"""Schedules, training-time timesteps/noise/masks/loss, and generation lengths against the official goldens."""

import json
import math

import pytest
import torch
from sa3_lora_studio.sa3 import schedules as S
from safetensors.torch import load_file

SR, DS_TINY = 44100, 32  # the fixtures' sample rate and downsampling ratio


def load_golden(fixtures_dir, name):
    return load_file(str(fixtures_dir / "golden" / name))


def close(got, expected, tol):
    torch.testing.assert_close(got, expected, atol=tol["atol"], rtol=tol["rtol"])


# --- sampling schedules --------------------------------------------------------------------------------------------


def test_sampling_schedules_match_every_official_golden(fixtures_dir, golden_cases):
    g = load_golden(fixtures_dir, "schedules.safetensors")
    case = golden_cases["schedules.sampling"]
    logsnr, full = S.DEFAULT_SAMPLING_SHIFT, S.DistributionShift()
    checked = 0
    for name in case["expected"]:
        parts = name.split(".")  # sched.<shift>.steps<N>[.smax<s>][.L<len>|.per_item]
        shift = logsnr if parts[1] == "logsnr" else full
        steps = int(parts[2].removeprefix("steps"))
        smax = next((float(p[4:] + "." + parts[i + 1]) for i, p in enumerate(parts) if p.startswith("smax")), 1.0)
        if name.endswith("per_item"):
            seq_len = g[name + ".effective_seq_len"]
        else:
            seq_len = next((int(p[1:]) for p in parts if p.startswith("L") and p[1:].isdigit()), 1379)
        got = S.build_schedule(steps, smax, shift, effective_seq_len=seq_len)
        assert got.shape == g[name].shape, name
        close(got, g[name], case["tolerance"])
        checked += 1
    assert checked == len(case["expected"]) == 13


@pytest.mark.parametrize("shift", [S.DEFAULT_SAMPLING_SHIFT, S.DistributionShift(), S.LogSNRShift(rate=1.0),
                                   S.FluxDistributionShift(alpha_min=1.5, alpha_max=6.93), S.IdentityDistributionShift()],
                         ids=["logsnr0", "full", "logsnr1", "flux", "identity"])
@pytest.mark.parametrize("steps", [1, 8, 50])
@pytest.mark.parametrize("seq_len", [20, 1379, 9000])
def test_a_schedule_starts_at_sigma_max_falls_and_ends_at_zero(shift, steps, seq_len):
    t = S.build_schedule(steps, 1.0, shift, effective_seq_len=seq_len)
    assert t.shape == (steps + 1,) and t.dtype == torch.float32
    assert t[0] == 1.0 and t[-1] == 0.0
    assert (t[1:] < t[:-1]).all()


def test_init_noise_below_one_keeps_the_official_rise_after_the_re_anchored_first_step():
    t = S.build_schedule(8, 0.8)
    assert t[0] == pytest.approx(0.8) and t[1] == pytest.approx(0.97680, abs=1e-5) and t[-1] == 0
    assert t[1] > t[0]  # reference quirk, kept for parity
    assert (t[2:] < t[1:-1]).all()


def test_per_item_schedules_are_one_row_per_item_even_when_the_batch_equals_steps_plus_one():
    lengths = torch.tensor([100.0, 300, 900, 1500, 2000, 2600, 3200, 3900, 4096])  # B = 9 = steps + 1
    t = S.build_schedule(8, 1.0, S.DistributionShift(), effective_seq_len=lengths)
    assert t.shape == (9, 9)
    for row, length in zip(t, lengths):
        torch.testing.assert_close(row, S.build_schedule(8, 1.0, S.DistributionShift(), effective_seq_len=int(length)))
    same = S.build_schedule(8, 1.0, S.DEFAULT_SAMPLING_SHIFT, effective_seq_len=torch.tensor([20.0, 5000.0]))
    assert same.shape == (2, 9) and torch.equal(same[0], same[1])  # LogSNR at rate 0 ignores the length


def test_shifts_keep_both_endpoints_exact():
    t = torch.tensor([0.0, 0.5, 1.0])
    for shift in (S.DEFAULT_SAMPLING_SHIFT, S.LogSNRShift(), S.DistributionShift(), S.FluxDistributionShift(2, 9, 3, 3)):
        for seq_len in (1000, torch.tensor([1000, 3000, 64])):
            out = shift.shift(t, seq_len)
            assert out[0] == 0 and out[2] == 1 and 0 < out[1] < 1
    assert torch.equal(S.FluxDistributionShift().shift(t, 1000), t)  # alpha 1 everywhere: no shift


def test_config_sampling_options_win_over_the_logsnr_default():
    assert S.sampling_shift_from_config({"distribution_shift_options": {"min_length": 256}}) == S.DEFAULT_SAMPLING_SHIFT
    full = S.sampling_shift_from_config({"sampling_distribution_shift_options": {"min_length": 256, "max_length": 4096}})
    assert full == S.DistributionShift(min_length=256, max_length=4096)
    assert isinstance(S.shift_from_options({"type": "none"}), S.IdentityDistributionShift)
    assert S.shift_from_options({"type": "logsnr"}) == S.LogSNRShift(rate=1.0)  # official class defaults
    assert S.shift_from_options({"type": "flux", "alpha_min": 6.93, "alpha_max": 6.93}).alpha(777) == pytest.approx(6.93)
    assert S.training_shift_from_config({}) is None
    with pytest.raises(ValueError, match="unknown"):
        S.shift_from_options({"type": "cosine"})
    with pytest.raises(ValueError, match="options"):
        S.shift_from_options({"type": "full", "mu": 1})


@pytest.mark.parametrize("name", ["sa3-sm-music.json", "sa3-sm-sfx.json", "sa3-medium.json"])
def test_real_configs_train_with_the_full_shift_and_sample_with_logsnr(fixtures_dir, name):
    path = fixtures_dir.parent / "sa3-real-configs" / name
    if not path.exists():
        pytest.skip(f"{path} not found")
    config = json.loads(path.read_text())
    assert S.training_shift_from_config(config) == S.DistributionShift(min_length=256, max_length=4096)
    assert S.sampling_shift_from_config(config) == S.DEFAULT_SAMPLING_SHIFT


def test_tiny_fixture_config_reads_the_same_shifts(fixtures_dir):
    config = json.loads((fixtures_dir / "tiny-small" / "model_config.json").read_text())
    assert S.training_shift_from_config(config) == S.DistributionShift()
    assert S.sampling_shift_from_config(config["model"]["diffusion"]) == S.DEFAULT_SAMPLING_SHIFT


# --- training timesteps -------------------------------------------------------------------------------------------


def test_training_shift_matches_the_official_golden_for_tensor_and_scalar_lengths(fixtures_dir, golden_cases):
    g = load_golden(fixtures_dir, "schedules.safetensors")
    tol = golden_cases["schedules.training"]["tolerance"]
    close(S.DistributionShift().shift(g["train_shift.t"], g["train_shift.L"]), g["train_shift.t_shifted"], tol)
    close(S.DistributionShift().shift(g["train_shift.t"], 1000), g["train_shift.t_shifted_scalar_L1000"], tol)


def test_truncated_logit_normal_reproduces_the_official_draw_from_a_seeded_generator(fixtures_dir, golden_cases):
    g = load_golden(fixtures_dir, "schedules.safetensors")
    tol = golden_cases["schedules.training"]["tolerance"]
    close(S.truncated_logit_normal(g["train_sampler.normal_draw"]), g["train_sampler.u"], tol)
    # torch.manual_seed(123) then torch.randn(6) == a private generator seeded 123: same values, global RNG untouched
    close(S.sample_training_t(6, generator=torch.Generator().manual_seed(123)), g["train_sampler.t"], tol)


@pytest.mark.parametrize("sampler", S.TRAINING_T_SAMPLERS)
def test_training_t_samplers_stay_in_the_unit_interval_and_follow_the_seed(sampler):
    t = S.sample_training_t(4096, sampler, torch.Generator().manual_seed(0))
    assert t.shape == (4096,) and t.dtype == torch.float32
    assert (t >= 0).all() and (t <= 1).all()
    assert torch.equal(t, S.sample_training_t(4096, sampler, torch.Generator().manual_seed(0)))
    if sampler == "trunc_logit_normal":
        assert (t > 0).all() and t.mean() > 0.5  # flipped: mass towards noise, never exactly data
    with pytest.raises(ValueError, match="unknown"):
        S.sample_training_t(2, "sobol")


def test_training_shift_uses_the_effective_length_of_seconds_total():
    lengths = S.effective_length([0.5, 2.0], SR, DS_TINY)
    assert lengths.tolist() == [690, 2757]
    t = S.sample_training_t(2, generator=torch.Generator().manual_seed(3), shift=S.DistributionShift(), seq_len=lengths)
    raw = S.sample_training_t(2, generator=torch.Generator().manual_seed(3))
    assert (t > raw).all()  # the shift moves t towards noise, more for the longer item
    assert S.effective_seq_len(380.0, 44100, 4096).tolist() == [4092]


# --- the official training step, from its stored intermediates ---------------------------------------------------


@pytest.mark.parametrize("variant", ["base", "lora"])
def test_training_step_golden_t_noise_pairing_x_t_and_loss(fixtures_dir, golden_cases, variant):
    g = load_golden(fixtures_dir, "train.safetensors")
    case = golden_cases["train.loss"]
    tol = case["tolerance"]["tensors"]
    seconds = [item["seconds_total"] for item in case["batch"]["metadata"]]
    t = S.DistributionShift().shift(1 - g["train.in.u"], S.effective_length(seconds, SR, DS_TINY))
    close(t, g[f"train.{variant}.t"], tol)

    perm = S.ot_noise_permutation(g["train.in.x0"], g["train.in.noise"])
    assert perm.tolist() == g[f"train.{variant}.noise_permutation"].tolist() == [1, 0]  # the fixture makes OT swap
    x_t, target = S.flow_pair(g["train.in.x0"], g["train.in.noise"][perm], t)
    close(x_t, g[f"train.{variant}.x_t"], tol)

    out = S.masked_flow_loss(g[f"train.{variant}.v_pred"], target, g["train.in.augmented_padding_mask"],
                             g["train.in.inpaint_mask"], context_weight=case["wrapper_kwargs"]["mask_loss_weight"])
    logged = case["observed"][variant]["logged"]
    rtol = case["tolerance"]["loss"]["rtol"]
    assert out.loss.item() == pytest.approx(g[f"train.{variant}.loss"].item(), rel=rtol)
    assert out.main.item() == pytest.approx(logged["train/mse_loss"], rel=rtol)
    assert out.context.item() == pytest.approx(logged["train/mse_context_loss"], rel=rtol)
    assert out.per_item.mean().item() == pytest.approx(out.loss.item(), rel=1e-6)


def test_ot_pairing_recovers_a_hidden_permutation_and_is_identity_for_one_item():
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 4, 32, generator=gen)
    hidden = torch.tensor([3, 0, 5, 1, 4, 2])
    noise = torch.empty_like(x0)
    noise[hidden] = x0 + 0.05 * torch.randn(x0.shape, generator=gen)  # item i's best noise sits at row hidden[i]
    assert S.ot_noise_permutation(x0, noise).tolist() == hidden.tolist()
    assert S.ot_noise_permutation(x0[:1], noise[:1]).tolist() == [0]


def test_masked_loss_excludes_padding_and_an_item_without_context_counts_zero():
    v = torch.zeros(2, 3, 6)
    target = torch.ones(2, 3, 6)
    target[:, :, 4:] = 100.0  # padding: must not count
    padding = torch.tensor([[1, 1, 1, 1, 0, 0]] * 2, dtype=torch.bool)
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.float32)[:, None]  # item 1: no context
    target[0, :, :2] = 2.0  # context of item 0: squared error 4
    out = S.masked_flow_loss(v, target, padding, mask, context_weight=0.5)
    assert out.main.item() == pytest.approx(1.0)
    assert out.context.item() == pytest.approx((4.0 + 0.0) / 2)  # item 1 adds 0 to the mean over items
    assert out.loss.item() == pytest.approx(1.0 + 0.5 * 2.0)
    assert out.per_item.tolist() == pytest.approx([1.0 + 0.5 * 4.0, 1.0])
    plain = S.masked_flow_loss(v, target, padding)
    assert plain.loss.item() == pytest.approx(((2 * 4 + 2 * 1) / 4 + 1.0) / 2)  # no mask: all real positions
    assert plain.context.item() == 0.0


# --- inpainting masks for training ------------------------------------------------------------------------------


def test_random_inpaint_masks_follow_the_official_kinds_and_default_frequencies():
    padding = torch.zeros(4000, 40, dtype=torch.bool)
    padding[:, :30] = True
    mask = S.random_inpaint_mask(padding, torch.Generator().manual_seed(1))
    assert mask.shape == (4000, 1, 40) and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert (mask[..., 30:] == 0).all()  # padding never looks like given context
    full = (mask == 0).all(dim=-1).squeeze(1)
    assert abs(full.float().mean().item() - 0.8) < 0.03  # 80 % full generation (a causal prefix of 0 adds a little)
    assert torch.equal(mask, S.random_inpaint_mask(padding, torch.Generator().manual_seed(1)))


def test_causal_masks_keep_a_prefix_and_segment_masks_stay_inside_the_real_part():
    padding = torch.zeros(500, 20, dtype=torch.bool)
    padding[:, :12] = True
    causal = S.random_inpaint_mask(padding, torch.Generator().manual_seed(2), probabilities=(0, 0, 1))[:, 0]
    for row in causal:
        kept = int(row.sum())
        assert torch.equal(row[:kept], torch.ones(kept)) and (row[kept:] == 0).all() and kept <= 12
    seg = S.random_inpaint_mask(padding, torch.Generator().manual_seed(3), probabilities=(1, 0, 0))[:, 0]
    assert (seg[:, :12] == 0).any(dim=1).all()  # every item generates at least one segment
    unpadded = S.random_inpaint_mask(padding, torch.Generator().manual_seed(3), probabilities=(1, 0, 0),
                                     mask_padding=False)[:, 0]
    assert (unpadded[:, 12:] == 1).all()
    empty = S.random_inpaint_mask(torch.zeros(3, 8, dtype=torch.bool), torch.Generator(), probabilities=(0, 0, 1))
    assert (empty == 1).all()  # nothing real to generate
    with pytest.raises(ValueError, match="sum to 1"):
        S.random_inpaint_mask(padding, probabilities=(0.5, 0.5, 0.5))


# --- lengths and masks for generation -----------------------------------------------------------------------------


def test_generation_length_follows_the_official_alignment_and_the_e2e_fixture():
    assert S.generation_length(1.0, SR, DS_TINY, 2, max_latents=768 // DS_TINY) == 24  # the e2e goldens' T
    assert S.generation_length(1.0, SR, DS_TINY, 2) == 9648  # ceil((1 + 6) s) to 64-sample multiples
    assert S.generation_length(30.0, SR, 4096, 2) == 388
    for seconds in (0.3, 7.7, 10.0, 29.99, 61.0):
        for align in (1, 2, 8):
            n = S.generation_length(seconds, SR, 4096, align)
            assert n % align == 0 and n * 4096 >= (seconds + 6) * SR > (n - align) * 4096
    assert S.generation_length([3.0, 10.0], SR, 4096, 2) == S.generation_length(10.0, SR, 4096, 2)
    assert S.generation_length(0.0, SR, 4096, 2, max_latents=1300) == 1300
    assert S.generation_length(500.0, SR, 4096, 2, max_latents=1301) == 1300  # a capped length stays aligned


def test_medium_reaches_380_seconds_instead_of_the_official_120_second_default_cap():
    medium_max = 16777216 // 4096  # native sample_size of medium: 4096 latents, ~380 s
    n = S.generation_length(380.0, SR, 4096, 2, max_latents=medium_max)
    assert n == medium_max and n > 5292032 // 4096  # well past 120 s worth (1292 latents)
    assert n >= S.effective_seq_len(380.0, SR, 4096).item()


def test_padding_mask_covers_each_duration_plus_headroom(fixtures_dir):
    mask = S.padding_mask_for([30.0], 388, SR, 4096)
    assert mask.shape == (1, 388) and mask.sum().item() == 387  # ceil(30 s) = 323 latents + 64 headroom
    mixed = S.padding_mask_for([1.0, 20.0], 300, SR, 4096)
    assert mixed.sum(dim=1).tolist() == [11 + 64, 216 + 64]
    g = load_golden(fixtures_dir, "e2e.safetensors")
    assert torch.equal(S.padding_mask_for([1.0], 24, SR, DS_TINY), g["e2e.arc_pingpong.dit_step0.padding_mask"])
    assert S.effective_seq_len(1.0, SR, DS_TINY).tolist() == [1379]


@pytest.mark.parametrize("case, regions", [("e2e.arc_inpaint", [(0.005, 0.011)]),
                                           ("e2e.arc_continuation", [(352 / 44100, 1.0)])])
def test_inpaint_latent_mask_equals_the_official_local_conditioning(fixtures_dir, golden_cases, case, regions):
    g = load_golden(fixtures_dir, "e2e.safetensors")
    kwargs = golden_cases[case]["generate_kwargs"]
    assert (kwargs["inpaint_mask_start_seconds"], kwargs["inpaint_mask_end_seconds"]) == pytest.approx(regions[0])
    n = g[f"{case}.dit_step0.local_add_cond"].shape[-1]
    mask = S.inpaint_latent_mask(regions, n, n * DS_TINY, SR, seconds_total=kwargs["duration"])
    assert mask.shape == (1, 1, n)
    assert torch.equal(mask[:, 0], g[f"{case}.dit_step0.local_add_cond"][:, 0])


def test_inpaint_latent_mask_handles_several_regions_and_zeroes_past_the_duration():
    mask = S.inpaint_latent_mask([(1.0, 2.0), (3.0, 3.5)], 10, 10 * 44100, 44100, seconds_total=[4.0, 8.0])
    assert mask[0, 0].tolist() == [1, 0, 1, 0, 1, 1, 1, 1, 0, 0]  # latent i takes the value at i seconds; past 8 s zeroed
    assert math.isclose(mask.sum().item(), 6)
    with pytest.raises(ValueError, match="start < end"):
        S.inpaint_latent_mask([(2.0, 1.0)], 10, 10 * 44100, 44100)


def test_a_region_running_past_the_outputs_end_is_clipped_with_a_warning():
    import warnings

    with pytest.warns(UserWarning, match=r"region \(6, 12\) s runs past the output's end \(8.00 s\)"):
        past = S.inpaint_latent_mask([(6.0, 12.0)], 10, 10 * 44100, 44100, seconds_total=8.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a region that ends at the end (a continuation) is exactly what was asked
        to_end = S.inpaint_latent_mask([(6.0, 8.0)], 10, 10 * 44100, 44100, seconds_total=8.0)
    assert torch.equal(past, to_end)
