"""The one training loop. It knows nothing about the problem: model, loss, data,
augmentation and callbacks arrive built; it owns what every run needs and users get wrong
by hand (device, precision, accumulation, clipping, the scheduler, validation, resume)."""

import contextlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import OmegaConf
from torch import nn

from runner import checkpoint
from runner.callbacks import Callback
from runner.distributed import Dist, all_reduce_max, all_reduce_sum, gather_objects
from runner.data import DataModule
from runner.errors import Interrupted, NonFiniteLossError
from runner.losses import LossFn, bind_context
from runner.metrics import confusion_matrix, eval_metrics, hard_labels, observed
from runner.state import TrainState, rng_state, set_rng_state

log = logging.getLogger("runner")


@dataclass
class Parts:
    """Everything build() makes from the config."""

    data: DataModule
    model: nn.Module
    loss: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any = None
    scheduler_interval: str = "step"  # step, epoch or validation
    scheduler_monitor: str | None = None  # the metric a validation-stepped scheduler reads
    # training batches only, on the device: (x, y) -> (x, y)
    augmentation: Callable | None = None
    callbacks: dict[str, Callback] | None = None


class Loop:
    def __init__(self, parts: Parts, trainer: Any, device: torch.device, checkpoint_dir: Path, config: dict, dist: Dist = Dist()):
        # a plain dataclass, not a DictConfig: the loop reads these settings every step, and
        # OmegaConf attribute access costs microseconds each
        trainer = OmegaConf.to_object(trainer) if OmegaConf.is_config(trainer) else trainer
        self.parts, self.trainer, self.device, self.dist = parts, trainer, device, dist
        self.checkpoint_dir, self.config = checkpoint_dir, config
        self.model, self.loss, self.optimizer = parts.model, parts.loss, parts.optimizer
        # the loss as the loop calls it: (outputs, targets, inputs, model); a loss takes the
        # inputs or the model only if its forward names them (distillation, physics)
        self.compute_loss: LossFn = bind_context(parts.loss)
        self.callbacks = parts.callbacks or {}
        self.task = parts.data.task
        # weights that evaluation uses instead of the trained ones (a callback may set it,
        # e.g. an exponential moving average); checkpoints carry them as "eval_model"
        self.eval_model: nn.Module | None = None
        # facts about the job for callbacks (loggers): output_dir, overrides, group choices, ...
        self.info: dict[str, Any] = {"output_dir": checkpoint_dir.parent}
        self._dispatch: dict[str, list[Callable]] = {}
        self._samples: int | None = None  # training samples this epoch, kept by fit()
        self.stop_signal: int | None = None  # set by a SIGINT/SIGTERM handler (run.py)
        self.redeliver: int | None = None  # a signal to hand on once the run is closed (run.py)
        self._step_loss = torch.zeros((), device=device)
        self.state = TrainState(train_sums=torch.zeros(3, dtype=torch.float64, device=device))
        self.log_every_n_steps = trainer.log_every_n_steps
        self.channels_last = trainer.channels_last
        self.model.to(device)
        self.loss.to(device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        # wrappers share parameters with self.model; checkpoints always use self.model
        self.forward = self.model
        if dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            self.forward = DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None)
        if trainer.compile:
            self.forward = torch.compile(self.forward)
        self.scaler = torch.amp.GradScaler(device.type, enabled=trainer.precision == "16-mixed")
        self.pin_memory = device.type == "cuda"
        self._loaders: dict[tuple[str, int], Any] = {}  # made on first use, kept for the run
        self.batches_per_epoch, self.total_steps = plan(parts.data, trainer, dist.world_size)

    # ----------------------------------------------------------------- the loop
    def fit(self) -> None:
        # views into state.train_sums (made once: indexing per step costs more than the adds)
        self._sums = self.state.train_sums.unbind(0)
        self._samples = int(self.state.train_sums[2])
        self._classification = self.task == "classification"
        self._batch_hooks = self._handlers("on_train_batch")
        self.emit("on_fit_start")
        while not self._done():
            # before the loader is made: a callback may change what it samples (mining)
            self.emit("on_epoch_start")
            # overfitting: epoch 0's order every epoch, so its first batches are the same ones
            order = 0 if self.trainer.overfit_batches > 0 else self.state.epoch
            loader = self._loader("train", epoch=order, start_batch=self.state.batch_in_epoch)
            self.model.train()
            for x, y in loader:
                self._train_batch(x, y)
                if self._done():
                    break
            else:
                self._end_epoch()
        self.emit("on_fit_end")

    def _train_batch(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = self._to_device(x, y)
        for hook in self._batch_hooks:  # callbacks that change training inputs (resizing)
            x, y = hook(self, x, y)
        if self.parts.augmentation is not None:
            x, y = self.parts.augmentation(x, y)
        with self._autocast():
            logits = self.forward(x)
            loss = self.compute_loss(logits, y, x, self.model)
        self.state.batch_in_epoch += 1
        detached = loss.detach()
        if self._finite(detached):
            accumulate = self.trainer.accumulate_grad_batches
            self.scaler.scale(loss / accumulate if accumulate > 1 else loss).backward()
            self._step_loss = detached
            with torch.no_grad():  # running sums stay on the device: no sync per step
                loss_sum, correct, _ = self._sums
                loss_sum.add_(detached, alpha=len(y))
                if self._classification:
                    correct.add_((logits.argmax(dim=1) == hard_labels(y)).sum())
            self._samples += len(y)  # a Python count: one tensor op fewer per step
        if self.state.batch_in_epoch % self.trainer.accumulate_grad_batches == 0 or self.state.batch_in_epoch == self.batches_per_epoch:
            self._optimizer_step()
            self.state.step += 1
            self._step_scheduler("step")
            if self.log_every_n_steps and self.state.step % self.log_every_n_steps == 0:
                self.log({"train/step_loss": self._step_loss.item()})
            if self.trainer.val_check_interval and self.state.step % self.trainer.val_check_interval == 0:
                self.validate()
            self.emit("on_step_end")
            if self._stop_requested():
                # the step is whole: save it, then stop (run.py marks the run KILLED)
                self.save_checkpoint("last.pt")
                raise Interrupted(self.stop_signal, self.state.step)

    def _optimizer_step(self) -> None:
        if self.trainer.gradient_clip_val > 0:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not scaled ones
            parameters = self.model.parameters()
            if self.trainer.gradient_clip_algorithm == "norm":
                torch.nn.utils.clip_grad_norm_(parameters, self.trainer.gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_value_(parameters, self.trainer.gradient_clip_val)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def _end_epoch(self) -> None:
        if not self.trainer.val_check_interval:
            self.validate()
        self.state.train_sums[2] = self._samples
        sums = all_reduce_sum(self.state.train_sums.clone(), self.dist)
        loss_sum, correct, samples = sums.tolist()  # one host sync per epoch
        if samples:
            self.log({"train/loss": loss_sum / samples} | ({"train/acc": correct / samples} if self.task == "classification" else {}))
        self._step_scheduler("epoch")
        self.state.epoch += 1
        self.state.batch_in_epoch = 0
        self.state.train_sums.zero_()
        self._samples = 0
        self.log({"epoch": float(self.state.epoch)})
        self.emit("on_epoch_end")

    def _stop_requested(self) -> bool:
        """A signal reached this process, or under DDP any rank: all stop at the same step."""
        if not self.dist.enabled:
            return self.stop_signal is not None
        flag = torch.tensor([float(self.stop_signal or 0)], device=self.device)
        signum = int(all_reduce_max(flag, self.dist).item())  # one small collective per step
        if signum and self.stop_signal is None:
            self.stop_signal = signum
        return bool(signum)

    def _done(self) -> bool:
        state, trainer = self.state, self.trainer
        return (
            state.should_stop
            or state.epoch >= trainer.max_epochs
            or (trainer.max_steps > 0 and state.step >= trainer.max_steps)
        )

    def _finite(self, loss: torch.Tensor) -> bool:
        # a host-device sync per batch: the price of naming the step that went wrong. Under
        # DDP every rank must agree (one rank skipping backward would hang the others).
        if not self.dist.enabled:
            finite = math.isfinite(loss.item())  # on CPU .item() is cheaper than an isfinite op
        else:
            finite = not bool(all_reduce_max((~torch.isfinite(loss)).to(torch.float32).reshape(1), self.dist))
        if finite:
            return True
        where = f"step {self.state.step + 1} (epoch {self.state.epoch + 1}, batch {self.state.batch_in_epoch})"
        if self.trainer.nonfinite_loss == "skip":
            self.state.skipped_batches += 1
            log.warning("train/loss is %s at %s; batch skipped (trainer.nonfinite_loss=skip)", loss.item(), where)
            return False
        raise NonFiniteLossError(
            f"train/loss became {loss.item()} at {where}; lower optimizer.lr, set "
            "trainer.gradient_clip_val, or pass trainer.nonfinite_loss=skip to skip such batches"
        )

    # ----------------------------------------------------------- the scheduler
    def _step_scheduler(self, event: str, metrics: dict[str, float] | None = None) -> None:
        """The one place the scheduler is stepped: on its configured interval."""
        scheduler = self.parts.scheduler
        if scheduler is None or event != self.parts.scheduler_interval:
            return
        if event == "validation":
            scheduler.step(metrics[self.parts.scheduler_monitor])
        else:
            scheduler.step()

    # -------------------------------------------------------------- evaluation
    def validate(self) -> dict[str, float]:
        self.emit("on_validation_start")
        metrics = self.evaluate("val", limit=self.trainer.limit_val_batches)
        self.log(metrics)
        self._step_scheduler("validation", metrics)
        self.emit("on_validation_end", metrics)
        return metrics

    @torch.no_grad()
    def evaluate(self, split: str, limit: int = -1, with_confusion: bool = False) -> dict[str, Any]:
        model = self.eval_model if self.eval_model is not None else self.model
        forward = self.eval_model if self.eval_model is not None else self.forward
        was_training = model.training
        model.eval()
        classification = self.task == "classification"
        collection = eval_metrics(self.parts.data.num_classes, self.task).to(self.device)
        with_confusion = with_confusion and classification
        confusion = confusion_matrix(self.parts.data.num_classes).to(self.device) if with_confusion else None
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        samples = 0
        for x, y in self._loader(split, limit=limit):
            x, y = self._to_device(x, y)
            with self._autocast():
                logits = forward(x)
                loss = self.compute_loss(logits, y, x, model)
            loss_sum += loss.double() * len(y)
            samples += len(y)
            if classification:
                labels = hard_labels(y)
                collection.update(logits.float(), labels)
                if with_confusion:
                    confusion.update(logits.float(), labels)
            else:
                collection.update(*observed(logits, y))
        model.train(was_training)
        # the metrics sum their counts over ranks in compute(); the loss we sum ourselves
        metrics = {f"{split}/{name}": float(value) for name, value in collection.compute().items()}
        totals = all_reduce_sum(torch.stack([loss_sum, torch.tensor(float(samples), dtype=torch.float64, device=self.device)]), self.dist)
        metrics[f"{split}/loss"] = float(totals[0]) / max(float(totals[1]), 1.0)
        if with_confusion:
            metrics["confusion_matrix"] = confusion.compute().cpu().tolist()
        return metrics

    # ----------------------------------------------------------------- helpers
    def _loader(self, split: str, epoch: int = 0, start_batch: int = 0, limit: int | None = None):
        """One DataLoader per split (and batch limit) for the whole run: its workers start once
        and persist across epochs and validations; only the sampler's epoch, start position
        and (for training) sample weights change between uses."""
        if limit is None:
            limit = train_batch_limit(self.trainer) if split == "train" else self.trainer.limit_val_batches
        loader = self._loaders.get((split, limit))
        if loader is None:
            loader = self._loaders[(split, limit)] = self.parts.data.loader(
                split, seed=self.trainer.seed, limit=limit, pin_memory=self.pin_memory,
                rank=self.dist.rank, world_size=self.dist.world_size,
            )
        self.parts.data.start(loader, split, epoch, start_batch)
        return loader

    def _to_device(self, x: torch.Tensor, y: torch.Tensor):
        # non_blocking overlaps the copy with compute when the source is pinned (CUDA)
        if x.device != self.device:
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y

    def _autocast(self):
        precision = self.trainer.precision
        if precision == "32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _handlers(self, event: str) -> list[Callable]:
        """The bound methods of the callbacks that define this event (not the no-op base)."""
        base = getattr(Callback, event)
        ordered = sorted(self.callbacks.values(), key=lambda c: getattr(c, "runs_last", False))
        return [getattr(c, event) for c in ordered if getattr(type(c), event, base) is not base]

    def emit(self, event: str, *args: Any) -> None:
        handlers = self._dispatch.get(event)
        if handlers is None:  # made once per event: most callbacks skip most events
            handlers = self._dispatch[event] = self._handlers(event)
        for handler in handlers:
            handler(self, *args)

    def log(self, metrics: dict[str, float]) -> None:
        """Record metrics at the current step and hand them to every callback (loggers too)."""
        self.state.metrics.update(metrics)
        self.emit("on_log", metrics)

    # ------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        scheduler = self.parts.scheduler
        if self._samples is not None:  # the sample count lives in a Python int during fit
            self.state.train_sums[2] = self._samples
        return {
            "format": checkpoint.FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "scaler": self.scaler.state_dict(),
            "state": self.state.state_dict(),
            "eval_model": self.eval_model.state_dict() if self.eval_model is not None else None,
            "callbacks": {name: callback.state_dict() for name, callback in self.callbacks.items()},
            "rng": rng_state(),
            # every rank's streams, so a resumed DDP run continues each of them
            "rng_ranks": gather_objects(rng_state(), self.dist) if self.dist.enabled else [],
            # the resolved config travels with the weights (and lets a resume spot changes)
            "config": self.config,
            "config_hash": checkpoint.config_hash(self.config),
        }

    def load_weights(self, payload: dict) -> None:
        """The trained weights, and the evaluation weights when both sides have them."""
        self.model.load_state_dict(payload["model"])
        if self.eval_model is not None and payload.get("eval_model") is not None:
            self.eval_model.load_state_dict(payload["eval_model"])

    def load_state_dict(self, payload: dict) -> None:
        self.load_weights(payload)
        self.optimizer.load_state_dict(payload["optimizer"])
        if self.parts.scheduler is not None and payload["scheduler"] is not None:
            self.parts.scheduler.load_state_dict(payload["scheduler"])
        if payload["scaler"]:
            self.scaler.load_state_dict(payload["scaler"])
        self.state.load_state_dict(payload["state"])
        for name, callback in self.callbacks.items():
            if name in payload["callbacks"]:
                callback.load_state_dict(payload["callbacks"][name])
        ranks = payload.get("rng_ranks") or []
        if ranks and len(ranks) != self.dist.world_size:
            log.warning("checkpoint has random streams of %d ranks, this run has %d: streams will differ", len(ranks), self.dist.world_size)
        own = ranks[self.dist.rank] if len(ranks) > self.dist.rank else payload["rng"]
        set_rng_state(own)  # last: nothing above may draw from the restored streams

    def save_checkpoint(self, name: str) -> Path:
        """Every rank calls this at the same point (it gathers random states); rank 0 writes."""
        path = self.checkpoint_dir / name
        payload = self.state_dict()
        if self.dist.rank == 0:
            checkpoint.save(payload, path)
        return path


def plan(data: DataModule, trainer: Any, world_size: int = 1) -> tuple[int, int]:
    """Micro-batches per epoch (per rank) and optimizer steps in the whole run (schedulers need it)."""
    batches = data.batches_per_epoch(train_batch_limit(trainer), world_size)
    steps = math.ceil(batches / trainer.accumulate_grad_batches) * trainer.max_epochs
    return batches, (min(steps, trainer.max_steps) if trainer.max_steps > 0 else steps)


def train_batch_limit(trainer: Any) -> int:
    """Training batches per epoch the settings allow: overfit_batches when set, else
    limit_train_batches (-1: all)."""
    return trainer.overfit_batches if trainer.overfit_batches > 0 else trainer.limit_train_batches
