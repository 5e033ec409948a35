"""The one callback system. The loop calls these events, in this order:

    on_fit_start
    for each epoch:
        on_epoch_start                                 before the epoch's loader is made
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
import os
import sys
import time

from runner.errors import ConfigError
from runner.joblog import FILE_ONLY


def check_metric_name(*args, **kwargs) -> str:
    # runner.metrics imports torch: only when a monitor is built, so that
    # modules needing just the Callback base (tracking, compare) stay light
    from runner.metrics import check_metric_name as check

    return check(*args, **kwargs)

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

    # after every other callback's handler of an event: last.pt holds their updated state
    runs_last = True

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
    """Records the learning rate of every parameter group, and whatever the scheduler reports
    in an optional ``metrics()`` method, on the steps the loop logs (every
    trainer.log_every_n_steps optimizer steps) and at every epoch end."""

    scheduler_metrics = None
    recorded_at = -1

    def on_fit_start(self, loop):
        self.scheduler_metrics = getattr(loop.parts.scheduler, "metrics", None)

    def on_step_end(self, loop):
        if loop.log_every_n_steps and loop.state.step % loop.log_every_n_steps == 0:
            self.record(loop)

    def on_epoch_end(self, loop):
        if self.recorded_at != loop.state.step:
            self.record(loop)

    def record(self, loop):
        self.recorded_at = loop.state.step
        groups = loop.optimizer.param_groups
        rates = {"lr": groups[0]["lr"]}
        rates.update({f"lr/group{i}": group["lr"] for i, group in enumerate(groups) if i > 0})
        if self.scheduler_metrics is not None:  # e.g. the phase of scheduler=phases
            rates.update(self.scheduler_metrics())
        loop.log(rates)


def figure(value: float) -> str:
    """A metric for people: 4 decimals, or 4 significant digits where those would show
    0.0000 (a PINN's relative error of 3.1e-05)."""
    return f"{value:.4f}" if value == 0 or abs(value) >= 1e-3 else f"{value:.3e}"


class Progress(Callback):
    """A rich progress bar on a terminal; plain log lines otherwise (files, CI, Slurm). The
    log file gets the per-step and per-epoch lines either way: with a bar they skip the
    terminal (the bar shows the same numbers), and other log lines are printed above the bar
    instead of through it. The end-of-run summary is printed last, after every other
    callback has finished (drift, export, the MLflow upload)."""

    runs_last = True  # its on_run_end comes after the other callbacks' (after ModelCheckpoint's)

    def __init__(self, refresh_per_second: float = 4.0):
        from runner.distributed import is_rank_zero

        self.silent = not is_rank_zero()  # under DDP only rank 0 reports
        self.refresh_per_second = refresh_per_second
        self.bar = None
        self._bar_context = None
        self.started = 0.0
        self.latest: dict[str, float] = {}
        self.tested: dict[str, float] | None = None

    def on_fit_start(self, loop):
        self.started = time.monotonic()
        self.tested = None
        if sys.stdout.isatty() and not self.silent:
            self._start_bar(loop)

    def _start_bar(self, loop) -> None:
        import contextlib

        from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn

        from runner.joblog import terminal_handlers, terminal_quiet

        self.bar = Bar(
            TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("{task.fields[summary]}"),
            refresh_per_second=self.refresh_per_second,
        )
        self._bar_context = contextlib.ExitStack()
        self._bar_context.enter_context(terminal_quiet())
        streams = {id(sys.stdout): "stdout", id(sys.stderr): "stderr"}
        handlers = [(handler, streams[id(handler.stream)]) for handler in terminal_handlers() if id(handler.stream) in streams]
        self.bar.start()  # from here on, what is written to sys.stdout/stderr is printed above the bar
        self._bar_context.callback(self.bar.stop)
        for handler, name in handlers:  # log handlers hold the streams of before: point them at the bar's
            before = handler.setStream(getattr(sys, name))
            if before is not None:  # None: rich did not redirect that stream
                self._bar_context.callback(handler.setStream, before)
        self.task = self.bar.add_task("fit", total=loop.total_steps, completed=loop.state.step, epoch=loop.state.epoch, summary="")

    def _stop_bar(self) -> None:
        if self.bar is not None:
            self.bar = None
            self._bar_context.close()  # streams back, the bar stopped, the terminal's handlers as before

    def on_log(self, loop, metrics):
        self.latest.update(metrics)

    def _summary(self) -> str:
        keys = ("train/loss", "val/loss", "val/acc", "val/rel_l2", "lr")
        return "  ".join(f"{key} {self.latest[key]:.4g}" for key in keys if key in self.latest)

    def on_step_end(self, loop):
        if self.silent:
            return
        if self.bar is not None:
            self.bar.update(self.task, completed=loop.state.step, epoch=loop.state.epoch, summary=self._summary())
        if loop.log_every_n_steps and loop.state.step % loop.log_every_n_steps == 0:
            log.info("step %d/%d  %s", loop.state.step, loop.total_steps, self._summary(), extra=FILE_ONLY)

    def on_epoch_end(self, loop):
        if not self.silent:
            log.info("epoch %d  step %d  %s", loop.state.epoch, loop.state.step, self._summary(), extra=FILE_ONLY)

    def on_fit_end(self, loop):
        self._stop_bar()
        if self.silent:
            return
        reason = f" ({loop.state.stop_reason})" if loop.state.stop_reason else ""
        log.info("fit ended after %d epochs, %d steps, %.2f s%s", loop.state.epoch, loop.state.step, time.monotonic() - self.started, reason)

    def on_test_end(self, loop, metrics):
        self.tested = dict(metrics)

    def on_run_end(self, loop, status, error):
        self._stop_bar()  # fit failed: the terminal gets its cursor back
        if self.silent or status != "FINISHED" or self.tested is None:
            return
        self.print_summary(loop, self.tested)

    def print_summary(self, loop, metrics: dict) -> None:
        """The end-of-run summary: the headline metrics of the best weights as a table that
        fits the terminal, then where the job's files and its MLflow run are, one per line
        and never wrapped, so a path or a URL can be copied whole."""
        from rich.console import Console

        Console().print(self.metrics_table(metrics))
        output_dir = loop.info["output_dir"]
        best = loop.checkpoint_dir / "best.pt"
        rows = [("output dir", str(output_dir)), ("best checkpoint", str(best) if best.is_file() else "none written"),
                ("all metrics", str(output_dir / "metrics.json"))]
        chosen = loop.info.get("threads")
        if chosen is not None and loop.device.type == "cpu":
            from runner.threads import busy_hint

            rows.append(("CPU threads", chosen.reason))
            hint = busy_hint(chosen)
            if hint:
                rows.append(("note", hint))
        rows += self._mlflow_rows(loop)  # last: the run page's link ends the output
        width = max(len(label) for label, _ in rows)
        for label, value in rows:
            print(f"{label.ljust(width)}  {value}")  # plain print: rich would fold a long path
        sys.stdout.flush()

    @staticmethod
    def metrics_table(metrics: dict):
        """One row per metric name, one column per split (test first), model size below."""
        from rich.table import Table

        metrics = {key: value for key, value in metrics.items() if isinstance(value, (int, float))}
        splits = [split for split in ("test", "val") if any(key.startswith(f"{split}/") for key in metrics)]
        names = sorted({key.split("/", 1)[1] for key in metrics if key.split("/", 1)[0] in splits})
        table = Table(title="final metrics (best weights)")
        table.add_column("metric")
        for split in splits:
            table.add_column(split, justify="right")
        for name in names:
            table.add_row(name, *(figure(metrics[f"{split}/{name}"]) if f"{split}/{name}" in metrics else "-" for split in splits))
        if "model/params" in metrics:
            table.add_section()
            table.add_row("parameters", f"{int(metrics['model/params']):,}", *([""] * (len(splits) - 1)))
        return table

    @staticmethod
    def _mlflow_rows(loop) -> list[tuple[str, str]]:
        """The job's MLflow run and the command that opens it, or why there is none."""
        from runner.schema import mask_url
        from runner.tracking import MLflowLogger, experiment_name, ui_rows

        logger = next((c for c in loop.callbacks.values() if isinstance(c, MLflowLogger)), None)
        if logger is None:
            choice = loop.info.get("choices", {}).get("logger")
            return [("MLflow", f"off (logger={choice})" if choice else "off (no MLflow logger)")]
        if logger.run_id is None:
            return [("MLflow", "not tracked (the store was unreachable; logger.required=false)")]
        uri = mask_url(logger.client.tracking_uri)  # printed and logged: never a password
        name = experiment_name(logger.experiment_name, loop.info.get("choices", {}))
        try:
            experiment_id = logger.client.get_run(logger.run_id).info.experiment_id
        except Exception as error:  # the summary never fails a finished run
            return [("MLflow run", f"{logger.run_id} (experiment '{name}')"), ("MLflow store", f"{uri} ({error})")]
        rows = [("MLflow run", f"{logger.run_id} (experiment '{name}', id {experiment_id})"), ("MLflow store", uri)]
        return rows + ui_rows(logger.client.tracking_uri, experiment_id, logger.run_id)


class EMA(Callback):
    """An exponential moving average of the weights, updated after every optimizer step:
    ema <- decay * ema + (1 - decay) * weights (buffers such as BatchNorm statistics are
    copied). Evaluation, best.pt and the final test use the averaged weights (through
    ``loop.eval_model``); the trained weights go on training. With ``warmup`` the decay
    ramps up as (1 + n) / (10 + n) over the first updates, so early averages are not
    dominated by the random initial weights."""

    def __init__(self, decay: float = 0.999, warmup: bool = True, every_n_steps: int = 1):
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"callbacks.ema.decay={decay} is out of range; use a value in (0, 1), e.g. 0.999")
        if every_n_steps < 1:
            raise ConfigError(f"callbacks.ema.every_n_steps={every_n_steps} must be at least 1")
        self.decay, self.warmup, self.every_n_steps = decay, warmup, every_n_steps
        self.updates = 0
        self.average = None
        self._pending: dict | None = None

    def on_fit_start(self, loop):
        import copy

        if self.average is None:
            self.average = copy.deepcopy(loop.model).eval().requires_grad_(False)
            if self._pending is not None:
                self.average.load_state_dict(self._pending)
                self._pending = None
        loop.eval_model = self.average
        self._pairs = (list(self.average.parameters()), list(loop.model.parameters()))
        self._buffers = (list(self.average.buffers()), list(loop.model.buffers()))

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    def on_step_end(self, loop):
        if loop.state.step % self.every_n_steps:
            return
        import torch

        with torch.no_grad():
            averaged, trained = self._pairs
            torch._foreach_lerp_(averaged, trained, 1.0 - self.current_decay())
            for mine, theirs in zip(*self._buffers):
                mine.copy_(theirs)
        self.updates += 1

    def state_dict(self):
        weights = self.average.state_dict() if self.average is not None else self._pending
        return {"updates": self.updates, "weights": weights}

    def load_state_dict(self, state):
        self.updates = state["updates"]
        if self.average is not None and state["weights"] is not None:
            self.average.load_state_dict(state["weights"])
        else:
            self._pending = state["weights"]


