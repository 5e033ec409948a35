"""The only module that calls hydra.utils.instantiate: config in, Parts out.

Runtime arguments (the model's parameters, the optimizer, the run's step count, class
counts) are passed at build time to ``_partial_: true`` configs, never written into the
config. Every target, at any depth, is resolved and judged by runner.targets before anything
is built (where it comes from, what it really is, whether it is the kind its key expects);
Hydra's own execution whitelist (``_execution_whitelist_``) then admits exactly those targets
inside instantiate.
"""

import inspect
import re
import sys
from dataclasses import dataclass, field
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from runner.errors import ConfigError, RunnerError
from runner.loop import Parts, plan
from runner.distributed import is_rank_zero
from runner.metrics import check_metric_name
from runner.schema import objective_names
from runner.targets import judge

SCHEDULER_INTERVALS = ("step", "epoch", "validation")
_PATTERN = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*\.(\*|[A-Za-z_]\w*)")


@dataclass(frozen=True)
class AllowList:
    """Which _target_s may be built: each is resolved and judged by runner.targets (where it
    comes from, what it really is, its kind). ``patterns`` (``allowed_targets``: ``pkg.*`` or
    exact targets) open packages that are not installed; a target typed on the command line is
    trusted at the key it was typed for only."""

    patterns: tuple[str, ...] = ()
    typed: dict[str, str] = field(default_factory=dict)  # "model._target_" -> "my_pkg.Net"

    @classmethod
    def of(cls, cfg: DictConfig, command_line: list[str]) -> "AllowList":
        extra = list(cfg.get("allowed_targets") or [])
        for entry in extra:
            if not isinstance(entry, str) or not _PATTERN.fullmatch(entry):
                raise ConfigError(
                    f"allowed_targets entry {entry!r} is not a package pattern or a target; "
                    "write e.g. 'allowed_targets=[my_pkg.*]' or 'allowed_targets=[my_pkg.models.Net]'"
                )
            if entry.split(".")[0] in sys.stdlib_module_names:
                raise ConfigError(
                    f"allowed_targets entry '{entry}' opens Python's standard library, whose functions run "
                    "commands and change files; wrap what you need in a function of your own package and allow that"
                )
        return cls(tuple(extra), _typed_targets(command_line))

    def check(self, node: Any, key: str = "") -> list[str]:
        """Judge every _target_ in node, at any depth, before anything is built; refused with
        its key. Returns their names, for Hydra's execution whitelist."""
        passed = []
        for target_key, target in _targets(node, key):
            verdict = judge(target, target_key, self.patterns, typed=self.typed.get(target_key) == target)
            passed += [target, verdict.real_name]  # Hydra checks the name as written and where it resolves
            if not inspect.isclass(verdict.obj):  # and the class a factory returns: its package's own
                passed.append(verdict.real_name.split(".")[0] + ".*")
        return passed


def _targets(node: Any, key: str) -> list[tuple[str, str]]:
    """(full key of each _target_, its value) in a config, without resolving anything else."""
    container = OmegaConf.to_container(node, resolve=False) if OmegaConf.is_config(node) else node
    found: list[tuple[str, str]] = []

    def walk(value: Any, path: str) -> None:
        if isinstance(value, str) and "${" in value and OmegaConf.is_config(node) and path:
            # an interpolated node (callbacks.optuna_pruning.pruner: ${hydra:sweeper.pruner})
            # is judged as what it resolves to, when it resolves to a config
            try:
                resolved = OmegaConf.select(node, path)
            except Exception:
                resolved = None
            if OmegaConf.is_config(resolved):
                walk(OmegaConf.to_container(resolved, resolve=True), path)
            return
        if isinstance(value, dict):
            if "_target_" in value and value.get("download") is True:  # torchvision's datasets
                where = f"{key}.{path}" if key and path else key or path
                raise ConfigError(
                    f"{where}.download=true: runner downloads nothing at run time; fetch the data once "
                    f"(e.g. the dataset class with download=True in a Python shell), then set {where}.download=false"
                )
            for name, child in value.items():
                child_path = f"{path}.{name}" if path else str(name)
                if name == "_target_":
                    found.append((child_path, _resolved_target(node, child_path, key, child)))
                else:
                    walk(child, child_path)
        elif isinstance(value, list):
            for index, child in enumerate(value):
                walk(child, f"{path}[{index}]")

    walk(container, "")
    return [(f"{key}.{path}" if key else path, target) for path, target in found]


