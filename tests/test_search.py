"""Sweeps for real: Optuna's sqlite storage, jobs run by Hydra's launcher in a subprocess sweep."""

import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from optuna.trial import TrialState

from tests.conftest import run_cli

pytestmark = pytest.mark.slow

CONF = str(Path(__file__).resolve().parent / "conf")
TINY = ["data=synthetic", "data.num_samples=256", "trainer.device=cpu", "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=2"]


def _study(tmp_path):
    (database,) = tmp_path.glob("multirun/*/optuna.db")
    (name,) = optuna.get_all_study_names(f"sqlite:///{database}")
    return optuna.load_study(study_name=name, storage=f"sqlite:///{database}"), database.parent


def _complete_trials(tmp_path) -> int:
    """Read the study's database read-only (Optuna itself would create tables while polling)."""
    for database in tmp_path.glob("multirun/*/optuna.db"):
        try:
            with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=1) as connection:
                return connection.execute("SELECT COUNT(*) FROM trials WHERE state = 'COMPLETE'").fetchone()[0]
        except sqlite3.Error:
            return 0
    return 0


def _states(study):
    return sorted(trial.state.name for trial in study.trials)


@pytest.mark.parametrize(
    "preset,extra",
    [
        ("grid", []),
        ("random", []),
        ("optuna_tpe", []),
        ("optuna_tpe", ["hydra.sweeper.sampler=gp", "hydra.sweeper.seed=0"]),
        ("optuna_tpe", ["hydra/sweeper/sampler=cmaes"]),
    ],
    ids=["grid", "random", "tpe", "gp", "cmaes"],
)
def test_each_preset_runs_end_to_end(tmp_path, preset, extra):
    result = run_cli(["-m", f"hparams_search={preset}", "hydra.sweeper.n_trials=3", "logger=none", *TINY, *extra], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    study, sweep_dir = _study(tmp_path)
    assert _states(study) == ["COMPLETE"] * 3
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == ["0", "1", "2"]  # job number = trial number
    for number in range(3):
        assert (sweep_dir / str(number) / "metrics.json").is_file()
    results = OmegaConf.load(sweep_dir / "optimization_results.yaml")
    assert results.best[0].number == study.best_trial.number
    assert (sweep_dir / "optuna_trials.csv").is_file() and (sweep_dir / "optuna_optimization_history.png").is_file()


def test_an_interrupted_sweep_resumes_without_redoing_trials(tmp_path):
    command = [sys.executable, "-m", "runner", "-m", "--config-dir", CONF, "hparams_search=tiny_tpe", "hydra.sweeper.n_trials=5"]
    sweep = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and _complete_trials(tmp_path) < 2:
        time.sleep(0.02)
    sweep.send_signal(signal.SIGKILL)
    sweep.wait()
    study, sweep_dir = _study(tmp_path)
    done = {t.number: t for t in study.get_trials(states=(TrialState.COMPLETE,))}
    assert len(done) >= 2 and len(done) < 5
    before = {path: path.stat().st_mtime_ns for n in done for path in (sweep_dir / str(n)).rglob("*") if path.is_file()}
    resumed = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming study" in resumed.stdout
    study, _ = _study(tmp_path)
    assert _states(study) == ["COMPLETE"] * 5  # 5 in storage, none twice
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3, 4]
    for number, trial in done.items():  # finished trials kept, their directories untouched
        assert study.trials[number].params == trial.params and study.trials[number].value == trial.value
    assert {path: path.stat().st_mtime_ns for path in before} == before
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("runner").experiment_id])
    parents = [run for run in runs if run.data.tags.get("runner.sweep") == "true"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"  # the resumed sweep continued its parent
    children = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(int(run.data.tags["optuna.trial.number"]) for run in children) == [0, 1, 2, 3, 4]


def test_a_resumed_tpe_sweep_draws_new_parameters_and_both_halves_reproduce(tmp_path):
    """Issue 14.8: a seeded sampler built anew on resume replayed its stream, so trials 3-5
    repeated trials 0-2 (TPE samples at random for its first 10 trials). The resume must draw
    new parameters, and a sweep run again from scratch must still give the same ones."""
    sweep = ["-m", "hparams_search=optuna_tpe", "logger=none", *TINY, "~callbacks.export", "~callbacks.drift", "~callbacks.curves", "hydra.sweeper.sampler.seed=7"]

    def run_and_resume(directory: Path) -> list[tuple]:
        directory.mkdir()
        first = run_cli([*sweep, "hydra.sweeper.n_trials=3"], cwd=directory)
        assert first.returncode == 0, first.stderr[-3000:]
        resumed = run_cli([*sweep, "hydra.sweeper.n_trials=6"], cwd=directory)  # same study: 3 more
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "resuming study" in resumed.stdout
        study, _ = _study(directory)
        assert _states(study) == ["COMPLETE"] * 6 and [t.number for t in study.trials] == list(range(6))
        return [tuple(sorted(trial.params.items())) for trial in study.trials]

    params = run_and_resume(tmp_path / "a")
    assert len({dict(p)["optimizer.lr"] for p in params}) == 6  # a log-uniform float: an honest draw never repeats
    assert len(set(params)) == 6, params
    again = run_and_resume(tmp_path / "b")
    assert again == params  # the same seed gives the same first half, and the same resume the same second


def test_failing_trials_are_recorded_and_the_sweep_goes_on(tmp_path):
    result = run_cli(["-m", "--config-dir", CONF, "hparams_search=tiny_failing"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    study, sweep_dir = _study(tmp_path)
    failed = {t.number for t in study.trials if t.state == TrialState.FAIL}
    assert _states(study) == ["COMPLETE", "COMPLETE", "FAIL", "FAIL"]
    assert all(study.trials[n].params["callbacks.boom.step"] == 2 for n in failed)
    assert "failed: RuntimeError: boom at step 2" in result.stdout
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("runner").experiment_id])
    by_trial = {int(r.data.tags["optuna.trial.number"]): r for r in runs if "optuna.trial.number" in r.data.tags}
    assert {n for n, r in by_trial.items() if r.info.status == "FAILED"} == failed
    assert all(by_trial[n].data.tags["optuna.trial.state"] == "FAIL" for n in failed)
    (parent,) = [run for run in runs if run.data.tags.get("runner.sweep") == "true"]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"sweep_summary.csv", "optuna_trials.csv", "optimization_results.yaml", "multirun.yaml"} <= artifacts
    assert parent.data.tags["jobs.failed"] == "2"