class ProgressiveResizing(Callback):
    """Train at a lower input resolution first and grow it by epoch (Howard's progressive
    resizing; FixRes-style evaluation at full size). ``schedule`` is a list of
    [first_epoch, scale] pairs, e.g. [[0, 0.5], [3, 0.75], [6, 1.0]]: training images (or
    spectrograms) are interpolated on the device to scale x their height and width.
    Evaluation always sees the full resolution, so the model must accept any size (cnn and
    resnet pool globally)."""

    modalities = ("image", "spectrogram")

    def __init__(self, schedule, mode: str = "bilinear"):
        pairs = [(int(epoch), float(scale)) for epoch, scale in schedule]
        if not pairs or any(not 0.0 < scale <= 4.0 for _, scale in pairs) or pairs != sorted(pairs):
            raise ConfigError(
                f"callbacks.progressive_resizing.schedule={[list(p) for p in pairs]} must be [epoch, scale] pairs "
                "sorted by epoch with scales in (0, 4], e.g. [[0,0.5],[3,1.0]]"
            )
        if mode not in ("bilinear", "bicubic", "nearest", "area"):
            raise ConfigError(f"callbacks.progressive_resizing.mode='{mode}' is not supported; use bilinear, bicubic, nearest or area")
        self.schedule, self.mode = pairs, mode
        self.scale, self.announced = 1.0, False

    def scale_at(self, epoch: int) -> float:
        scale = 1.0 if epoch < self.schedule[0][0] else self.schedule[0][1]
        for first, value in self.schedule:
            if epoch >= first:
                scale = value
        return scale

    def on_epoch_start(self, loop):
        scale = self.scale_at(loop.state.epoch)
        if scale != self.scale or not self.announced:
            self.announced = True
            log.info("progressive resizing: epoch %d trains at %.0f%% resolution", loop.state.epoch + 1, 100 * scale)
        self.scale = scale
        loop.log({"resize/scale": scale})

    def on_train_batch(self, loop, x, y):
        if self.scale == 1.0:
            return x, y
        import torch.nn.functional as F

        size = [max(1, round(side * self.scale)) for side in x.shape[-2:]]
        smooth = self.mode in ("bilinear", "bicubic")
        return F.interpolate(x, size=size, mode=self.mode, **({"align_corners": False, "antialias": self.scale < 1} if smooth else {})), y

    def state_dict(self):
        return {"scale": self.scale}

    def load_state_dict(self, state):
        self.scale = state["scale"]


