"""Hyperparameter search: runner's Optuna sweeper and the pruning callback.

The sweeper keeps the Optuna sweeper plugin's config keys and search-space syntax
(``hydra.sweeper.params``: ``choice(...)``, ``interval(...)``, ``tag(log, ...)``, ``range(...)``)
and adds what the plugin lacks:

* persistent storage by default (``<sweep dir>/optuna.db``) under a study name that is the
  same when the same command runs again, so an interrupted sweep resumes: finished trials
  stay, interrupted ones run again in their own directory (and resume from their
  ``last.pt``), and only the missing trials are asked for;
* failure tolerance: a trial that raises or returns NaN is FAIL in Optuna (FAILED in
  MLflow) and the sweep goes on until more than ``max_failure_rate`` of its trials failed;
* pruning: with ``pruner=median|hyperband|successive_halving`` each job gets an
  ``OptunaPruning`` callback that reports the monitored metric at every validation and stops
  the job cleanly when the pruner says so (PRUNED in Optuna, KILLED in MLflow);
* job numbers are trial numbers, so trial N lives in ``<sweep dir>/N``.
"""

import hashlib
import logging
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

import optuna
from hydra.core.utils import JobStatus
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl, create_params_from_overrides
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from runner.callbacks import Callback
from runner.errors import ConfigError, Pruned
from runner.schema import objective_names

log = logging.getLogger("runner")

DIRECTIONS = ("minimize", "maximize")
FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def objectives(config: DictConfig) -> list[str]:
    return objective_names(config.get("optimized_metric"))


def directions(sweeper: DictConfig) -> list[str]:
    direction = sweeper.get("direction")
    values = list(direction) if OmegaConf.is_list(direction) else [direction]
    return [value.name if hasattr(value, "name") else str(value) for value in values]


def pruning_monitor(config: DictConfig) -> str:
    """The validation metric a pruner watches: the objective itself when it is a val/ metric."""
    name = objectives(config)[0]
    return name if name.startswith("val/") else "val/" + name.split("/")[-1]


