"""The command line, run as a user runs it: default job, own code, own configs (bad input:
tests/test_bad_input.py)."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import run_cli

pytestmark = pytest.mark.slow

FAST = ["trainer.device=cpu", "logger=none"]


def test_default_job_learns_digits(tmp_path):
    result = run_cli(["hydra.run.dir=out"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["val/acc"] >= 0.95 and metrics["test/acc"] >= 0.95
    assert {"train/loss", "val/f1", "val/precision", "val/recall", "test/f1"} <= metrics.keys()
    for name in (".hydra/config.yaml", ".hydra/overrides.yaml", "runner.log", "checkpoints/best.pt", "checkpoints/last.pt"):
        assert (out / name).is_file(), name
    confusion = json.loads((out / "confusion_matrix.json").read_text())
    assert confusion["class_names"] == [str(d) for d in range(10)]
    assert sum(map(sum, confusion["matrix"])) == 270  # the whole test split
    assert "final metrics" in result.stdout


def test_console_script_runs_a_debug_job(tmp_path):
    script = Path(sys.executable).with_name("runner")
    result = run_cli(["debug=fast", "model=mlp", "hydra.run.dir=out"], cwd=tmp_path, executable=[str(script)])
    assert not (tmp_path / "mlflow.db").exists()  # debug=fast turns the logger off
    assert result.returncode == 0, result.stderr
    state = torch.load(tmp_path / "out" / "checkpoints" / "last.pt", weights_only=True)["state"]
    assert (state["epoch"], state["step"]) == (1, 2)  # debug=fast: 1 epoch of 2 batches
    # and nothing but the loop: no drift report, export or curves (the smoke test's seconds)
    out = tmp_path / "out"
    assert (out / "metrics.json").is_file()
    assert not (out / "export").exists() and not (out / "drift.json").exists() and not (out / "training_curves.png").exists()
    assert "drift:" not in result.stdout + result.stderr and "export:" not in result.stdout + result.stderr


def test_debug_overfit_drives_train_loss_near_zero_on_two_batches(tmp_path):
    # the default job on the same 2 batches (128 of the 1257 training digits) for 100 epochs;
    # 2 fresh batches an epoch would train on the whole split (train/loss ~0.03 at the end)
    result = run_cli(["debug=overfit", "~callbacks.export", "~callbacks.drift", "~callbacks.curves", "hydra.run.dir=out"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    state = torch.load(tmp_path / "out" / "checkpoints" / "last.pt", weights_only=True)["state"]
    assert (state["epoch"], state["step"]) == (100, 200)
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["train/loss"] < 0.015


def test_help_and_cfg_job_do_not_import_torch(tmp_path):
    code = (
        "import runpy, sys\n"
        "sys.argv = ['runner', '--cfg', 'job', 'model=mlp']\n"
        "try:\n    runpy.run_module('runner', run_name='__main__')\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = run_cli(["-c", code], cwd=tmp_path, executable=[sys.executable])
    assert result.returncode == 0, result.stderr
    assert "_target_: runner.models.MLP" in result.stdout
    help_text = run_cli(["--help"], cwd=tmp_path)
    assert help_text.returncode == 0, help_text.stderr
    assert "  * cnn " in help_text.stdout and "    mlp " in help_text.stdout


def test_own_model_class_without_a_fork(tmp_path):
    result = run_cli(
        [*FAST, "debug=fast", "model._target_=runner_test_helpers.TinyNet", "+model.width=8", "~model.channels", "~model.dropout", "hydra.run.dir=out"],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    weights = torch.load(tmp_path / "out" / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert weights["net.1.weight"].shape == (8, 64)  # width 8 on flattened 1x8x8 digits


def test_own_config_group_file(tmp_path):
    (tmp_path / "my_conf" / "model").mkdir(parents=True)
    (tmp_path / "my_conf" / "model" / "wide_mlp.yaml").write_text(
        "_target_: runner.models.MLP\ninput_shape: ${data.input_shape}\nnum_classes: ${data.num_classes}\nhidden: [48]\n"
    )
    result = run_cli(["--config-dir", "my_conf", "model=wide_mlp", *FAST, "debug=fast", "hydra.run.dir=out"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    weights = torch.load(tmp_path / "out" / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert weights["net.1.weight"].shape == (48, 64)


def test_own_data_file(tmp_path):
    generator = np.random.default_rng(0)
    x = generator.normal(size=(300, 6)).astype("float32")
    y = (x[:, 0] > 0).astype("int64") + 2 * (x[:, 1] > 0)
    np.savez(tmp_path / "my_data.npz", x=x, y=y)
    result = run_cli(["data=tensors", "data.path=my_data.npz", "model=mlp", *FAST, "trainer.max_epochs=15", "hydra.run.dir=out"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["val/acc"] > 0.8  # 4 quadrant classes: learnable


def test_experiment_recipe_runs(tmp_path):
    result = run_cli(["experiment=digits_cnn_focal", *FAST, "trainer.max_epochs=2", "hydra.run.dir=out"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    config = (tmp_path / "out" / ".hydra" / "config.yaml").read_text()
    assert "runner.losses.FocalLoss" in config and "runner.schedulers.WarmupCosineLR" in config
