"""Samplers: the official per-step update rules and RNG order replayed from the e2e traces (no DiT needed), plus
solver properties on analytic models. Tolerance: the e2e cases' latents tolerance (atol 2e-4, rtol 1e-3); a faithful
fp32 update reproduces the traces to about 5e-7."""

import pytest
import torch
from sa3_lora_studio.sa3 import samplers as P
from sa3_lora_studio.sa3 import schedules as S
from safetensors.torch import load_file

E2E = ["e2e.arc_pingpong", "e2e.base_euler_cfg3", "e2e.base_euler_cfg3_batch2_negative", "e2e.arc_audio_to_audio",
       "e2e.arc_inpaint", "e2e.arc_continuation"]


@pytest.fixture(scope="module")
def e2e(fixtures_dir):
    return load_file(str(fixtures_dir / "golden" / "e2e.safetensors"))


class Trace:
    """One e2e case: the schedule, the x fed to the model and the denoised estimate at each step, the RNG draws."""

    def __init__(self, golden, cases, case_id):
        self.case = cases[case_id]
        self.id = case_id
        self.sigmas = golden[f"{case_id}.sigmas_visited"]
        self.steps = self.sigmas.shape[0] - 1
        self.x = [golden[f"{case_id}.step{i:02d}.x"] for i in range(self.steps)]
        self.denoised = [golden[f"{case_id}.step{i:02d}.denoised"] for i in range(self.steps)]
        self.latents = golden[f"{case_id}.latents"]
        self.draws = [golden[d["tensor"]] for d in self.case["rng_order"]]
        self.sampler = "pingpong" if self.case["model"] == "tiny-small-arc" else "euler"
        self.tol = self.case["tolerance"]["latents"]

    def replay_model(self):
        """A model_fn whose i-th call returns the velocity giving the recorded denoised estimate at the given x."""
        calls = iter(range(self.steps))

        def model_fn(x, t):
            i = next(calls)
            return (x - self.denoised[i]) / t.reshape(-1, 1, 1)

        return model_fn

    def close(self, got, expected):
        torch.testing.assert_close(got, expected, atol=self.tol["atol"], rtol=self.tol["rtol"])


@pytest.fixture(params=E2E)
def trace(request, e2e, golden_cases):
    return Trace(e2e, golden_cases, request.param)


def test_the_default_schedule_is_the_one_the_official_generate_visited(trace):
    kwargs = trace.case["generate_kwargs"]
    sigma_max = kwargs.get("init_noise_level", 1.0) if "init_audio" in kwargs else 1.0
    lengths = S.effective_seq_len(kwargs["duration"], 44100, 32)
    sigmas = S.build_schedule(kwargs["steps"], sigma_max, S.DEFAULT_SAMPLING_SHIFT, effective_seq_len=lengths)
    for row in sigmas:  # per item ([B, steps + 1]); all rows equal at LogSNR rate 0
        torch.testing.assert_close(row, trace.sigmas, atol=1e-6, rtol=1e-6)


def test_each_sampler_step_reproduces_the_next_official_x_from_x_denoised_and_the_recorded_draw(trace):
    sample = P.get_sampler(trace.sampler)
    for i in range(trace.steps):
        v = (trace.x[i] - trace.denoised[i]) / trace.sigmas[i]
        kwargs = {"noise_fn": lambda x, z=trace.draws[i + 1]: z} if trace.sampler == "pingpong" else {}
        out = sample(lambda x, t, v=v: v, trace.x[i], trace.sigmas[i:i + 2], **kwargs)
        trace.close(out, trace.x[i + 1] if i + 1 < trace.steps else trace.latents)


def test_a_chained_run_visits_every_official_x_and_ends_on_the_official_latents(trace):
    seen = []
    draws = iter(trace.draws[1:])
    kwargs = {"noise_fn": lambda x: next(draws)} if trace.sampler == "pingpong" else {}
    out = P.get_sampler(trace.sampler)(trace.replay_model(), trace.x[0], trace.sigmas,
                                       callback=lambda info: seen.append(info), **kwargs)
    assert [info["i"] for info in seen] == list(range(trace.steps))
    for info, x, d, t in zip(seen, trace.x, trace.denoised, trace.sigmas):
        trace.close(info["x"], x)
        trace.close(info["denoised"], d)
        assert torch.equal(info["sigma"], t.expand(x.shape[0]))
    trace.close(out, trace.latents)


