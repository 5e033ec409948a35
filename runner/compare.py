"""Runs of an experiment side by side in the terminal: the params that differ, then the
final metrics, the best value of each metric row marked.

    python -m runner.compare                          # the last 10 runs of experiment "runner"
    python -m runner.compare --last 3 --metrics 'test/*,val/acc'
    python -m runner.compare --sweep <parent run id>  # the jobs of one --multirun
    python -m runner.compare --runs <id> <id> ...     # these runs, from any experiment

The store is the one runner writes to: --tracking-uri, else $MLFLOW_TRACKING_URI, else
mlflow.db in the current directory. Sweep parent runs are left out unless asked for by id.
"""

import argparse
import fnmatch
import os
import sys
from datetime import datetime
from typing import Any

DEFAULT_METRICS = "test/*,val/*,best/*,objective,objective/*"
# a metric whose name holds one of these is better lower / higher; others are not marked
LOWER_IS_BETTER = ("loss", "mse", "mae", "rel_l2", "error", "_ms", "params")
HIGHER_IS_BETTER = ("acc", "f1", "precision", "recall", "auc")
MAX_VALUE_CHARS = 40
MAX_RUNS = 1000  # of a sweep, when --last does not say


class CompareError(Exception):
    """A problem the user fixes with another argument: printed as one line, exit status 2."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m runner.compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--experiment", default="runner", help="experiment name (default: runner; an experiment preset's runs are under its name)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite mlflow.db here)")
    parser.add_argument("--runs", nargs="+", metavar="ID", help="compare these run ids (from any experiment)")
    parser.add_argument("--sweep", metavar="PARENT_RUN_ID", help="compare the jobs of this --multirun's parent run")
    parser.add_argument("--last", type=int, default=None, metavar="N", help="the N most recent runs (default: 10; with --sweep: all its jobs)")
    parser.add_argument("--metrics", default=DEFAULT_METRICS, help=f"comma-separated names or patterns (default: {DEFAULT_METRICS})")
    args = parser.parse_args(argv)
    if args.last is not None and args.last < 1:
        parser.error(f"--last {args.last}: give at least 1")
    return args


def connect(uri: str):
    """A client for the store; refuses to create an empty sqlite store (MLflow would make
    one silently for a mistyped path)."""
    if uri.startswith("sqlite:///") and not os.path.isfile(uri.removeprefix("sqlite:///")):
        raise CompareError(
            f"no MLflow store at {uri}; run python -m runner.compare where the runs were launched "
            "(mlflow.db is there), or pass --tracking-uri sqlite:///<path>/mlflow.db or a server URL"
        )
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # a dead server: seconds, not minutes
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def find_runs(client, uri: str, args: argparse.Namespace) -> list:
    """The runs to compare, oldest first."""
    if args.runs:
        runs = [_get_run(client, run_id) for run_id in args.runs]
    elif args.sweep:
        parent = _get_run(client, args.sweep)
        runs = _search(client, parent.info.experiment_id, f"tags.`mlflow.parentRunId` = '{args.sweep}'", args.last or MAX_RUNS)
        if not runs:
            raise CompareError(f"--sweep {args.sweep}: that run has no nested jobs in {uri}; give the parent run id of a --multirun")
    else:
        experiment = client.get_experiment_by_name(args.experiment)
        if experiment is None:
            names = sorted(e.name for e in client.search_experiments())
            raise CompareError(
                f"--experiment '{args.experiment}' does not exist in {uri}; "
                + (f"pick one of: {', '.join(names)}" if names else "run a job first (python -m runner)")
            )
        runs = _search(client, experiment.experiment_id, "", args.last or 10)
        if not runs:
            raise CompareError(f"experiment '{args.experiment}' in {uri} has no runs yet; run a job first (python -m runner)")
    return sorted(runs, key=lambda run: run.info.start_time or 0)


def _get_run(client, run_id: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException:
        raise CompareError(f"run '{run_id}' is not in this store; copy its id from the run summary or the MLflow UI") from None


def _search(client, experiment_id: str, filter_string: str, count: int) -> list:
    """The newest `count` job runs (sweep parent runs left out), page by page."""
    runs, token = [], None
    while len(runs) < count:
        page = client.search_runs(
            [experiment_id], filter_string, max_results=max(count, 50), order_by=["attributes.start_time DESC"], page_token=token
        )
        runs += [run for run in page if run.data.tags.get("runner.sweep") != "true"]
        token = page.token
        if not token:
            break
    return runs[:count]


def differing_params(runs: list) -> tuple[list[tuple[str, list[str]]], int]:
    """(key, value per run) for the params whose values differ, and how many are the same."""
    keys = sorted(set().union(*(run.data.params for run in runs)))
    rows = []
    for key in keys:
        values = [run.data.params.get(key, "-") for run in runs]
        if len(set(values)) > 1:
            rows.append((key, [_short(value) for value in values]))
    return rows, len(keys) - len(rows)


def own_overrides(runs: list) -> list[str]:
    """Each run's command-line overrides minus those every run has."""
    tokens = [(run.data.tags.get("overrides") or "").replace("(none)", "").split() for run in runs]
    shared = set(tokens[0]).intersection(*tokens[1:])
    return [" ".join(token for token in own if token not in shared) for own in tokens]


