"""runner's basic sweeper (a plain -m): the adapter to Hydra's, and switching callbacks off
(~callbacks.<name>, callbacks.<name>=null) under every sweeper and launcher a user may pick."""

from pathlib import Path

import pytest
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper as HydraBasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from runner.sweeper import BasicSweeper
from tests.conftest import compose_config, run_cli

TINY = ["data=synthetic", "data.num_samples=256", "model=mlp", "trainer.device=cpu", "trainer.max_epochs=1",
        "trainer.limit_train_batches=2", "trainer.limit_val_batches=2", "logger=none"]
OFF = ["~callbacks.export", "~callbacks.drift", "callbacks.curves=null"]


def _jobs(sweeper, overrides: list[str]) -> list[list[str]]:
    (batch,) = sweeper.split_arguments(OverridesParser.create().parse_overrides(overrides), None)
    return batch


def test_deletions_reach_each_job_as_typed():
    typed = ["~callbacks.export", "model=mlp,cnn", "~callbacks.drift=null", "~model.dropout"]
    assert _jobs(BasicSweeper, typed) == [
        ["~callbacks.export", "model=mlp", "~callbacks.drift=null", "~model.dropout"],
        ["~callbacks.export", "model=cnn", "~callbacks.drift=null", "~model.dropout"],
    ]
    # the cause: Hydra's own sweeper writes `~key` as `~key=null` ("delete it only if it is
    # null"); when a Hydra release stops doing so, runner.sweeper.BasicSweeper can go
    assert _jobs(HydraBasicSweeper, typed)[0][0] == "~callbacks.export=null"


@pytest.mark.parametrize(
    "overrides,target",
    [
        ([], "runner.sweeper.BasicSweeper"),
        (["hparams_search=optuna_tpe"], "runner.sweeper.Sweeper"),
        (["hparams_search=grid"], "runner.sweeper.Sweeper"),
        (["hydra/sweeper=runner_optuna"], "runner.sweeper.Sweeper"),
        (["hydra/sweeper=basic"], "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"),
    ],
)
def test_a_plain_sweep_uses_runner_basic_and_presets_still_choose_theirs(overrides, target):
    assert compose_config(overrides, return_hydra_config=True).hydra.sweeper._target_ == target


def _assert_callbacks_off(job: Path) -> None:
    assert (job / "metrics.json").is_file() and (job / "checkpoints" / "best.pt").is_file()
    assert not (job / "export").exists() and not (job / "drift.json").exists() and not (job / "training_curves.png").exists()
    overrides = OmegaConf.load(job / ".hydra" / "overrides.yaml")
    assert "~callbacks.export" in overrides and "~callbacks.drift" in overrides


@pytest.mark.slow
@pytest.mark.parametrize(
    "sweep,jobs",
    [
        (["model=mlp,cnn"], 2),
        (["hparams_search=optuna_tpe", "hydra.sweeper.n_trials=2"], 2),
        (["hydra/sweeper=runner_optuna", "hydra.sweeper.n_trials=1", "optimizer.lr=interval(0.001, 0.01)"], 1),
        (["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5"], 1),
        (["hparams_search=optuna_tpe", "hydra.sweeper.n_trials=1", "hydra/launcher=local"], 1),
    ],
    ids=["basic", "optuna_tpe", "runner_optuna", "submitit_local", "optuna_on_submitit"],
)
def test_callbacks_switched_off_in_a_sweep(tmp_path, sweep, jobs):
    result = run_cli(["-m", *TINY, *OFF, *sweep, "hydra.sweep.dir=sweep"], cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for number in range(jobs):
        _assert_callbacks_off(tmp_path / "sweep" / str(number))
    assert not (tmp_path / "sweep" / str(jobs)).exists()