def test_a_seeded_generator_reproduces_the_official_global_rng_draws_in_order(trace):
    generator = torch.Generator().manual_seed(trace.case["generate_kwargs"]["seed"])
    assert torch.equal(P.draw_noise(trace.draws[0].shape, generator), trace.draws[0])  # the initial noise
    if trace.sampler == "euler":
        return
    seen = []
    sample_from = trace.x[0]  # audio-to-audio mixes the source in first; the sampler starts from the mix
    out = P.sample_pingpong(trace.replay_model(), sample_from, trace.sigmas, generator=generator,
                            callback=lambda info: seen.append(info["x"]))
    for x_seen, x in zip(seen, trace.x):  # x at step i + 1 carries the draw made after model call i
        trace.close(x_seen, x)
    trace.close(out, trace.latents)
    assert len(trace.draws) == trace.steps + 1  # one draw per call, the last (times t = 0) included


def test_pingpong_without_a_generator_leaves_the_global_rng_alone():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    P.sample_pingpong(lambda x, t: x, torch.ones(1, 2, 3), S.build_schedule(4))
    assert torch.equal(torch.get_rng_state(), before)


# --- properties on analytic models ----------------------------------------------------------------------------


def constant_denoiser(target):
    """A model whose clean estimate is always `target`: every solver must land exactly on it."""
    return lambda x, t: (x - target) / t.reshape(-1, *([1] * (x.dim() - 1)))


@pytest.mark.parametrize("name", sorted(set(P.SAMPLERS) - {"rk4"}))  # rk4's last stage is evaluated at t = 1e-5
@pytest.mark.parametrize("sigma_max", [1.0, 0.8])                   # (official clamp), so it is not exact there
def test_every_sampler_lands_on_a_constant_denoiser_target(name, sigma_max):
    gen = torch.Generator().manual_seed(1)
    target = torch.randn(2, 3, 10, generator=gen)
    x = torch.randn(2, 3, 10, generator=gen)
    out = P.get_sampler(name)(constant_denoiser(target), x, S.build_schedule(8, sigma_max), generator=gen)
    torch.testing.assert_close(out, target, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(P.SAMPLERS))
def test_per_item_schedules_match_a_shared_schedule_and_items_follow_their_own_row(name):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 7, generator=gen)
    shared = S.build_schedule(6, 1.0, S.DistributionShift(), effective_seq_len=1000)
    per_item = S.build_schedule(6, 1.0, S.DistributionShift(), effective_seq_len=torch.tensor([1000, 3000]))

    def model_fn(x, t):  # a non-trivial field: depends on x and t
        return torch.tanh(x) * t.reshape(-1, 1, 1) + 0.3

    run = P.get_sampler(name)
    a = run(model_fn, x, shared, generator=torch.Generator().manual_seed(5))
    b = run(model_fn, x, torch.stack([shared, shared]), generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    c = run(model_fn, x, per_item, generator=torch.Generator().manual_seed(5))
    assert torch.equal(c[0], a[0]) and not torch.allclose(c[1], a[1])
    with pytest.raises(ValueError, match="sigmas"):
        run(model_fn, x, per_item[:1].expand(3, -1))


def gaussian_flow(mean, std):
    """Exact velocity when every data value is N(mean, std^2): the flow ODE maps noise e to mean + std·e."""

    def model_fn(x, t):
        t, x = t.reshape(-1, 1, 1).double(), x.double()
        a = 1 - t
        denoised = mean + a * std**2 / (a**2 * std**2 + t**2) * (x - a * mean)
        return ((x - denoised) / t.clamp(min=1e-12)).float()

    return model_fn


def test_deterministic_solvers_converge_at_their_order_on_gaussian_data():
    eps = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(0))
    exact = 0.7 + 0.3 * eps

    def error(name, steps):
        out = P.get_sampler(name)(gaussian_flow(0.7, 0.3), eps, S.build_schedule(steps, 1.0, None))
        return (out - exact).abs().max().item()

    assert error("rk4", 8) < 1e-3 and error("rk4", 16) < error("rk4", 8) / 8
    assert 1.6 < error("euler", 16) / error("euler", 32) < 2.4  # first order
    assert error("dpmpp", 16) < error("euler", 16) / 3 and error("dpmpp", 32) < error("euler", 32) / 3