class HardExampleMining(Callback):
    """Every ``every_n_epochs`` epochs, score the whole training split with the current
    model (eval mode, no augmentation) and sample the next epochs toward the hard examples.

    A sample is hard when the model gets it wrong or gives its class a probability below
    ``threshold``. Its sampling weight is the weight of its kind: ``positive_weight`` /
    ``negative_weight`` for easy samples of positive / negative classes (negative classes
    are listed in ``negative_classes``, e.g. the background class of a detector), and
    ``hard_positive_weight`` / ``hard_negative_weight`` for hard ones. The epoch's order is
    drawn with replacement in proportion to the weights (seeded, so resume is exact).
    Logs mining/hard, mining/hard_negatives and mining/hard_fraction."""

    tasks = ("classification",)

    def __init__(self, every_n_epochs: int = 1, threshold: float = 0.5, negative_classes=(),
                 positive_weight: float = 1.0, negative_weight: float = 1.0,
                 hard_positive_weight: float = 3.0, hard_negative_weight: float = 3.0, batch_size: int = 512):
        if every_n_epochs < 1:
            raise ConfigError(f"callbacks.hard_example_mining.every_n_epochs={every_n_epochs} must be at least 1")
        weights = (positive_weight, negative_weight, hard_positive_weight, hard_negative_weight)
        if min(weights) < 0 or max(weights) == 0:
            raise ConfigError(f"callbacks.hard_example_mining weights {list(weights)} must be non-negative and not all 0")
        self.every_n_epochs, self.threshold, self.batch_size = every_n_epochs, threshold, batch_size
        self.negative_classes = [int(c) for c in negative_classes]
        self.kind_weights = weights
        self.weights = None

    def on_fit_start(self, loop):
        if loop.task not in self.tasks:
            raise ConfigError(f"callbacks.hard_example_mining needs classification data, but the data is {loop.task}; remove it with ~callbacks.hard_example_mining")
        loop.parts.data.sample_weights = self.weights

    def on_epoch_start(self, loop):
        # at the start of the epoch whose order the weights decide (a resumed run passes the
        # same point with the same model); not on re-entering an epoch resumed mid-way
        epoch = loop.state.epoch
        if epoch > 0 and epoch % self.every_n_epochs == 0 and loop.state.batch_in_epoch == 0:
            self.weights, found = self.score(loop)
            loop.parts.data.sample_weights = self.weights
            loop.log(found)

    def score(self, loop):
        import torch
        from torch.utils.data import DataLoader

        model = loop.model
        was_training = model.training
        model.eval()
        correct_probability, wrong, labels = [], [], []
        with torch.no_grad():
            # in index order, decoded by the data's workers as in training; a private generator
            # keeps the global random stream (and so a resume) untouched
            data = loop.parts.data
            loader = DataLoader(data.train, batch_size=self.batch_size, num_workers=data.num_workers,
                                generator=torch.Generator().manual_seed(0))
            for x, y in loader:
                x, y = loop._to_device(x, y)
                with loop._autocast():
                    logits = model(x)
                probabilities = logits.float().softmax(dim=1)
                correct_probability.append(probabilities.gather(1, y.view(-1, 1)).squeeze(1))
                wrong.append(probabilities.argmax(dim=1) != y)
                labels.append(y)
        model.train(was_training)
        p_true, wrong, labels = torch.cat(correct_probability), torch.cat(wrong), torch.cat(labels)
        hard = wrong | (p_true < self.threshold)
        negative = torch.isin(labels, torch.tensor(self.negative_classes, device=labels.device, dtype=labels.dtype))
        easy_pos, easy_neg, hard_pos, hard_neg = self.kind_weights
        weights = torch.where(negative, torch.where(hard, hard_neg, easy_neg), torch.where(hard, hard_pos, easy_pos))
        count, count_negative = int(hard.sum()), int((hard & negative).sum())
        log.info("hard-example mining: %d of %d training samples are hard (%d negatives)", count, len(hard), count_negative)
        return weights.double().cpu(), {
            "mining/hard": float(count), "mining/hard_negatives": float(count_negative), "mining/hard_fraction": count / max(len(hard), 1),
        }

    def state_dict(self):
        return {"weights": self.weights}

    def load_state_dict(self, state):
        self.weights = state["weights"]


