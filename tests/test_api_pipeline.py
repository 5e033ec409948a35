"""runner from Python (train()) and multi-stage pipelines."""

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runner.errors import ConfigError
from tests.conftest import HELPERS, ROOT, run_cli

TINY = ["data=synthetic", "data.num_samples=256", "trainer.device=cpu", "trainer.max_epochs=2"]


def _client(tmp_path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")


def test_train_twice_in_one_process_writes_what_the_cli_writes(tmp_path, monkeypatch):
    from runner import train

    monkeypatch.chdir(tmp_path)  # the default store and outputs/ land in the working directory
    first = train([*TINY, "model=mlp"])
    second = train([*TINY, "model=cnn", "loss=focal"])
    assert first.output_dir != second.output_dir
    for result in (first, second):
        assert result.output_dir.parent.parent == tmp_path / "outputs"
        assert 0.0 <= result.metrics["test/acc"] <= 1.0
        assert result.best_checkpoint == result.output_dir / "checkpoints" / "best.pt" and result.best_checkpoint.is_file()
        for name in (".hydra/config.yaml", ".hydra/overrides.yaml", ".hydra/hydra.yaml", "runner.log", "metrics.json"):
            assert (result.output_dir / name).is_file(), name
        assert (result.output_dir / "mlflow_run_id").read_text().strip() == result.mlflow_run_id
    assert "model=cnn" in (second.output_dir / ".hydra" / "overrides.yaml").read_text()
    assert "runner.models.CNN" in (second.output_dir / ".hydra" / "config.yaml").read_text()
    client = _client(tmp_path)
    runs = {run.info.run_id: run for run in client.search_runs([client.get_experiment_by_name("runner").experiment_id])}
    assert set(runs) == {first.mlflow_run_id, second.mlflow_run_id}
    assert {run.info.status for run in runs.values()} == {"FINISHED"}
    assert runs[second.mlflow_run_id].data.tags["choice.loss"] == "focal"


def test_train_refuses_distributed_and_says_how_to_launch(tmp_path, monkeypatch):
    from runner import train

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"trainer.strategy=ddp needs one process per device.*torchrun --nproc_per_node=2 -m runner"):
        train([*TINY, "trainer=ddp"])
    assert not (tmp_path / "outputs").exists()  # refused before anything was written
    with pytest.raises(ConfigError, match="Could not find 'model/nope'"):
        train(["model=nope"])


