"""Parity of sdq.sdmodel.samplers with diffusers' schedulers under SD v1.5's scheduler config.

The reference is the Stable Diffusion pipeline's own loop (init_noise_sigma, scale_model_input,
step with the extra kwargs the pipeline passes), driven by a toy ε model that depends on x,
on its neighbours and on t, so a wrong timestep, input scaling or noise draw shows up.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from sdq.sdmodel import schedule
from sdq.sdmodel.diffusers_reference import reference_scheduler
from sdq.sdmodel.samplers import METHODS, SAMPLERS, SPACINGS, sample

SEEDS = (0, 1234, 99)
LATENT_SHAPE = (4, 8, 8)
# Measured: 0.0 for every sampler and step count on CPU (the samplers keep the reference's
# float32 operation order). The bound leaves room for other kernels' rounding, ~1e-6 relative
# to latents of magnitude ~4, and sits far below the negative controls (>= 1e-3).
ATOL = 2e-5
CASES = [(name, steps, 0.0) for name in SAMPLERS for steps in (1, 7, 20, 50)]
CASES += [("ddim", steps, 0.7) for steps in (1, 7, 20, 50)]

_mixing = torch.Generator().manual_seed(7)
MIX = torch.randn(4, 4, generator=_mixing) * 0.5
PHASE = torch.randn(4, generator=_mixing).view(1, 4, 1, 1)


def toy_eps(x: Tensor, t: Tensor) -> Tensor:
    """ε-like output: mostly x, plus channel/neighbour mixing and a t-dependent term; per item."""
    t = torch.as_tensor(t).to(torch.float32)
    mixed = sum(MIX[:, c].view(1, 4, 1, 1) * x[:, c : c + 1] for c in range(4))
    neighbours = torch.tanh(mixed + 0.3 * torch.roll(x, 1, dims=-1))
    return 0.8 * x + 0.2 * neighbours + 0.2 * torch.sin(t * 0.1 + PHASE)


def generators(seeds: tuple[int, ...]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def initial_noise(gens: list[torch.Generator]) -> Tensor:
    """The pipeline's per-image draw: one (1, 4, h, w) float32 randn per generator."""
    return torch.cat([torch.randn((1, *LATENT_SHAPE), generator=g, dtype=torch.float32) for g in gens])


