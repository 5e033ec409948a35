"""Every loss runner ships, in one module.

The contract: ``forward(outputs, target)``, plus ``inputs`` and/or ``model`` when the loss
names them in its signature (distillation runs a teacher on the inputs; a physics loss
differentiates the model at its inputs). The loop calls every loss through
``bind_context``, so it passes the same four things to all of them and never asks which
loss it has. Classification losses take targets that are class indices (N,) or per-class
probabilities (N, C), so batch mixing (mixup, cutmix) composes with all of them.
"""

import inspect
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from runner.errors import ConfigError


LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, nn.Module], torch.Tensor]
CONTEXT = ("inputs", "model")


def bind_context(loss: Callable) -> LossFn:
    """``loss`` as a function of (outputs, target, inputs, model) that hands it only the
    context its forward names. Decided once, here, not per step."""
    forward = loss.forward if isinstance(loss, nn.Module) else loss
    try:
        parameters = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        parameters = {}
    wanted = [name for name in CONTEXT if name in parameters]
    if isinstance(loss, nn.Module) and not _has_hooks(loss):
        # call forward directly: Module.__call__'s hook machinery costs microseconds a step,
        # which shows on small models; a loss with hooks keeps going through __call__
        loss = forward
    if not wanted:
        return lambda outputs, target, inputs, model: loss(outputs, target)
    if wanted == ["inputs"]:
        return lambda outputs, target, inputs, model: loss(outputs, target, inputs=inputs)
    if wanted == ["model"]:
        return lambda outputs, target, inputs, model: loss(outputs, target, model=model)
    return lambda outputs, target, inputs, model: loss(outputs, target, inputs=inputs, model=model)