class Profiler(Callback):
    """Where the training time goes, measured from outside the loop (no timer in the loop):
    model forward pre/post hooks, optimizer step pre/post hooks, this callback's own events,
    and the other callbacks' handlers wrapped for the length of fit. The sections split the
    wall time from on_fit_start to on_fit_end:

        data        the next batch: loading and the copy to the device (step end -> on_train_batch)
        augment     augmentation (on_train_batch -> the model's training forward)
        forward     the model's training forward
        backward    the loss and backward (forward end -> optimizer step; with gradient
                    accumulation, -> the micro-batch's last parameter gradient)
        optimizer   optimizer.step
        validation  validation passes (without the callbacks they call)
        callbacks   every other callback's handlers, also listed one by one
        other       the rest of the loop: zeroing gradients, the scheduler, logging, ...

    At fit end it prints a table (rank 0) and logs ``profile/<section>_ms`` (milliseconds per
    optimizer step). On CUDA, kernels run asynchronously; with ``synchronize`` every section
    edge waits for the GPU (about eight torch.cuda.synchronize per step), so each section holds
    its own GPU time, at the price of the host no longer queueing work ahead of the GPU (a
    few percent on large models, more on small ones that were launch bound). synchronize=false
    measures host time only and adds no waits. ``trace_steps`` > 0 records a torch.profiler
    trace of that many steps after ``wait`` steps into <output_dir>/profiler/ (Chrome trace
    JSON, for chrome://tracing or ui.perfetto.dev) and hands it to the loggers as an artifact;
    traced steps run slower and the section times include that.
    """

    SECTIONS = ("data", "augment", "forward", "backward", "optimizer", "validation", "callbacks", "other")
    # events other callbacks handle during fit; their handlers are wrapped to be timed
    TIMED_EVENTS = ("on_epoch_start", "on_step_end", "on_validation_start", "on_validation_end", "on_epoch_end", "on_log")

    def __init__(self, trace_steps: int = 0, wait: int = 5, synchronize: bool = True):
        for key, value in (("trace_steps", trace_steps), ("wait", wait)):
            if value < 0:
                raise ConfigError(f"callbacks.profiler.{key}={value} is negative; use 0 or a number of steps")
        self.trace_steps, self.wait, self.synchronize = trace_steps, wait, synchronize
        self.totals: dict[str, float] = {}  # seconds per section; "callbacks/<name>" per callback
        self.counts: dict[str, int] = {}  # entries into forward, backward, optimizer
        self.steps, self.wall = 0, 0.0
        self.trace_path = None
        self._hooks: list = []
        self._trace = None
        self._batch_hooks = None
        self.current, self.mark = "other", 0.0
        self._cuda = None

    # ------------------------------------------------------------------ the clock
    def _now(self) -> float:
        if self._cuda is not None:
            import torch

            torch.cuda.synchronize(self._cuda)
        return time.perf_counter()

    def _switch(self, section: str, now: float | None = None) -> str:
        """Close the running section (at now) and open ``section``; returns the closed one."""
        now = self._now() if now is None else now
        self.totals[self.current] = self.totals.get(self.current, 0.0) + now - self.mark
        previous, self.current, self.mark = self.current, section, now
        return previous

    # ---------------------------------------------------------------------- hooks
    def _forward_start(self, module, args):
        if module.training and self.current == "augment":  # not validation, not a loss's own call
            self.counts["forward"] += 1
            self._switch("forward")

    def _forward_end(self, module, args, output):
        if self.current == "forward":
            self.counts["backward"] += 1
            self._switch("backward")

    def _gradient_done(self, parameter):
        self._gradient_time = time.perf_counter()

    def _optimizer_start(self, optimizer, args, kwargs):
        self.counts["optimizer"] += 1
        self._switch("optimizer")

    def _optimizer_end(self, optimizer, args, kwargs):
        if self.current == "optimizer":
            self._switch("other")

    def _timed(self, handler, section: str):
        def timed(*args):
            previous = self._switch(section)
            try:
                return handler(*args)
            finally:
                self._switch(previous)

        return timed

    # --------------------------------------------------------------------- events
    def on_fit_start(self, loop):
        self._cuda = loop.device if loop.device.type == "cuda" and self.synchronize else None
        self.totals = dict.fromkeys(self.SECTIONS, 0.0)
        self.counts = dict.fromkeys(("forward", "backward", "optimizer"), 0)
        self.first_step, self._gradient_time = loop.state.step, None
        self._hooks = [
            loop.model.register_forward_pre_hook(self._forward_start),
            loop.model.register_forward_hook(self._forward_end),
            loop.optimizer.register_step_pre_hook(self._optimizer_start),
            loop.optimizer.register_step_post_hook(self._optimizer_end),
        ]
        if loop.trainer.accumulate_grad_batches > 1:  # only then can a batch follow a backward
            self._hooks += [p.register_post_accumulate_grad_hook(self._gradient_done) for p in loop.model.parameters() if p.requires_grad]
        self._wrap_callbacks(loop)
        self._start_trace(loop)
        self.current, self.mark = "data", self._now()
        self.started = self.mark

    def _wrap_callbacks(self, loop) -> None:
        """Time the other callbacks by wrapping their handlers in the loop's dispatch lists
        (and the on_train_batch list fit() made before on_fit_start); undone at fit end."""
        names = {id(callback): name for name, callback in loop.callbacks.items()}

        def wrap(handlers):
            return [h if h.__self__ is self else self._timed(h, f"callbacks/{names.get(id(h.__self__), type(h.__self__).__name__)}") for h in handlers]

        for event in self.TIMED_EVENTS:
            loop._dispatch[event] = wrap(loop._handlers(event))
        self._batch_hooks = loop._batch_hooks
        loop._batch_hooks = wrap(self._batch_hooks)

    def on_train_batch(self, loop, x, y):
        if self.current == "backward" and self._gradient_time is not None:
            # accumulating: the last micro-batch's backward ended with its last gradient
            self._switch("data", self._gradient_time)
        self._gradient_time = None
        self._switch("augment")
        return x, y

    def on_step_end(self, loop):
        if self._trace is not None:
            self._trace.step()
        self._switch("data")

    def on_validation_start(self, loop):
        self._before_validation = self._switch("validation")

    def on_validation_end(self, loop, metrics):
        self._switch(self._before_validation)

    def on_fit_end(self, loop):
        self._switch("other")
        self.wall = self.mark - self.started
        self.steps = loop.state.step - self.first_step
        self._close(loop)
        loop.log(self.metrics())
        if loop.dist.rank == 0:
            from rich.console import Console

            Console().print(self.table())

    def on_run_end(self, loop, status, error):
        self._close(loop)  # fit failed before its end: no hooks or tracing left behind

    def _close(self, loop) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self._batch_hooks is not None:
            for event in self.TIMED_EVENTS:  # emit() lists the plain handlers again
                loop._dispatch.pop(event, None)
            loop._batch_hooks, self._batch_hooks = self._batch_hooks, None
        if self._trace is not None:
            self._trace.stop()  # writes a trace still recording
            self._trace = None

    # -------------------------------------------------------------------- tracing
    def _start_trace(self, loop) -> None:
        if not self.trace_steps:
            return
        from torch.profiler import ProfilerActivity, profile, schedule

        folder = loop.info["output_dir"] / "profiler"
        first = loop.state.step + self.wait + 1

        def write(profiler):
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"trace_rank{loop.dist.rank}_steps{first}-{loop.state.step}.json"
            profiler.export_chrome_trace(str(path))
            self.trace_path = path
            # loggers upload what callbacks list here (MLflowLogger: into this folder)
            loop.info.setdefault("artifacts", []).append((path, "profiler"))
            log.info("profiler trace of steps %d-%d: %s", first, loop.state.step, path)

        import torch

        # kineto, the profiler's engine, writes its own lines straight to stderr: a
        # "USDT: ... profiler_start"/"profiler_stop" pair around every trace, and on a CUDA
        # build of torch without a usable GPU "gpuGetDeviceCount failed with code 35" (it
        # enumerates GPUs whatever activities are asked for). What a trace holds is in its
        # file, so kineto's lines are off (6: above all its levels); it reads the variable
        # when it starts, and a value the user set wins (KINETO_LOG_LEVEL=4 shows its errors).
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")
        cuda = loop.device.type == "cuda" and torch.cuda.is_available()  # CUDA activity only where there is one
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        # one warm-up step (when wait allows) keeps the profiler's start-up out of the trace
        steps = schedule(wait=max(self.wait - 1, 0), warmup=min(self.wait, 1), active=self.trace_steps, repeat=1)
        self._trace = profile(activities=activities, schedule=steps, on_trace_ready=write)
        self._trace.start()

    # -------------------------------------------------------------------- results
    def sections(self) -> dict[str, float]:
        """Seconds per section; callbacks is the sum of the callbacks/<name> that follow it."""
        per_callback = dict(sorted((key, value) for key, value in self.totals.items() if key.startswith("callbacks/")))
        totals = {}
        for section in self.SECTIONS:
            if section == "callbacks":
                totals[section] = sum(per_callback.values())
                totals.update(per_callback)
            else:
                totals[section] = self.totals.get(section, 0.0)
        return totals

    def metrics(self) -> dict[str, float]:
        steps = max(self.steps, 1)
        metrics = {f"profile/{section}_ms": 1000.0 * total / steps for section, total in self.sections().items()}
        metrics["profile/step_ms"] = 1000.0 * self.wall / steps
        return metrics

    def table(self):
        from rich.table import Table

        steps = max(self.steps, 1)
        table = Table(title=f"profile: {self.steps} steps, {self.wall:.2f} s")
        for column in ("section", "total s", "ms/step", "share %"):
            table.add_column(column, justify="left" if column == "section" else "right")
        for section, total in self.sections().items():
            name = "  " + section.split("/", 1)[1] if section.startswith("callbacks/") else section
            share = 100.0 * total / self.wall if self.wall else 0.0
            table.add_row(name, f"{total:.3f}", f"{1000.0 * total / steps:.2f}", f"{share:.1f}")
        table.add_section()
        table.add_row("fit", f"{self.wall:.3f}", f"{1000.0 * self.wall / steps:.2f}", "100.0")
        return table