def _resolved_target(node: Any, path: str, key: str, raw: Any) -> str:
    if isinstance(raw, str) and "${" in raw and OmegaConf.is_config(node):
        try:
            return str(OmegaConf.select(node, path))
        except Exception as error:
            raise ConfigError(f"{key + '.' if key else ''}{path}='{raw}' cannot be resolved ({str(error).splitlines()[0]})") from None
    return str(raw)


def build(cfg: DictConfig, command_line: list[str] | None = None, world_size: int = 1) -> Parts:
    allowed = AllowList.of(cfg, command_line or [])
    allowed.check(cfg)  # the whole job config, nested targets too, before any part is built
    data = _make(cfg.data, "data", allowed)
    for metric in objective_names(cfg.optimized_metric):
        check_metric_name("optimized_metric", metric, task=data.task)
    model = _make(cfg.model, "model", allowed)
    if cfg.get("init_from"):
        _initial_weights(model, cfg.init_from)
    _check_modality(model, "model", cfg.model._target_, data)
    loss = _make(cfg.loss, "loss", allowed)
    _check_modality(loss, "loss", cfg.loss._target_, data)
    if _is_partial(cfg.loss):
        loss = _call(loss, cfg.loss, "loss", class_counts=data.class_counts())
    optimizer = _call(_make(cfg.optimizer, "optimizer", allowed), cfg.optimizer, "optimizer", params=model.parameters())
    scheduler, interval, monitor = _scheduler(cfg, optimizer, data, allowed, world_size)
    callbacks = {}
    if is_rank_zero():  # the one place: only rank 0 logs
        # first, so the runs are open before any other callback reports into them
        callbacks.update(_loggers(cfg.logger, allowed))
    for name, node in (cfg.callbacks or {}).items():
        if node is not None:
            callbacks[name] = _make(node, f"callbacks.{name}", allowed)
            _check_modality(callbacks[name], f"callbacks.{name}", node._target_, data)
            tracker = getattr(callbacks[name], "tracker", None)  # a monitored metric must exist for this task
            if hasattr(tracker, "check"):
                tracker.check(data.task)
    return Parts(
        data=data, model=model, loss=loss, optimizer=optimizer,
        scheduler=scheduler, scheduler_interval=interval, scheduler_monitor=monitor,
        augmentation=_augmentation(cfg.augmentation, data, allowed),
        callbacks=callbacks,
    )


def build_data(cfg: DictConfig, command_line: list[str] | None = None) -> Any:
    """The data module alone (python -m runner.data.pack), judged like every part."""
    allowed = AllowList.of(cfg, command_line or [])
    allowed.check(cfg.data, "data")
    return _make(cfg.data, "data", allowed)


def _loggers(node: Any, allowed: AllowList) -> dict[str, Any]:
    """One logger (the file has a _target_) or several named ones (logger=mlflow_tensorboard).
    The first is the callback "logger" (what checkpoints and helpers look up), the others
    "logger.<name>"."""
    if not node:
        return {}
    if _has_target(node):
        return {"logger": _make(node, "logger", allowed)}
    loggers = {}
    for name, entry in node.items():
        if entry is not None:
            loggers["logger" if not loggers else f"logger.{name}"] = _make(entry, f"logger.{name}", allowed)
    return loggers


def _augmentation(node: Any, data, allowed: AllowList) -> Any:
    """One transform, or named ones applied in order (augmentation=[mixup,noise_shift]
    selects several files of the group, each under its own name)."""
    if node is None or (not _has_target(node) and not node):
        return None
    from runner.augment import Compose

    named = {"augmentation": node} if _has_target(node) else {f"augmentation.{name}": entry for name, entry in node.items() if entry is not None}
    transforms = []
    for key, entry in named.items():
        transform = _make(entry, key, allowed)
        _check_modality(transform, key, entry._target_, data)
        transforms.append(transform)
    return transforms[0] if len(transforms) == 1 else Compose(transforms)


# what to pick when the loss does not fit the data's task
_OTHER_LOSS = {
    "regression": "use loss=mse (experiment=regression sets it and monitors val/mse)",
    "classification": "use a classification loss such as loss=cross_entropy",
}


def _check_modality(part: Any, key: str, target: str, data) -> None:
    """A part that works on some kinds of input only says so in ``modalities``; refuse a
    wrong pairing here rather than deep inside a forward pass."""
    tasks = getattr(part, "tasks", None)
    if tasks is not None and data.task not in tasks:
        raise ConfigError(
            f"{key}: '{target}' is for {' or '.join(tasks)} data, but the data is {data.task}; "
            f"{_OTHER_LOSS.get(data.task, 'pick another loss') if key == 'loss' else 'remove it'} or pick {' or '.join(tasks)} data"
        )
    accepts = getattr(part, "modalities", None)
    if accepts is not None and data.modality not in accepts:
        raise ConfigError(
            f"{key}: '{target}' works on {' or '.join(accepts)} inputs, but the data gives "
            f"{data.modality} inputs of shape {list(data.input_shape)}; pick another {key.split('.')[0]} "
            f"or data with {' or '.join(accepts)} samples"
        )


