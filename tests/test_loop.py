"""The loop: exact hook counts, learning, precision, accumulation, the NaN guard."""

import math
from collections import Counter

import pytest
import torch

from runner.build import build
from runner.callbacks import Callback
from runner.errors import NonFiniteLossError
from runner.loop import Loop
from runner.run import resolved, run
from runner.state import seed_everything

EVENTS = ("on_fit_start", "on_epoch_start", "on_step_end", "on_validation_start", "on_validation_end", "on_epoch_end", "on_fit_end", "on_test_end")


def _counter(name):
    def event(self, loop, *args):
        self.calls.update([name])
    return event


class Recorder(Callback):
    """Counts every event and keeps every logged metric with its step."""

    def __init__(self):
        self.calls = Counter()
        self.logged: list[tuple[int, dict]] = []

    def on_train_batch(self, loop, x, y):
        self.calls.update(["on_train_batch"])
        return x, y

    locals().update({name: _counter(name) for name in EVENTS})

    def on_log(self, loop, metrics):
        self.logged.append((loop.state.step, dict(metrics)))

    def series(self, key):
        return [metrics[key] for _, metrics in self.logged if key in metrics]


def make_loop(cfg, tmp_path, loss=None, **callbacks):
    seed_everything(cfg.trainer.seed, cfg.trainer.deterministic)
    parts = build(cfg)
    parts.callbacks.update(callbacks)
    if loss is not None:
        parts.loss = loss
    return Loop(parts, cfg.trainer, torch.device("cpu"), tmp_path / "checkpoints", resolved(cfg))


@pytest.mark.parametrize(
    "overrides,steps,validations",
    [
        ([], 10, 2),  # 5 batches a epoch, 2 epochs, validation per epoch
        (["trainer.accumulate_grad_batches=2"], 6, 2),  # steps of 2+2+1 batches
        (["trainer.val_check_interval=3"], 10, 3),  # validate at steps 3, 6, 9
    ],
)
def test_hooks_are_called_exactly(cfg, tmp_path, overrides, steps, validations):
    recorder = Recorder()
    config = cfg("trainer.limit_train_batches=5", "callbacks=none", *overrides)
    loop = make_loop(config, tmp_path, recorder=recorder)
    loop.fit()
    from runner.run import test

    test(loop)
    assert recorder.calls == Counter(
        on_fit_start=1, on_epoch_start=2, on_train_batch=10, on_step_end=steps, on_validation_start=validations,
        on_validation_end=validations, on_epoch_end=2, on_fit_end=1, on_test_end=1,
    )
    assert loop.state.step == steps and loop.state.epoch == 2


def test_loss_falls_and_accuracy_rises_on_synthetic(cfg, tmp_path):
    recorder = Recorder()
    config = cfg("model=mlp", "trainer.max_epochs=6", "data.num_samples=512", "callbacks=none", "optimizer.lr=0.003")
    loop = make_loop(config, tmp_path, recorder=recorder)
    loop.fit()
    losses, accuracies = recorder.series("train/loss"), recorder.series("val/acc")
    assert loop.state.step == 6 * math.ceil(358 / 32)  # 42 steps: "a few dozen"
    assert losses[-1] < 0.6 * losses[0]
    assert accuracies[-1] > accuracies[0] + 0.15 and accuracies[-1] > 0.6


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_trains_on_cpu(cfg, tmp_path, precision):
    recorder = Recorder()
    config = cfg("model=mlp", f"trainer.precision={precision}", "trainer.max_epochs=4", "callbacks=none", "optimizer.lr=0.003")
    loop = make_loop(config, tmp_path, recorder=recorder)
    assert loop.scaler.is_enabled() == (precision == "16-mixed")
    with loop._autocast():
        assert loop.forward(torch.zeros(2, 1, 8, 8)).dtype == (torch.bfloat16 if precision == "bf16-mixed" else torch.float16)
    loop.fit()
    losses = recorder.series("train/loss")
    assert all(math.isfinite(value) for value in losses) and losses[-1] < losses[0]