def test_callback_reports_step_sigma_next_sigma_and_denoised_once_per_step():
    infos = []
    sigmas = S.build_schedule(5)
    P.sample_euler(lambda x, t: x * 0 + 1, torch.zeros(3, 2, 4), sigmas, callback=infos.append)
    assert [i["i"] for i in infos] == list(range(5))
    for info, t, t_next in zip(infos, sigmas[:-1], sigmas[1:]):
        assert set(info) >= {"i", "x", "sigma", "sigma_next", "denoised"}
        assert info["sigma"].shape == (3,) and torch.all(info["sigma"] == t) and torch.all(info["sigma_next"] == t_next)
        torch.testing.assert_close(info["denoised"], info["x"] - t)


def test_pingpong_draws_once_per_step_and_passes_extra_args_to_the_model():
    draws, seen = [], []

    def noise_fn(x):
        draws.append(1)
        return torch.zeros_like(x)

    def model_fn(x, t, scale):
        seen.append(scale)
        return x * 0

    P.sample_pingpong(model_fn, torch.ones(1, 1, 2), S.build_schedule(8), extra_args={"scale": 3}, noise_fn=noise_fn)
    assert len(draws) == 8 and seen == [3] * 8


def test_sampler_registry_and_defaults_per_model_kind():
    assert P.default_sampler("rf_denoiser") == "pingpong" and P.default_sampler("rectified_flow") == "euler"
    assert P.get_sampler("dpmpp") is P.sample_dpmpp_2m and P.get_sampler("rk4") is P.sample_rk4
    with pytest.raises(ValueError, match="unknown"):
        P.get_sampler("heun")


# --- the official sampling loop with the real DiT (conditioning taken from the stored step-0 DiT inputs) ------------


@pytest.fixture(scope="module")
def tiny_dits(fixtures_dir):
    import json

    from sa3_lora_studio.sa3.dit import DiTWrapper

    dits = {}
    for name in ("tiny-small", "tiny-small-arc"):
        config = json.loads((fixtures_dir / name / "model_config.json").read_text())
        diffusion = config["model"]["diffusion"]
        dit = DiTWrapper(diffusion["diffusion_objective"], **diffusion["config"])
        weights = load_file(str(fixtures_dir / name / "model.safetensors"))
        dit.load_state_dict({k.removeprefix("model."): v for k, v in weights.items() if k.startswith("model.model.")})
        dits[name] = (dit.eval(), config)
    return dits


@pytest.mark.parametrize("case_id", E2E)
def test_the_seeded_sampling_loop_with_the_real_dit_reproduces_the_official_latents(case_id, e2e, golden_cases,
                                                                                     tiny_dits):
    case = golden_cases[case_id]
    kwargs = case["generate_kwargs"]
    dit, config = tiny_dits[case["model"]]
    inputs = {k.split(".")[-1]: v for k, v in e2e.items() if k.startswith(f"{case_id}.dit_step0.")}
    generator = torch.Generator().manual_seed(kwargs["seed"])
    x = P.draw_noise(inputs["x"].shape, generator)
    sigma_max = 1.0
    if "init_audio" in kwargs:  # the encoded source is not stored: start from the recorded mix z·(1 - s) + noise·s
        sigma_max, x = kwargs["init_noise_level"], inputs["x"]
    sigmas = S.build_schedule(kwargs["steps"], sigma_max, S.sampling_shift_from_config(config),
                              effective_seq_len=S.effective_seq_len(kwargs["duration"], 44100, 32))

    def model_fn(x, t):
        return dit(x, t, inputs["cross_attn_cond"], inputs["global_cond"], inputs["local_add_cond"],
                   padding_mask=inputs["padding_mask"], cfg_scale=kwargs["cfg_scale"], apg_scale=1.0,
                   negative_cross_attn_cond=inputs.get("negative_cross_attn_cond"),
                   negative_cross_attn_mask=inputs.get("negative_cross_attn_mask"))

    sampler = P.get_sampler(P.default_sampler(config["model"]["diffusion"]["diffusion_objective"]))
    with torch.inference_mode():
        out = sampler(model_fn, x, sigmas, generator=generator)
    tol = case["tolerance"]["latents"]
    torch.testing.assert_close(out, e2e[f"{case_id}.latents"], atol=tol["atol"], rtol=tol["rtol"])