def _initial_weights(model, path: str) -> None:
    """init_from: load the tensors of a checkpoint whose names and shapes match (a new
    head for another number of classes stays random), and say what was left out."""
    from runner import checkpoint

    weights = checkpoint.evaluation_weights(
        path, "init_from", "point it at a runner checkpoint (<run dir>/checkpoints/best.pt or last.pt) or set init_from=null"
    )
    own = model.state_dict()
    matching = {key: value for key, value in weights.items() if key in own and own[key].shape == value.shape}
    if not matching:
        raise ConfigError(
            f"init_from='{path}': none of its tensors fits this model (it has {len(weights)}, e.g. "
            f"{next(iter(weights), '-')}); point it at a checkpoint of the same architecture"
        )
    model.load_state_dict(matching, strict=False)
    skipped = sorted(set(own) - set(matching))
    if is_rank_zero():
        import logging

        logging.getLogger("runner").info(
            "model initialised from %s: %d of %d tensors%s", path, len(matching), len(own),
            f"; left as initialised: {', '.join(skipped[:6])}{' ...' if len(skipped) > 6 else ''}" if skipped else "",
        )


def _scheduler(cfg: DictConfig, optimizer, data, allowed: AllowList, world_size: int) -> tuple[Any, str, str | None]:
    node = cfg.scheduler
    if not _has_target(node):
        return None, "step", None
    node = node.copy()  # runner's own keys come off the copy, never off the user's config
    with open_dict(node):
        interval = node.pop("interval", "step")
        monitor = node.pop("monitor", None)
        if "total_steps" in node and node.total_steps is None:
            node.total_steps = plan(data, cfg.trainer, world_size)[1]
    if interval not in SCHEDULER_INTERVALS:
        raise ConfigError(f"scheduler.interval='{interval}' is not supported; use one of {', '.join(SCHEDULER_INTERVALS)}")
    if interval == "validation":
        if monitor is None:
            raise ConfigError("scheduler.interval=validation needs scheduler.monitor, e.g. scheduler.monitor=val/loss")
        check_metric_name("scheduler.monitor", monitor, splits=("val",), task=data.task)
    scheduler = _call(_make(node, "scheduler", allowed), node, "scheduler", optimizer)
    return scheduler, interval, monitor


def _make(node: Any, key: str, allowed: AllowList) -> Any:
    if not _has_target(node):
        raise ConfigError(f"{key} has no _target_; pick a file of conf/{key.split('.')[0]}/ or set {key}._target_")
    target = node._target_
    judged = allowed.check(node, key)
    _check_arguments(node, key, target)
    try:  # Hydra's own whitelist then enforces exactly the targets judged above
        return instantiate(node, _execution_whitelist_=judged)
    except Exception as error:  # hydra wraps the target's own error; show the real one
        raise _explain(error, key, target, node) from None


# keys instantiate reads itself; the rest are the target's keyword arguments
_INSTANTIATE_KEYS = ("_target_", "_partial_", "_args_", "_recursive_", "_convert_")