@pytest.mark.slow
def test_interrupting_train_leaves_a_resumable_run_marked_killed(tmp_path):
    """A notebook's kernel interrupt is SIGINT to the kernel process: here, train() in a
    fresh Python process interrupted by SIGINT at step 5."""
    script = f"""
import sys
sys.path.insert(0, {str(HELPERS)!r})
from runner import train
try:
    train({[*TINY, "+callbacks.stop._target_=runner_test_helpers.SignalAtStep", "+callbacks.stop.step=5", f"+callbacks.stop.signum={int(signal.SIGINT)}"]!r}, output_dir="job")
except KeyboardInterrupt as interrupt:
    print("interrupted:", interrupt)
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "interrupted: interrupted by SIGINT after step 5" in done.stdout
    assert torch.load(tmp_path / "job" / "checkpoints" / "last.pt", weights_only=True)["state"]["step"] == 5
    (run,) = _client(tmp_path).search_runs([_client(tmp_path).get_experiment_by_name("runner").experiment_id])
    assert run.info.status == "KILLED"


@pytest.mark.slow
def test_two_stage_pipeline_passes_weights_skips_finished_stages_and_resumes_the_killed_one(tmp_path):
    args = ["--config-dir", str(ROOT / "tests" / "conf"), "pipeline=tiny_two_stage", *TINY[:-1], "hydra.run.dir=pipe"]
    killed = run_cli(args, cwd=tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    pipe = tmp_path / "pipe"
    # stage 2 started from stage 1's best weights, tensor for tensor
    pretrained = torch.load(pipe / "pretrain" / "checkpoints" / "best.pt", weights_only=True)["model"]
    initial = torch.load(tmp_path / "initial_finetune.pt", weights_only=True)
    assert initial.keys() == pretrained.keys()
    assert all(torch.equal(initial[key], pretrained[key]) for key in pretrained)
    assert not (pipe / "finetune" / "metrics.json").exists()
    pretrain_files = {p: p.stat().st_mtime_ns for p in (pipe / "pretrain").rglob("*") if p.is_file()}
    client = _client(tmp_path)
    finetune_run = (pipe / "finetune" / "mlflow_run_id").read_text().strip()

    again = run_cli(args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "pipeline stage 'pretrain': finished earlier" in again.stdout
    assert "resumed from" in again.stdout and "finetune/checkpoints/last.pt at epoch 1, step 8" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in (pipe / "pretrain").rglob("*") if p.is_file()} == pretrain_files
    assert torch.load(pipe / "finetune" / "checkpoints" / "last.pt", weights_only=True)["state"]["step"] == 18
    summary = json.loads((pipe / "pipeline.json").read_text())
    assert summary["finetune"]["best_checkpoint"] == str(pipe / "finetune" / "checkpoints" / "best.pt")
    # MLflow: one parent run, both stages nested under it, stage 2 still one run
    parent = (pipe / "mlflow_parent_run_id").read_text().strip()
    experiment = client.get_experiment_by_name("tiny_two_stage").experiment_id
    children = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(run.info.run_id for run in children) == sorted([finetune_run, (pipe / "pretrain" / "mlflow_run_id").read_text().strip()])
    assert {run.info.status for run in children} == {"FINISHED"}
    assert client.get_run(parent).info.status == "FINISHED"
    # the pipeline's own summary, last: each stage, how it ran, its optimized metric, run, weights
    assert "pipeline tiny_two_stage: 2 stages" in again.stdout and f"MLflow pipeline run {parent}" in again.stdout
    for stage, ran in (("pretrain", r"skipped \(finished earlier\)"), ("finetune", "trained")):
        value = summary[stage]["metrics"]["val/acc"]
        run_id = (pipe / stage / "mlflow_run_id").read_text().strip()
        best = re.escape(str(pipe / stage / "checkpoints" / "best.pt"))
        assert re.search(rf"│ {stage}\s+│ {ran}\s+│ val/acc {value:.4f}\s+│ {run_id}\s+│ {best}\s+│", again.stdout), again.stdout[-3000:]

    third = run_cli(args, cwd=tmp_path)  # everything finished: both stages skipped
    assert third.returncode == 0 and third.stdout.count("finished earlier in") == 2
    assert len(re.findall(r"│ (?:pretrain|finetune)\s+│ skipped \(finished earlier\)", third.stdout)) == 2


def test_a_stage_referring_to_an_unknown_stage_is_refused():
    from runner.pipeline import resolve_overrides

    with pytest.raises(ConfigError, match=r"pipeline stage 'b': override 'init_from=\$\{stages.a.best_checkpoint\}' cannot be resolved.*earlier stages \(none yet\)"):
        resolve_overrides({"name": "b", "overrides": ["init_from=${stages.a.best_checkpoint}"]}, {})
    resolved = resolve_overrides({"name": "b", "overrides": ["x=${stages.a.metrics.test/acc}", "y=1"]}, {"a": {"metrics": {"test/acc": 0.5}}})
    assert resolved == ["x=0.5", "y=1"]


@pytest.mark.slow
def test_the_example_notebook_runs_top_to_bottom(tmp_path):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(ROOT / "runner" / "examples" / "quickstart.ipynb", as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    text = "".join(output.get("text", "") for output in outputs)
    assert "test accuracy" in text and "best learning rate by validation accuracy" in text
    assert any("image/png" in output.get("data", {}) for output in outputs)  # the plot rendered
    assert len(list((tmp_path / "outputs").glob("*/*"))) == 4  # four runs, four directories
