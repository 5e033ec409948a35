"""run(cfg): check, seed, build, resume, fit, test, and write what the job produced."""

import contextlib
import math
import os
import json
import logging
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from runner import checkpoint, distributed, threads
from runner.build import build
from runner.errors import ConfigError, Interrupted, Pruned, RunnerError
from runner.joblog import job_output
from runner.loop import Loop
from runner.metrics import check_metric_name
from runner.plots import confusion_matrix_png
from runner.schema import CLIP_ALGORITHMS, NONFINITE_POLICIES, PRECISIONS, STRATEGIES, objective_names, remember_env_values
from runner.state import seed_everything

log = logging.getLogger("runner")


@dataclass
class RunResult:
    metrics: dict[str, float]
    optimized_value: float | list[float]
    output_dir: Path
    best_checkpoint: Path | None
    last_checkpoint: Path | None
    confusion_matrix: list[list[int]] = field(default_factory=list)
    mlflow_run_id: str | None = None  # the job's MLflow run, when a logger opened one


def run(cfg: DictConfig, output_dir: str | Path | None = None, command_line: list[str] | None = None,
        choices: dict[str, str] | None = None) -> RunResult:
    """One job: returns its metrics; the logger's run ends FINISHED, FAILED or KILLED.
    Outside a Hydra app (train(), pipelines) output_dir, command_line and the group
    choices come from the caller."""
    # what libraries say that runner cannot act on goes to runner.log: the terminal shows
    # the progress and, last, the summary (__main__ opens this earlier, around its imports)
    with job_output():
        return _run(cfg, output_dir, command_line, choices)


def _run(cfg: DictConfig, output_dir: str | Path | None, command_line: list[str] | None,
         choices: dict[str, str] | None) -> RunResult:
    info = job_info(output_dir, command_line)
    if choices:
        info["choices"] = {key: value for key, value in choices.items() if value is not None}
    check(cfg)
    device = resolve_device(cfg.trainer.device)
    dist = distributed.setup(cfg.trainer.strategy, device.type == "cuda")
    if dist.enabled:
        if device.type == "cuda":
            device = torch.device("cuda", dist.local_rank)
            torch.cuda.set_device(device)
        # every rank works in rank 0's output directory (only rank 0 writes there)
        info["output_dir"] = Path(distributed.broadcast_object(str(info["output_dir"]), dist))
    # per-rank streams: dropout and augmentation differ between ranks; DDP copies rank 0's
    # initial weights to the others
    seed_everything(cfg.trainer.seed + dist.rank, cfg.trainer.deterministic)
    remember_env_values(cfg)  # what ${oc.env:...} reads is masked wherever the config is sent (schema.py)
    config = resolved(cfg)
    parts = build(cfg, info["overrides"], dist.world_size)
    info["threads"] = threads.choose(cfg.trainer.num_threads, parts.model, parts.data.input_shape, parts.data.batch_size,
                                     device, threads.ranks_on_this_node() if dist.enabled else 1)
    log.info("threads: %s", info["threads"].reason)
    loop = Loop(parts, cfg.trainer, device, info["output_dir"] / "checkpoints", config, dist)
    loop.info.update(info)
    status, error = "FAILED", None
    try:
        with _stop_on_signals(loop):
            resume(loop, cfg.ckpt_path, config)
            loop.fit()
            result = _finish(loop, cfg.optimized_metric)
        status = "FINISHED"
        return result
    except (Interrupted, Pruned, KeyboardInterrupt) as interrupt:
        status, error = "KILLED", interrupt
        raise
    except BaseException as failure:
        error = failure
        raise
    finally:
        try:
            loop.emit("on_run_end", status, error)
        except Exception:  # never hide the job's own error behind a logger's
            log.exception("a callback failed while ending the run")
        if loop.redeliver is not None:
            # submitit's preemption signal, held until last.pt was saved and the run
            # closed: now its own handler requeues the job (and exits)
            signal.raise_signal(loop.redeliver)


def _finish(loop: Loop, optimized_metric: Any) -> RunResult:
    """Test the best weights and write what the job produced."""
    metrics = test(loop)
    output_dir = loop.info["output_dir"]
    confusion = metrics.pop("confusion_matrix", [])
    if loop.dist.rank == 0:
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    if loop.dist.rank == 0 and confusion:
        class_names = loop.parts.data.class_names
        (output_dir / "confusion_matrix.json").write_text(json.dumps({"class_names": class_names, "matrix": confusion}) + "\n")
        confusion_matrix_png(confusion, class_names, output_dir / "confusion_matrix.png")
    names = objective_names(optimized_metric)
    values = [metrics[name] for name in names]
    if not all(math.isfinite(value) for value in values):
        raise RunnerError(f"optimized_metric {', '.join(names)} = {values}: not a finite number; the run diverged")
    loop.log({"objective": values[0]} if len(values) == 1 else {f"objective/{i}": v for i, v in enumerate(values)})
    best, last = (loop.checkpoint_dir / name for name in ("best.pt", "last.pt"))
    return RunResult(
        metrics=metrics,
        optimized_value=values[0] if isinstance(optimized_metric, str) else values,
        output_dir=output_dir,
        best_checkpoint=best if best.exists() else None,
        last_checkpoint=last if last.exists() else None,
        confusion_matrix=confusion,
        mlflow_run_id=getattr(loop.callbacks.get("logger"), "run_id", None),
    )


