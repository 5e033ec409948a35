"""Faults injected for real, through the CLI: SIGKILL at five points of a run, Ctrl-C, damaged
checkpoints, a tracking server that dies, a full disk and an unwritable directory, a NaN loss
inside a sweep. Nothing that was saved may be lost, and no fault may pass silently.

Covered elsewhere, not repeated here:
- SIGTERM: exit 143, last.pt at the step, MLflow run KILLED, resume continues the same run:
  tests/test_tracking.py::test_sigterm_ends_killed_saves_last_and_resume_continues_the_same_run
- SIGKILL mid-epoch and resume, bit-identical with a stepped scheduler in play:
  tests/test_resume.py::test_sigkill_mid_epoch_then_resume_is_bit_identical (the mid-epoch
  point below repeats it only to add the checks of what is on disk)
- SIGKILL mid-epoch with the MLflow run continued, no step sent twice:
  tests/test_tracking.py::test_sigkill_and_resume_is_one_run_with_continuous_steps
- a damaged ckpt_path, or a damaged last.pt with no previous one: exit 2 with the message:
  tests/test_bad_input.py (the "corrupt ckpt_path" and "corrupt last.pt" cases); each damage
  against find_resume directly: tests/test_checkpoint.py
- trainer.nonfinite_loss=skip: tests/test_loop.py::test_nonfinite_loss_can_skip_the_batch
- a sweep with failing trials, and the failure budget: tests/test_search.py
- 8 jobs logging to one new store at once:
  tests/test_tracking.py::test_eight_jobs_writing_to_one_new_store_at_once
"""

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from runner.checkpoint import FORMAT, CheckpointWriteError, find_resume, load, save
from tests.conftest import assert_same_training_state, run_cli, start_mlflow_server, stop_mlflow_server

pytestmark = pytest.mark.slow

CONF = str(Path(__file__).resolve().parent / "conf")

# CNN (BatchNorm, dropout) with random augmentation on CPU, deterministic, one thread (much
# faster than torch's default on this busy 2-core machine). 179 training samples / 32 =
# 6 steps per epoch, 18 in all; last.pt every 4 steps and at each epoch end.
COMMON = [
    "data=synthetic", "data.num_samples=256", "model=cnn", "augmentation=noise_shift",
    "trainer.deterministic=true", "trainer.device=cpu", "trainer.num_threads=1", "trainer.seed=3",
    "trainer.max_epochs=3", "callbacks.checkpoint.every_n_steps=4",
    "~callbacks.export", "~callbacks.drift", "~callbacks.curves",
]
UNTRACKED = [*COMMON, "logger=none"]


