"""What a config file may ask of Hydra's job set-up: environment variables (``hydra.job.env_set``)
and logging (``hydra.job_logging``, ``hydra.hydra_logging``).

Both are applied by Hydra before runner's own checks could run, and both can run code or
write files: an environment variable steers every subprocess and library (``GIT_CONFIG_*``
made ``git status`` run a command, ``LD_PRELOAD``, ``PYTHONPATH``, ``CC`` for torch.compile,
``HOME`` for every tool's configuration), and a ``FileHandler`` writes wherever its
``filename`` points, in its formatter's words. So:

* ``env_set`` from a config file may only set the variables in ``SAFE_ENV`` (threads, device
  choice, allocator and collective-communication tuning); anything else is refused with its
  key, unless that key was typed on the command line;
* every logging handler with a ``filename`` must write inside the job's output directory.
  The check wraps the function Hydra's ``configure_log`` calls (the adapter below, one place
  that knows a Hydra internal), so it runs before any handler opens its file, in every
  process that runs a job: ``runner.__main__`` installs it on import, and that module is
  imported wherever a launcher unpickles the task function.
"""

import os
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping

from runner.errors import ConfigError

SAFE_ENV = frozenset({
    # threads and devices
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
    "KMP_AFFINITY", "KMP_BLOCKTIME", "TOKENIZERS_PARALLELISM",
    "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "CUDA_LAUNCH_BLOCKING", "CUBLAS_WORKSPACE_CONFIG",
    "PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_NO_CUDA_MEMORY_CACHING",
    # distributed runs: interfaces and diagnostics, no plugin or library paths
    "NCCL_DEBUG", "NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME", "NCCL_P2P_DISABLE", "NCCL_IB_DISABLE",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING", "TORCH_NCCL_BLOCKING_WAIT", "TORCH_DISTRIBUTED_DEBUG", "TORCH_CPP_LOG_LEVEL",
    "TORCH_SHOW_CPP_STACKTRACES",
    # MLflow client behaviour
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_DISABLE_TELEMETRY",
})


def check_env_set(env_set: Mapping[str, Any], typed_overrides: Iterable[str]) -> None:
    """Refuse a variable a config file sets in ``hydra.job.env_set`` that runner does not need."""
    typed = {override.split("=", 1)[0].lstrip("+~") for override in typed_overrides}
    for name in env_set:
        key = f"hydra.job.env_set.{name}"
        if name in SAFE_ENV or key in typed:
            continue
        raise ConfigError(
            f"{key} is set by a config file, and {name} is not a variable runner lets a config set (it could "
            f"steer the programs and libraries the job runs); remove it, or type {key}=... on the command line if"
            " you mean it (what a config may set: SAFE_ENV in runner/job_guard.py)"
        )


def check_log_files(config: Mapping[str, Any], output_dir: str | None, which: str = "hydra.job_logging") -> None:
    """Every logging handler that names a file must write inside the job's output directory."""
    root = Path(output_dir).resolve() if output_dir else None
    for name, handler in (config.get("handlers") or {}).items():
        if not isinstance(handler, Mapping):
            continue
        for argument in ("filename", "file", "path", "dir", "directory", "logdir", "log_dir"):
            if argument not in handler or handler[argument] is None:
                continue
            path = Path(os.path.expanduser(str(handler[argument])))
            path = (path if path.is_absolute() else Path.cwd() / path).resolve()
            if root is None or not path.is_relative_to(root):
                where = f"the job's output directory {root}" if root else "a job's output directory"
                raise ConfigError(
                    f"{which}.handlers.{name}.{argument}='{handler[argument]}' writes outside {where}; "
                    f"log inside it, e.g. {which}.handlers.{name}.{argument}=${{hydra.runtime.output_dir}}/{path.name}"
                )


def install_logging_guard() -> None:
    """Wrap the function Hydra's configure_log calls to apply a resolved logging config, so
    check_log_files runs before any handler is made (idempotent)."""
    from hydra._internal import logging_config

    configure = logging_config.configure_logging
    if getattr(configure, "runner_guarded", False):
        return

    def guarded(config: dict, *args: Any, **kwargs: Any) -> None:
        try:
            check_log_files(config, _runtime_output_dir())
        except ConfigError as error:  # before the job starts: nothing to record, one line and exit 2
            print(f"runner: error: {error}", file=sys.stderr)
            raise SystemExit(error.exit_code) from None
        configure(config, *args, **kwargs)

    guarded.runner_guarded = True  # type: ignore[attr-defined]
    logging_config.configure_logging = guarded


def _runtime_output_dir() -> str | None:
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    if not HydraConfig.initialized():
        return None
    try:
        value = OmegaConf.select(HydraConfig.instance().cfg, "hydra.runtime.output_dir", default=None)
    except Exception:  # not set yet (e.g. Hydra's own logging before the first job)
        return None
    return str(value) if value else None



def relative_path(value: str, key: str) -> Path:
    """A path a config names for runner to write (a picture, a log folder): relative, taken
    inside the job's output directory, and never leaving it; refused with the key otherwise."""
    path = Path(str(value))
    if path.is_absolute() or str(value).startswith("~") or ".." in path.parts or not path.parts:
        raise ConfigError(
            f"{key}='{value}' would write outside the job's output directory; give a relative name inside it, "
            f"such as {path.name or 'name'}"
        )
    return path
