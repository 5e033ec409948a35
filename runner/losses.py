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
    if not wanted:
        return lambda outputs, target, inputs, model: loss(outputs, target)
    if wanted == ["inputs"]:
        return lambda outputs, target, inputs, model: loss(outputs, target, inputs=inputs)
    if wanted == ["model"]:
        return lambda outputs, target, inputs, model: loss(outputs, target, model=model)
    return lambda outputs, target, inputs, model: loss(outputs, target, inputs=inputs, model=model)


def _soft_targets(target: torch.Tensor, num_classes: int, label_smoothing: float) -> torch.Tensor:
    if target.dtype in (torch.long, torch.int, torch.int64, torch.int32):
        target = F.one_hot(target, num_classes).to(torch.float32)
    if label_smoothing > 0:
        target = target * (1.0 - label_smoothing) + label_smoothing / num_classes
    return target


class CrossEntropyLoss(nn.Module):
    """Cross entropy with optional label smoothing and class weights."""

    def __init__(self, label_smoothing: float = 0.0, weight: Sequence[float] | None = None):
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"loss.label_smoothing={label_smoothing} is out of range; use a value in [0, 1)")
        self.label_smoothing = label_smoothing
        self.register_buffer("weight", None if weight is None else torch.as_tensor(weight, dtype=torch.float32))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), target, weight=self.weight, label_smoothing=self.label_smoothing)


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
