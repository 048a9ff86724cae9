"""Rectified-flow samplers as small pure functions (k-diffusion spirit), sigma = t, 1 = noise, 0 = data.

All share one call shape:

    sample_x(model_fn, x, sigmas, extra_args=None, callback=None, disable=None, generator=None) -> x at sigmas[-1]

- `model_fn(x, t, **extra_args) -> velocity` (noise - data), x [B, ...], t [B] fp32 (the value at each item).
- `sigmas`: a schedule from `schedules.build_schedule`, [N + 1] or per item [B, N + 1], ending at 0.
- `callback({"i", "x", "sigma", "sigma_next", "denoised"})` after each model call: the step index, the x fed to
  the model, t [B], the next t [B] and `x - t·v`. One hook serves progress bars, previews and cancellation (raise from
  it to stop).
- `disable`: False shows a tqdm bar when tqdm is installed; None/True show none.
- Randomness (ping-pong only) comes from `generator` (or `noise_fn(x) -> next draw`, to replay recorded draws). The
  draws are `torch.randn` on the generator's device in fp32, so on CPU
  `g = torch.Generator().manual_seed(seed); noise = torch.randn(shape, generator=g); sample_pingpong(..., generator=g)`
  reproduces the official `torch.manual_seed(seed)` run: initial noise first, then one draw after every model call,
  the last one included (it is multiplied by t = 0).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

ModelFn = Callable[..., Tensor]
NoiseFn = Callable[[Tensor], Tensor]


def draw_noise(shape, generator: torch.Generator | None = None, device=None, dtype=None) -> Tensor:
    """Standard-normal draws of `shape`, made in fp32 on the generator's device (so a CPU seed gives the same values
    whatever device the model runs on), returned on `device` in `dtype` (defaults: the generator's device, fp32)."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    z = torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=torch.float32)
    return z.to(device=device if device is not None else gen_device, dtype=dtype or torch.float32)


def _noise_source(x: Tensor, generator: torch.Generator | None, noise_fn: NoiseFn | None) -> NoiseFn:
    if noise_fn is not None:
        return noise_fn
    if generator is None:  # unseeded but private: never advance torch's global RNG
        generator = torch.Generator()
        generator.seed()
    return lambda like: draw_noise(like.shape, generator, like.device, like.dtype)


def _rows(sigmas: Tensor, x: Tensor) -> Tensor:
    """Schedule as [B, N + 1] on x's device (a shared [N + 1] schedule is the same row for every item)."""
    sigmas = sigmas.to(x.device)
    if sigmas.dim() == 1:
        return sigmas[None].expand(x.shape[0], -1)
    if sigmas.dim() != 2 or sigmas.shape[0] != x.shape[0]:
        raise ValueError(f"sigmas must be [steps + 1] or [B={x.shape[0]}, steps + 1]; got {tuple(sigmas.shape)}")
    return sigmas


def _per_item(t: Tensor, x: Tensor) -> Tensor:
    """[B] -> [B, 1, ...] in x's dtype, to scale x item by item."""
    return t.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)


def _steps(n: int, disable: bool | None):
    if disable is False:
        try:
            from tqdm.auto import trange

            return trange(n)
        except ImportError:
            pass
    return range(n)


def _report(callback, i: int, x: Tensor, t: Tensor, t_next: Tensor, denoised: Tensor) -> None:
    if callback is not None:
        callback({"i": i, "x": x, "sigma": t, "sigma_next": t_next, "denoised": denoised})


