"""Learning-rate schedules torch does not ship. Each is an LRScheduler, so its state_dict
goes into the checkpoint like torch's own."""

import logging
import math
from typing import Sequence

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from runner.errors import ConfigError

log = logging.getLogger(__name__)


class WarmupCosineLR(LRScheduler):
    """Linear warmup from warmup_start_ratio*lr to lr over warmup_steps, then cosine decay to
    min_lr_ratio*lr at total_steps, flat after. Step t (0-based) uses the value at t."""

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int,
        total_steps: int,
        warmup_start_ratio: float = 0.0,
        min_lr_ratio: float = 0.0,
        last_epoch: int = -1,
    ):
        if warmup_steps < 0 or total_steps < 1:
            raise ConfigError(
                f"scheduler.warmup_steps={warmup_steps} and scheduler.total_steps={total_steps} "
                "must be non-negative and positive; use e.g. warmup_steps=50 total_steps=null"
            )
        if warmup_steps > total_steps:
            # a short debug run of a long recipe: warm up over the whole run rather than refuse
            log.warning("scheduler.warmup_steps=%d exceeds the run's %d steps; warming up over all of them", warmup_steps, total_steps)
            warmup_steps = total_steps
        self.warmup_steps, self.total_steps = warmup_steps, total_steps
        self.warmup_start_ratio, self.min_lr_ratio = warmup_start_ratio, min_lr_ratio
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_start_ratio + (1 - self.warmup_start_ratio) * step / self.warmup_steps
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * cosine

    def get_lr(self) -> list[float]:
        return [base * self.factor(self.last_epoch) for base in self.base_lrs]


class PhaseLR(LRScheduler):
    """lrs[i] for steps[i] optimizer steps, phase after phase; the last rate stays after."""

    def __init__(self, optimizer: Optimizer, lrs: Sequence[float], steps: Sequence[int], last_epoch: int = -1):
        if len(lrs) != len(steps) or not lrs:
            raise ConfigError(
                f"scheduler.lrs has {len(lrs)} entries and scheduler.steps {len(steps)}; "
                "give one step count per learning rate"
            )
        if any(lr <= 0 for lr in lrs) or any(n <= 0 for n in steps):
            raise ConfigError(f"scheduler.lrs={list(lrs)} and scheduler.steps={list(steps)} must all be positive")
        self.lrs, self.steps = [float(lr) for lr in lrs], [int(n) for n in steps]
        self.current_phase = 0
        super().__init__(optimizer, last_epoch)

    def phase(self, step: int) -> int:
        end = 0
        for index, count in enumerate(self.steps):
            end += count
            if step < end:
                return index
        return len(self.steps) - 1

    def get_lr(self) -> list[float]:
        phase = self.phase(self.last_epoch)
        if phase != self.current_phase:
            log.info("phase %d/%d starts at step %d: lr %g", phase + 1, len(self.lrs), self.last_epoch, self.lrs[phase])
            self.current_phase = phase
        return [self.lrs[phase] for _ in self.base_lrs]

    def metrics(self) -> dict[str, float]:
        """What LearningRateMonitor logs besides the rate: the phase (1-based)."""
        return {"lr/phase": float(self.current_phase + 1)}


class InverseSqrtLR(LRScheduler):
    """The transformer schedule (Vaswani et al. 2017): linear warmup to lr over
    warmup_steps, then lr * sqrt(warmup_steps / step)."""

    def __init__(self, optimizer: Optimizer, warmup_steps: int, last_epoch: int = -1):
        if warmup_steps < 1:
            raise ConfigError(f"scheduler.warmup_steps={warmup_steps} must be at least 1; e.g. scheduler.warmup_steps=100")
        self.warmup_steps = warmup_steps
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        step = step + 1
        return min(step / self.warmup_steps, (self.warmup_steps / step) ** 0.5)

    def get_lr(self) -> list[float]:
        return [base * self.factor(self.last_epoch) for base in self.base_lrs]


class LinearWarmupLR(LRScheduler):
    """Linear warmup from 0 to lr over warmup_steps, then linear decay to min_lr_ratio*lr at
    total_steps (decay=true, the BERT schedule) or constant (decay=false)."""

    def __init__(self, optimizer: Optimizer, warmup_steps: int, total_steps: int, decay: bool = True,
                 min_lr_ratio: float = 0.0, last_epoch: int = -1):
        if warmup_steps < 0 or total_steps < 1:
            raise ConfigError(f"scheduler.warmup_steps={warmup_steps} and scheduler.total_steps={total_steps} must be non-negative and positive")
        self.warmup_steps, self.total_steps = min(warmup_steps, total_steps), total_steps
        self.decay, self.min_lr_ratio = decay, min_lr_ratio
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if not self.decay:
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return 1.0 - (1.0 - self.min_lr_ratio) * progress

    def get_lr(self) -> list[float]:
        return [base * self.factor(self.last_epoch) for base in self.base_lrs]