def job_info(output_dir: str | Path | None, command_line: list[str] | None) -> dict[str, Any]:
    """Where the job writes and how it was asked for: from Hydra when Hydra runs the job."""
    info: dict[str, Any] = {"overrides": list(command_line or []), "choices": {}, "job_num": None, "run_name": None}
    if output_dir is not None:
        info["output_dir"] = Path(output_dir)
        return info
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra = HydraConfig.get()
    if hydra.mode == RunMode.RUN and "submitit" in str(hydra.launcher.get("_target_", "")):
        choice = hydra.runtime.choices.get("hydra/launcher")
        raise ConfigError(f"hydra/launcher={choice} launches the jobs of a --multirun; add -m to the command (a single job is a sweep of one)")
    info["output_dir"] = Path(hydra.runtime.output_dir)
    info["overrides"] = list(hydra.overrides.task)
    info["choices"] = {key: value for key, value in hydra.runtime.choices.items() if value is not None}
    if hydra.mode == RunMode.MULTIRUN:
        info["job_num"] = hydra.job.num
        # short: <sweep dir name>-<job number> (an Optuna sweep's dir is its study name); the
        # job's overrides are its MLflow tag "overrides"
        info["run_name"] = f"{Path(hydra.sweep.dir).name}-{hydra.job.num}"
    return info


