"""Hydra callback: the checks that must come before Hydra itself acts on the config.

Hydra creates the output directory before the job function runs, and a sweeper builds its
sampler after the sweep's MLflow parent run is opened; a problem found there would surface as
Hydra's traceback (and a parent run to close). This callback, listed first in
``hydra.callbacks``, checks them at ``on_run_start`` / ``on_multirun_start`` and reports bad
input as ``__main__`` does: one line, ``runner: error: ...``, exit status 2.
"""

import errno
import sys
import tempfile
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig, OmegaConf

from runner.errors import ConfigError, RunnerError


class Preflight(HydraCallback):
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _or_exit(lambda: check_output_dir(config, "hydra.run.dir"))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _or_exit(lambda: check_output_dir(config, "hydra.sweep.dir"))
        sweeper = config.hydra.sweeper
        if sweeper.get("_target_") == "runner.sweeper.Sweeper":
            from runner.build import check_sweep_parts  # torch and optuna: only for an Optuna sweep

            _or_exit(lambda: check_sweep_parts(sweeper))


def check_output_dir(config: DictConfig, key: str) -> None:
    """The directory at key exists or can be made, and a file can be created in it."""
    try:
        path = OmegaConf.select(config, key)
    except Exception:  # e.g. an interpolation that only resolves inside the job: Hydra will say
        return
    if path is None:
        return
    directory = Path(str(path))
    try:
        directory.mkdir(parents=True, exist_ok=True)  # what Hydra does next, with the same value
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as error:
        raise ConfigError(
            f"{key}='{path}' cannot be written ({_reason(error, directory)}); pick a directory you can write, "
            f"e.g. {key}={'multirun/my_sweep' if 'sweep' in key else 'outputs/my_run'}, or make that one writable"
        ) from None


def _reason(error: OSError, directory: Path) -> str:
    """Why a directory cannot be written, naming the path that stands in the way."""
    ancestors = [directory, *directory.parents]
    if error.errno == errno.ENOTDIR:
        blocker = next((path for path in reversed(ancestors) if path.exists() and not path.is_dir()), None)
        if blocker is not None:
            return f"'{blocker}' is a file, not a directory"
    existing = next((path for path in ancestors if path.exists()), Path("."))
    if error.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied: '{existing}' is not writable"
    if error.errno == errno.EROFS:
        return f"'{existing}' is on a read-only file system"
    return error.strerror or type(error).__name__


def _or_exit(check) -> None:
    """Run a check; bad input ends the process as __main__ ends a job, with one line. (Hydra
    turns a callback's exception into a warning and goes on; SystemExit it lets through.)"""
    try:
        check()
    except RunnerError as error:
        print(f"runner: error: {error}", file=sys.stderr)
        raise SystemExit(error.exit_code) from None