class TrainingCurves(Callback):
    """Records every logged metric with its optimizer step and, after the final test, draws
    training_curves.png in the output directory (losses, validation metrics, learning rate;
    runner.plots.training_curves_png) and lists it as an artifact. The series are kept
    across a resume, so the picture of a resumed run covers the whole run. Rank 0 draws."""

    def __init__(self, filename: str = "training_curves.png"):
        from runner.job_guard import relative_path

        self.filename = relative_path(filename, "callbacks.curves.filename")
        self.series: dict[str, dict[str, list]] = {}  # name -> {"steps": [...], "values": [...]}

    def on_log(self, loop, metrics):
        step = loop.state.step
        for name, value in metrics.items():
            if isinstance(value, (int, float)):
                entry = self.series.setdefault(name, {"steps": [], "values": []})
                entry["steps"].append(step)
                entry["values"].append(float(value))

    def on_test_end(self, loop, metrics):
        from runner.distributed import is_rank_zero
        from runner.plots import training_curves_png

        if not is_rank_zero():
            return
        series = {name: (entry["steps"], entry["values"]) for name, entry in self.series.items()}
        path = training_curves_png(series, loop.info["output_dir"] / self.filename)
        if path is not None:
            loop.info.setdefault("artifacts", []).append((path, None))

    def state_dict(self):
        return {"series": {name: {"steps": list(e["steps"]), "values": list(e["values"])} for name, e in self.series.items()}}

    def load_state_dict(self, state):
        self.series = {name: {"steps": list(e["steps"]), "values": list(e["values"])} for name, e in state.get("series", {}).items()}
