"""Multi-stage pipelines: stages run in order, each an ordinary job with its own output
directory and MLflow run, nested under one pipeline parent run.

A pipeline file (conf/pipeline/*.yaml) lists stages, each a name and overrides. A stage's
overrides may refer to an earlier stage's results with ``${stages.<name>.<field>}``, where
field is best_checkpoint, last_checkpoint, output_dir, mlflow_run_id or
``metrics.<metric>`` (e.g. ``init_from=${stages.pretrain.best_checkpoint}``). Those
references are resolved here, once the earlier stage has finished.

Re-running the same command in the same directory (``hydra.run.dir=...``) skips every
stage that already finished with the same config and resumes the stage that was
interrupted from its ``last.pt``.
"""

import json
import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from runner.errors import ConfigError
from runner.run import RunResult
from runner.schema import objective_names

log = logging.getLogger("runner")
FIELDS = ("best_checkpoint", "last_checkpoint", "output_dir", "mlflow_run_id", "metrics")


def stages_of(cfg: DictConfig) -> list[dict[str, Any]]:
    """The stage list, validated; overrides stay as written (their ${stages...} unresolved)."""
    spec = OmegaConf.to_container(cfg.pipeline, resolve=False)
    stages = spec.get("stages") if isinstance(spec, dict) else None
    if not isinstance(stages, list) or not stages:
        raise ConfigError("pipeline.stages must be a list of {name, overrides} entries, e.g. [{name: pretrain, overrides: [trainer.max_epochs=5]}]")
    names = []
    for index, stage in enumerate(stages):
        if not isinstance(stage, dict) or not isinstance(stage.get("name"), str) or not stage["name"].isidentifier():
            raise ConfigError(f"pipeline.stages[{index}] needs a name made of letters, digits and _ (got {stage!r})")
        if stage["name"] in names:
            raise ConfigError(f"pipeline.stages[{index}].name='{stage['name']}' is used twice; give every stage its own name")
        overrides = stage.setdefault("overrides", [])
        if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
            raise ConfigError(f"pipeline.stages[{index}].overrides must be a list of key=value strings")
        names.append(stage["name"])
    return stages


def resolve_overrides(stage: dict, done: dict[str, dict]) -> list[str]:
    """The stage's overrides with ${stages.<name>.<field>} filled from finished stages."""
    context = OmegaConf.create({"stages": done})
    resolved = []
    for index, override in enumerate(stage["overrides"]):
        if "${" not in override:
            resolved.append(override)
            continue
        node = OmegaConf.create({"stages": context.stages, "value": override})
        try:
            resolved.append(str(node.value))
        except Exception as error:
            known = ", ".join(done) or "none yet"
            raise ConfigError(
                f"pipeline stage '{stage['name']}': override '{override}' cannot be resolved "
                f"({str(error).splitlines()[0]}); it may refer to earlier stages ({known}) and their "
                f"fields {', '.join(FIELDS)}"
            ) from None
    return resolved


def run_pipeline(cfg: DictConfig, overrides: list[str], pipeline_dir: Path) -> dict[str, RunResult]:
    """Run the stages of cfg.pipeline in order under pipeline_dir/<stage name>/."""
    from runner.api import _job_logging, _refuse_distributed, compose, group_choices, prepare_output_dir
    from runner.run import run

    stages = stages_of(cfg)
    base = [o for o in overrides if o.split("=")[0].lstrip("+~").split(".")[0] != "pipeline"]
    parent = _ParentRun(cfg, pipeline_dir)
    done: dict[str, dict] = {}
    results: dict[str, RunResult] = {}
    rows: list[tuple[str, ...]] = []  # the summary's, one per stage
    status = "FAILED"
    try:
        for stage in stages:
            stage_overrides = [*base, *resolve_overrides(stage, done)]
            stage_cfg = compose(stage_overrides, with_hydra=True)
            with open_dict(stage_cfg):
                stage_cfg.pipeline = None
            _refuse_distributed(stage_cfg)
            directory = pipeline_dir / stage["name"]
            result = _finished(directory, stage_cfg)
            metric_names = objective_names(stage_cfg.optimized_metric)
            ran = "skipped (finished earlier)" if result is not None else "trained"
            if result is not None:
                log.info("pipeline stage '%s': finished earlier in %s, skipped", stage["name"], directory)
            else:
                log.info("pipeline stage '%s': %s", stage["name"], " ".join(stage_overrides) or "(no overrides)")
                prepare_output_dir(stage_cfg, stage_overrides, directory)
                choices = group_choices(stage_cfg)
                with open_dict(stage_cfg):
                    del stage_cfg["hydra"]
                with parent.nesting(), _job_logging(directory / "runner.log"):
                    result = run(stage_cfg, output_dir=directory, command_line=stage_overrides, choices=choices)
            results[stage["name"]] = result
            done[stage["name"]] = _fields(result)
            rows.append(_summary_row(stage["name"], ran, result, metric_names))
        status = "FINISHED"
        (pipeline_dir / "pipeline.json").write_text(json.dumps(done, indent=2) + "\n")
        print_summary(OmegaConf.select(cfg, "pipeline.name"), rows, pipeline_dir, parent.run_id)
        return results
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        parent.close(status, done)