def check_sweep_or_exit(config: DictConfig) -> None:
    """check_sweep, with bad input reported as one line and exit status 2 (no traceback)."""
    try:
        check_sweep(config)
    except ConfigError as error:
        print(f"runner: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def check_sweep(config: DictConfig) -> None:
    """Every check a sweep can make before a trial runs; raises ConfigError."""
    from runner.metrics import check_metric_name

    metrics = objectives(config)
    for metric in metrics:
        check_metric_name("optimized_metric", metric)
    sweeper = config.hydra.sweeper
    if sweeper.get("_target_") != "runner.sweeper.Sweeper":
        return
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "LOCAL_RANK" in os.environ:
        raise ConfigError(
            "an Optuna sweep under torchrun would run one sweep per rank; launch it from one process and "
            "give each trial its ranks through Slurm: -m hparams_search=... hydra/launcher=slurm trainer=ddp hydra.launcher.tasks_per_node=N"
        )
    wanted = directions(sweeper)
    for direction in wanted:
        if direction not in DIRECTIONS:
            raise ConfigError(f"hydra.sweeper.direction='{direction}' is not a direction; use minimize or maximize")
    if len(wanted) != len(metrics):
        raise ConfigError(
            f"hydra.sweeper.direction has {len(wanted)} entries but optimized_metric names {len(metrics)} metrics; "
            "give one direction per metric"
        )
    sampler = sweeper.get("sampler")
    if isinstance(sampler, str):
        from runner.build import SAMPLERS

        if sampler not in SAMPLERS:
            raise ConfigError(f"hydra.sweeper.sampler='{sampler}' is not a sampler; use one of {', '.join(SAMPLERS)}")
    for key, value in (sweeper.get("params") or {}).items():
        try:
            create_params_from_overrides([f"{key}={value}"])
        except Exception as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ConfigError(
                f"hydra.sweeper.params.{key}='{value}' does not parse ({reason}); write it as e.g. "
                "choice(a, b), interval(0.1, 0.5), tag(log, interval(1e-4, 1e-1)) or range(1, 10)"
            ) from None
    if sweeper.get("pruner") and len(metrics) > 1:
        raise ConfigError("pruning needs a single objective; use pruner=none with a list optimized_metric")
    if sweeper.get("pruner"):
        check_metric_name("the pruner's monitor (from optimized_metric)", pruning_monitor(config), splits=("val",))


class OptunaSearch(OptunaSweeperImpl):
    def __init__(self, sampler: Any, direction: Any, storage: Any, study_name: str | None, n_trials: int, n_jobs: int,
                 max_failure_rate: float, custom_search_space: str | None, params: DictConfig | None,
                 pruner: Any = None, seed: int | None = None):
        # the sampler is built in sweep(): a grid sampler needs the parsed search space
        super().__init__(sampler, direction, storage, study_name, n_trials, n_jobs, max_failure_rate, custom_search_space, params)
        self.pruner_config, self.seed = pruner, seed

    # ------------------------------------------------------------------ sweep
    def sweep(self, arguments: list[str]) -> None:
        check_sweep_or_exit(self.config)
        study, space, fixed, fixed_overrides = self._study(arguments)
        self.space, self.fixed, self.fixed_overrides = space, fixed, fixed_overrides
        finished = [t for t in study.get_trials(deepcopy=False) if t.state in FINISHED_STATES]
        interrupted = [optuna.trial.Trial(study, t._trial_id) for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))]
        if finished or interrupted:
            log.info("resuming study %s: %d trials finished, %d interrupted trials run again", study.study_name, len(finished), len(interrupted))
        if interrupted:
            self._run(study, interrupted)
        while (missing := self.n_trials - len(study.get_trials(deepcopy=False, states=FINISHED_STATES))) > 0:
            self._run(study, [study.ask() for _ in range(min(self.n_jobs, missing))])
        summarise(study, Path(self.config.hydra.sweep.dir))

    def _study(self, arguments: list[str]):
        from runner.build import build_pruner, build_sampler

        self._process_searchspace_config()
        space, fixed, fixed_overrides = create_params_from_overrides(self._parse_sweeper_params_config() + list(arguments))
        for name in fixed:
            space.pop(name, None)
        if isinstance(space.get("model"), optuna.distributions.CategoricalDistribution):
            space["model"] = self._models_for_the_data(space["model"])
        grid = {name: self._to_grid_sampler_choices(d) for name, d in space.items()} if self._is_grid() else {}
        sampler = build_sampler(self.sampler, self.seed, grid)
        if grid:
            self.n_trials = min(self.n_trials, math.prod(len(values) for values in grid.values()))
        sweep_dir = Path(self.config.hydra.sweep.dir).resolve()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")  # as Hydra's basic sweeper does
        self.storage = self.storage or f"sqlite:///{sweep_dir / 'optuna.db'}"
        study = optuna.create_study(
            study_name=self.study_name, storage=self.storage, sampler=sampler, pruner=build_pruner(self.pruner_config),
            directions=self._get_directions(), load_if_exists=True,
        )
        earlier = len(study.get_trials(deepcopy=False))
        if earlier and (continued := self._continued_sampler(earlier, grid)) is not None:
            study.sampler = continued
        log.info("study %s in %s: %s, %s, %d trials", study.study_name, self.storage, type(sampler).__name__, self._get_directions(), self.n_trials)
        return study, space, fixed, fixed_overrides

    def _models_for_the_data(self, choices: Any) -> Any:
        """A preset's model choices less those whose class declares modalities the data is not
        (the CNN on a table): each option's config is composed and its class read, not built."""
        from runner.data.module import modality_of
        from runner.targets import judge

        from hydra.core.override_parser.overrides_parser import OverridesParser

        data = self.config.data
        modality = data.get("modality") or modality_of(list(data.input_shape))
        typed = [str(o) for o in self.config.hydra.overrides.task]  # a job's own choices, less the sweep's
        fixed = [raw for raw, parsed in zip(typed, OverridesParser.create().parse_overrides(typed))
                 if not parsed.is_sweep_override() and parsed.key_or_group != "model"]
        kept = []
        for option in choices.choices:
            config = self.hydra_context.config_loader.load_sweep_config(self.config, [*fixed, f"model={option}"])
            accepts = getattr(judge(str(config.model._target_), "model._target_").obj, "modalities", None)
            if accepts is None or modality in accepts:
                kept.append(option)
        if not kept:
            raise ConfigError(f"hydra.sweeper.params.model: none of {list(choices.choices)} takes {modality} data; give models that do, e.g. model: choice(mlp)")
        if len(kept) < len(choices.choices):
            log.info("model choices for %s data: %s (left out: %s)", modality, ", ".join(map(str, kept)),
                     ", ".join(str(option) for option in choices.choices if option not in kept))
        return optuna.distributions.CategoricalDistribution(kept)

    def _continued_sampler(self, earlier: int, grid: dict) -> Any:
        """The sampler for a study that already holds `earlier` trials, or None to keep the one
        built. A seeded sampler built anew replays its stream from the start: a resumed TPE sweep
        would ask again for the parameters of its first trials. Seeded from the seed and the
        number of trials instead, it draws a fresh stream that the same resume reproduces.
        QMCSampler numbers its points in the study itself and so continues as it is."""
        from runner.build import SAMPLERS, build_sampler

        named = isinstance(self.sampler, str)
        seed = self.seed if named else OmegaConf.select(self.sampler, "seed", default=None)
        target = SAMPLERS.get(self.sampler, "") if named else str(OmegaConf.select(self.sampler, "_target_", default=""))
        if seed is None or target.endswith("QMCSampler"):
            return None
        continued_seed = resumed_seed(int(seed), earlier)
        log.info("study resumed after %d trials: sampler seed %d (from seed %d and the trial count)", earlier, continued_seed, seed)
        if named:
            return build_sampler(self.sampler, continued_seed, grid)
        return build_sampler(OmegaConf.merge(self.sampler, {"seed": continued_seed}), None, grid)

    def _is_grid(self) -> bool:
        if isinstance(self.sampler, str):
            return self.sampler == "grid"
        return str(OmegaConf.select(self.sampler, "_target_", default="")).endswith("GridSampler")

    # ------------------------------------------------------------ one batch
    def _run(self, study: optuna.Study, trials: list) -> None:
        overrides = [list(job) + self._per_trial(trial) for job, trial in zip(self._configure_trials(trials, self.space, self.fixed, self.fixed_overrides), trials)]
        returns = []
        # job numbers are trial numbers: launch runs of consecutive numbers together
        start = 0
        for end in range(1, len(trials) + 1):
            if end == len(trials) or trials[end].number != trials[end - 1].number + 1:
                returns += self.launcher.launch(overrides[start:end], initial_job_idx=trials[start].number)
                start = end
        for trial, result in zip(trials, returns):
            self._tell(study, trial, result)
        self._check_failure_budget(study)

    def _per_trial(self, trial) -> list[str]:
        # the sweep dir as resolved here: a job's own overrides must not move it
        extra = [f"hydra.sweep.dir='{self.config.hydra.sweep.dir}'", f"hydra.sweep.subdir={trial.number}"]
        if self.pruner_config:
            prefix = "+callbacks.optuna_pruning"
            extra += [
                f"{prefix}._target_={__name__}.OptunaPruning",
                f"{prefix}.storage='{self.storage}'",
                f"{prefix}.study_name='{trial.study.study_name}'",
                # the trial's number, which is also the job's (the storage's own trial ids
                # start at 1 and would read as off by one beside the job numbers)
                f"{prefix}.trial_number={trial.number}",
                f"{prefix}.monitor={pruning_monitor(self.config)}",
                # the job's own copy of this sweep's pruner config
                f"{prefix}.pruner='${{hydra:sweeper.pruner}}'",
            ]
        return extra

    def _tell(self, study: optuna.Study, trial, result) -> None:
        state, values = TrialState.COMPLETE, None
        if result.status == JobStatus.COMPLETED:
            raw = result.return_value
            values = [float(v) for v in (raw if isinstance(raw, (list, tuple)) else [raw])]
            if not all(math.isfinite(v) for v in values):
                state, values = TrialState.FAIL, None
                log.warning("trial %d failed: it returned %s", trial.number, raw)
        elif isinstance(result._return_value, Pruned):
            state = TrialState.PRUNED
            log.info("trial %d pruned: %s", trial.number, result._return_value)
        else:
            state = TrialState.FAIL
            error = result._return_value
            log.warning("trial %d failed: %s: %s", trial.number, type(error).__name__, str(error).splitlines()[0] if str(error) else "")
        from runner.tracking import tag_job_run

        # tag first: a sweep killed between the two re-runs this trial on resume, and tags again
        tag_job_run(result.cfg, _output_dir(result), {"optuna.study": study.study_name, "optuna.trial.number": str(trial.number), "optuna.trial.state": state.name})
        try:
            study.tell(trial, values=values, state=state, skip_if_finished=True)
        except RuntimeError as error:
            # GridSampler calls study.stop() once the grid is done, which Optuna only
            # allows inside optimize(); the trial itself has been recorded by then
            if "Study.stop" not in str(error):
                raise

    def _check_failure_budget(self, study: optuna.Study) -> None:
        done = study.get_trials(deepcopy=False, states=FINISHED_STATES)
        failed = [t for t in done if t.state == TrialState.FAIL]
        if done and len(failed) / len(done) > self.max_failure_rate:
            print(
                f"runner: error: {len(failed)} of {len(done)} trials failed, more than hydra.sweeper.max_failure_rate="
                f"{self.max_failure_rate}; see the trials' runner.log, fix the cause, and run the same command to resume",
                file=sys.stderr,
            )
            raise SystemExit(1)


