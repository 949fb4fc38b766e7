"""Samplers for epsilon-prediction latent diffusion, one function each, k-diffusion style.

Each sampler equals, numerically, the diffusers scheduler of its kind configured from SD v1.5's
scheduler config (the reference pipeline users compare against), so the update formulas keep
the reference's float32 operation order and each sampler works in the space the reference
does: DDIM, PLMS and DPM-Solver++ on VP latents x = sqrt(ᾱ)·x0 + sqrt(1-ᾱ)·ε, the Euler
samplers on VE latents x = x0 + σ·ε. ``eps_model(x_in, t)`` is the network; ``t`` is the
timestep value the reference feeds the UNet, fractional or rounded as it is.

Every sampler takes the same arguments (k-diffusion's contract): the model, the latents at the
first noise level, the timesteps, their noise levels (ᾱ for the VP methods, σ with a final 0
for the VE ones, a (from, to) pair per evaluation for PLMS), a callback, and keyword-only
``eta`` (read by DDIM alone) and ``noise_sampler`` (by those that draw noise). A row of
``params.SAMPLERS`` names its update rule (``METHODS``) and its timestep spacing
(``SPACINGS``), so `sample` looks both up. Image-to-image runs the same loops on the tail of
the schedule: `sample` slices it from step ``start`` and noises the image's latents to the
first level kept (`start_latents`), as diffusers' img2img pipeline does.

Randomness is per image: ancestral noise comes from each item's own CPU generator, drawn in the
reference's order, so an image is the same alone or at any position of any batch.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from sdq.core.params import SAMPLERS

from . import schedule

EpsModel = Callable[[Tensor, Tensor], Tensor]
NoiseSampler = Callable[[], Tensor]
Callback = Callable[[int, int], None]


def sample_ddim(
    eps_model: EpsModel,
    x: Tensor,
    timesteps: Tensor,
    alphas: Tensor,
    callback: Callback,
    *,
    eta: float = 0.0,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12); eta scales the stochastic term, eta=1 is DDPM-like."""
    # a_t, a_prev = ᾱ_t, ᾱ_{t-1} (alphas: n + 1 values); e_t = ε_θ(x_t, t);
    # pred_x0 = f_θ(x_t) of eq. 9; sigma_t = σ_t(η) of eq. 16.
    n = len(timesteps)
    for i, t in enumerate(timesteps):
        a_t, a_prev = alphas[i], alphas[i + 1]
        e_t = eps_model(x, t)
        pred_x0 = (x - (1 - a_t) ** 0.5 * e_t) / a_t**0.5
        sigma_t = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
        x = a_prev**0.5 * pred_x0 + (1 - a_prev - sigma_t**2) ** 0.5 * e_t
        if eta > 0:
            assert noise_sampler is not None  # `sample` passes one whenever eta > 0
            x = x + sigma_t * noise_sampler()
        callback(i + 1, n)
    return x


def _pndm_transfer(x: Tensor, e_t: Tensor, a_t: Tensor, a_prev: Tensor) -> Tensor:
    """The transfer part φ(x_t, ε, t, t-δ) of PNDM (Liu et al. 2022, eq. 11)."""
    denom = a_t * (1 - a_prev) ** 0.5 + (a_t * (1 - a_t) * a_prev) ** 0.5
    return (a_prev / a_t) ** 0.5 * x - (a_prev - a_t) * e_t / denom


def _linear_multistep(e_t: Tensor, past: list[Tensor]) -> Tensor:
    """Adams–Bashforth combination of ε (PNDM eq. 12), at the order the history allows."""
    if not past:
        return e_t
    if len(past) == 1:
        return (3 * e_t - past[-1]) / 2
    if len(past) == 2:
        return (23 * e_t - 16 * past[-1] + 5 * past[-2]) / 12
    return (1 / 24) * (55 * e_t - 59 * past[-1] + 37 * past[-2] - 9 * past[-3])


