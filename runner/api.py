"""runner from Python and notebooks: the same config groups and overrides as the command
line, composed through Hydra's compose API (``@hydra.main`` does not run in a notebook).

    from runner import train
    result = train(["model=cnn", "loss=focal", "trainer.max_epochs=3"])
    result.metrics["test/acc"], result.output_dir, result.best_checkpoint, result.mlflow_run_id

Each call writes what the command line writes: an output directory with ``.hydra/``, the
log, checkpoints, metrics, and one MLflow run. Calls can repeat in one process: nothing is
left active between them (runner's MLflow logger uses a client, never the fluent active run).
"""

import logging
import sys
import time
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig, OmegaConf, open_dict

from runner.errors import ConfigError

log = logging.getLogger("runner")


def compose(overrides: Sequence[str] = (), config_dir: str | Path | None = None, with_hydra: bool = False) -> DictConfig:
    """The job config the command line would build from these overrides. ``config_dir`` adds
    a directory of your own config groups, like ``--config-dir``."""
    from hydra import compose as hydra_compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    import runner.schema  # noqa: F401  (registers the typed schema)

    overrides = list(overrides)
    if config_dir is not None:
        directory = Path(config_dir).expanduser().resolve()
        if not directory.is_dir():
            raise ConfigError(f"config_dir='{config_dir}' is not a directory; give the folder holding your group folders (model/, data/, ...)")
        overrides.append(f"hydra.searchpath=[file://{directory}]")
    inside_app = GlobalHydra.instance().is_initialized()  # e.g. a pipeline run by python -m runner
    try:
        if inside_app:  # the app's search path (and --config-dir) already apply
            return hydra_compose(config_name="train", overrides=overrides, return_hydra_config=with_hydra)
        with initialize_config_module(config_module="runner.conf"):
            return hydra_compose(config_name="train", overrides=overrides, return_hydra_config=with_hydra)
    except Exception as error:  # Hydra's own message names the override and the choices
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(str(error).strip().splitlines()[0]) from None
    finally:
        if not inside_app:
            GlobalHydra.instance().clear()


def train(overrides: Sequence[str] = (), config_dir: str | Path | None = None, output_dir: str | Path | None = None):
    """Train one job and return its RunResult (metrics, output_dir, best_checkpoint,
    last_checkpoint, mlflow_run_id). ``output_dir`` defaults to Hydra's
    ``outputs/<date>/<time>``; passing an existing one resumes the job there.

    Interrupting (Ctrl-C, a notebook's kernel interrupt) finishes the current step, saves a
    resumable ``last.pt``, marks the MLflow run KILLED and raises KeyboardInterrupt.
    """
    from runner.errors import Interrupted, RunnerError
    from runner.joblog import discard_or_record, job_start
    from runner.run import run

    overrides = list(overrides)
    cfg = compose(overrides, config_dir, with_hydra=True)
    if cfg.get("pipeline"):
        raise ConfigError("train() runs one job; run a pipeline with python -m runner pipeline=<name> (or runner.pipeline.run_pipeline)")
    _refuse_distributed(cfg)
    directory = prepare_output_dir(cfg, overrides, output_dir)
    choices = group_choices(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    with _job_logging(directory / "runner.log"):
        start = job_start()
        try:
            return run(cfg, output_dir=directory, command_line=overrides, choices=choices)
        except RunnerError as error:  # as the command line: a refused run leaves no directory
            discard_or_record(directory, error, Path.cwd(), start)
            if isinstance(error, Interrupted):
                raise KeyboardInterrupt(str(error)) from None
            raise


def group_choices(cfg: DictConfig) -> dict[str, str]:
    """The option picked in every group (model: cnn, ...), from a config composed with its
    hydra node."""
    choices = OmegaConf.select(cfg, "hydra.runtime.choices", default=None) or {}
    return {str(key): str(value) for key, value in choices.items() if value is not None}


def _refuse_distributed(cfg: DictConfig) -> None:
    if cfg.trainer.strategy == "ddp":
        raise ConfigError(
            "trainer.strategy=ddp needs one process per device, which train() in a Python process "
            "or notebook cannot start; launch it from a shell: torchrun --nproc_per_node=2 -m runner "
            "trainer.strategy=ddp ... (or on Slurm: python -m runner -m hydra/launcher=slurm trainer=ddp ...)"
        )


def prepare_output_dir(cfg: DictConfig, overrides: Sequence[str], output_dir: str | Path | None) -> Path:
    """Hydra's run directory with the files Hydra writes there: .hydra/config.yaml,
    overrides.yaml and hydra.yaml. ``cfg`` is composed with its hydra node."""
    if output_dir is None:
        output_dir = OmegaConf.select(cfg, "hydra.run.dir")  # outputs/${now:...}: resolved here
        while Path(output_dir).exists():  # two calls within a second must not share a directory
            time.sleep(0.05)
            output_dir = OmegaConf.select(cfg, "hydra.run.dir")
    directory = Path(output_dir).resolve()
    hydra_dir = directory / ".hydra"
    hydra_dir.mkdir(parents=True, exist_ok=True)
    job = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])
    OmegaConf.save(job, hydra_dir / "config.yaml")
    OmegaConf.save(OmegaConf.create(list(overrides)), hydra_dir / "overrides.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": OmegaConf.to_container(cfg.hydra, resolve=False)}), hydra_dir / "hydra.yaml")
    return directory


class _job_logging:
    """runner's log lines to <output_dir>/runner.log (as the command line's Hydra logging
    does) and, outside a Hydra app (a script, a notebook), to stdout as plain lines.

    Outside a Hydra app runner shows its own lines and does not hand them on to the root
    logger, so every call prints the same: what the root logger holds is not runner's to
    judge (importing mlflow.pytorch calls logging.basicConfig, after which a second call
    printed each line twice, the second time in the root's format). Inside one (a pipeline's
    stages) the app's handlers show them, as for any job."""

    def __init__(self, path: Path):
        self.path = path
        self.handlers: list[logging.Handler] = []

    def __enter__(self):
        from hydra.core.global_hydra import GlobalHydra

        logger = logging.getLogger("runner")
        file_handler = logging.FileHandler(self.path)
        file_handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        self.handlers.append(file_handler)
        self.propagate = logger.propagate
        if not GlobalHydra.instance().is_initialized():
            console = logging.StreamHandler(sys.stdout)
            console.setFormatter(logging.Formatter("%(message)s"))
            self.handlers.append(console)
            logger.propagate = False
        for handler in self.handlers:
            logger.addHandler(handler)
        self.level = logger.level
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc):
        logger = logging.getLogger("runner")
        for handler in self.handlers:
            logger.removeHandler(handler)
            handler.close()
        logger.setLevel(self.level)
        logger.propagate = self.propagate
        return False
