"""Command line entry: ``python -m runner [overrides]`` or the ``runner`` console script."""

import atexit
import os
import shutil
import sys
import tempfile

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

import runner.schema  # noqa: F401  (registers the typed schema before Hydra composes)
from runner.errors import RunnerError
from runner.job_guard import check_env_set, install_logging_guard


# Hydra's own instantiations (hydra.callbacks, sweeper, launcher) are limited to these
# packages, checked by Hydra before it imports anything; logging handlers to the ones Hydra's
# own job_logging uses (StreamHandler, FileHandler), which Hydra always permits: a config
# file cannot add a handler that ships the log elsewhere. runner's build() applies its own
# allow-list to the object configs.
TRUSTED = ["runner.*", "hydra.*", "hydra_plugins.*"]
# and a logging handler writes inside the job's output directory only (runner/job_guard.py);
# installed on import, so every process that unpickles main() for a launcher has it too
install_logging_guard()


@hydra.main(config_path="pkg://runner.conf", config_name="train", execution_whitelist=TRUSTED)
def main(cfg: DictConfig) -> float:
    """Run one job and return ``optimized_metric`` (a float, or a list of them) to the sweeper."""
    try:
        hydra_config = HydraConfig.get()  # first, before anything reads the environment Hydra set
        check_env_set(hydra_config.job.env_set or {}, hydra_config.overrides.hydra)
        from runner.run import run  # torch is imported here, not on the --help/--cfg path

        if cfg.get("pipeline"):
            return _pipeline(cfg)
        return run(cfg).optimized_value
    except RunnerError as error:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # the sweeper records the failed job and goes on
        print(f"runner: error: {error}", file=sys.stderr)
        raise SystemExit(error.exit_code) from None


def _pipeline(cfg: DictConfig) -> float:
    """Run the pipeline's stages in the job's directory; return the last stage's objective."""
    from pathlib import Path

    from runner.pipeline import run_pipeline

    hydra = HydraConfig.get()
    if hydra.mode == RunMode.MULTIRUN:
        raise RunnerError("pipeline=... runs its stages itself; run it without -m (a sweep inside a stage is not supported)")
    results = run_pipeline(cfg, list(hydra.overrides.task), Path(hydra.runtime.output_dir))
    return list(results.values())[-1].optimized_value


def entry() -> None:
    """Console script and ``python -m runner``. Under torchrun every rank runs this; only rank
    0 may create Hydra's output directories, or each rank would make its own (their
    timestamps can differ) and write its own .hydra/ and log."""
    rank = int(os.environ.get("RANK", "0"))
    if rank > 0 and "LOCAL_RANK" in os.environ:
        scratch = tempfile.mkdtemp(prefix=f"runner-rank{rank}-")
        atexit.register(shutil.rmtree, scratch, ignore_errors=True)
        sys.argv += [f"hydra.run.dir={scratch}", f"hydra.sweep.dir={scratch}", "hydra.output_subdir=null"]
    main()


if __name__ == "__main__":
    entry()