def sample_plms(
    eps_model: EpsModel,
    x: Tensor,
    timesteps: Tensor,
    alphas: Tensor,
    callback: Callback,
    *,
    eta: float = 0.0,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """PLMS (Liu et al. 2022, eq. 12) started with a second-order step in place of the RK warm-up,
    one network evaluation per timestep, as diffusers' PNDMScheduler (skip_prk_steps) runs it.

    ``alphas`` holds each evaluation's transfer (ᾱ from, ᾱ to), so it has one row per timestep
    (`_plms_calls`). The first evaluation transfers x and so probes ε at its end point; the
    second evaluates ε there and redoes the transfer from the first x with the mean ε.
    """
    # e_t = ε_θ(x_t, t); e_prime = ε' of eq. 12; past = ε history (the probe's ε is not kept).
    n = len(timesteps)
    past: list[Tensor] = []
    x_first = x
    for i, t in enumerate(timesteps):
        a_from, a_to = alphas[i]
        e_t = eps_model(x, t)
        if i == 1:
            e_prime, x = (e_t + past[-1]) / 2, x_first
        else:
            e_prime = _linear_multistep(e_t, past)
            past = [*past[-2:], e_t]
        x = _pndm_transfer(x, e_prime, a_from, a_to)
        callback(i + 1, n)
    return x


def _denoise(eps_model: EpsModel, x: Tensor, sigma: Tensor, t: Tensor) -> Tensor:
    """VE denoiser D(x; σ) from ε-prediction: the UNet sees x / sqrt(σ² + 1), its VP input."""
    return x - sigma * eps_model(x / (sigma**2 + 1) ** 0.5, t)


def _euler_step(x: Tensor, denoised: Tensor, sigma: Tensor, sigma_to: Tensor) -> Tensor:
    """One Euler step of the probability-flow ODE dx/dσ = (x - D(x; σ)) / σ from σ to sigma_to."""
    d = (x - denoised) / sigma
    return x + d * (sigma_to - sigma)


def sample_euler(
    eps_model: EpsModel,
    x: Tensor,
    timesteps: Tensor,
    sigmas: Tensor,
    callback: Callback,
    *,
    eta: float = 0.0,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """Euler method on the probability-flow ODE (Karras et al. 2022, Algorithm 2 without churn),
    from latents ``x`` at noise level ``sigmas[0]``."""
    n = len(timesteps)
    for i, t in enumerate(timesteps):
        denoised = _denoise(eps_model, x, sigmas[i], t)
        x = _euler_step(x, denoised, sigmas[i], sigmas[i + 1])
        callback(i + 1, n)
    return x


def sample_euler_ancestral(
    eps_model: EpsModel,
    x: Tensor,
    timesteps: Tensor,
    sigmas: Tensor,
    callback: Callback,
    *,
    eta: float = 0.0,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """Ancestral Euler (k-diffusion sample_euler_ancestral): deterministic step to σ_down, noise σ_up,
    from latents ``x`` at noise level ``sigmas[0]``."""
    # σ_up² + σ_down² = σ_{i+1}², σ_up² = σ_{i+1}²(σ_i² - σ_{i+1}²)/σ_i² (DDPM posterior variance in VE).
    assert noise_sampler is not None  # `sample` passes one to every ancestral sampler
    n = len(timesteps)
    for i, t in enumerate(timesteps):
        sigma_from, sigma_to = sigmas[i], sigmas[i + 1]
        denoised = _denoise(eps_model, x, sigma_from, t)
        sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
        sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
        x = _euler_step(x, denoised, sigma_from, sigma_down)
        x = x + noise_sampler() * sigma_up
        callback(i + 1, n)
    return x


def _vp_coefficients(sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """α_t, σ_t and λ_t = log(α_t / σ_t) of the VP latents at VE noise level ``sigma``."""
    alpha_t = 1 / (sigma**2 + 1) ** 0.5
    sigma_t = sigma * alpha_t
    return alpha_t, sigma_t, torch.log(alpha_t) - torch.log(sigma_t)


def sample_dpmpp_2m(
    eps_model: EpsModel,
    x: Tensor,
    timesteps: Tensor,
    sigmas: Tensor,
    callback: Callback,
    *,
    eta: float = 0.0,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), first order on the first and last step."""
    # s = current, t = next level; x0 = data prediction x_θ; h = λ_t - λ_s; r = h_{i-1} / h;
    # D1 = (x0 - x0_prev) / r. The last step reaches σ = 0 (λ = ∞), where only order 1 is finite.
    n = len(timesteps)
    x0_prev = h_prev = None
    for i, t in enumerate(timesteps):
        alpha_s, sigma_s, lambda_s = _vp_coefficients(sigmas[i])
        alpha_t, sigma_t, lambda_t = _vp_coefficients(sigmas[i + 1])
        x0 = (x - sigma_s * eps_model(x, t)) / alpha_s
        h = lambda_t - lambda_s
        phi = alpha_t * (torch.exp(-h) - 1.0)
        x_next = (sigma_t / sigma_s) * x - phi * x0
        if x0_prev is not None and i < n - 1:
            r = h_prev / h
            x_next = x_next - 0.5 * phi * ((1.0 / r) * (x0 - x0_prev))
        x, x0_prev, h_prev = x_next, x0, h
        callback(i + 1, n)
    return x


def _per_item_noise(generators: Sequence[torch.Generator], like: Tensor) -> NoiseSampler:
    """Unit noise drawn per batch item from its own CPU generator, exactly as diffusers'
    randn_tensor does with a list of generators, so items never share a random stream."""

    def draw() -> Tensor:
        shape = (1, *like.shape[1:])
        draws = [torch.randn(shape, generator=g, dtype=torch.float32) for g in generators]
        return torch.cat(draws).to(like.device)

    return draw


def _predrawn_noise(generators: Sequence[torch.Generator], like: Tensor, count: int) -> NoiseSampler:
    """The same draws as `_per_item_noise`, all `count` of them made before the loop.

    Each image's generator draws its own values in its own order (one (1, C, h, w) tensor per
    step, the shape the per-step path draws), so the streams are identical; the block goes to
    the device in one asynchronous copy from pinned memory, and the loop never waits on the
    host for noise."""
    shape = like.shape[1:]
    pinned = like.device.type == "cuda"
    block = torch.empty((count, len(generators), *shape), dtype=torch.float32, pin_memory=pinned)
    for b, g in enumerate(generators):
        for step in range(count):
            block[step, b] = torch.randn((1, *shape), generator=g, dtype=torch.float32)[0]
    on_device = block.to(like.device, non_blocking=True)
    steps = iter(on_device)

    def draw() -> Tensor:
        return next(steps)

    return draw


# -- dispatch: the rows of params.SAMPLERS name one of each ---------------------------------

def _leading(steps: int, alphas_cumprod: Tensor) -> tuple[Tensor, Tensor]:
    timesteps = schedule.leading_timesteps(steps)
    return timesteps, schedule.alphas_cumprod_at(timesteps, alphas_cumprod)


def _linspace(steps: int, alphas_cumprod: Tensor) -> tuple[Tensor, Tensor]:
    timesteps = schedule.linspace_timesteps(steps)
    train_sigmas = schedule.sigmas_from_alphas_cumprod(alphas_cumprod)
    return timesteps, schedule.append_zero(schedule.sigma_at(timesteps, train_sigmas))


def _dpm_linspace(steps: int, alphas_cumprod: Tensor) -> tuple[Tensor, Tensor]:
    timesteps = schedule.dpm_linspace_timesteps(steps)
    train_sigmas = schedule.sigmas_from_alphas_cumprod(alphas_cumprod)
    return timesteps, schedule.append_zero(schedule.sigma_at(timesteps, train_sigmas))


def _karras(steps: int, alphas_cumprod: Tensor) -> tuple[Tensor, Tensor]:
    train_sigmas = schedule.sigmas_from_alphas_cumprod(alphas_cumprod)
    levels = schedule.karras_sigmas(train_sigmas[0].item(), train_sigmas[-1].item(), steps)
    return schedule.sigma_to_t(levels, train_sigmas).round(), schedule.append_zero(levels)


SPACINGS: dict[str, Callable[[int, Tensor], tuple[Tensor, Tensor]]] = {
    "leading": _leading, "linspace": _linspace, "dpm_linspace": _dpm_linspace, "karras": _karras,
}
"""Each spacing: (steps, ᾱ of the training timesteps) -> (timesteps, their noise levels), as the
reference scheduler of that kind selects them (ᾱ for leading, σ with a final 0 for the rest)."""
METHODS: dict[str, Callable[..., Tensor]] = {
    "ddim": sample_ddim, "plms": sample_plms, "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral, "dpmpp_2m": sample_dpmpp_2m,
}
"""Each update rule, by the name sampler rows give it."""


def _plms_calls(timesteps: Tensor, alphas: Tensor, start: int) -> tuple[Tensor, Tensor]:
    """PNDMScheduler's evaluations from call ``start`` on: leading ``timesteps`` with the second
    one repeated (its first is the probe), each with its transfer (ᾱ from, ᾱ to) as
    `step_plms` computes it from its own timestep: t to t - δ, but the second call from t + δ
    to t. ``alphas`` are ᾱ at ``timesteps`` and a final ᾱ_0 (`_leading`).

    diffusers' img2img slices that list, repeat included, at ``start``, so from ``start`` >= 1
    its redo step and the levels after it are not the leading schedule's: reproduced here as
    the reference runs it, since matching it is the contract."""
    calls = [0] if len(timesteps) == 1 else [0, 1, *range(1, len(timesteps))]
    calls = calls[start:]
    pairs = [(alphas[m - 1], alphas[m]) if j == 1 else (alphas[m], alphas[m + 1])
             for j, m in enumerate(calls)]
    return timesteps[calls], torch.stack([torch.stack(pair) for pair in pairs])


def start_latents(method: str, noise: Tensor, level: Tensor, init: Tensor | None = None) -> Tensor:
    """The latents a sampler starts from at its first noise ``level`` (ᾱ for ddim/plms, σ for
    the rest): unit ``noise`` scaled as the reference's `init_noise_sigma` scales it, or with
    ``init`` (an image's scaled latents) noised as its scheduler's `add_noise` does, in the
    space the sampler works in and in the reference's operation order."""
    if method in ("ddim", "plms"):
        return noise if init is None else level**0.5 * init + (1 - level) ** 0.5 * noise
    if method == "dpmpp_2m":
        if init is None:
            return noise
        alpha_t, sigma_t, _ = _vp_coefficients(level)
        return alpha_t * init + sigma_t * noise
    return noise * level if init is None else init + noise * level


def _check_tensors(name: str, noise: Tensor, eta: float,
                   generators: Sequence[torch.Generator] | None, init: Tensor | None) -> None:
    """Refuse latents or generators the per-image seed contract cannot run with (the sampler,
    steps and eta were checked as `params.BatchShape` checks them)."""
    if noise.dtype != torch.float32 or noise.ndim != 4:
        shape = tuple(noise.shape)
        raise ValueError(f"noise must be a float32 (B, C, h, w) tensor, got {noise.dtype} {shape}")
    if init is not None and (init.shape != noise.shape or init.dtype != torch.float32):
        raise ValueError(f"init latents must be float32 like the noise {tuple(noise.shape)}, "
                         f"got {init.dtype} {tuple(init.shape)}")
    stochastic = SAMPLERS[name].ancestral or eta > 0
    if stochastic and generators is None:
        raise ValueError(f"{name!r} with eta={eta} draws noise: pass one CPU generator per image")
    if generators is not None and len(generators) != noise.shape[0]:
        raise ValueError(f"got {len(generators)} generators for a batch of {noise.shape[0]}")
    if generators is not None and any(g.device.type != "cpu" for g in generators):
        raise ValueError("generators must be CPU generators, as the per-image seed contract requires")


def sample(
    name: str,
    eps_model: EpsModel,
    noise: Tensor,
    steps: int,
    *,
    eta: float = 0.0,
    generators: Sequence[torch.Generator] | None = None,
    on_step: Callback | None = None,
    predraw: bool = False,
    init: Tensor | None = None,
    start: int = 0,
) -> Tensor:
    """Run sampler ``name`` from unit ``noise`` for ``steps`` steps; return the final latents.

    ``name``, ``steps`` and ``eta`` are as a `params.BatchShape` holds them (a canonical name,
    checked values). Image-to-image: ``init``, the images' scaled latents, noised to the level
    of step ``start`` (steps - int(steps * strength)), from which the rest of the schedule
    runs. ``on_step(i, total)`` follows network evaluations, which is one more than the steps
    run for plms. ``generators`` (one CPU generator per image, having drawn ``noise``)
    feed euler_a and ddim with eta > 0, one draw per step; ``predraw`` makes those draws before
    the loop (same values) so that a GPU loop never waits for them. The per-step coefficients
    stay CPU scalars, as in diffusers: PyTorch passes them to device kernels by value, without
    a sync.
    """
    _check_tensors(name, noise, eta, generators, init)
    if not 0 <= start < steps:
        raise ValueError(f"start must be in [0, {steps}), got {start}")
    row = SAMPLERS[name]
    timesteps, levels = SPACINGS[row.spacing](steps, schedule.alphas_cumprod(schedule.betas()))
    if row.method == "plms":
        timesteps, levels = _plms_calls(timesteps, levels, start)
        first = levels[0, 0]
    else:
        timesteps, levels = timesteps[start:], levels[start:]
        first = levels[0]
    callback = on_step or (lambda i, total: None)
    draw = None
    if generators is not None and (row.ancestral or eta > 0):
        draw = (_predrawn_noise(generators, noise, len(timesteps)) if predraw
                else _per_item_noise(generators, noise))
    x = start_latents(row.method, noise, first, init)
    t_in = timesteps.to(noise.device, torch.float32)
    return METHODS[row.method](eps_model, x, t_in, levels, callback, eta=eta, noise_sampler=draw)
