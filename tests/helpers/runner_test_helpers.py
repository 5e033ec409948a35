"""Code the CLI tests load into a runner subprocess through _target_ (PYTHONPATH=tests/helpers)."""

import os
import signal

from torch import nn

from runner.callbacks import Callback


class KillAtStep(Callback):
    """SIGKILL this process at the end of optimizer step `step` (after the checkpoint
    callback has had its turn): a crash no handler can soften."""

    runs_last = True  # after ModelCheckpoint (also runs_last, and listed before it)

    def __init__(self, step: int, flush_logger: bool = False):
        self.step, self.flush_logger = step, flush_logger

    def on_step_end(self, loop):
        if loop.state.step == self.step:
            if self.flush_logger:  # metrics past the last checkpoint reach the store first
                loop.callbacks["logger"].sender.send()
            os.kill(os.getpid(), signal.SIGKILL)


class TinyNet(nn.Module):
    """A user's own model, built by model._target_=runner_test_helpers.TinyNet."""

    def __init__(self, input_shape, num_classes, width: int = 16):
        super().__init__()
        size = 1
        for dim in input_shape:
            size *= dim
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(size, width), nn.ReLU(), nn.Linear(width, num_classes))

    def forward(self, x):
        return self.net(x)


class RaiseAtStep(Callback):
    """Fail the job at the end of optimizer step `step`, as a bug in user code would."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, loop):
        if loop.state.step == self.step:
            raise RuntimeError(f"boom at step {self.step}")


class SignalAtStep(Callback):
    """Send this process a real signal (default SIGTERM) at the end of step `step`, once."""

    def __init__(self, step: int, signum: int = int(signal.SIGTERM)):
        self.step, self.signum = step, signum

    def on_step_end(self, loop):
        if loop.state.step == self.step:
            os.kill(os.getpid(), self.signum)


class SleepPerStep(Callback):
    """Slow a tiny job down so a test can signal it while it trains."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_step_end(self, loop):
        import time

        time.sleep(self.seconds)


class KillOnce(KillAtStep):
    """KillAtStep the first time only: it leaves `marker` behind, and a rerun trains on."""

    def __init__(self, step: int, marker: str):
        super().__init__(step)
        self.marker = marker

    def on_step_end(self, loop):
        if loop.state.step == self.step and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            super().on_step_end(loop)


class SaveInitialWeights(Callback):
    """Save the model's weights as fit starts (once: a resumed run keeps the first file)."""

    def __init__(self, path: str):
        self.path = path

    def on_fit_start(self, loop):
        import torch

        if not os.path.exists(self.path):
            torch.save(loop.model.state_dict(), self.path)