def _sqlite(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def _final(run_dir: Path):
    return load(run_dir / "checkpoints" / "last.pt"), json.loads((run_dir / "metrics.json").read_text())


def _assert_every_checkpoint_readable(checkpoints: Path) -> None:
    """Every file a resume could pick loads; a leftover temporary file is never a candidate."""
    names = sorted(path.name for path in checkpoints.iterdir())
    for name in names:
        if name.startswith("."):
            assert name.endswith(".tmp"), names  # save()'s temporary: find_resume never looks at it
        else:
            load(checkpoints / name)
    found = find_resume(None, checkpoints)
    assert found is not None and found[1].name in ("last.pt", "last.prev.pt")


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """One unbroken run: what every interrupted-and-resumed run must end as, to the bit."""
    tmp_path = tmp_path_factory.mktemp("straight")
    result = run_cli([*UNTRACKED, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return _final(tmp_path / "run")


# point -> (the killer callback's overrides, the (epoch, step) the resume starts from)
KILL_POINTS = {
    # inside checkpoint.save: the step-8 last.pt is written and fsynced as .last.pt.tmp, the
    # step-6 last.pt already moved to last.prev.pt, the rename not yet done: no last.pt at all
    "checkpoint-write": (["_target_=runner_test_helpers.KillAtReplace", "nth=3"], (1, 6)),
    # after optimizer step 11; the newest last.pt is step 8's
    "mid-epoch": (["_target_=runner_test_helpers.KillOnce", "step=11"], (1, 8)),
    # right after epoch 1's last.pt was saved
    "after-epoch-checkpoint": (["_target_=runner_test_helpers.KillDuring", "point=epoch_end", "at=1"], (1, 6)),
    # in the model's first forward of the second validation; step 12's last.pt (the epoch's
    # last batch, its end not yet run) is the newest
    "during-validation": (["_target_=runner_test_helpers.KillDuring", "point=validation", "at=2"], (1, 12)),
    # in the final test of the best weights, after fit: last.pt is final, metrics.json not written
    "during-final-test": (["_target_=runner_test_helpers.KillDuring", "point=test"], (3, 18)),
}


@pytest.mark.parametrize("point", KILL_POINTS)
def test_sigkill_at_any_point_then_resume_ends_bit_identical(tmp_path, straight, point):
    killer, (epoch, step) = KILL_POINTS[point]
    command = [
        *UNTRACKED, f"hydra.run.dir={tmp_path / 'run'}",
        *[f"+callbacks.killer.{setting}" for setting in killer], f"+callbacks.killer.marker={tmp_path / 'killed'}",
    ]
    killed = run_cli(command, cwd=tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    checkpoints = tmp_path / "run" / "checkpoints"
    _assert_every_checkpoint_readable(checkpoints)
    if point == "checkpoint-write":
        assert not (checkpoints / "last.pt").exists() and (checkpoints / ".last.pt.tmp").is_file()
    assert not (tmp_path / "run" / "metrics.json").exists()
    resumed = run_cli(command, cwd=tmp_path)  # the same command: the killers act once
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at epoch {epoch}, step {step}" in resumed.stdout, resumed.stdout[-3000:]
    _assert_every_checkpoint_readable(checkpoints)
    assert_same_training_state(straight, _final(tmp_path / "run"), 18)


def test_ctrl_c_saves_last_ends_killed_and_exits_130(tmp_path):
    """A real SIGINT, as Ctrl-C delivers it, at the end of step 8 (SIGTERM: see the docstring)."""
    command = [*COMMON, f"logger.tracking_uri={_sqlite(tmp_path)}", "hydra.run.dir=out"]
    stopped = run_cli([*command, "+callbacks.stop._target_=runner_test_helpers.SignalAtStep", "+callbacks.stop.step=7",
                       f"+callbacks.stop.signum={int(signal.SIGINT)}"], cwd=tmp_path)
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert "SIGINT received: stopping after this step" in stopped.stdout
    assert "runner: error: interrupted by SIGINT after step 7; checkpoints/last.pt is saved" in stopped.stderr
    assert load(tmp_path / "out" / "checkpoints" / "last.pt")["state"]["step"] == 7
    client = MlflowClient(_sqlite(tmp_path))
    (run,) = client.search_runs([client.get_experiment_by_name("runner").experiment_id])
    assert run.info.status == "KILLED"
    assert run.data.tags["runner.error"].startswith("Interrupted: interrupted by SIGINT after step 7")


# each damage done to last.pt; last.prev.pt (epoch 1) stays good
DAMAGE = {
    "random-bytes": lambda path: path.write_bytes(os.urandom(4096)),
    "zero-length": lambda path: path.write_bytes(b""),
    "truncated": lambda path: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2]),
    "foreign-format": lambda path: torch.save({"state_dict": {"w": torch.zeros(2)}}, path),
}
REASON = {
    "random-bytes": "is unreadable",
    "zero-length": "is unreadable",
    "truncated": "is unreadable",
    "foreign-format": "is not a runner checkpoint (format None",
}


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
    """A finished 2-epoch run: last.pt at step 12, last.prev.pt at step 6 (epoch ends only)."""
    tmp_path = tmp_path_factory.mktemp("two_epochs")
    result = run_cli([*UNTRACKED, "trainer.max_epochs=2", "callbacks.checkpoint.every_n_steps=0", "hydra.run.dir=run"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoints = tmp_path / "run" / "checkpoints"
    assert load(checkpoints / "last.pt")["state"]["step"] == 12 and load(checkpoints / "last.prev.pt")["state"]["step"] == 6
    return tmp_path / "run"


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_last_pt_falls_back_to_the_previous_one_and_says_so(tmp_path, two_epochs, straight, damage):
    run_dir = tmp_path / "run"
    shutil.copytree(two_epochs, run_dir)
    last = run_dir / "checkpoints" / "last.pt"
    DAMAGE[damage](last)
    resumed = run_cli([*UNTRACKED, "callbacks.checkpoint.every_n_steps=0", "hydra.run.dir=run"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stdout
    assert f"checkpoint '{last}' {REASON[damage]}" in log and "trying an older checkpoint" in log
    assert f"resuming from the previous good checkpoint {last.with_name('last.prev.pt')} instead" in log
    assert "at epoch 1, step 6" in log  # not from scratch
    # checkpoint frequency changes no number: this run ends as the unbroken one
    assert_same_training_state(straight, _final(run_dir), 18)


def test_no_readable_checkpoint_refuses_instead_of_starting_over(tmp_path, two_epochs):
    run_dir = tmp_path / "run"
    shutil.copytree(two_epochs, run_dir)
    checkpoints = run_dir / "checkpoints"
    DAMAGE["truncated"](checkpoints / "last.pt")
    DAMAGE["zero-length"](checkpoints / "last.prev.pt")
    before = {path.name: path.read_bytes() for path in checkpoints.iterdir()}
    refused = run_cli([*UNTRACKED, "hydra.run.dir=run"], cwd=tmp_path)
    assert refused.returncode == 2
    (line,) = [line for line in refused.stderr.splitlines() if line.startswith("runner: error:")]
    assert "no readable checkpoint to resume from" in line
    assert f"'{checkpoints / 'last.pt'}' is unreadable" in line and f"'{checkpoints / 'last.prev.pt'}' is unreadable" in line
    assert f"delete {checkpoints} to start over, or pass ckpt_path=<file>" in line
    assert {path.name: path.read_bytes() for path in checkpoints.iterdir()} == before  # nothing trained, nothing overwritten


def test_the_tracking_server_dies_mid_run_training_finishes_and_the_gap_is_reported(tmp_path):
    server, uri = start_mlflow_server(tmp_path)
    try:
        started = time.monotonic()
        result = run_cli(
            [
                *COMMON, f"logger.tracking_uri={uri}", "logger.flush_interval_s=0.2", "trainer.log_every_n_steps=1",
                "hydra.run.dir=out", "+callbacks.slow._target_=runner_test_helpers.SleepPerStep", "+callbacks.slow.seconds=0.1",
                "+callbacks.outage._target_=runner_test_helpers.KillServerAtStep", "+callbacks.outage.step=8",
            ],
            cwd=tmp_path, env={"RUNNER_TEST_SERVER_PGID": str(server.pid)}, timeout=180,
        )
        elapsed = time.monotonic() - started
        assert server.wait(timeout=10) is not None  # the outage was real
        assert result.returncode == 0, result.stderr[-3000:]
        assert load(tmp_path / "out" / "checkpoints" / "last.pt")["state"]["step"] == 18
        assert (tmp_path / "out" / "metrics.json").is_file()
        run_id = (tmp_path / "out" / "mlflow_run_id").read_text().strip()
        log = result.stdout + result.stderr
        assert "Traceback" not in log, log[-3000:]
        (report,) = [line for line in log.splitlines() if f"MLflow run {run_id} is incomplete" in line]
        assert f"the tracking store {uri} stopped answering" in report
        assert "could not be marked FINISHED" in report
        assert elapsed < 120, elapsed  # a dead server costs bounded retries, not a hang
        # the server back on the same database: what was sent before the outage is there
        server, uri = start_mlflow_server(tmp_path)
        client = MlflowClient(uri)
        run = client.get_run(run_id)
        assert run.info.status == "RUNNING"  # as the report says
        sent = [metric.step for metric in client.get_metric_history(run_id, "train/step_loss")]
        assert sent == list(range(1, len(sent) + 1)) and 1 <= len(sent) <= 8
        # the values not sent are the rest, in logging order: from step len(sent) (values
        # logged after its step loss) or the next one, to the end
        first_unsent = int(re.search(r"metric values of steps (\d+)-18 were not sent", report).group(1))
        assert first_unsent in (len(sent), len(sent) + 1), (report, sent)
    finally:
        stop_mlflow_server(server)


def _limit_file_size(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.parametrize("fault", ["disk-full", "unwritable-dir"])
def test_a_full_disk_or_unwritable_directory_fails_clearly_and_keeps_the_previous_checkpoint(tmp_path, fault):
    """From step 7 on the next checkpoint cannot be written (step 8's last.pt, every 4 steps):
    disk full is a file-size limit (RLIMIT_FSIZE) the checkpoint has outgrown by then;
    unwritable is the checkpoint directory made immutable (chattr +i, which binds root too)."""
    command = [sys.executable, "-m", "runner", *COMMON, f"logger.tracking_uri={_sqlite(tmp_path)}", "hydra.run.dir=out"]
    checkpoints = tmp_path / "out" / "checkpoints"
    preexec = None
    if fault == "disk-full":
        command += ["+callbacks.ballast._target_=runner_test_helpers.BallastFromStep", "+callbacks.ballast.step=7", "+callbacks.ballast.megabytes=8"]
        preexec = _limit_file_size(4 * 2**20)  # checkpoints here are ~0.3 MB, the MLflow store ~1 MB
    else:
        if shutil.which("chattr") is None:
            pytest.skip("chattr is not installed")
        command += ["+callbacks.freeze._target_=runner_test_helpers.FreezeDirAtStep", "+callbacks.freeze.step=7"]
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent / "helpers"), os.environ.get("PYTHONPATH", "")]))
    try:
        result = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=180, preexec_fn=preexec)
    finally:
        if fault == "unwritable-dir" and checkpoints.exists():
            subprocess.run(["chattr", "-i", str(checkpoints)], check=False)
    assert result.returncode == 1, result.stderr[-3000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("runner: error:")]
    os_error = "[Errno 27] File too large" if fault == "disk-full" else "[Errno 1] Operation not permitted"
    assert f"runner: error: could not write checkpoint '{checkpoints / 'last.pt'}': {os_error}" in line
    assert "Traceback" not in result.stderr
    # the previous last.pt (epoch 1's end, step 6) is intact, and no half-written file is left
    assert sorted(path.name for path in checkpoints.iterdir()) == ["best.pt", "last.prev.pt", "last.pt"]
    assert load(checkpoints / "last.pt")["state"]["step"] == 6
    payload, path = find_resume(None, checkpoints)
    assert path.name == "last.pt" and payload["state"]["step"] == 6
    client = MlflowClient(_sqlite(tmp_path))
    (run,) = client.search_runs([client.get_experiment_by_name("runner").experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.tags["runner.error"].startswith("CheckpointWriteError: could not write checkpoint")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_no_space_left_removes_the_partial_file_and_keeps_the_previous_checkpoint(tmp_path):
    """A real ENOSPC, in process: save()'s temporary file is a link to /dev/full."""
    path = tmp_path / "last.pt"
    payload = {"format": FORMAT, "model": {"w": torch.ones(4)}, "optimizer": {}, "state": {"step": 1}, "callbacks": {}, "rng": {}}
    save(payload, path)
    (tmp_path / ".last.pt.tmp").symlink_to("/dev/full")
    with pytest.raises(CheckpointWriteError) as failure:
        save(payload | {"state": {"step": 2}}, path)
    assert str(failure.value).startswith(f"could not write checkpoint '{path}': [Errno 28] No space left on device; the previous last.pt is intact")
    assert sorted(os.listdir(tmp_path)) == ["last.pt"]
    assert find_resume(None, tmp_path)[0]["state"]["step"] == 1


def test_a_nan_loss_fails_its_trial_naming_the_step_and_the_sweep_goes_on(tmp_path):
    result = run_cli(["-m", "--config-dir", CONF, "hparams_search=tiny_nan", "~callbacks.export", "~callbacks.drift", "~callbacks.curves"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (database,) = tmp_path.glob("multirun/*/optuna.db")
    (name,) = optuna.get_all_study_names(f"sqlite:///{database}")
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{database}")
    states = {trial.params["callbacks.poison.step"]: trial.state for trial in study.trials}
    assert states == {3: TrialState.FAIL, 1000000: TrialState.COMPLETE}
    (failed,) = [trial.number for trial in study.trials if trial.state == TrialState.FAIL]
    message = "NonFiniteLossError: train/loss became nan at step 3 (epoch 1, batch 3); lower optimizer.lr"
    assert f"trial {failed} failed: {message}" in result.stdout
    assert not (database.parent / str(failed) / "metrics.json").exists()
    assert (database.parent / str(1 - failed) / "metrics.json").is_file()
    client = MlflowClient(_sqlite(tmp_path))
    runs = client.search_runs([client.get_experiment_by_name("runner").experiment_id])
    by_trial = {int(run.data.tags["optuna.trial.number"]): run for run in runs if "optuna.trial.number" in run.data.tags}
    assert by_trial[failed].info.status == "FAILED" and by_trial[1 - failed].info.status == "FINISHED"
    assert by_trial[failed].data.tags["runner.error"].startswith(message)