def metric_rows(runs: list, patterns: str) -> list[tuple[str, list[float | None]]]:
    """(metric, final value per run) for the metrics matching the patterns, in pattern order."""
    wanted = [pattern.strip() for pattern in patterns.split(",") if pattern.strip()]
    names = set().union(*(run.data.metrics for run in runs))
    ordered: list[str] = []
    for pattern in wanted:
        ordered += sorted(name for name in names if fnmatch.fnmatchcase(name, pattern) and name not in ordered)
    return [(name, [run.data.metrics.get(name) for run in runs]) for name in ordered]


def better(name: str, optimized_metric: str | None) -> str | None:
    """'max', 'min' or None (unknown: not marked). objective follows the optimized metric."""
    if name.startswith("objective") and optimized_metric:
        name = optimized_metric
    leaf = name.rsplit("/", 1)[-1]
    if any(word in leaf for word in LOWER_IS_BETTER):
        return "min"
    if any(word in leaf for word in HIGHER_IS_BETTER):
        return "max"
    return None


def _short(value: str) -> str:
    return value if len(value) <= MAX_VALUE_CHARS else value[: MAX_VALUE_CHARS - 3] + "..."


def _header(run) -> str:
    started = datetime.fromtimestamp(run.info.start_time / 1000).strftime("%Y-%m-%d %H:%M:%S") if run.info.start_time else "-"
    name = _short(run.info.run_name or "")
    return f"{name}\n{run.info.run_id[:8]}\n{run.info.status}\n{started}"


def render(runs: list, patterns: str, title: str) -> Any:
    from rich.table import Table
    from rich.text import Text

    params, identical = differing_params(runs)
    metrics = metric_rows(runs, patterns)
    optimized = runs[0].data.tags.get("runner.optimized_metric")
    table = Table(title=title, caption="* best value in its row", show_lines=False)
    table.add_column("")
    for run in runs:
        table.add_column(Text(_header(run)), justify="right", overflow="fold")
    overrides = own_overrides(runs)
    if any(overrides):
        table.add_row(Text("overrides (not shared)"), *(Text(value or "-") for value in overrides))
    for key, values in params:
        table.add_row(Text(key), *(Text(value) for value in values))
    table.add_row(Text(f"{identical} params identical", style="dim"), *("" for _ in runs))
    table.add_section()
    for name, values in metrics:
        present = [value for value in values if value is not None]
        direction = better(name, optimized) if len(present) > 1 else None
        best = (max if direction == "max" else min)(present) if direction else None
        cells = []
        for value in values:
            if value is None:
                cells.append(Text("-"))
            elif best is not None and value == best:
                cells.append(Text(f"{value:.4f} *", style="bold green"))
            else:
                cells.append(Text(f"{value:.4f}  "))
        table.add_row(Text(name), *cells)
    if not metrics:
        table.add_row(Text(f"no metric matches {patterns}", style="dim"), *("" for _ in runs))
    return table


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from rich.console import Console

    from runner.tracking import default_tracking_uri  # the store runner itself writes to

    from runner.schema import mask_url

    store = default_tracking_uri(args.tracking_uri)
    uri = mask_url(store)  # what is printed: never a password in the URL
    try:
        client = connect(store)
        runs = find_runs(client, uri, args)
    except CompareError as error:
        print(f"runner.compare: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # the store itself failed (a server down, a foreign database)
        first = mask_url(str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__)
        print(f"runner.compare: error: the MLflow store at {uri} failed: {first}; check --tracking-uri", file=sys.stderr)
        return 2
    what = f"runs {', '.join(r[:8] for r in args.runs)}" if args.runs else f"sweep {args.sweep[:8]}" if args.sweep else f"experiment '{args.experiment}'"
    table = render(runs, args.metrics, f"{len(runs)} runs of {what} ({uri})")
    Console(width=None if sys.stdout.isatty() else 240).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
