"""The one callback system. The loop calls these events, in this order:

    on_fit_start
    for each epoch:
        on_epoch_start
        for each batch:
            on_train_batch(x, y) -> (x, y)             may change the training inputs, before
                                                       augmentation (progressive resizing)
            forward, backward; after every optimizer step:
            [validate]                                 every trainer.val_check_interval steps
            on_step_end
        [validate]                                     when validating per epoch
        on_epoch_end
    where validate is on_validation_start, evaluation, on_validation_end(metrics)
    on_fit_end
    on_test_end(metrics)                               after the best weights are tested
    on_run_end(status, error)                          always, last: FINISHED, FAILED or KILLED
    on_log(metrics)                                    whenever the loop records metrics

A callback stops training by setting ``loop.state.should_stop``, never by raising, and keeps
what it needs across a resume in ``state_dict()``; the checkpoint stores it by callback name.
The loop calls a callback only for the events its class defines, so an unused event costs
nothing per step. A callback may set ``loop.eval_model`` (weights evaluation uses instead of
the trained ones, e.g. an exponential moving average).
"""

import logging
import math
import sys
import time

from runner.errors import ConfigError
from runner.metrics import check_metric_name

log = logging.getLogger("runner")


class Callback:
    def on_fit_start(self, loop) -> None: ...
    def on_epoch_start(self, loop) -> None: ...
    def on_train_batch(self, loop, x, y) -> tuple:
        return x, y
    def on_step_end(self, loop) -> None: ...
    def on_validation_start(self, loop) -> None: ...
    def on_validation_end(self, loop, metrics: dict[str, float]) -> None: ...
    def on_epoch_end(self, loop) -> None: ...
    def on_fit_end(self, loop) -> None: ...
    def on_test_end(self, loop, metrics: dict[str, float]) -> None: ...
    def on_run_end(self, loop, status: str, error: BaseException | None) -> None: ...
    def on_log(self, loop, metrics: dict[str, float]) -> None: ...

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...


def _mode(key: str, mode: str) -> str:
    if mode not in ("min", "max"):
        raise ConfigError(f"{key}.mode='{mode}' is not supported; use min or max")
    return mode


def _as_list(best) -> list[float]:
    return list(best) if isinstance(best, (list, tuple)) else [best]


class _Monitor:
    """Tracks the best value of one metric under a mode, or of several compared in order:
    monitor=[[val/loss, min], [val/acc, max]] prefers the lower loss and, on a tie within
    min_delta, the higher accuracy."""

    def __init__(self, key: str, monitor, mode: str, min_delta: float = 0.0):
        self.key = key
        if isinstance(monitor, str):
            pairs = [(monitor, mode)]
        else:
            pairs = [tuple(pair) for pair in monitor]
            if not pairs or any(len(pair) != 2 for pair in pairs):
                raise ConfigError(
                    f"{key}.monitor={[list(p) for p in pairs]} must be a metric name or a list of "
                    f"[metric, mode] pairs, e.g. '{key}.monitor=[[val/loss,min],[val/acc,max]]'"
                )
        self.pairs = [
            (check_metric_name(f"{key}.monitor", name, splits=("train", "val")), _mode(key, pair_mode))
            for name, pair_mode in pairs
        ]
        self.names = [name for name, _ in self.pairs]
        self.monitor = self.names[0]
        self.min_delta = min_delta
        self.best = [math.inf if pair_mode == "min" else -math.inf for _, pair_mode in self.pairs]

    def check(self, task: str) -> None:
        """Once the data is known: every monitored metric must be one this task reports."""
        for name in self.names:
            check_metric_name(f"{self.key}.monitor", name, splits=("train", "val"), task=task)

    def values(self, metrics: dict[str, float]) -> list[float] | None:
        if any(name not in metrics for name in self.names):
            return None
        return [metrics[name] for name in self.names]

    def improved(self, values: list[float]) -> bool:
        for value, best, (_, mode) in zip(values, self.best, self.pairs):
            gain = (best - value) if mode == "min" else (value - best)
            if gain > self.min_delta or (math.isinf(best) and math.isfinite(value)):
                return True
            if gain < -self.min_delta:
                return False
        return False

    def describe(self) -> str:
        return ", ".join(f"{name} {best:.4g}" for name, best in zip(self.names, self.best))