def preemption_signal() -> int | None:
    """The signal submitit sends a job before preemption or its time limit, when under submitit."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return None
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), None)


@contextlib.contextmanager
def _stop_on_signals(loop: Loop):
    """First SIGINT/SIGTERM (or submitit's preemption signal): finish the step, save last.pt,
    stop. A second signal: stop at once. The preemption signal is handed on to submitit's
    own handler afterwards (see run()), which requeues the job."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    preempt = preemption_signal()

    def handle(signum, frame):
        if loop.stop_signal is not None:
            raise KeyboardInterrupt
        loop.stop_signal = signum
        log.warning("%s received: stopping after this step (again to stop at once)", signal.Signals(signum).name)

    watched = [signal.SIGINT, signal.SIGTERM] + ([preempt] if preempt else [])
    previous = {signum: signal.signal(signum, handle) for signum in watched}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if preempt and loop.stop_signal == preempt and callable(previous[preempt]):
            loop.redeliver = preempt


def check(cfg: DictConfig) -> None:
    """Every check that needs no data or model; all problems are reported at once."""
    trainer, problems = cfg.trainer, []

    def expect(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    expect(trainer.strategy in STRATEGIES, f"trainer.strategy='{trainer.strategy}' is not supported; use one of {', '.join(STRATEGIES)}")
    expect(trainer.precision in PRECISIONS, f"trainer.precision='{trainer.precision}' is not supported; use one of {', '.join(PRECISIONS)}")
    expect(trainer.nonfinite_loss in NONFINITE_POLICIES, f"trainer.nonfinite_loss='{trainer.nonfinite_loss}' is not supported; use one of {', '.join(NONFINITE_POLICIES)}")
    expect(trainer.gradient_clip_algorithm in CLIP_ALGORITHMS, f"trainer.gradient_clip_algorithm='{trainer.gradient_clip_algorithm}' is not supported; use one of {', '.join(CLIP_ALGORITHMS)}")
    expect(trainer.num_threads == "auto" or (isinstance(trainer.num_threads, int) and trainer.num_threads >= 0),
           f"trainer.num_threads={trainer.num_threads!r} is not a thread count; use auto (the default), a count, or 0 (torch's default)")
    expect(trainer.max_epochs >= 1, f"trainer.max_epochs={trainer.max_epochs} must be at least 1")
    expect(trainer.accumulate_grad_batches >= 1, f"trainer.accumulate_grad_batches={trainer.accumulate_grad_batches} must be at least 1")
    expect(trainer.val_check_interval >= 0, f"trainer.val_check_interval={trainer.val_check_interval} is negative; use 0 (every epoch) or a step count")
    expect(trainer.limit_train_batches != 0, "trainer.limit_train_batches=0 trains on nothing; use -1 (all) or a positive count")
    expect(trainer.overfit_batches >= 0, f"trainer.overfit_batches={trainer.overfit_batches} is negative; use 0 (off) or a batch count")
    expect(trainer.gradient_clip_val >= 0, f"trainer.gradient_clip_val={trainer.gradient_clip_val} is negative; use 0 (off) or a positive bound")
    lr = OmegaConf.select(cfg, "optimizer.lr", default=None)
    expect(lr is None or lr > 0, f"optimizer.lr={lr} is invalid; use a positive learning rate, e.g. optimizer.lr=1e-3")
    batch_size = OmegaConf.select(cfg, "data.batch_size", default=1)
    expect(batch_size >= 1, f"data.batch_size={batch_size} must be at least 1")
    for metric in objective_names(cfg.optimized_metric):
        try:
            check_metric_name("optimized_metric", metric)
        except ConfigError as error:
            problems.append(str(error))
    if problems:
        raise ConfigError("\n".join(problems))


def resolved(cfg: DictConfig) -> dict:
    """The config as plain containers, every interpolation resolved; a resolver's own
    RunnerError (e.g. a missing data file) comes out as itself."""
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as error:
        message = str(error).splitlines()[0]
        # OmegaConf drops the resolver's exception and keeps only its text
        for name in ("ConfigError", "RunnerError"):
            marker = f"{name} raised while resolving interpolation: "
            if marker in message:
                raise ConfigError(message.split(marker, 1)[1]) from None
        if "Missing mandatory value: " in message:  # a ??? to fill in, e.g. data=audio_folder's data.root
            name = message.split("Missing mandatory value: ", 1)[1].split()[0]
            raise ConfigError(f"{name} is not set (the config has ???); give it, e.g. {name}=<value>; "
                              f"the comments of its conf/ file say what it takes") from None
        key = getattr(error, "full_key", "") or "config"
        raise ConfigError(f"{key}: {message}") from None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"trainer.device='{name}' is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"trainer.device='{name}' but CUDA is not available on this machine; use trainer.device=cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"trainer.device='{name}' but this machine has {torch.cuda.device_count()} CUDA device(s); use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    elif device.type != "cpu":
        raise ConfigError(f"trainer.device='{name}' is not supported; use auto, cpu, cuda or cuda:N")
    return device


def resume(loop: Loop, ckpt_path: str | None, config: dict) -> None:
    found = checkpoint.find_resume(ckpt_path, loop.checkpoint_dir)  # load() words torch's refusals plainly
    if found is None:
        return
    payload, path = found
    changed = checkpoint.changed_keys(payload.get("config") or {}, config)
    if payload.get("config_hash") != checkpoint.config_hash(config) and changed:
        log.warning("resuming with a config that differs from the checkpoint's: %s", ", ".join(changed[:8]))
    try:
        loop.load_state_dict(payload)
    except (RuntimeError, KeyError, ValueError) as error:
        raise ConfigError(_misfit(path, ckpt_path, payload, config, error)) from None
    log.info("resumed from %s at epoch %d, step %d", path, loop.state.epoch, loop.state.step)


def _misfit(path: Path, ckpt_path: str | None, payload: dict, config: dict, error: Exception) -> str:
    """Why a checkpoint does not fit: another model class when the checkpoint says so, else
    the first lines of torch's complaint (its first line alone names no tensor)."""
    key = f"ckpt_path='{ckpt_path}'" if ckpt_path else f"checkpoint '{path}' (this output directory's last.pt)"
    trained = OmegaConf.select(OmegaConf.create(payload.get("config") or {}), "model._target_", default=None)
    building = OmegaConf.select(OmegaConf.create(config), "model._target_", default=None)
    if trained and trained != building:
        reason = f"it holds a {trained} model, this run builds {building}"
    else:
        reason = " ".join(line.strip() for line in str(error).strip().splitlines()[:2])[:300]
    fix = "pass ckpt_path=null to start fresh" if ckpt_path else f"delete {path.parent} to start over"
    return f"{key} does not fit this model/optimizer ({reason}); resume with the config it was trained with, or {fix}"


def test(loop: Loop) -> dict[str, Any]:
    """Evaluate the best weights (best.pt, else the final ones) on val and test."""
    best = loop.checkpoint_dir / "best.pt"
    distributed.barrier(loop.dist)  # rank 0 has finished writing best.pt
    if best.exists():
        loop.load_weights(checkpoint.load(best))
    metrics = {key: value for key, value in loop.state.metrics.items() if key.startswith("train/")}
    metrics["model/params"] = float(sum(p.numel() for p in loop.model.parameters()))
    metrics.update(loop.evaluate("val"))
    metrics.update(loop.evaluate("test", with_confusion=True))
    loop.log({key: value for key, value in metrics.items() if key.startswith(("test/", "model/"))})
    loop.emit("on_test_end", {key: value for key, value in metrics.items() if key != "confusion_matrix"})
    return metrics
