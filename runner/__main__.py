"""Command line entry: ``python -m runner [overrides]`` or the ``runner`` console script."""

import atexit
import gc
import os
import shutil
import sys
import tempfile
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

import runner.schema  # noqa: F401  (registers the typed schema before Hydra composes)
from runner.errors import RunnerError
from runner.job_guard import check_env_set, install_logging_guard
from runner.joblog import discard_or_record, job_output, job_start
from runner.sweeper import register as register_sweeper


# Hydra's own instantiations (hydra.callbacks, sweeper, launcher) are limited to these
# packages, checked by Hydra before it imports anything; logging handlers to the ones Hydra's
# own job_logging uses (StreamHandler, FileHandler), which Hydra always permits: a config
# file cannot add a handler that ships the log elsewhere. runner's build() applies its own
# allow-list to the object configs.
TRUSTED = ["runner.*", "hydra.*", "hydra_plugins.*"]
# and a logging handler writes inside the job's output directory only (runner/job_guard.py);
# installed on import, so every process that unpickles main() for a launcher has it too
install_logging_guard()
register_sweeper()  # hydra/sweeper=runner_basic, the default of a plain -m


@hydra.main(config_path="pkg://runner.conf", config_name="train", execution_whitelist=TRUSTED)
def main(cfg: DictConfig) -> float:
    """Run one job and return ``optimized_metric`` (a float, or a list of them) to the sweeper."""
    start = job_start()  # Hydra has opened the job's log file
    try:
        hydra_config = HydraConfig.get()  # first, before anything reads the environment Hydra set
        check_env_set(hydra_config.job.env_set or {}, hydra_config.overrides.hydra)
        with job_output():  # libraries' warnings and log lines to runner.log, from the imports on
            from runner.run import run  # torch is imported here, not on the --help/--cfg path

            if cfg.get("pipeline"):
                return _pipeline(cfg)
            return run(cfg).optimized_value
    except RunnerError as error:
        hydra_config = HydraConfig.get()
        if hydra_config.mode == RunMode.MULTIRUN:
            raise  # the sweeper records the failed job and goes on
        # a run refused before it wrote anything leaves no outputs/<date>/<time>/ behind;
        # one that had begun keeps its directory, with the error at the end of its log
        discard_or_record(Path(hydra_config.runtime.output_dir), error, Path(hydra_config.runtime.cwd), start)
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
    try:
        main()
    finally:
        # At exit the interpreter's last garbage collections walk every object torch, MLflow
        # and friends made: 2.6-4.6 s of silence after the summary on this 2-core machine
        # (py-spy: gc_collect_main in finalisation). Frozen objects are skipped by them; exit
        # handlers (MLflow's, multiprocessing's) still run, and memory goes back to the OS.
        gc.freeze()


if __name__ == "__main__":
    entry()
