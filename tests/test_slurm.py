"""runner on a real single-node Slurm cluster (started by the slurm_cluster fixture)."""

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.conftest import run_cli

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

SMALL = ["data=synthetic", "data.num_samples=256", "model=mlp", "trainer.device=cpu", "hydra/launcher=slurm"]


def _runs(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return client, client.search_runs([client.get_experiment_by_name("runner").experiment_id])


def test_a_sweep_on_slurm_lands_under_one_parent(tmp_path, slurm_cluster):
    result = run_cli(["-m", *SMALL, "trainer.max_epochs=1", "model=mlp,cnn", "hydra.sweep.dir=sweep"], cwd=tmp_path, env=slurm_cluster.env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    client, runs = _runs(tmp_path)
    (parent,) = [run for run in runs if run.data.tags.get("runner.sweep") == "true"]
    children = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == 3 and len(children) == 2
    assert {run.info.status for run in runs} == {"FINISHED"}
    assert all(run.data.tags.get("slurm.job_id") for run in children)  # they really ran as Slurm jobs
    assert sorted(run.data.tags["choice.model"] for run in children) == ["cnn", "mlp"]
    slurm_cluster.wait_idle(60)


def test_a_submission_with_callbacks_switched_off(tmp_path, slurm_cluster):
    # a Slurm submission is a sweep of one: its overrides reach the job through the sweeper
    off = ["~callbacks.export", "~callbacks.drift", "callbacks.curves=null"]
    result = run_cli(["-m", *SMALL, "trainer.max_epochs=1", "logger=none", *off, "hydra.sweep.dir=sweep"], cwd=tmp_path, env=slurm_cluster.env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    job = tmp_path / "sweep" / "0"
    assert (job / "metrics.json").is_file() and (job / "checkpoints" / "best.pt").is_file()
    assert not (job / "export").exists() and not (job / "drift.json").exists() and not (job / "training_curves.png").exists()
    assert list((tmp_path / "sweep" / ".submitit").iterdir())  # it ran as a Slurm job
    slurm_cluster.wait_idle(60)


def test_a_preempted_job_is_requeued_and_ends_as_if_never_stopped(tmp_path, slurm_cluster):
    # one thread in both runs: a Slurm job may get one CPU where the straight run gets two, and a
    # different thread count sums floats in another order (the last bits differ)
    job = [*SMALL, "trainer.max_epochs=3", "trainer.deterministic=true", "trainer.log_every_n_steps=1", "augmentation=noise_shift",
           "trainer.num_threads=1"]
    sweep = subprocess.Popen(
        ["python", "-m", "runner", "-m", *job, "hydra.sweep.dir=sweep", "+callbacks.slow._target_=runner_test_helpers.SleepPerStep", "+callbacks.slow.seconds=0.25"],
        cwd=tmp_path, env=_env(slurm_cluster), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    log = tmp_path / "sweep" / "0" / "runner.log"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not (log.is_file() and re.search(r"step [5-9]/", log.read_text())):
        time.sleep(0.2)
    assert log.is_file(), "the Slurm job never started training"
    job_id = subprocess.run(["squeue", "-h", "-o", "%i"], env=slurm_cluster.env, capture_output=True, text=True).stdout.split()[0]
    subprocess.run(["scancel", "--signal=USR2", job_id], env=slurm_cluster.env, check=True)
    output, _ = sweep.communicate(timeout=600)
    assert sweep.returncode == 0, output[-3000:]
    text = log.read_text()
    assert "SIGUSR2 received: stopping after this step" in text
    assert re.search(r"resumed from .*last.pt at epoch \d+, step \d+", text)
    # the same job, trained straight through without Slurm
    straight = run_cli([*[a for a in job if not a.startswith("hydra/launcher")], "logger=none", "hydra.run.dir=straight"], cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]
    a = torch.load(tmp_path / "sweep" / "0" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "straight" / "checkpoints" / "last.pt", weights_only=True)
    for key in b["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert json.loads((tmp_path / "sweep" / "0" / "metrics.json").read_text()) == json.loads((tmp_path / "straight" / "metrics.json").read_text())
    client, runs = _runs(tmp_path)
    children = [run for run in runs if "mlflow.parentRunId" in run.data.tags]
    assert len(children) == 1 and children[0].info.status == "FINISHED"  # one MLflow run, not two
    steps = [m.step for m in client.get_metric_history(children[0].info.run_id, "lr")]
    assert steps == sorted(set(steps)) == list(range(1, steps[-1] + 1))
    slurm_cluster.wait_idle(60)


def _env(cluster):
    import os
    from tests.conftest import HELPERS

    env = dict(cluster.env)
    env["PYTHONPATH"] = os.pathsep.join([str(HELPERS), env.get("PYTHONPATH", "")])
    env["PATH"] = str(Path(__import__("sys").executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def test_ddp_over_slurm_tasks(tmp_path, slurm_cluster):
    result = run_cli(
        # 512 samples: 358 for training, even, so no rank pads its shard
        ["-m", *SMALL, "data.num_samples=512", "trainer=ddp", "trainer.device=cpu", "trainer.max_epochs=2", "model.dropout=0",
         "data.batch_size=16", "hydra.launcher.tasks_per_node=2", "hydra.sweep.dir=sweep"],
        cwd=tmp_path, env=slurm_cluster.env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    single = run_cli(["data=synthetic", "data.num_samples=512", "model=mlp", "model.dropout=0", "trainer.device=cpu",
                      "trainer.max_epochs=2", "data.batch_size=32", "logger=none", "hydra.run.dir=single"], cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    a = torch.load(tmp_path / "sweep" / "0" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "single" / "checkpoints" / "last.pt", weights_only=True)
    assert len(a["rng_ranks"]) == 2  # two Slurm tasks formed one process group
    for key in b["model"]:
        assert torch.allclose(a["model"][key], b["model"][key], atol=1e-5, rtol=0), key
    client, runs = _runs(tmp_path)
    assert len([run for run in runs if "mlflow.parentRunId" in run.data.tags]) == 1  # rank 0 alone logged
    slurm_cluster.wait_idle(60)
