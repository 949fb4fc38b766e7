"""Samplers for epsilon-prediction latent diffusion, one function each, k-diffusion style.

Each sampler equals, numerically, the diffusers scheduler of its kind configured from SD v1.5's
scheduler config (the reference pipeline users compare against), so the update formulas keep
the reference's float32 operation order and each sampler works in the space the reference
does: DDIM, PLMS and DPM-Solver++ on VP latents x = sqrt(ᾱ)·x0 + sqrt(1-ᾱ)·ε, the Euler
samplers on VE latents x = x0 + σ·ε. ``eps_model(x_in, t)`` is the network; ``t`` is the
timestep value the reference feeds the UNet, fractional or rounded as it is.

Every sampler takes the same arguments (k-diffusion's contract): the model, the latents, the
timesteps, their noise levels (ᾱ for the VP methods, σ with a final 0 for the VE ones), a
callback, and keyword-only ``eta`` (read by DDIM alone) and ``noise_sampler`` (by those that
draw noise). A row of ``params.SAMPLERS`` names its update rule (``METHODS``) and its timestep
spacing (``SPACINGS``), so `sample` looks both up.

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
    """PLMS (Liu et al. 2022, eq. 12) started with a second-order step in place of the RK warm-up.

    The first step probes ε at its own end point and redoes itself with the mean ε, so n steps
    cost n + 1 network evaluations (n >= 2); ``callback`` counts evaluations.
    """
    # a_t, a_prev = ᾱ_t, ᾱ_{t-δ}; e_t = ε_θ(x_t, t); e_prime = ε' of eq. 12; past = ε history.
    n = len(timesteps)
    total = n + 1 if n > 1 else 1
    past: list[Tensor] = []
    for i, t in enumerate(timesteps):
        a_t, a_prev = alphas[i], alphas[i + 1]
        e_t = eps_model(x, t)
        if i == 0 and n > 1:
            callback(1, total)
            x_probe = _pndm_transfer(x, e_t, a_t, a_prev)
            e_prime = (eps_model(x_probe, timesteps[1]) + e_t) / 2
        else:
            e_prime = _linear_multistep(e_t, past)
        past = [*past[-2:], e_t]
        x = _pndm_transfer(x, e_prime, a_t, a_prev)
        callback(i + 1 + (total - n), total)
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
    from unit noise ``x`` scaled to the first (largest) σ."""
    x = x * sigmas[0]
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
    from unit noise ``x`` scaled to the first (largest) σ."""
    # σ_up² + σ_down² = σ_{i+1}², σ_up² = σ_{i+1}²(σ_i² - σ_{i+1}²)/σ_i² (DDPM posterior variance in VE).
    assert noise_sampler is not None  # `sample` passes one to every ancestral sampler
    x = x * sigmas[0]
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


def _check_tensors(name: str, noise: Tensor, eta: float,
                   generators: Sequence[torch.Generator] | None) -> None:
    """Refuse latents or generators the per-image seed contract cannot run with (the sampler,
    steps and eta were checked as `params.BatchShape` checks them)."""
    if noise.dtype != torch.float32 or noise.ndim != 4:
        shape = tuple(noise.shape)
        raise ValueError(f"noise must be a float32 (B, C, h, w) tensor, got {noise.dtype} {shape}")
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
) -> Tensor:
    """Run sampler ``name`` from unit ``noise`` for ``steps`` steps; return the final latents.

    ``name``, ``steps`` and ``eta`` are as a `params.BatchShape` holds them (a canonical name,
    checked values). ``on_step(i, total)`` follows network evaluations, which is one more than
    ``steps`` for plms. ``generators`` (one CPU generator per image, having drawn ``noise``)
    feed euler_a and ddim with eta > 0, one draw per step; ``predraw`` makes those draws before
    the loop (same values) so that a GPU loop never waits for them. The per-step coefficients
    stay CPU scalars, as in diffusers: PyTorch passes them to device kernels by value, without
    a sync.
    """
    _check_tensors(name, noise, eta, generators)
    row = SAMPLERS[name]
    callback = on_step or (lambda i, total: None)
    draw = None
    if generators is not None and (row.ancestral or eta > 0):
        draw = _predrawn_noise(generators, noise, steps) if predraw else _per_item_noise(generators, noise)
    timesteps, levels = SPACINGS[row.spacing](steps, schedule.alphas_cumprod(schedule.betas()))
    t_in = timesteps.to(noise.device, torch.float32)
    return METHODS[row.method](eps_model, noise, t_in, levels, callback, eta=eta, noise_sampler=draw)
