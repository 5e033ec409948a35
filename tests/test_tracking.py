"""MLflow, for real: a local sqlite store and a real `mlflow server`, read back with MlflowClient."""

import csv
import os
import signal
import subprocess
import sys
import uuid

import pytest
import torch
from mlflow.tracking import MlflowClient

from runner.schema import flatten
from runner.tracking import MAX_PARAM_LENGTH, TRUNCATED, _truncate, _unreachable, credentials_to_environment, ui_rows
from tests.conftest import HELPERS, free_port, run_cli, start_mlflow_server, stop_mlflow_server

# 179 training samples / 32 = 6 steps per epoch
SMALL = ["data=synthetic", "data.num_samples=256", "model=mlp", "trainer.device=cpu", "trainer.log_every_n_steps=1"]


def _client(tmp_path):
    return MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")


def _runs(client, experiment="runner"):
    experiment = client.get_experiment_by_name(experiment)
    return client.search_runs([experiment.experiment_id]) if experiment else []


def _steps(client, run, key):
    return [metric.step for metric in client.get_metric_history(run.info.run_id, key)]


def test_params_are_flattened_and_long_values_truncated():
    assert flatten({"optimizer": {"lr": 0.1, "_target_": "torch.optim.SGD"}, "x": 1}) == {"optimizer.lr": 0.1, "optimizer._target_": "torch.optim.SGD", "x": 1}
    long = _truncate("a" * (MAX_PARAM_LENGTH + 100))
    assert len(long) == MAX_PARAM_LENGTH and long.endswith(TRUNCATED)
    assert _truncate("short") == "short"


def test_credentials_in_a_server_uri_go_to_mlflow_and_the_probe_asks_the_real_host():
    # percent-encoded as a URI must hold them: '@' in the password, ':' in the user
    uri = f"http://b%3Ab:p%40ss@127.0.0.1:{free_port()}/prefix"
    assert credentials_to_environment(uri) == uri.replace("b%3Ab:p%40ss@", "")
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == ("b:b", "p@ss")
    assert "refused" in _unreachable(uri)  # the closed port of 127.0.0.1, not a host named 'b%3Ab:p%40ss@127.0.0.1'
    assert credentials_to_environment("sqlite:///x.db") == "sqlite:///x.db"


def test_the_run_page_comes_from_the_tracking_uri_or_from_the_ui_command(monkeypatch):
    page = "#/experiments/3/runs/abc"
    assert ui_rows("http://mlflow.example:8080/prefix/", "3", "abc") == [("run page", f"http://mlflow.example:8080/prefix/{page}")]
    assert ui_rows("https://mlflow.example", "3", "abc") == [("run page", f"https://mlflow.example/{page}")]
    # a local store: the command that serves it, its port spelled out, and the page it serves
    monkeypatch.delenv("MLFLOW_PORT", raising=False)
    monkeypatch.delenv("MLFLOW_HOST", raising=False)
    assert ui_rows("sqlite:////data/my runs/mlflow.db", "3", "abc") == [
        ("to open the UI, run", "mlflow ui --backend-store-uri 'sqlite:////data/my runs/mlflow.db' --port 5000"),
        ("then open", f"http://127.0.0.1:5000/{page}"),
    ]
    monkeypatch.setenv("MLFLOW_PORT", "5123")  # mlflow ui reads it too
    (command, link) = ui_rows("sqlite:////x/mlflow.db", "3", "abc")
    assert command[1].endswith("--port 5123") and link[1] == f"http://127.0.0.1:5123/{page}"