def reference(name: str, steps: int, seeds: tuple[int, ...], eta: float = 0.0, model=toy_eps) -> Tensor:
    """Run the diffusers scheduler the way StableDiffusionPipeline does."""
    scheduler = reference_scheduler(name)
    scheduler.set_timesteps(steps)
    gens = generators(seeds)
    x = initial_noise(gens) * scheduler.init_noise_sigma
    accepted = inspect.signature(scheduler.step).parameters
    extra = {k: v for k, v in (("eta", eta), ("generator", gens)) if k in accepted}
    for t in scheduler.timesteps:
        eps = model(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(eps, t, x, **extra).prev_sample
    return x


def ours(name: str, steps: int, seeds: tuple[int, ...], eta: float = 0.0, model=toy_eps, **kwargs) -> Tensor:
    gens = generators(seeds)
    return sample(name, model, initial_noise(gens), steps, eta=eta, generators=gens, **kwargs)


def recording(calls: list[float]) -> Callable[[Tensor, Tensor], Tensor]:
    def model(x: Tensor, t: Tensor) -> Tensor:
        calls.append(float(t))
        return toy_eps(x, t)

    return model


@pytest.mark.parametrize(("name", "steps", "eta"), CASES)
def test_matches_diffusers(name: str, steps: int, eta: float) -> None:
    expected = reference(name, steps, SEEDS, eta)
    got = ours(name, steps, SEEDS, eta)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert (got - expected).abs().max().item() <= ATOL


@pytest.mark.parametrize("name", SAMPLERS)
def test_model_sees_the_reference_timesteps_and_progress_counts_them(name: str) -> None:
    expected_t: list[float] = []
    got_t: list[float] = []
    progress: list[tuple[int, int]] = []
    reference(name, 20, SEEDS[:1], model=recording(expected_t))
    ours(name, 20, SEEDS[:1], model=recording(got_t), on_step=lambda i, n: progress.append((i, n)))
    assert got_t == expected_t
    assert progress == [(i, len(expected_t)) for i in range(1, len(expected_t) + 1)]


@pytest.mark.parametrize("name", SAMPLERS)
def test_shifted_timestep_is_caught(name: str) -> None:
    """Negative control: the parity tolerance is far tighter than a one-timestep error."""

    def shifted(x: Tensor, t: Tensor) -> Tensor:
        return toy_eps(x, t + 1)

    diff = (ours(name, 20, SEEDS, model=shifted) - reference(name, 20, SEEDS)).abs().max().item()
    assert diff > 50 * ATOL


@pytest.mark.parametrize(("name", "eta"), [("ddim", 0.7), ("euler_a", 0.0)])
def test_step_noise_must_continue_the_initial_draw(name: str, eta: float) -> None:
    """Negative control: generators that did not draw the initial latents give other noise."""
    fresh = sample(name, toy_eps, initial_noise(generators(SEEDS)), 20, eta=eta, generators=generators(SEEDS))
    assert (fresh - reference(name, 20, SEEDS, eta)).abs().max().item() > 50 * ATOL


@pytest.mark.parametrize(("name", "eta"), [(name, 0.0) for name in SAMPLERS] + [("ddim", 0.7)])
def test_an_image_is_the_same_alone_and_in_a_batch(name: str, eta: float) -> None:
    batch = ours(name, 7, SEEDS, eta)
    for k, seed in enumerate(SEEDS):
        assert torch.equal(ours(name, 7, (seed,), eta)[0], batch[k])


@pytest.mark.parametrize("steps", [1, 2, 3, 7, 10, 20, 25, 50, 100, 999])
def test_schedules_equal_the_reference(steps: int) -> None:
    alphas_cumprod = schedule.alphas_cumprod(schedule.betas())
    train_sigmas = schedule.sigmas_from_alphas_cumprod(alphas_cumprod)

    def scheduler(name: str):
        made = reference_scheduler(name)
        made.set_timesteps(steps)
        return made

    ddim = scheduler("ddim")
    assert torch.equal(ddim.alphas_cumprod, alphas_cumprod)
    assert torch.equal(ddim.timesteps, schedule.leading_timesteps(steps))
    euler = scheduler("euler")
    assert torch.equal(euler.timesteps, schedule.linspace_timesteps(steps))
    assert torch.equal(euler.sigmas, schedule.append_zero(schedule.sigma_at(euler.timesteps, train_sigmas)))
    dpm = scheduler("dpmpp_2m")
    assert torch.equal(dpm.timesteps, schedule.dpm_linspace_timesteps(steps))
    assert torch.equal(dpm.sigmas, schedule.append_zero(schedule.sigma_at(dpm.timesteps, train_sigmas)))
    karras = scheduler("dpmpp_2m_karras")
    levels = schedule.karras_sigmas(train_sigmas[0].item(), train_sigmas[-1].item(), steps)
    assert torch.equal(karras.sigmas, schedule.append_zero(levels))
    assert torch.equal(karras.timesteps, schedule.sigma_to_t(levels, train_sigmas).round().long())


def test_sigma_to_t_inverts_sigma_at_on_the_grid() -> None:
    train_sigmas = schedule.sigmas_from_alphas_cumprod(schedule.alphas_cumprod(schedule.betas()))
    t = torch.tensor([0.0, 1.0, 250.0, 999.0])
    assert torch.allclose(schedule.sigma_to_t(schedule.sigma_at(t, train_sigmas), train_sigmas), t.double())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"eta": 0.5, "generators": None}, "one CPU generator per image"),
        ({"name": "euler_a", "generators": None}, "one CPU generator per image"),
        ({"generators": generators(SEEDS[:2])}, "2 generators for a batch of 3"),
        ({"noise": torch.zeros(3, *LATENT_SHAPE, dtype=torch.float64)}, "float32"),
    ],
)
def test_bad_arguments_are_rejected(kwargs: dict, message: str) -> None:
    call = {"name": "ddim", "noise": initial_noise(generators(SEEDS)), "steps": 5}
    call["generators"] = generators(SEEDS)
    call.update(kwargs)
    name, noise, steps = call.pop("name"), call.pop("noise"), call.pop("steps")
    with pytest.raises(ValueError, match=message):
        sample(name, toy_eps, noise, steps, **call)


def test_every_sampler_row_names_an_update_rule_and_a_spacing_sdmodel_has() -> None:
    assert {row.method for row in SAMPLERS.values()} == set(METHODS)
    assert {row.spacing for row in SAMPLERS.values()} == set(SPACINGS)