def _summary_row(name: str, ran: str, result: RunResult, metric_names: list[str]) -> tuple[str, ...]:
    metrics = "  ".join(f"{metric} {result.metrics[metric]:.4f}" for metric in metric_names if metric in result.metrics)
    checkpoint = result.best_checkpoint or result.last_checkpoint
    return name, ran, metrics or "-", result.mlflow_run_id or "-", str(checkpoint or result.output_dir)


def print_summary(pipeline: str, rows: list[tuple[str, ...]], pipeline_dir: Path, parent_run_id: str | None) -> None:
    """The pipeline's end: each stage with its optimized metric, MLflow run and weights, after
    the last stage's own summary."""
    import sys

    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    parent = f"MLflow pipeline run {parent_run_id}; " if parent_run_id else ""
    table = Table(title=f"pipeline {pipeline}: {len(rows)} stages", caption=f"{parent}all fields: {pipeline_dir / 'pipeline.json'}")
    for column in ("stage", "ran", "optimized metric", "MLflow run", "best checkpoint (or output dir)"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(Text(cell) for cell in row))  # Text: a [bracket] in a path is not rich markup
    Console(width=None if sys.stdout.isatty() else 240).print(table)


def _fields(result: RunResult) -> dict[str, Any]:
    return {
        "best_checkpoint": str(result.best_checkpoint) if result.best_checkpoint else None,
        "last_checkpoint": str(result.last_checkpoint) if result.last_checkpoint else None,
        "output_dir": str(result.output_dir),
        "mlflow_run_id": result.mlflow_run_id,
        "metrics": dict(result.metrics),
    }


def _finished(directory: Path, stage_cfg: DictConfig) -> RunResult | None:
    """The stage's earlier result when it finished with this very config; None when it has
    not finished (it runs, resuming from last.pt if it was interrupted)."""
    metrics_file, config_file = directory / "metrics.json", directory / ".hydra" / "config.yaml"
    if not metrics_file.is_file():
        return None
    job = OmegaConf.masked_copy(stage_cfg, [key for key in stage_cfg if key != "hydra"])
    earlier = OmegaConf.load(config_file) if config_file.is_file() else None
    if earlier is None or OmegaConf.to_container(earlier) != OmegaConf.to_container(job):
        raise ConfigError(
            f"pipeline stage directory '{directory}' holds a finished run of a different config; "
            "run the pipeline in a new directory (hydra.run.dir=...) or delete that stage's directory"
        )
    best, last = directory / "checkpoints" / "best.pt", directory / "checkpoints" / "last.pt"
    run_id_file = directory / "mlflow_run_id"
    metrics = json.loads(metrics_file.read_text())
    return RunResult(
        metrics=metrics, optimized_value=float("nan"), output_dir=directory,
        best_checkpoint=best if best.exists() else None, last_checkpoint=last if last.exists() else None,
        mlflow_run_id=run_id_file.read_text().strip() if run_id_file.is_file() else None,
    )


class _ParentRun:
    """The pipeline's MLflow parent run (when the logger is MLflow): created once, reopened
    when the pipeline is re-run in the same directory, its id handed to the stages through
    the environment as a sweep's is."""

    def __init__(self, cfg: DictConfig, pipeline_dir: Path):
        from runner.tracking import PARENT_RUN_ENV, connect, default_tracking_uri, experiment_name, mlflow_config

        self.env, self.client, self.run_id = PARENT_RUN_ENV, None, None
        logger = mlflow_config(cfg.get("logger"))
        if logger is None:
            return
        choices = {"experiment": OmegaConf.select(cfg, "pipeline.name")}
        self.client, experiment_id = connect(default_tracking_uri(logger.tracking_uri), experiment_name(logger.experiment_name, choices), logger.required)
        if self.client is None:
            return
        pipeline_dir.mkdir(parents=True, exist_ok=True)
        id_file = pipeline_dir / "mlflow_parent_run_id"
        if id_file.is_file():
            self.run_id = id_file.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            tags = {"runner.pipeline": str(OmegaConf.select(cfg, "pipeline.name")), "pipeline_dir": str(pipeline_dir.resolve())}
            self.run_id = self.client.create_run(experiment_id, run_name=f"pipeline {OmegaConf.select(cfg, 'pipeline.name')}", tags=tags).info.run_id
            id_file.write_text(self.run_id + "\n")

    def nesting(self):
        import contextlib

        @contextlib.contextmanager
        def nested():
            if self.run_id is None:
                yield
                return
            previous = os.environ.get(self.env)
            os.environ[self.env] = self.run_id
            try:
                yield
            finally:
                if previous is None:
                    os.environ.pop(self.env, None)
                else:
                    os.environ[self.env] = previous

        return nested()

    def close(self, status: str, done: dict) -> None:
        if self.run_id is None:
            return
        from mlflow.entities import Metric, RunTag
        import time

        stamp = int(time.time() * 1000)
        metrics = [
            Metric(f"{name}/{key}", float(value), stamp, 0)
            for name, fields in done.items() for key, value in fields["metrics"].items()
            if isinstance(value, (int, float))
        ]
        tags = [RunTag(f"stage.{name}.run_id", fields["mlflow_run_id"] or "") for name, fields in done.items()]
        try:
            self.client.log_batch(self.run_id, metrics=metrics[:1000], tags=tags)
        finally:
            self.client.set_terminated(self.run_id, status=status)
