"""Physics-informed training: the oscillator's math, the physics loss's identities, the data
module, the pairing check, and the experiment preset run through the CLI."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from runner.build import build
from runner.data.ode import damped_oscillator, ode
from runner.errors import ConfigError
from runner.losses import DampedOscillator, PhysicsLoss, bind_context, time_derivatives
from runner.models import PINN
from tests.conftest import compose_config, run_cli

OSCILLATORS = [  # zeta, omega, x0, v0
    (0.15, 4.0, 1.0, 0.0),
    (0.0, 2.5, -0.5, 1.5),
    (0.7, 10.0, 2.0, -3.0),
]


def _times(count: int = 64, t_max: float = 3.0) -> torch.Tensor:
    return torch.linspace(0.0, t_max, count, dtype=torch.float64).unsqueeze(1).requires_grad_(True)


@pytest.mark.parametrize("zeta,omega,x0,v0", OSCILLATORS)
def test_exact_solution_satisfies_the_equation_and_initial_conditions(zeta, omega, x0, v0):
    t = _times()
    residual = DampedOscillator(zeta, omega)(t, damped_oscillator(t, zeta, omega, x0, v0))
    assert residual.shape == t.shape
    assert residual.abs().max().item() < 1e-10
    start = torch.zeros(1, 1, dtype=torch.float64, requires_grad=True)
    position, velocity = time_derivatives(damped_oscillator(start, zeta, omega, x0, v0), start, 1)
    assert position.item() == pytest.approx(x0, abs=1e-12)
    assert velocity.item() == pytest.approx(v0, abs=1e-12)


def test_residual_of_a_wrong_function_is_not_zero():
    zeta, omega = 0.15, 4.0
    t = _times()
    equation = DampedOscillator(zeta, omega)
    undamped = torch.cos(omega * t)  # solves the equation only for zeta = 0: residual -2 zeta sin(omega t)
    assert torch.allclose(equation(t, undamped), -2 * zeta * torch.sin(omega * t), atol=1e-10)
    assert equation(t, undamped).abs().max().item() > 0.25
    wrong_frequency = damped_oscillator(t, zeta, 1.2 * omega, 1.0, 0.0)
    assert equation(t, wrong_frequency).abs().max().item() > 0.1


def test_time_derivatives_of_a_polynomial():
    t = _times(16)
    u, first, second, third, fourth = time_derivatives(t**3 + 2 * t, t, 4)
    assert torch.allclose(first, 3 * t**2 + 2)
    assert torch.allclose(second, 6 * t)
    assert torch.allclose(third, torch.full_like(t, 6.0))
    assert torch.equal(fourth, torch.zeros_like(t))  # past the degree: zeros, not an autograd error
    assert all(d.shape == u.shape for d in (first, second, third, fourth))


def _batch(seed: int = 0, size: int = 32):
    generator = torch.Generator().manual_seed(seed)
    inputs = 3.0 * torch.rand(size, 1, generator=generator)
    target = torch.randn(size, 1, generator=generator)
    target[::3] = math.nan  # collocation points
    torch.manual_seed(seed)
    return inputs, target, PINN((1,), 1, (16, 16))


def test_with_physics_and_initial_terms_off_the_loss_is_the_observed_mse():
    inputs, target, model = _batch()
    outputs = model(inputs)
    loss = PhysicsLoss(DampedOscillator(0.15, 4.0), physics_weight=0.0, initial_values=None)(outputs, target, inputs, model)
    known = ~torch.isnan(target)
    assert torch.allclose(loss, F.mse_loss(outputs[known], target[known]))


def test_nan_targets_are_ignored_by_the_data_term():
    inputs, target, model = _batch()
    loss = PhysicsLoss(DampedOscillator(0.15, 4.0), physics_weight=0.0, initial_values=None)
    outputs = model(inputs).detach()
    moved = outputs.clone()
    moved[torch.isnan(target)] += 100.0  # predictions where nothing was observed
    assert torch.isfinite(loss(outputs, target, inputs, model))
    assert torch.equal(loss(outputs, target, inputs, model), loss(moved, target, inputs, model))
    unobserved = torch.full_like(target, math.nan)
    assert loss(outputs, unobserved, inputs, model).item() == 0.0  # no data term, not NaN


def test_terms_add_up_with_their_weights():
    inputs, target, model = _batch()
    equation = DampedOscillator(0.15, 4.0)
    outputs = model(inputs)
    data = PhysicsLoss(equation, 0.0, None)(outputs, target, inputs, model)
    with_physics = PhysicsLoss(equation, 2.5, None)(outputs, target, inputs, model)
    with_initial = PhysicsLoss(equation, 0.0, [1.0, 0.0], initial_weight=3.0)(outputs, target, inputs, model)
    t = inputs.clone().requires_grad_(True)
    residual = equation(t, model(t))
    start = torch.zeros(1, 1, requires_grad=True)
    position, velocity = time_derivatives(model(start), start, 1)
    assert torch.allclose(with_physics - data, 2.5 * residual.pow(2).mean(), rtol=1e-5)
    assert torch.allclose(with_initial - data, 3.0 * ((position - 1.0) ** 2 + velocity**2).squeeze(), rtol=1e-5)


def test_loss_trains_the_model_from_collocation_points_alone():
    inputs, _, model = _batch()
    unobserved = torch.full((len(inputs), 1), math.nan)
    loss = PhysicsLoss(DampedOscillator(0.15, 4.0), 1.0, [1.0, 0.0])(model(inputs), unobserved, inputs, model)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_loss_works_under_no_grad_and_autocast_as_in_evaluation():
    inputs, target, model = _batch()
    loss = PhysicsLoss(DampedOscillator(0.15, 4.0), 1.0, [1.0, 0.0])
    expected = loss(model(inputs), target, inputs, model).detach()
    with torch.no_grad():
        evaluated = bind_context(loss)(model(inputs), target, inputs, model)
    assert not evaluated.requires_grad
    assert torch.allclose(evaluated, expected)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = bind_context(loss)(model(inputs), target, inputs, model)
    # the residual and initial terms run in float32; only the data term sees bfloat16 outputs
    assert mixed.dtype == torch.float32 and torch.isfinite(mixed)
    assert mixed.item() == pytest.approx(expected.item(), rel=0.05)


def test_loss_refuses_bad_settings():
    with pytest.raises(ConfigError, match=r"loss.initial_values=\[1.0\] has 1 entries but DampedOscillator is of order 2"):
        PhysicsLoss(DampedOscillator(0.15, 4.0), 1.0, [1.0])
    with pytest.raises(ConfigError, match="loss.physics_weight=-1"):
        PhysicsLoss(DampedOscillator(0.15, 4.0), -1.0)


def test_data_module_shapes_task_and_targets():
    data = ode(t_max=3.0, num_collocation=40, num_observed=8, num_val=16, num_test=24, batch_size=8)
    assert (data.task, data.modality, data.input_shape, data.num_classes) == ("regression", "coordinates", (1,), 1)
    x, y = data.train.tensors
    assert x.shape == y.shape == (48, 1) and x.dtype == y.dtype == torch.float32
    assert int(torch.isnan(y).sum()) == 40 and bool(torch.isnan(y[:40]).all())
    assert float(x.min()) >= 0.0 and float(x.max()) <= 3.0
    # one observed time in each eighth of [0, 3], with the exact value
    observed = x[40:, 0]
    assert torch.equal(torch.floor(observed / (3.0 / 8)).long(), torch.arange(8))
    assert torch.allclose(y[40:], damped_oscillator(x[40:], 0.15, 4.0, 1.0, 0.0))
    assert data.sample_weights is not None and data.sample_weights[40:].eq(16.0).all() and data.sample_weights[:40].eq(1.0).all()
    for split, count in (("val", 16), ("test", 24)):
        times, values = getattr(data, split).tensors
        assert times.shape == values.shape == (count, 1) and not torch.isnan(values).any()
        assert torch.allclose(values, damped_oscillator(times, 0.15, 4.0, 1.0, 0.0))
    assert torch.equal(data.val.tensors[0][:, 0], torch.linspace(0.0, 3.0, 16))
    batch_x, batch_y = next(iter(data.loader("train")))
    assert batch_x.shape == batch_y.shape == (8, 1)


def test_data_module_is_deterministic_per_seed():
    first, second, other = ode(data_seed=3), ode(data_seed=3), ode(data_seed=4)
    for split in ("train", "test"):
        assert torch.equal(getattr(first, split).tensors[0], getattr(second, split).tensors[0])
        assert not torch.equal(getattr(first, split).tensors[0], getattr(other, split).tensors[0])
    noisy = ode(observed_noise=0.1)
    exact = ode(observed_noise=0.0)
    assert torch.equal(noisy.train.tensors[0], exact.train.tensors[0])  # same times, noisier x
    assert not torch.equal(noisy.train.tensors[1][-8:], exact.train.tensors[1][-8:])


@pytest.mark.parametrize(
    "override,message",
    [
        ({"zeta": 1.0}, "data.zeta=1.0 is not underdamped"),
        ({"num_collocation": 0}, "data.num_collocation=0 is too small"),
        ({"input_shape": (2,)}, "data.input_shape=[2]"),
    ],
)
def test_data_module_refuses_bad_settings(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        ode(**override)


def test_pinn_is_refused_on_image_data():
    cfg = compose_config(["data=digits", "model=pinn", "trainer.device=cpu", "logger=none"])
    with pytest.raises(ConfigError) as raised:
        build(cfg)
    message = str(raised.value)
    assert message.startswith("model: 'runner.models.PINN'")
    assert "coordinates inputs" in message and "image inputs" in message


@pytest.mark.slow
def test_oscillator_experiment_fits_the_exact_solution(tmp_path):
    result = run_cli(["experiment=pinn_oscillator", "logger=none", "hydra.run.dir=out"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["test/rel_l2"] < 5e-2, metrics
    assert {"val/mse", "val/mae", "test/mse"} <= metrics.keys() and "test/acc" not in metrics