def _has_hooks(module: nn.Module) -> bool:
    from torch.nn.modules import module as torch_module

    own = any(getattr(m, name) for m in module.modules() for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks"))
    everywhere = any(getattr(torch_module, name, None) for name in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks"))
    return own or everywhere


def _soft_targets(target: torch.Tensor, num_classes: int, label_smoothing: float) -> torch.Tensor:
    if target.dtype in (torch.long, torch.int, torch.int64, torch.int32):
        target = F.one_hot(target, num_classes).to(torch.float32)
    if label_smoothing > 0:
        target = target * (1.0 - label_smoothing) + label_smoothing / num_classes
    return target


class CrossEntropyLoss(nn.Module):
    """Cross entropy with optional label smoothing and class weights."""

    tasks = ("classification",)

    def __init__(self, label_smoothing: float = 0.0, weight: Sequence[float] | None = None):
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"loss.label_smoothing={label_smoothing} is out of range; use a value in [0, 1)")
        self.label_smoothing = label_smoothing
        self.register_buffer("weight", None if weight is None else torch.as_tensor(weight, dtype=torch.float32))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits if logits.dtype == torch.float32 else logits.float()
        return F.cross_entropy(logits, target, weight=self.weight, label_smoothing=self.label_smoothing)


class WeightedCrossEntropyLoss(CrossEntropyLoss):
    """Cross entropy with class weights; null weights become inverse class frequencies."""

    def __init__(self, class_counts: torch.Tensor, weight: Sequence[float] | None = None, label_smoothing: float = 0.0):
        counts = torch.as_tensor(class_counts, dtype=torch.float32)
        if weight is None:
            weight = counts.sum() / counts.clamp(min=1) / len(counts)
            weight = weight / weight.mean()
        elif len(weight) != len(counts):
            raise ConfigError(
                f"loss.weight has {len(weight)} entries but the data has {len(counts)} classes; "
                "give one weight per class or weight=null for inverse class frequency"
            )
        super().__init__(label_smoothing=label_smoothing, weight=weight)


class FocalLoss(nn.Module):
    """Focal loss, -sum_c t_c (1 - p_c)^gamma log p_c, averaged over the batch.

    With gamma=0 it is cross entropy; with soft targets it weights every class's term.
    """

    tasks = ("classification",)

    def __init__(self, gamma: float = 2.0, label_smoothing: float = 0.0):
        super().__init__()
        if gamma < 0:
            raise ConfigError(f"loss.gamma={gamma} is negative; use gamma >= 0 (0 is cross entropy)")
        self.gamma, self.label_smoothing = gamma, label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(logits.float(), dim=1)
        target = _soft_targets(target, logits.shape[1], self.label_smoothing)
        focus = (1.0 - log_p.exp()).pow(self.gamma)
        return -(target * focus * log_p).sum(dim=1).mean()


class MSELoss(nn.Module):
    """Mean squared error of regression outputs, over the targets that are observed (NaN
    marks one that is not, as in the physics data); the targets' shape, e.g. [N, 1]."""

    tasks = ("regression",)

    def forward(self, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.float()
        known = ~torch.isnan(target)
        # masked, not indexed: boolean indexing would wait for the device on every step
        errors = torch.where(known, outputs.float().reshape(target.shape) - target.nan_to_num(), 0.0)
        return errors.pow(2).sum() / known.sum().clamp(min=1)


# ---------------------------------------------------------------- physics-informed losses
# A physics loss differentiates the model at its inputs, so it asks for both (bind_context).
# The equation is its own part (loss.equation._target_): another ODE is another class with
# forward(t, u) -> residual, not a branch here.


def time_derivatives(u: torch.Tensor, t: torch.Tensor, order: int) -> list[torch.Tensor]:
    """[u, du/dt, ..., d^order u/dt^order] at every point, each shaped like u.

    u must be computed from t (which requires grad) point by point, so the gradient of
    u.sum() is the pointwise derivative. create_graph=True keeps each derivative
    differentiable: for the next order, and for the parameters' gradients in backward.
    """
    derivatives = [u]
    for _ in range(order):
        current = derivatives[-1]
        if not current.requires_grad:  # no longer depends on t (a low-degree polynomial): zero
            derivatives.append(torch.zeros_like(current))
            continue
        (derivative,) = torch.autograd.grad(current.sum(), t, create_graph=True, allow_unused=True)
        derivatives.append(torch.zeros_like(current) if derivative is None else derivative)
    return derivatives


class DampedOscillator(nn.Module):
    """Residual of x'' + 2 zeta omega x' + omega^2 x = 0, divided by omega^2: the residual
    then has x's units, so physics_weight means the same at every frequency."""

    order = 2  # the derivatives the equation needs, hence the initial values it takes

    def __init__(self, zeta: float, omega: float):
        super().__init__()
        if omega <= 0:
            raise ConfigError(f"loss.equation.omega={omega} must be positive; it is the natural angular frequency")
        self.zeta, self.omega = zeta, omega

    def forward(self, t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        x, velocity, acceleration = time_derivatives(u, t, self.order)
        return acceleration / self.omega**2 + 2.0 * self.zeta / self.omega * velocity + x


class PhysicsLoss(nn.Module):
    """data term + physics_weight * mean squared residual + initial_weight * initial error.

    The data term is the mean squared error over observed targets (NaN marks the rest, e.g.
    collocation points); the residual is the equation's at the batch's inputs; the initial
    error is the squared error of u and its derivatives at t = 0 against initial_values
    ([x(0), x'(0)] for a second-order equation; null drops the term). The initial term
    makes the problem well posed without any observed point; observed points make the fit
    faster (conf/experiment/pinn_oscillator.yaml uses both).
    """

    modalities = ("coordinates",)

    def __init__(self, equation: nn.Module, physics_weight: float = 1.0,
                 initial_values: Sequence[float] | None = None, initial_weight: float = 1.0):
        super().__init__()
        for key, weight in (("physics_weight", physics_weight), ("initial_weight", initial_weight)):
            if weight < 0:
                raise ConfigError(f"loss.{key}={weight} is negative; use a weight >= 0 (0 drops the term)")
        order = getattr(equation, "order", None)
        if initial_values is not None and order is not None and len(initial_values) != order:
            raise ConfigError(
                f"loss.initial_values={list(initial_values)} has {len(initial_values)} entries but "
                f"{type(equation).__name__} is of order {order}; give u(0) and its first {order - 1} derivative(s)"
            )
        self.equation, self.physics_weight, self.initial_weight = equation, physics_weight, initial_weight
        values = None if initial_values is None else torch.as_tensor(list(initial_values), dtype=torch.float32)
        self.register_buffer("initial_values", values)

    def forward(self, outputs: torch.Tensor, target: torch.Tensor, inputs: torch.Tensor, model: nn.Module) -> torch.Tensor:
        known = ~torch.isnan(target)
        errors = outputs.float().reshape(target.shape)[known] - target[known].float()
        # a batch of collocation points only has no data term (not NaN, as mean() of none)
        loss = errors.pow(2).sum() / max(errors.numel(), 1)
        with_initial = self.initial_values is not None and self.initial_weight > 0
        if self.physics_weight == 0 and not with_initial:
            return loss
        grad_enabled = torch.is_grad_enabled()
        # evaluation runs under no_grad and maybe autocast: derivatives need a graph, and
        # second derivatives in half precision are noise
        with torch.enable_grad(), torch.autocast(inputs.device.type, enabled=False):
            if self.physics_weight > 0:
                t = inputs.detach().float().requires_grad_(True)
                loss = loss + self.physics_weight * self.equation(t, model(t)).pow(2).mean()
            if with_initial:
                loss = loss + self.initial_weight * self._initial_error(model, inputs)
        return loss if grad_enabled else loss.detach()

    def _initial_error(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        start = torch.zeros(1, *inputs.shape[1:], device=inputs.device, requires_grad=True)
        derivatives = time_derivatives(model(start), start, len(self.initial_values) - 1)
        predicted = torch.stack([d.reshape(()) for d in derivatives])
        return (predicted - self.initial_values).pow(2).sum()


# ---------------------------------------------------------------- distillation
class DistillationLoss(nn.Module):
    """(1 - alpha) * base(student, labels) + alpha * T^2 * KL(teacher_T || student_T).

    The teacher is a model built from its own config and loaded from a runner checkpoint
    (the evaluation weights when it has them, e.g. an EMA) or from the best.pt artifact of
    an MLflow run. It is a submodule, so it follows the loss to the student's device, and it
    runs inside the loop's autocast, so at the student's precision; it stays in eval mode
    and never gets gradients. The T^2 factor keeps the soft term's gradients on the scale
    of the hard term's as T changes.
    """

    def __init__(self, teacher: nn.Module, base: nn.Module | None = None, teacher_checkpoint: str | None = None,
                 teacher_run_id: str | None = None, tracking_uri: str | None = None,
                 temperature: float = 4.0, alpha: float = 0.5):
        super().__init__()
        if temperature <= 0 or not 0.0 <= alpha <= 1.0:
            raise ConfigError(
                f"loss.temperature={temperature} and loss.alpha={alpha}: the temperature must be positive "
                "and alpha in [0, 1] (0: base loss only, 1: teacher only)"
            )
        self.base = base if base is not None else CrossEntropyLoss()
        self.temperature, self.alpha = temperature, alpha
        self.teacher = teacher
        source = _teacher_file(teacher_checkpoint, teacher_run_id, tracking_uri)
        if source is None and alpha > 0:
            raise ConfigError(
                "loss.teacher_checkpoint and loss.teacher_run_id are both null: distillation needs a trained "
                "teacher; train one (python -m runner model=cnn hydra.run.dir=outputs/teacher) and pass "
                "loss.teacher_checkpoint=outputs/teacher/checkpoints/best.pt or loss.teacher_run_id=<MLflow run id>"
            )
        if source is not None:
            self._load_teacher(source)
        self.teacher.eval().requires_grad_(False)

    def _load_teacher(self, path) -> None:
        from runner import checkpoint

        weights = checkpoint.evaluation_weights(
            path, "loss.teacher_checkpoint",
            "point it at the teacher run's checkpoints/best.pt, or pass loss.teacher_run_id=<MLflow run id>",
        )
        try:
            self.teacher.load_state_dict(weights)
        except RuntimeError as error:
            first = str(error).strip().splitlines()[0]
            raise ConfigError(
                f"loss.teacher does not fit the weights in '{path}' ({first}); set loss.teacher to the model "
                "config the teacher was trained with, e.g. model@loss.teacher=resnet or loss.teacher.channels=[...]"
            ) from None

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the teacher's dropout and BatchNorm stay in inference mode
        return self

    def forward(self, outputs: torch.Tensor, target: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        hard = self.base(outputs, target)
        if self.alpha == 0:
            return hard
        with torch.no_grad():
            teacher_outputs = self.teacher(inputs)
        t = self.temperature
        soft = F.kl_div(
            F.log_softmax(outputs.float() / t, dim=1), F.log_softmax(teacher_outputs.float() / t, dim=1),
            reduction="batchmean", log_target=True,
        )
        return (1.0 - self.alpha) * hard + self.alpha * t * t * soft


def _teacher_file(path: str | None, run_id: str | None, tracking_uri: str | None):
    """The teacher's checkpoint: a file, or best.pt downloaded from an MLflow run."""
    from pathlib import Path

    if path is not None and run_id is not None:
        raise ConfigError("loss.teacher_checkpoint and loss.teacher_run_id are both set; give one of them")
    if path is not None:
        return Path(path)
    if run_id is None:
        return None
    import tempfile

    from mlflow.tracking import MlflowClient

    from runner.schema import mask_url
    from runner.tracking import default_tracking_uri

    uri = default_tracking_uri(tracking_uri)
    try:
        return Path(MlflowClient(uri).download_artifacts(run_id, "checkpoints/best.pt", tempfile.mkdtemp(prefix="teacher-")))
    except Exception as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(
            f"loss.teacher_run_id='{run_id}': no checkpoints/best.pt in that run at {mask_url(uri)} ({mask_url(first[:200])}); "
            "check the id (mlflow ui) and loss.tracking_uri, or pass loss.teacher_checkpoint=<file>"
        ) from None