def test_gradient_accumulation_equals_the_larger_batch(cfg, tmp_path):
    common = ["model=mlp", "model.dropout=0", "optimizer=sgd", "optimizer.momentum=0", "optimizer.nesterov=false", "trainer.max_epochs=1", "callbacks=none", "trainer.limit_train_batches=4"]
    big = make_loop(cfg(*common, "data.batch_size=32"), tmp_path)
    small = make_loop(cfg(*common, "data.batch_size=16", "trainer.accumulate_grad_batches=2", "trainer.limit_train_batches=8"), tmp_path)
    big.fit()
    small.fit()
    assert big.state.step == small.state.step == 4
    for a, b in zip(big.model.parameters(), small.model.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


class NaNAtBatch(torch.nn.Module):
    """Cross entropy that returns NaN on the n-th call."""

    def __init__(self, n):
        super().__init__()
        self.n, self.calls = n, 0

    def forward(self, logits, target):
        self.calls += 1
        loss = torch.nn.functional.cross_entropy(logits, target)
        return loss * float("nan") if self.calls == self.n else loss


def test_nonfinite_loss_stops_with_the_step_named(cfg, tmp_path):
    loop = make_loop(cfg("callbacks=none"), tmp_path, loss=NaNAtBatch(4))
    with pytest.raises(NonFiniteLossError, match=r"train/loss became nan at step 4 \(epoch 1, batch 4\); lower optimizer.lr"):
        loop.fit()


def test_nonfinite_loss_can_skip_the_batch(cfg, tmp_path):
    loop = make_loop(cfg("callbacks=none", "trainer.nonfinite_loss=skip"), tmp_path, loss=NaNAtBatch(4))
    loop.fit()
    assert loop.state.skipped_batches == 1
    assert all(torch.isfinite(p).all() for p in loop.model.parameters())


def test_early_stopping_sets_the_stop_flag(cfg, tmp_path):
    config = cfg("trainer.max_epochs=30", "callbacks.early_stopping.patience=1", "callbacks.early_stopping.min_delta=0.5")
    result = run(config, output_dir=tmp_path)
    # no validation can improve val/acc by 0.5 after the first: stops after epoch 2
    assert result.metrics["train/loss"] > 0
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["state"]
    assert state["epoch"] == 2 and state["should_stop"]
    assert "early stopping: no improvement on val/acc" in state["stop_reason"]


class _PidRecorder(torch.utils.data.Dataset):
    """Wraps a split and leaves a file named after each process that loads a sample of it."""

    def __init__(self, dataset, folder):
        self.dataset, self.folder = dataset, folder

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        import os

        (self.folder / str(os.getpid())).touch()
        return self.dataset[index]


def test_one_loader_per_split_keeps_its_workers_for_the_whole_run(cfg, tmp_path):
    """3 epochs and 3 validations with 2 workers each: 2 training and 2 validation worker
    processes in all (a loader made per epoch would start 12)."""
    config = cfg("trainer.max_epochs=3", "data.num_workers=2", "callbacks=none", "trainer.limit_train_batches=3")
    loop = make_loop(config, tmp_path)
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
        setattr(loop.parts.data, split, _PidRecorder(getattr(loop.parts.data, split), tmp_path / split))
    loop.fit()
    assert loop.state.epoch == 3
    train_workers, val_workers = ({path.name for path in (tmp_path / split).iterdir()} for split in ("train", "val"))
    assert len(train_workers) == 2 and len(val_workers) == 2, (train_workers, val_workers)
    assert not train_workers & val_workers and str(__import__("os").getpid()) not in train_workers


class BatchRecorder(Callback):
    """Keeps the training inputs each epoch sees, batch by batch."""

    def __init__(self):
        self.epochs: dict[int, list[torch.Tensor]] = {}

    def on_train_batch(self, loop, x, y):
        self.epochs.setdefault(loop.state.epoch, []).append(x.clone())
        return x, y


def _same_batches(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_overfit_batches_trains_on_the_same_batches_every_epoch(cfg, tmp_path):
    overfit, limited = BatchRecorder(), BatchRecorder()
    make_loop(cfg("trainer.max_epochs=3", "callbacks=none", "trainer.overfit_batches=2"), tmp_path, recorder=overfit).fit()
    make_loop(cfg("trainer.max_epochs=3", "callbacks=none", "trainer.limit_train_batches=2"), tmp_path, recorder=limited).fit()
    assert sorted(overfit.epochs) == [0, 1, 2] and all(len(batches) == 2 for batches in overfit.epochs.values())
    assert _same_batches(overfit.epochs[0], overfit.epochs[1]) and _same_batches(overfit.epochs[0], overfit.epochs[2])
    # limit_train_batches takes the first 2 batches of each epoch's new order: other samples
    assert not _same_batches(limited.epochs[0], limited.epochs[1])
    assert _same_batches(overfit.epochs[0], limited.epochs[0])  # epoch 0's order, shuffled as usual


def test_debug_overfit_drives_train_loss_towards_zero(cfg, tmp_path):
    recorder = Recorder()
    config = cfg("debug=overfit", "model=mlp", "callbacks=none", "trainer.max_epochs=60")
    assert config.trainer.overfit_batches == 2 and config.trainer.limit_train_batches == -1
    loop = make_loop(config, tmp_path, recorder=recorder)
    loop.fit()
    losses = recorder.series("train/loss")
    assert loop.state.step == 120 and len(losses) == 60
    assert losses[-1] < 0.05 < losses[0], (losses[0], losses[-1])


def test_overfit_batches_resume_is_bit_identical(cfg, tmp_path):
    common = ["model=mlp", "callbacks=none", "trainer.overfit_batches=2", "trainer.deterministic=true"]
    straight = make_loop(cfg(*common, "trainer.max_epochs=4"), tmp_path / "straight")
    straight.fit()
    first = make_loop(cfg(*common, "trainer.max_epochs=2"), tmp_path / "first")
    first.fit()
    saved = first.state_dict()  # now: the random streams as the first run left them
    resumed = make_loop(cfg(*common, "trainer.max_epochs=4"), tmp_path / "resumed")
    resumed.load_state_dict(saved)
    resumed.fit()
    assert resumed.state.step == straight.state.step == 8
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