@pytest.mark.slow
def test_a_run_resumed_with_other_settings_records_them(tmp_path):
    args = [*SMALL, "~callbacks.export", "~callbacks.drift", "~callbacks.curves", "hydra.run.dir=out"]
    for epochs in (1, 2, 2, 3):  # the third resumes with the same settings: nothing to record
        result = run_cli([*args, f"trainer.max_epochs={epochs}"], cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
    (run,) = _runs(_client(tmp_path))  # one run, resumed three times
    params = run.data.params
    assert params["trainer.max_epochs"] == "1"  # MLflow keeps a param's first value
    assert params["resume/1/trainer.max_epochs"] == "2" and params["resume/2/trainer.max_epochs"] == "3"
    assert sorted(key for key in params if key.startswith("resume/")) == ["resume/1/trainer.max_epochs", "resume/2/trainer.max_epochs"]
    assert run.data.tags["resume/1"] == "trainer.max_epochs: 1 -> 2" and run.data.tags["resume/2"] == "trainer.max_epochs: 2 -> 3"
    assert "resume/3" not in run.data.tags
    assert "this resume's are params resume/2/...: trainer.max_epochs: 2 -> 3" in (tmp_path / "out" / "runner.log").read_text()


@pytest.mark.slow
def test_a_run_lands_whole_in_the_local_store(tmp_path):
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "x"], cwd=tmp_path, check=True)
    result = run_cli([*SMALL, "trainer.max_epochs=3", "hydra.run.dir=out"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    client = _client(tmp_path)
    (run,) = _runs(client)
    assert run.info.status == "FINISHED"
    assert (tmp_path / "out" / "mlflow_run_id").read_text().strip() == run.info.run_id
    params = run.data.params
    assert params["optimizer.lr"] == "0.001" and params["model._target_"] == "runner.models.MLP"
    assert params["trainer.max_epochs"] == "3" and params["data.num_samples"] == "256"
    tags = run.data.tags
    assert tags["choice.model"] == "mlp" and tags["choice.loss"] == "cross_entropy"
    assert "trainer.max_epochs=3" in tags["overrides"]
    assert tags["output_dir"].endswith("out") and tags["torch.version"] == torch.__version__
    assert tags["device"] == "cpu"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    assert tags["mlflow.source.git.commit"] == head and tags["git.dirty"] == "false"
    assert _steps(client, run, "val/acc") == [6, 12, 18]
    assert _steps(client, run, "train/loss") == [6, 12, 18]
    assert _steps(client, run, "lr") == list(range(1, 19))
    assert _steps(client, run, "train/step_loss") == list(range(1, 19))
    assert _steps(client, run, "best/val/acc") == [6, 12, 18]
    best = [m.value for m in client.get_metric_history(run.info.run_id, "best/val/acc")]
    assert best == sorted(best)  # best so far never falls
    assert {"test/acc", "test/f1", "objective", "epoch"} <= run.data.metrics.keys()
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    artifacts |= {a.path for folder in ("hydra", "checkpoints") for a in client.list_artifacts(run.info.run_id, folder)}
    assert {"hydra/config.yaml", "hydra/hydra.yaml", "hydra/overrides.yaml", "runner.log", "checkpoints/best.pt", "confusion_matrix.png"} <= artifacts


@pytest.mark.slow
def test_a_run_lands_in_a_real_tracking_server(tmp_path, mlflow_server):
    result = run_cli([*SMALL, "trainer.max_epochs=2", f"logger.tracking_uri={mlflow_server}", "logger.experiment_name=served", "hydra.run.dir=out"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "mlflow.db").exists()
    client = MlflowClient(mlflow_server)
    (run,) = _runs(client, "served")
    assert run.info.status == "FINISHED"
    assert _steps(client, run, "val/acc") == [6, 12]
    assert "checkpoints/best.pt" in {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    local = client.download_artifacts(run.info.run_id, "checkpoints/best.pt", str(tmp_path))
    assert torch.load(local, weights_only=True)["format"] == "runner-checkpoint/1"


@pytest.mark.slow
def test_a_job_that_raises_ends_failed_with_the_error(tmp_path):
    result = run_cli([*SMALL, "+callbacks.boom._target_=runner_test_helpers.RaiseAtStep", "+callbacks.boom.step=3", "hydra.run.dir=out"], cwd=tmp_path)
    assert result.returncode == 1
    (run,) = _runs(_client(tmp_path))
    assert run.info.status == "FAILED"
    assert run.data.tags["runner.error"] == "RuntimeError: boom at step 3"
    assert "runner.log" in {a.path for a in _client(tmp_path).list_artifacts(run.info.run_id)}


@pytest.mark.slow
def test_sigterm_ends_killed_saves_last_and_resume_continues_the_same_run(tmp_path):
    args = [*SMALL, "trainer.max_epochs=3", "hydra.run.dir=out"]
    stopped = run_cli([*args, "+callbacks.term._target_=runner_test_helpers.SignalAtStep", "+callbacks.term.step=8"], cwd=tmp_path)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr
    assert "runner: error: interrupted by SIGTERM after step 8" in stopped.stderr
    client = _client(tmp_path)
    (run,) = _runs(client)
    assert run.info.status == "KILLED"
    assert torch.load(tmp_path / "out" / "checkpoints" / "last.pt", weights_only=True)["state"]["step"] == 8
    resumed = run_cli(args, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    (run,) = _runs(client)  # still one run
    assert run.info.status == "FINISHED"
    assert _steps(client, run, "lr") == list(range(1, 19))


@pytest.mark.slow
def test_sigkill_and_resume_is_one_run_with_continuous_steps(tmp_path):
    args = [*SMALL, "trainer.max_epochs=3", "callbacks.checkpoint.every_n_steps=4", "hydra.run.dir=out"]
    killed = run_cli([*args, "+callbacks.killer._target_=runner_test_helpers.KillAtStep", "+callbacks.killer.step=11", "+callbacks.killer.flush_logger=true"], cwd=tmp_path)
    assert killed.returncode == -signal.SIGKILL
    client = _client(tmp_path)
    (run,) = _runs(client)
    sent_before_kill = _steps(client, run, "lr")
    assert sent_before_kill == list(range(1, 12))  # sent up to step 11, past the step-8 checkpoint
    resumed = run_cli(args, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    (run,) = _runs(client)
    assert run.info.status == "FINISHED"
    assert _steps(client, run, "lr") == list(range(1, 19))  # every step once: none lost, none twice
    assert _steps(client, run, "val/acc") == [6, 12, 18]


@pytest.mark.slow
def test_a_grid_sweep_is_one_parent_with_nested_jobs_and_a_summary(tmp_path):
    result = run_cli(["-m", *SMALL, "trainer.max_epochs=1", "model=mlp,cnn", "optimizer.lr=0.001,0.01", "hydra.sweep.dir=sweep"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    client = _client(tmp_path)
    runs = _runs(client)
    (parent,) = [run for run in runs if run.data.tags.get("runner.sweep") == "true"]
    children = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == 5 and len(children) == 4
    assert {run.info.status for run in runs} == {"FINISHED"}
    assert sorted(run.data.tags["hydra.job.num"] for run in children) == ["0", "1", "2", "3"]
    # short names, <sweep dir name>-<job number>; the overrides are a tag
    assert sorted(run.info.run_name for run in children) == ["sweep-0", "sweep-1", "sweep-2", "sweep-3"]
    assert all("model=" in run.data.tags["overrides"] and "optimizer.lr=" in run.data.tags["overrides"] for run in children)
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"sweep_summary.csv", "sweep_objective.png", "multirun.yaml"}
    rows = list(csv.DictReader(open(tmp_path / "sweep" / "sweep_summary.csv")))
    assert [row["job"] for row in rows] == ["0", "1", "2", "3"]
    best = max(rows, key=lambda row: float(row["val/acc"]))
    assert parent.data.tags["best.job"] == best["job"]
    assert parent.data.metrics["best/val/acc"] == pytest.approx(float(best["val/acc"]))
    assert "model=" in parent.data.tags["best.overrides"]


@pytest.mark.slow
def test_eight_jobs_writing_to_one_new_store_at_once(tmp_path):
    uri = f"sqlite:///{tmp_path / 'shared.db'}"
    processes = [
        subprocess.Popen(
            [
                sys.executable, "-m", "runner", *SMALL, "trainer.max_epochs=2", "trainer.num_threads=1", f"trainer.seed={seed}",
                "~callbacks.export", "~callbacks.drift", "~callbacks.curves", f"logger.tracking_uri={uri}", f"hydra.run.dir=out{seed}",
            ],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for seed in range(8)
    ]
    outputs = [process.communicate(timeout=300) for process in processes]
    assert [process.returncode for process in processes] == [0] * 8, [err[-2000:] for _, err in outputs]
    assert not any("is incomplete" in out for out, _ in outputs)  # a batch the store refused for a while was sent later
    client = MlflowClient(uri)
    runs = _runs(client)
    assert len(runs) == 8 and {run.info.status for run in runs} == {"FINISHED"}
    assert sorted(run.data.tags["output_dir"].rsplit("out", 1)[1] for run in runs) == [str(seed) for seed in range(8)]
    for run in runs:
        assert _steps(client, run, "lr") == list(range(1, 13))
        assert _steps(client, run, "train/step_loss") == list(range(1, 13))
        assert _steps(client, run, "val/acc") == [6, 12]
        assert {"test/acc", "objective"} <= run.data.metrics.keys()
        assert "checkpoints/best.pt" in {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}


@pytest.mark.slow
def test_eight_jobs_creating_one_new_experiment_on_a_server_at_once(tmp_path, mlflow_server):
    """Issue 14.6: every job finds the new experiment missing and creates it; the server keeps
    one and answers the others RESOURCE_ALREADY_EXISTS, which must not end them."""
    name = f"together-{tmp_path.name}"
    tiny = ["data=synthetic", "data.num_samples=128", "model=mlp", "trainer.device=cpu", "trainer.max_epochs=1", "trainer.num_threads=1"]
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HELPERS), os.environ.get("PYTHONPATH", "")]))
    processes = [
        subprocess.Popen(
            [
                sys.executable, "-m", "runner", *tiny, "~callbacks.export", "~callbacks.drift", "~callbacks.curves",
                "+callbacks.together._target_=runner_test_helpers.StartTogether", f"+callbacks.together.directory={tmp_path / 'started'}",
                "+callbacks.together.count=8", f"+callbacks.together.tracking_uri={mlflow_server}", f"logger.tracking_uri={mlflow_server}", f"logger.experiment_name={name}", f"hydra.run.dir=out{job}",
            ],
            cwd=tmp_path, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for job in range(8)
    ]
    outputs = [process.communicate(timeout=300) for process in processes]
    assert [process.returncode for process in processes] == [0] * 8, [err[-1500:] for _, err in outputs]
    # (whether two jobs met inside the create call depends on the machine's load; when they
    # did, the loser says "was created by another job at the same moment" and goes on)
    client = MlflowClient(mlflow_server)
    assert [e.name for e in client.search_experiments(filter_string=f"name = '{name}'")] == [name]
    runs = _runs(client, name)
    assert len(runs) == 8 and {run.info.status for run in runs} == {"FINISHED"}
    assert sorted(run.data.tags["output_dir"].rsplit("out", 1)[1] for run in runs) == [str(job) for job in range(8)]
    for run in runs:
        assert {"test/acc", "objective"} <= run.data.metrics.keys()
        assert 0.0 <= run.data.metrics["test/acc"] <= 1.0


@pytest.mark.slow
def test_a_password_in_a_server_uri_logs_in_and_is_never_shown(tmp_path, monkeypatch):
    """Issue 14.7: http://user:password@host:port reaches the host (not 'user:password@host'),
    MLflow logs in with those credentials, and the password appears in no output."""
    password = "Pa55-" + uuid.uuid4().hex[:12]
    (tmp_path / "server").mkdir()
    server, uri = start_mlflow_server(tmp_path / "server", admin_password=password)
    try:
        host = uri.removeprefix("http://")
        args = [*SMALL, "trainer.max_epochs=1", "~callbacks.export", "~callbacks.drift", "~callbacks.curves", "logger.experiment_name=guarded"]
        good = run_cli([*args, f"logger.tracking_uri=http://admin:{password}@{host}", "hydra.run.dir=good"], cwd=tmp_path)
        wrong = run_cli([*args, f"logger.tracking_uri=http://admin:not-{password}@{host}", "hydra.run.dir=wrong"], cwd=tmp_path, timeout=120)
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        client = MlflowClient(uri)
        (run,) = _runs(client, "guarded")
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    finally:
        stop_mlflow_server(server)
    assert good.returncode == 0, good.stderr[-3000:]
    assert run.info.status == "FINISHED" and "test/acc" in run.data.metrics
    assert "checkpoints/best.pt" in artifacts  # the artifact uploads logged in too
    assert run.data.params["logger.tracking_uri"] == f"http://admin:***@{host}"
    assert wrong.returncode == 2
    assert f"runner: error: logger.tracking_uri='http://admin:***@{host}' refused the credentials (HTTP 401); give the server's user and password" in wrong.stderr
    assert not (tmp_path / "wrong" / "checkpoints").exists()  # stopped before training
    for text in (good.stdout, good.stderr, (tmp_path / "good" / "runner.log").read_text(), wrong.stdout, wrong.stderr):
        assert password not in text


@pytest.mark.slow
def test_logger_none_creates_nothing(tmp_path):
    result = run_cli([*SMALL, "logger=none", "trainer.max_epochs=1", "hydra.run.dir=out"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
    assert not (tmp_path / "out" / "mlflow_run_id").exists()


@pytest.mark.slow
def test_an_unreachable_server_fails_fast_unless_not_required(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    result = run_cli([*SMALL, f"logger.tracking_uri={uri}", "hydra.run.dir=out"], cwd=tmp_path, timeout=60)
    assert result.returncode == 2
    assert f"runner: error: logger.tracking_uri='{uri}' is unreachable" in result.stderr
    assert "unset logger.tracking_uri and MLFLOW_TRACKING_URI to use the local store" in result.stderr
    assert not (tmp_path / "out" / "checkpoints").exists()  # failed before training
    relaxed = run_cli([*SMALL, f"logger.tracking_uri={uri}", "logger.required=false", "trainer.max_epochs=1", "hydra.run.dir=out2"], cwd=tmp_path, timeout=60)
    assert relaxed.returncode == 0, relaxed.stderr
    assert "training without tracking" in relaxed.stdout
    assert (tmp_path / "out2" / "metrics.json").is_file()


@pytest.mark.slow
def test_env_tracking_uri_and_experiment_preset_name_are_used(tmp_path):
    uri = f"sqlite:///{tmp_path / 'from_env.db'}"
    result = run_cli(
        ["experiment=digits_cnn_focal", "trainer.device=cpu", "trainer.max_epochs=1", "trainer.limit_train_batches=2", "hydra.run.dir=out"],
        cwd=tmp_path, env={"MLFLOW_TRACKING_URI": uri},
    )
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "mlflow.db").exists()
    (run,) = _runs(MlflowClient(uri), "digits_cnn_focal")
    assert run.info.status == "FINISHED" and run.data.tags["choice.experiment"] == "digits_cnn_focal"