def resumed_seed(seed: int, earlier_trials: int) -> int:
    """The sampler seed of a sweep that resumes a study holding `earlier_trials` trials: the
    seed itself for a new study, else a 32-bit hash of both (a plain seed + trials would make
    a resume of seed 0 replay a new sweep of seed 3)."""
    if earlier_trials == 0:
        return seed
    return int.from_bytes(hashlib.sha256(f"{seed}:{earlier_trials}".encode()).digest()[:4], "little")


def _output_dir(result) -> str | None:
    """The job's output directory (its working_dir is the launch directory: no chdir)."""
    hydra = result.hydra_cfg
    return OmegaConf.select(hydra, "hydra.runtime.output_dir", default=None) or OmegaConf.select(hydra, "runtime.output_dir", default=None)


class OptunaPruning(Callback):
    """Reports the monitored metric to this job's Optuna trial at each validation and stops
    the run cleanly when the study's pruner says so. Added to each job by the Sweeper."""

    def __init__(self, storage: str, study_name: str, trial_number: int, monitor: str, pruner: Any = None):
        study = optuna.load_study(study_name=study_name, storage=storage, pruner=pruner)
        (trial,) = [t for t in study.get_trials(deepcopy=False) if t.number == trial_number]
        self.trial = optuna.trial.Trial(study, trial._trial_id)
        self.monitor = monitor
        self.pruned_at: int | None = None

    def on_validation_end(self, loop, metrics):
        if self.monitor not in metrics:
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a step reported again after a resume is ignored
            self.trial.report(metrics[self.monitor], step=loop.state.step)
        if self.trial.should_prune():
            self.pruned_at = loop.state.step
            loop.state.should_stop = True
            loop.state.stop_reason = f"pruned at step {loop.state.step} ({self.monitor}={metrics[self.monitor]:.4g})"

    def on_fit_end(self, loop):
        if self.pruned_at is not None:  # the loop has stopped and saved; now say how it ended
            raise Pruned(f"trial {self.trial.number} {loop.state.stop_reason}")

    def state_dict(self):
        return {"pruned_at": self.pruned_at}

    def load_state_dict(self, state):
        self.pruned_at = state["pruned_at"]