class ModelCheckpoint(Callback):
    """best.pt when the monitored metric improves; last.pt every N steps, at each epoch end
    and at the end of fit. Both are whole checkpoints a run can resume from."""

    def __init__(self, monitor: str | list = "val/acc", mode: str = "max", every_n_steps: int = 0):
        self.tracker = _Monitor("callbacks.checkpoint", monitor, mode)
        if every_n_steps < 0:
            raise ConfigError(f"callbacks.checkpoint.every_n_steps={every_n_steps} is negative; use 0 (off) or a step count")
        self.every_n_steps = every_n_steps
        self.last_saved: list[int] = []  # (epoch, step, batch) of the newest last.pt

    def _save_last(self, loop) -> None:
        position = [loop.state.epoch, loop.state.step, loop.state.batch_in_epoch]
        if position != self.last_saved:  # fit's end right after an epoch's end: same state
            self.last_saved = position
            loop.save_checkpoint("last.pt")

    def on_fit_start(self, loop):
        self.tracker.check(loop.task)

    def on_validation_end(self, loop, metrics):
        values = self.tracker.values(metrics)
        if values is None:
            return
        if self.tracker.improved(values):
            self.tracker.best = values
            loop.save_checkpoint("best.pt")
        loop.log({f"best/{name}": best for name, best in zip(self.tracker.names, self.tracker.best)})

    def on_step_end(self, loop):
        if self.every_n_steps and loop.state.step % self.every_n_steps == 0:
            self._save_last(loop)

    def on_epoch_end(self, loop):
        self._save_last(loop)

    def on_fit_end(self, loop):
        self._save_last(loop)

    def state_dict(self):
        return {"best": self.tracker.best, "last_saved": self.last_saved}

    def load_state_dict(self, state):
        self.tracker.best = _as_list(state["best"])
        self.last_saved = list(state["last_saved"])


class EarlyStopping(Callback):
    """Stop when the monitored metric has not improved by more than min_delta for
    `patience` validations in a row."""

    def __init__(self, monitor: str | list = "val/acc", mode: str = "max", patience: int = 5, min_delta: float = 0.0):
        self.tracker = _Monitor("callbacks.early_stopping", monitor, mode, min_delta)
        if patience < 1:
            raise ConfigError(f"callbacks.early_stopping.patience={patience} must be at least 1; or remove it with ~callbacks.early_stopping")
        self.patience = patience
        self.wait = 0

    def on_fit_start(self, loop):
        self.tracker.check(loop.task)

    def on_validation_end(self, loop, metrics):
        values = self.tracker.values(metrics)
        if values is None:
            return
        if self.tracker.improved(values):
            self.tracker.best, self.wait = values, 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            loop.state.should_stop = True
            loop.state.stop_reason = f"early stopping: no improvement on {self.tracker.describe()} for {self.wait} validations"

    def state_dict(self):
        return {"best": self.tracker.best, "wait": self.wait}

    def load_state_dict(self, state):
        self.tracker.best, self.wait = _as_list(state["best"]), state["wait"]


class LearningRateMonitor(Callback):
    """Records the learning rate of every parameter group after each optimizer step."""

    def on_step_end(self, loop):
        groups = loop.optimizer.param_groups
        rates = {"lr": groups[0]["lr"]}
        rates.update({f"lr/group{i}": group["lr"] for i, group in enumerate(groups) if i > 0})
        loop.log(rates)


class Progress(Callback):
    """A rich progress bar on a terminal; plain log lines otherwise (files, CI, Slurm).
    Prints a table of the final metrics at the end."""

    def __init__(self, refresh_per_second: float = 4.0):
        from runner.distributed import is_rank_zero

        self.silent = not is_rank_zero()  # under DDP only rank 0 reports
        self.refresh_per_second = refresh_per_second
        self.bar = None
        self.started = 0.0
        self.latest: dict[str, float] = {}

    def on_fit_start(self, loop):
        self.started = time.monotonic()
        if sys.stdout.isatty() and not self.silent:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn

            self.bar = Bar(
                TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TextColumn("{task.fields[summary]}"),
                refresh_per_second=self.refresh_per_second,
            )
            self.bar.start()
            self.task = self.bar.add_task("fit", total=loop.total_steps, completed=loop.state.step, epoch=loop.state.epoch, summary="")

    def on_log(self, loop, metrics):
        self.latest.update(metrics)

    def _summary(self) -> str:
        keys = ("train/loss", "val/loss", "val/acc", "lr")
        return "  ".join(f"{key} {self.latest[key]:.4g}" for key in keys if key in self.latest)

    def on_step_end(self, loop):
        if self.bar is not None:
            self.bar.update(self.task, completed=loop.state.step, epoch=loop.state.epoch, summary=self._summary())
        elif not self.silent and loop.log_every_n_steps and loop.state.step % loop.log_every_n_steps == 0:
            log.info("step %d/%d  %s", loop.state.step, loop.total_steps, self._summary())

    def on_epoch_end(self, loop):
        if self.bar is None and not self.silent:
            log.info("epoch %d  step %d  %s", loop.state.epoch, loop.state.step, self._summary())

    def on_fit_end(self, loop):
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
        if self.silent:
            return
        reason = f" ({loop.state.stop_reason})" if loop.state.stop_reason else ""
        log.info("fit ended after %d epochs, %d steps, %.2f s%s", loop.state.epoch, loop.state.step, time.monotonic() - self.started, reason)

    def on_test_end(self, loop, metrics):
        if self.silent:
            return
        from rich.console import Console
        from rich.table import Table

        table = Table(title="final metrics")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for key in sorted(metrics):
            table.add_row(key, f"{metrics[key]:.4f}")
        Console().print(table)
