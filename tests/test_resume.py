"""Resume to the bit: stop-and-resume and SIGKILL-and-resume equal one straight run."""

import json
import signal

import pytest
import torch

from tests.conftest import assert_same_training_state, run_cli

pytestmark = pytest.mark.slow

# CNN (BatchNorm + dropout), random augmentation, a stepped scheduler with its own state:
# every random stream and every piece of state a resume must restore is in play.
# 179 training samples / 32 = 6 batches (steps) per epoch.
COMMON = [
    "data=synthetic", "data.num_samples=256", "model=cnn", "augmentation=noise_shift",
    "scheduler=warmup_cosine", "scheduler.warmup_steps=4", "scheduler.total_steps=24",
    "trainer.deterministic=true", "trainer.device=cpu", "trainer.seed=7",
]


def _train(tmp_path, name, *extra):
    result = run_cli([*COMMON, f"hydra.run.dir={tmp_path / name}", *extra], cwd=tmp_path)
    return result


def _final(tmp_path, name):
    last = torch.load(tmp_path / name / "checkpoints" / "last.pt", weights_only=True)
    metrics = json.loads((tmp_path / name / "metrics.json").read_text())
    return last, metrics


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("straight")
    result = _train(tmp_path, "run", "trainer.max_epochs=4")
    assert result.returncode == 0, result.stderr
    return _final(tmp_path, "run")


def test_stop_after_two_epochs_and_resume_to_four_is_bit_identical(tmp_path, straight):
    first = _train(tmp_path, "run", "trainer.max_epochs=2")
    assert first.returncode == 0, first.stderr
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["state"]["epoch"] == 2
    second = _train(tmp_path, "run", "trainer.max_epochs=4")
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stdout and "at epoch 2, step 12" in second.stdout
    assert_same_training_state(straight, _final(tmp_path, "run"), 24)


def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path, straight):
    killed = _train(
        tmp_path, "run", "trainer.max_epochs=4", "callbacks.checkpoint.every_n_steps=4",
        "+callbacks.killer._target_=runner_test_helpers.KillAtStep", "+callbacks.killer.step=9",
    )
    assert killed.returncode == -signal.SIGKILL
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["state"]
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (8, 1, 2)  # mid-epoch
    resumed = _train(tmp_path, "run", "trainer.max_epochs=4", "callbacks.checkpoint.every_n_steps=4")
    assert resumed.returncode == 0, resumed.stderr
    assert "at epoch 1, step 8" in resumed.stdout
    assert_same_training_state(straight, _final(tmp_path, "run"), 24)


def test_explicit_ckpt_path_resumes_into_a_new_directory(tmp_path, straight):
    first = _train(tmp_path, "a", "trainer.max_epochs=2")
    assert first.returncode == 0, first.stderr
    second = _train(tmp_path, "b", "trainer.max_epochs=4", f"ckpt_path={tmp_path / 'a' / 'checkpoints' / 'last.pt'}")
    assert second.returncode == 0, second.stderr
    assert_same_training_state(straight, _final(tmp_path, "b"), 24)
