"""The SD v1 discretisation: noise levels and the timesteps each sampler visits.

Pure functions, no state. Parity with diffusers is the contract (see samplers.py), so the
selections below reproduce diffusers' arithmetic exactly, including where it works in float64
NumPy before casting to float32: a timestep or sigma that is one float32 ulp away would make an
image differ from the reference pipeline. The training discretisation is SD v1.5's:
``scaled_linear`` betas from 0.00085 to 0.012 over 1000 steps.

Notation: ``t`` is the integer (or fractional) training timestep, ``alphas_cumprod[t]`` is
ᾱ_t of DDPM (Ho et al. 2020), ``sigma`` is the VE noise level sqrt((1 - ᾱ_t) / ᾱ_t) of
Karras et al. 2022, so that x_VE = x_VP / sqrt(ᾱ_t).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

NUM_TRAIN_TIMESTEPS = 1000
BETA_START = 0.00085
BETA_END = 0.012
STEPS_OFFSET = 1
KARRAS_RHO = 7.0


def betas(
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
    beta_start: float = BETA_START,
    beta_end: float = BETA_END,
) -> Tensor:
    """``scaled_linear`` betas: linear in sqrt(beta), the schedule LDM was trained with."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2


def alphas_cumprod(betas: Tensor) -> Tensor:
    """ᾱ_t = prod_{s<=t} (1 - beta_s), in float32 like the reference, so every later step agrees."""
    return torch.cumprod(1.0 - betas, dim=0)


def sigmas_from_alphas_cumprod(alphas_cumprod: Tensor) -> Tensor:
    """VE noise level per training timestep, ascending with t (float32)."""
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def leading_timesteps(steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> Tensor:
    """DDIM/PNDM "leading" spacing with steps_offset 1: 1 + k * (T // steps), descending.

    The largest timestep is therefore below T - 1 (853 for 7 steps) and the last one is 1.
    """
    step_ratio = num_train_timesteps // steps
    return torch.arange(steps - 1, -1, -1, dtype=torch.int64) * step_ratio + STEPS_OFFSET


def linspace_timesteps(steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> Tensor:
    """Euler "linspace" spacing: fractional float32 timesteps from T - 1 down to 0 inclusive."""
    t = np.linspace(0, num_train_timesteps - 1, steps, dtype=np.float32)[::-1].copy()
    return torch.from_numpy(t)


def dpm_linspace_timesteps(steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> Tensor:
    """DPM-Solver "linspace" spacing: steps + 1 points over [0, T - 1], rounded, the 0 dropped."""
    t = np.linspace(0, num_train_timesteps - 1, steps + 1).round()[::-1][:-1].copy()
    return torch.from_numpy(t.astype(np.int64))


def sigma_at(timesteps: Tensor, sigmas: Tensor) -> Tensor:
    """Noise level at (possibly fractional) timesteps, interpolated linearly in sigma (float64)."""
    train_sigmas = sigmas.numpy()
    return torch.from_numpy(np.interp(timesteps.numpy(), np.arange(len(train_sigmas)), train_sigmas))


def sigma_to_t(sigma: Tensor, sigmas: Tensor) -> Tensor:
    """Fractional timestep of a noise level, interpolated linearly in log sigma (float64).

    Not the exact inverse of sigma_at, which is linear in sigma; both are what the reference
    uses in its own direction.
    """
    log_sigmas = np.log(sigmas.numpy())
    log_sigma = np.log(np.maximum(sigma.numpy(), 1e-10))
    above = log_sigma - log_sigmas[:, np.newaxis] >= 0
    low_idx = np.cumsum(above, axis=0).argmax(axis=0).clip(max=len(log_sigmas) - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return torch.from_numpy((1 - w) * low_idx + w * high_idx)


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = KARRAS_RHO) -> Tensor:
    """Noise levels evenly spaced in sigma^(1/rho) (Karras et al. 2022, eq. 5), descending, float64."""
    ramp = np.linspace(0, 1, steps)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return torch.from_numpy((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def append_zero(sigmas: Tensor) -> Tensor:
    """Close a sigma schedule at 0 (sampling ends on the clean latents) and cast to float32."""
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(torch.float32)


def alphas_cumprod_at(timesteps: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """ᾱ at each timestep, closed with ᾱ_0: SD's set_alpha_to_one=False stops one step short of 1."""
    return torch.cat([alphas_cumprod[timesteps], alphas_cumprod[:1]])
