"""Code the CLI tests load into a runner subprocess through _target_ (PYTHONPATH=tests/helpers)."""

import os
import signal

from torch import nn
from torch.utils.data import Dataset

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


# ---------------------------------------------------------------- fault injection
# Used by tests/test_faults.py. The killers act once: each leaves `marker` behind, so the
# same command run again (the resume) trains on.


def _kill_once(marker: str) -> None:
    open(marker, "w").close()
    os.kill(os.getpid(), signal.SIGKILL)


class KillAtReplace(Callback):
    """SIGKILL this process inside runner.checkpoint.save, on the `nth` rename of a fully
    written and fsynced temporary file onto `name`: the previous file has already been moved
    aside to <name>.prev, the new one is not in place yet. Wraps the real os.replace that
    save calls; every other rename goes through untouched."""

    def __init__(self, nth: int, marker: str, name: str = "last.pt"):
        self.nth, self.marker, self.name = nth, marker, name
        self.seen = 0

    def on_fit_start(self, loop):
        if os.path.exists(self.marker):
            return
        real_replace = os.replace

        def replace(source, destination, *args, **kwargs):
            if os.path.basename(os.fspath(source)) == f".{self.name}.tmp":
                self.seen += 1
                if self.seen == self.nth:
                    _kill_once(self.marker)
            return real_replace(source, destination, *args, **kwargs)

        os.replace = replace


class KillDuring(Callback):
    """SIGKILL this process once, at one point of the run:
    - point=epoch_end: right after the checkpoint callback saved epoch `at`'s last.pt;
    - point=validation: inside the `at`-th validation, in the model's first eval-mode forward;
    - point=test: inside the final test of the best weights (after fit), first eval forward."""

    runs_last = True  # after ModelCheckpoint, which is listed before it

    def __init__(self, point: str, marker: str, at: int = 1):
        assert point in ("epoch_end", "validation", "test"), point
        self.point, self.marker, self.at = point, marker, at
        self.validations = 0
        self.phase = "train"

    def on_fit_start(self, loop):
        if self.point in ("validation", "test"):
            loop.model.register_forward_hook(self._forward)

    def _forward(self, module, args, output):
        armed = (self.point == "validation" and self.phase == "validation" and self.validations == self.at) or (
            self.point == "test" and self.phase == "test"
        )
        if armed and not module.training and not os.path.exists(self.marker):
            _kill_once(self.marker)

    def on_validation_start(self, loop):
        self.validations += 1
        self.phase = "validation"

    def on_validation_end(self, loop, metrics):
        self.phase = "train"

    def on_epoch_end(self, loop):
        if self.point == "epoch_end" and loop.state.epoch == self.at and not os.path.exists(self.marker):
            _kill_once(self.marker)

    def on_fit_end(self, loop):
        self.phase = "test"


class PoisonAtStep(Callback):
    """A NaN in the inputs of the batch that makes optimizer step `step`: its loss is NaN."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch(self, loop, x, y):
        if loop.state.step + 1 == self.step:
            x = x.clone()
            x.view(len(x), -1)[:, 0] = float("nan")
        return x, y


class KillServerAtStep(Callback):
    """At the end of step `step`, SIGKILL the process group named by $RUNNER_TEST_SERVER_PGID
    (the tracking server the test started in its own session) and wait until the logger's
    tracking URI refuses connections."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, loop):
        if loop.state.step != self.step:
            return
        import time
        import urllib.request

        os.killpg(int(os.environ["RUNNER_TEST_SERVER_PGID"]), signal.SIGKILL)
        health = loop.callbacks["logger"].client.tracking_uri.rstrip("/") + "/health"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(health, timeout=1).close()
            except OSError:
                return
            time.sleep(0.05)
        raise RuntimeError(f"{health} still answers after SIGKILL")


class BallastFromStep(Callback):
    """From step `step` on, this callback's state (saved in every checkpoint) carries
    `megabytes` of zeros: later checkpoints outgrow a file-size limit the test set."""

    def __init__(self, step: int, megabytes: float):
        self.step, self.megabytes = step, megabytes
        self.active = False

    def on_step_end(self, loop):
        self.active = loop.state.step >= self.step

    def state_dict(self):
        import torch

        return {"ballast": torch.zeros(int(self.megabytes * 2**20), dtype=torch.uint8)} if self.active else {}


class FreezeDirAtStep(Callback):
    """At the end of step `step`, make the checkpoint directory immutable (chattr +i): no file
    can be created, renamed or removed in it, not even by root. The test undoes it."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, loop):
        if loop.state.step == self.step:
            import subprocess

            subprocess.run(["chattr", "+i", str(loop.checkpoint_dir)], check=True)


class StartTogether(Callback):
    """Hold this job while its callbacks are built until `count` jobs have got that far (each
    leaves a file in `directory`): the logger opens the tracking store in on_fit_start, soon
    after, so the jobs reach the store at the same moment, not spread out by their imports.
    With tracking_uri, MLflow's client is loaded and has talked to that store once before the
    wait (nothing is created there), so that little is left to do between the wait and the store."""

    def __init__(self, directory: str, count: int, tracking_uri: str | None = None, timeout_s: float = 240.0):
        import time

        if tracking_uri:
            from mlflow.tracking import MlflowClient

            MlflowClient(tracking_uri).search_experiments(max_results=1)
        os.makedirs(directory, exist_ok=True)
        open(os.path.join(directory, str(os.getpid())), "w").close()
        deadline = time.monotonic() + timeout_s
        while len(os.listdir(directory)) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(os.listdir(directory))} of {count} jobs started")
            time.sleep(0.005)


class RandomFlipNoise(nn.Module):
    """A user's random per-sample image transform (as a torchvision v2 one would be): a
    horizontal flip with probability 1/2 and a little noise, from torch's global RNG."""

    def forward(self, x):
        import torch

        if torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x + 0.05 * torch.randn_like(x)


class Blobs(Dataset):
    """A user's map-style dataset over a local root, shaped like a torchvision one: it reads
    root/blobs.npz (images uint8 [N, 8, 8], labels [N]) and yields (PIL image, int label);
    .targets and .classes as torchvision has them. train=False reads the test arrays."""

    classes = ["low", "mid", "high"]

    def __init__(self, root: str, train: bool = True):
        import numpy as np

        arrays = np.load(os.path.join(root, "blobs.npz"))
        prefix = "" if train else "test_"
        self.images, self.targets = arrays[f"{prefix}images"], arrays[f"{prefix}labels"].tolist()

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        from PIL import Image

        return Image.fromarray(self.images[index]), self.targets[index]


def write_blobs(root, count: int = 240, seed: int = 0) -> str:
    """Three classes of 8x8 grey images by brightness, train and test arrays."""
    import numpy as np

    rng = np.random.default_rng(seed)
    arrays = {}
    for prefix, n in (("", count), ("test_", count // 4)):
        labels = np.arange(n) % 3
        images = (rng.normal(60 + 70 * labels[:, None, None], 25, (n, 8, 8))).clip(0, 255).astype(np.uint8)
        arrays[f"{prefix}images"], arrays[f"{prefix}labels"] = images, labels
    os.makedirs(root, exist_ok=True)
    np.savez(os.path.join(root, "blobs.npz"), **arrays)
    return str(root)