# ------------------------------------------------------------------ summary
def summarise(study: optuna.Study, sweep_dir: Path) -> None:
    """Best trial(s) as a table, the trials as CSV, and Optuna's plots, in the sweep dir
    (the MLflow sweep callback uploads them to the parent run)."""
    from rich.console import Console
    from rich.table import Table

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    study.trials_dataframe().to_csv(sweep_dir / "optuna_trials.csv", index=False)
    best = study.best_trials if len(study.directions) > 1 else ([study.best_trial] if complete else [])
    table = Table(title=f"study {study.study_name}: " + ("Pareto front" if len(study.directions) > 1 else "best trial"))
    table.add_column("trial")
    table.add_column("value(s)", justify="right")
    table.add_column("params")
    for trial in best:
        table.add_row(str(trial.number), ", ".join(f"{v:.4g}" for v in trial.values), " ".join(f"{k}={v}" for k, v in trial.params.items()))
    Console().print(table)
    counts = {state.name: len(study.get_trials(deepcopy=False, states=(state,))) for state in FINISHED_STATES}
    log.info("trials: %s", ", ".join(f"{count} {name}" for name, count in counts.items()))
    results = {"study_name": study.study_name, "trials": counts, "best": [{"number": t.number, "values": t.values, "params": t.params} for t in best]}
    OmegaConf.save(OmegaConf.create(results), sweep_dir / "optimization_results.yaml")
    _plots(study, sweep_dir, complete)


def _plots(study: optuna.Study, sweep_dir: Path, complete: Sequence) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plots

    targets = [None] if len(study.directions) == 1 else [lambda t, i=i: t.values[i] for i in range(len(study.directions))]
    names = [f"objective {i}" for i in range(len(targets))]
    drawings = {"optimization_history": plots.plot_optimization_history, "param_importances": plots.plot_param_importances, "parallel_coordinate": plots.plot_parallel_coordinate}
    if len(study.directions) > 1:
        drawings = {"pareto_front": plots.plot_pareto_front}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna marks its matplotlib plots experimental
        for name, draw in drawings.items():
            if len(complete) < 2:
                break  # nothing to compare yet
            try:
                kwargs = {} if name == "pareto_front" or targets == [None] else {"target": targets[0], "target_name": names[0]}
                axes = draw(study, **kwargs)
                figure = (axes.flat[0] if hasattr(axes, "flat") else axes).get_figure()
                figure.set_size_inches(8, 5)
                figure.tight_layout()
                figure.savefig(sweep_dir / f"optuna_{name}.png", dpi=110)
                plt.close(figure)
            except Exception as error:  # e.g. importances need two params that vary
                log.info("no %s plot: %s", name.replace("_", " "), error)