def _check_arguments(node: Any, key: str, target: str) -> None:
    """Name every key the target does not take at once, with the fix, before building: a
    config file written for another class (the CNN's channels and dropout after
    model._target_=my_pkg.Net) otherwise costs one run per key as instantiate finds them.
    A target taking **kwargs, or whose signature cannot be read, is left to instantiate."""
    from hydra.utils import get_object

    try:  # the target was judged above: importing it again is a lookup
        parameters = list(inspect.signature(get_object(target)).parameters.values())
    except Exception:
        return
    if any(parameter.kind == parameter.VAR_KEYWORD for parameter in parameters):
        return
    takes = [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unexpected = [str(name) for name in node if name not in _INSTANTIATE_KEYS and name not in takes]
    if not unexpected:
        return
    several = len(unexpected) > 1
    fix = f"drop {'them' if several else 'it'} with {' '.join(f'~{key}.{name}' for name in unexpected)}"
    if "." not in key:  # a group: a file of the user's own can hold the class's keys
        fix += f", or write a {key} file for the class and pick it (--config-dir my_conf {key}=my_{key})"
    raise ConfigError(
        f"{key}: '{target}' does not take {', '.join(f'{name}={_shown(node, name)}' for name in unexpected)} "
        f"(it takes {', '.join(takes) or 'no arguments'}); {fix}"
    )


def _shown(node: Any, name: str) -> Any:
    try:
        return OmegaConf.select(node, name)
    except Exception:  # an interpolation that does not resolve: as written
        return OmegaConf.to_container(node, resolve=False)[name]


def _call(factory, node: DictConfig, key: str, *args, **kwargs) -> Any:
    """Complete a _partial_ object with its runtime arguments."""
    try:
        return factory(*args, **kwargs)
    except RunnerError:
        raise
    except Exception as error:
        raise _explain(error, key, node._target_, node) from None


def _explain(error: Exception, key: str, target: str, node: DictConfig | None = None) -> RunnerError:
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, RunnerError):
            return cause
        root, cause = cause, cause.__cause__
    lines = [line for line in str(root).strip().splitlines() if not line.startswith("full_key:")]
    message = lines[-1] if lines else type(root).__name__
    if type(root).__name__ == "InstantiationException":  # Hydra's own refusal: its first sentence, and where
        where = next((line for line in str(root).splitlines() if line.startswith("full_key:")), "")
        message = f"{' '.join(lines) or message} ({where or 'full_key: ' + key})"
    unexpected = re.search(r"unexpected keyword argument '(\w+)'", message)
    if unexpected:  # e.g. model._target_ changed while the old file's keys stayed
        name = unexpected.group(1)
        return ConfigError(f"{key}: '{target}' does not take {name}={OmegaConf.select(node, name) if node is not None else '?'}; drop it with ~{key}.{name} or give the class that argument")
    return ConfigError(f"{key}: could not build '{target}': {message}; check the {key}.* keys")


def _typed_targets(command_line: list[str]) -> dict[str, str]:
    """Targets the user typed in a command-line override (model._target_=my_pkg.Net): their
    own choice, so allowed, at that key only; the same target in a config file elsewhere is not."""
    targets = {}
    for override in command_line:
        key, _, value = override.partition("=")
        key, value = key.lstrip("+~"), value.strip().strip("'\"")
        if key.endswith("_target_") and value:
            targets[key] = value
    return targets


def _has_target(node: Any) -> bool:
    return isinstance(node, (DictConfig, dict)) and "_target_" in node


def _is_partial(node: DictConfig) -> bool:
    return bool(OmegaConf.select(node, "_partial_", default=False))


SAMPLERS = {
    "tpe": "optuna.samplers.TPESampler",
    "random": "optuna.samplers.RandomSampler",
    "cmaes": "optuna.samplers.CmaEsSampler",
    "gp": "optuna.samplers.GPSampler",
    "qmc": "optuna.samplers.QMCSampler",
    "nsgaii": "optuna.samplers.NSGAIISampler",
    "grid": "optuna.samplers.GridSampler",
}


def build_sampler(sampler: Any, seed: int | None, grid_space: dict) -> Any:
    """An Optuna sampler from a hydra/sweeper/sampler config or a bare name (tpe, gp, ...)."""
    sampler = _sampler_config(sampler, seed)
    made = _make(sampler, "hydra.sweeper.sampler", AllowList())
    # GridSampler is partial: it needs the grid, known only once the search space is parsed
    return made(grid_space) if _is_partial(sampler) else made


def check_sweep_parts(sweeper: Any) -> None:
    """Build the sampler (a grid sampler without its grid) and pruner of a hydra.sweeper
    config once, before the sweep starts: bad input stops there, before a parent run or a
    trial exists (runner.preflight)."""
    _make(_sampler_config(sweeper.get("sampler"), sweeper.get("seed")), "hydra.sweeper.sampler", AllowList())
    build_pruner(sweeper.get("pruner"))


def _sampler_config(sampler: Any, seed: int | None) -> Any:
    if not isinstance(sampler, str):
        return sampler
    if sampler not in SAMPLERS:
        raise ConfigError(f"hydra.sweeper.sampler='{sampler}' is not a sampler; use one of {', '.join(SAMPLERS)}")
    node = {"_target_": SAMPLERS[sampler]} | ({"seed": seed} if seed is not None else {})
    if sampler == "grid":
        node["_partial_"] = True
    return OmegaConf.create(node)


def build_pruner(pruner: Any) -> Any:
    return _make(pruner, "hydra.sweeper.pruner", AllowList()) if _has_target(pruner) else None