def test_too_many_failures_end_the_sweep_with_a_message(tmp_path):
    result = run_cli(["-m", "--config-dir", CONF, "hparams_search=tiny_failing", "logger=none", "hydra.sweeper.max_failure_rate=0.2"], cwd=tmp_path)
    assert result.returncode == 1
    assert "runner: error: 1 of 3 trials failed, more than hydra.sweeper.max_failure_rate=0.2" in result.stderr
    study, _ = _study(tmp_path)
    assert len(study.trials) == 3  # stopped as soon as the budget was spent


def test_median_pruner_stops_bad_trials_early(tmp_path):
    result = run_cli(["-m", "--config-dir", CONF, "hparams_search=tiny_prune"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    study, sweep_dir = _study(tmp_path)
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    assert pruned and any(t.params["optimizer.lr"] == 1e-9 for t in pruned)
    for trial in pruned:
        state = torch.load(sweep_dir / str(trial.number) / "checkpoints" / "last.pt", weights_only=True)["state"]
        assert state["epoch"] < 6 and state["stop_reason"].startswith("pruned at step")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("runner").experiment_id])
    states = {r.data.tags.get("optuna.trial.state"): r.info.status for r in runs if "optuna.trial.state" in r.data.tags}
    assert states["PRUNED"] == "KILLED" and states["COMPLETE"] == "FINISHED"
    # a job's MLflow run is named <sweep>-<job number>; the pruning callback's trial number
    # (an internal override, shown by runner.compare) is the job number too
    jobs = [r for r in runs if "optuna.trial.state" in r.data.tags]
    assert len(jobs) == 6
    for job in jobs:
        number = job.data.tags["hydra.job.num"]
        assert job.data.tags["optuna.trial.number"] == job.data.params["callbacks.optuna_pruning.trial_number"] == number
        assert job.info.run_name == f"{sweep_dir.name}-{number}"
        assert f"+callbacks.optuna_pruning.trial_number={number}" in job.data.tags["overrides"].split()
    (parent,) = [r for r in runs if r.data.tags.get("runner.sweep") == "true"]
    compare = subprocess.run([sys.executable, "-m", "runner.compare", "--sweep", parent.info.run_id], cwd=tmp_path, capture_output=True, text=True)
    assert compare.returncode == 0, compare.stderr
    assert "trial_id" not in compare.stdout
    # the row of the differing param (its label shortened to the column): jobs 0-5 in order
    assert re.search(r"callbacks\.optuna_pruning\.trial\S*\s+│\s+0\s+│\s+1\s+│\s+2\s+│\s+3\s+│\s+4\s+│\s+5\s", compare.stdout), compare.stdout


def test_two_objectives_give_a_pareto_front(tmp_path):
    result = run_cli(["-m", "--config-dir", CONF, "hparams_search=tiny_pareto", "logger=none"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    study, sweep_dir = _study(tmp_path)
    assert len(study.directions) == 2 and _states(study) == ["COMPLETE"] * 4
    results = OmegaConf.load(sweep_dir / "optimization_results.yaml")
    front = {entry.number for entry in results.best}
    assert front == {t.number for t in study.best_trials}
    assert all(len(entry["values"]) == 2 and entry["values"][1] > 1000 for entry in results.best)  # acc, params
    assert "Pareto front" in result.stdout and (sweep_dir / "optuna_pareto_front.png").is_file()


@pytest.mark.parametrize(
    "args,code,message",
    [
        (["hparams_search=optuna_tpe", "hydra.sweeper.sampler=annealing"], 2, "runner: error: hydra.sweeper.sampler='annealing' is not a sampler; use one of tpe, random"),
        (["hparams_search=optuna_tpe", "pruner=patient"], 1, "Could not find 'pruner/patient'"),
        (["--config-dir", CONF, "hparams_search=bad_space"], 2, "runner: error: hydra.sweeper.params.optimizer.lr='interval(1e-3)' does not parse"),
        (["hparams_search=optuna_tpe", "optimized_metric=val/accuracy"], 2, "runner: error: optimized_metric='val/accuracy' is not a metric this run reports"),
        (["hparams_search=optuna_tpe", "hydra.sweeper.direction=sideways"], 2, "runner: error: hydra.sweeper.direction='sideways' is not a direction; use minimize or maximize"),
        (["model=mlp,cnn", "optimized_metric=val/accuracy"], 2, "runner: error: optimized_metric='val/accuracy' is not a metric"),
    ],
    ids=["sampler", "pruner", "space", "metric", "direction", "basic-sweeper-metric"],
)
def test_bad_sweep_input_stops_before_any_trial(tmp_path, args, code, message):
    result = run_cli(["-m", *args], cwd=tmp_path, timeout=120)
    assert result.returncode == code, result.stderr[-2000:]
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.glob("multirun/*/optuna.db")) and not list(tmp_path.glob("multirun/**/metrics.json"))
    assert not (tmp_path / "mlflow.db").exists()