@torch.no_grad()
def sample_euler(model_fn: ModelFn, x: Tensor, sigmas: Tensor, extra_args: dict | None = None, callback=None,
                 disable: bool | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Euler on the flow ODE (default for base / `rectified_flow` models): x <- x + (t_next - t)·v(x, t).
    Deterministic; `generator` is accepted for the shared call shape and unused."""
    extra_args = extra_args or {}
    ts = _rows(sigmas, x)
    for i in _steps(ts.shape[1] - 1, disable):
        t, t_next = ts[:, i], ts[:, i + 1]
        v = model_fn(x, t, **extra_args)
        _report(callback, i, x, t, t_next, x - _per_item(t, x) * v)
        x = x + _per_item(t_next - t, x) * v
    return x


@torch.no_grad()
def sample_pingpong(model_fn: ModelFn, x: Tensor, sigmas: Tensor, extra_args: dict | None = None, callback=None,
                    disable: bool | None = None, generator: torch.Generator | None = None,
                    noise_fn: NoiseFn | None = None) -> Tensor:
    """Ping-pong (default for ARC / `rf_denoiser` models): jump to the model's clean estimate, then re-noise it to the
    next level with fresh noise: x0_hat = x - t·v(x, t); x <- (1 - t_next)·x0_hat + t_next·eps. The last step has
    t_next = 0 and returns x0_hat; its draw is still made, as the reference does, to keep the RNG stream aligned."""
    extra_args = extra_args or {}
    next_noise = _noise_source(x, generator, noise_fn)
    ts = _rows(sigmas, x)
    for i in _steps(ts.shape[1] - 1, disable):
        t, t_next = ts[:, i], ts[:, i + 1]
        denoised = x - _per_item(t, x) * model_fn(x, t, **extra_args)
        _report(callback, i, x, t, t_next, denoised)
        eps = next_noise(x)  # drawn after the model call: the official order
        s = _per_item(t_next, x)
        x = (1 - s) * denoised + s * eps
    return x


def _log_snr(t: Tensor) -> Tensor:
    """lambda = log((1 - t) / t), clamped so t = 0 or 1 stays finite."""
    return ((1 - t).clamp(min=1e-10) / t.clamp(min=1e-10)).log()


@torch.no_grad()
def sample_dpmpp_2m(model_fn: ModelFn, x: Tensor, sigmas: Tensor, extra_args: dict | None = None, callback=None,
                    disable: bool | None = None, generator: torch.Generator | None = None) -> Tensor:
    """DPM-Solver++(2M) in rectified-flow form (alpha = 1 - t, sigma = t, lambda = log(alpha / sigma)).

    Data-prediction update x <- (t_next / t)·x - (1 - t_next)·(e^-h - 1)·D with e^-h - 1 written directly as
    (t_next - t) / ((1 - t_next)·t) (finite at t_next = 0). D is the current denoised estimate on the first and last
    step, else the multistep extrapolation (1 + 1/2r)·D - (1/2r)·D_prev, r = h_prev / h. Deterministic."""
    extra_args = extra_args or {}
    ts = _rows(sigmas, x)
    old_denoised = None
    for i in _steps(ts.shape[1] - 1, disable):
        t, t_next = ts[:, i], ts[:, i + 1]
        tc, tn = _per_item(t, x), _per_item(t_next, x)
        denoised = x - tc * model_fn(x, t, **extra_args)
        _report(callback, i, x, t, t_next, denoised)
        expm1_neg_h = (tn - tc) / ((1 - tn).clamp(min=1e-10) * tc.clamp(min=1e-10))
        d = denoised
        if old_denoised is not None and not bool((t_next == 0).all()):
            h = _log_snr(tn) - _log_snr(tc)
            h_prev = _log_snr(tc) - _log_snr(_per_item(ts[:, i - 1], x))
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = (tn / tc.clamp(min=1e-10)) * x - (1 - tn) * expm1_neg_h * d
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_rk4(model_fn: ModelFn, x: Tensor, sigmas: Tensor, extra_args: dict | None = None, callback=None,
               disable: bool | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Classic 4th-order Runge-Kutta on the flow ODE (4 model calls per step). The last stage is evaluated at
    max(t_next, 1e-5): models are not trained at t = 0. Deterministic."""
    extra_args = extra_args or {}
    ts = _rows(sigmas, x)
    for i in _steps(ts.shape[1] - 1, disable):
        t, t_next = ts[:, i], ts[:, i + 1]
        dt = t_next - t
        h = _per_item(dt, x)
        k1 = model_fn(x, t, **extra_args)
        _report(callback, i, x, t, t_next, x - _per_item(t, x) * k1)
        k2 = model_fn(x + h / 2 * k1, t + dt / 2, **extra_args)
        k3 = model_fn(x + h / 2 * k2, t + dt / 2, **extra_args)
        k4 = model_fn(x + h * k3, t_next.clamp(min=1e-5), **extra_args)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "euler": sample_euler,
    "pingpong": sample_pingpong,
    "dpmpp": sample_dpmpp_2m,  # the official name
    "dpmpp_2m": sample_dpmpp_2m,
    "rk4": sample_rk4,
}
STOCHASTIC = frozenset({"pingpong"})  # samplers that draw from the generator


DEFAULTS = {  # per model kind: sampler, steps, CFG (the official docs and Gradio defaults)
    "arc": ("pingpong", 8, 1.0),
    "base": ("euler", 50, 7.0),
}


def default_sampler(objective: str) -> str:
    """Post-trained ARC models (`rf_denoiser`) -> "pingpong"; base models (`rectified_flow`) -> "euler"."""
    return DEFAULTS["arc" if objective == "rf_denoiser" else "base"][0]


def get_sampler(name: str) -> Callable[..., Tensor]:
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"sampler {name!r} is unknown; use one of {sorted(SAMPLERS)}") from None
