"""A damped harmonic oscillator as a physics-informed regression problem.

x'' + 2 zeta omega x' + omega^2 x = 0, x(0) = x0, x'(0) = v0, underdamped (0 <= zeta < 1),
whose solution is known in closed form. Training samples are times t in [0, t_max]:
collocation points with NaN targets (only the physics term of the loss sees them) and a
few observed points, one in each equal slice of the interval, whose targets are the
solution, optionally noisy; the sampler draws them more often (observed_weight).
Validation and test targets are the exact solution, on a uniform grid and at random times.
"""

import math
from typing import Sequence

import torch
from torch.utils.data import TensorDataset

from runner.data.module import DataModule
from runner.errors import ConfigError


def damped_oscillator(t: torch.Tensor, zeta: float, omega: float, x0: float, v0: float) -> torch.Tensor:
    """The exact x(t): exp(-zeta omega t) (x0 cos(w t) + (v0 + zeta omega x0) / w sin(w t)),
    w = omega sqrt(1 - zeta^2). Built from torch ops, so autograd can differentiate it."""
    frequency = omega * math.sqrt(1.0 - zeta**2)
    decay = torch.exp(-zeta * omega * t)
    return decay * (x0 * torch.cos(frequency * t) + (v0 + zeta * omega * x0) / frequency * torch.sin(frequency * t))


def ode(
    zeta: float = 0.15,
    omega: float = 4.0,
    x0: float = 1.0,
    v0: float = 0.0,
    t_max: float = 3.0,
    num_collocation: int = 2040,
    num_observed: int = 8,
    observed_noise: float = 0.0,
    observed_weight: float = 16.0,
    num_val: int = 256,
    num_test: int = 1024,
    data_seed: int = 0,
    batch_size: int = 128,
    num_workers: int = 0,
    num_classes: int = 1,
    input_shape: Sequence[int] = (1,),
) -> DataModule:
    _check(zeta, omega, t_max, observed_weight, num_classes, input_shape,
           num_collocation=num_collocation, num_observed=num_observed, num_val=num_val, num_test=num_test)
    generator = torch.Generator().manual_seed(data_seed)

    def times(count: int) -> torch.Tensor:  # uniform random times, shape (count, 1)
        return t_max * torch.rand(count, 1, generator=generator)

    def solution(t: torch.Tensor) -> torch.Tensor:
        return damped_oscillator(t, zeta, omega, x0, v0)

    collocation = times(num_collocation)
    # one observed time in each of num_observed equal slices of [0, t_max]: measurements
    # spread over the interval, as a sampled sensor's would be
    slices = torch.arange(num_observed, dtype=torch.float32).unsqueeze(1)
    observed = (slices + torch.rand(num_observed, 1, generator=generator)) * (t_max / max(num_observed, 1))
    measured = solution(observed) + observed_noise * torch.randn(observed.shape, generator=generator)
    train = TensorDataset(
        torch.cat([collocation, observed]),
        torch.cat([torch.full_like(collocation, math.nan), measured]),
    )
    # a few observed points among thousands of collocation points would be missing from most
    # batches: drawing each observed point observed_weight times as often puts some in each
    weights = torch.cat([torch.ones(num_collocation), torch.full((num_observed,), float(observed_weight))])
    grid = torch.linspace(0.0, t_max, num_val).unsqueeze(1)
    test_times = times(num_test)
    return DataModule(
        train, TensorDataset(grid, solution(grid)), TensorDataset(test_times, solution(test_times)),
        num_classes=1, input_shape=(1,), batch_size=batch_size, num_workers=num_workers,
        modality="coordinates", task="regression",
        sample_weights=None if observed_weight == 1 else weights,
    )


def _check(zeta, omega, t_max, observed_weight, num_classes, input_shape, **counts) -> None:
    if not 0.0 <= zeta < 1.0:
        raise ConfigError(f"data.zeta={zeta} is not underdamped; use 0 <= zeta < 1 (the closed-form solution assumes it)")
    if omega <= 0 or t_max <= 0:
        raise ConfigError(f"data.omega={omega}, data.t_max={t_max}: both must be positive")
    if observed_weight <= 0:
        raise ConfigError(f"data.observed_weight={observed_weight} must be positive; 1 draws observed and collocation points alike")
    for key, count in counts.items():
        if count < (0 if key == "num_observed" else 1):
            raise ConfigError(f"data.{key}={count} is too small; use a positive count (num_observed may be 0)")
    # published for the model (model.num_classes, model.input_shape interpolate them)
    if int(num_classes) != 1 or tuple(input_shape) != (1,):
        raise ConfigError(
            f"data.num_classes={num_classes}, data.input_shape={list(input_shape)}: the oscillator has one "
            "input (time) and one output (x); remove the overrides or set num_classes=1 and input_shape=[1]"
        )
