"""The Hydra plugin classes of runner's sweepers: the Optuna sweeper, registered through the
``hydra.plugins`` entry point, and the basic sweeper of a plain ``-m`` (register() below).
Hydra imports every plugin when it starts, so this module stays light; the Optuna work (and
optuna, torch) lives in runner.search.

This module is the adapter to Hydra's sweeper internals: BasicSweeper subclasses the class
Hydra keeps in hydra._internal (tests/test_sweeper.py checks what it hands to the jobs)."""

from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper as HydraBasicSweeper
from hydra.core.override_parser.types import Override
from hydra.plugins.sweeper import Sweeper as HydraSweeper


class Sweeper(HydraSweeper):
    def __init__(self, **settings: Any):
        from runner.search import OptunaSearch

        self.search = OptunaSearch(**settings)

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.search.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        return self.search.sweep(arguments)


class BasicSweeper(HydraBasicSweeper):
    """Hydra's basic sweeper (a plain ``-m``: one job per combination of ``key=a,b`` values)
    that hands a deletion to the jobs as it was typed. Hydra's own writes every override that
    is not a sweep as ``key=value``, so ``~callbacks.export`` reached each job as
    ``~callbacks.export=null``, which means "delete it only if its value is null", and every
    job failed to compose (Hydra checks them all before the first starts). ``~key=value`` keeps
    its meaning; the jobs' overrides (.hydra/overrides.yaml, the MLflow tag) read as typed."""

    @staticmethod
    def split_arguments(overrides: list[Override], max_batch_size: int | None) -> list[list[list[str]]]:
        bare = {f"{o.get_key_element()}=null": o.get_key_element() for o in overrides if o.is_delete() and o.value_type is None}
        batches = HydraBasicSweeper.split_arguments(overrides, max_batch_size)
        return [[[bare.get(item, item) for item in job] for job in batch] for batch in batches]


def register() -> None:
    """Make BasicSweeper known to Hydra, which instantiates only plugin classes it has found
    (the package's entry point names the Optuna sweeper); hydra/sweeper=runner_basic, the
    default of conf/train.yaml, selects it."""
    from hydra.core.plugins import Plugins

    Plugins.instance().register(BasicSweeper)
