"""Metrics through torchmetrics, named the way they are logged. Which ones a run reports
depends on the data's task: classification (acc, f1, ...) or regression (mse, mae, rel_l2)."""

import torch
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)
from torchmetrics.regression import MeanAbsoluteError, MeanSquaredError

TASKS = ("classification", "regression")
TRAIN_METRICS = {"classification": ("loss", "acc", "step_loss"), "regression": ("loss", "step_loss")}
EVAL_METRICS = {"classification": ("loss", "acc", "f1", "precision", "recall"), "regression": ("loss", "mse", "mae", "rel_l2")}
SPLITS = ("train", "val", "test")


def metric_names(task: str | None = None) -> list[str]:
    """Every scalar a run of this task reports (all tasks when None): what optimized_metric and
    monitors may name."""
    names: list[str] = []
    for name in TASKS if task is None else (task,):
        names += [f"train/{metric}" for metric in TRAIN_METRICS[name]]
        names += [f"{split}/{metric}" for split in ("val", "test") for metric in EVAL_METRICS[name]]
    names = list(dict.fromkeys(names))
    return names + ["model/params"]  # trainable parameters: a second objective for size


class RelativeL2Error(Metric):
    """||prediction - target||_2 / ||target||_2 over every value seen."""

    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("error", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("norm", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        self.error += (preds.double() - target.double()).pow(2).sum()
        self.norm += target.double().pow(2).sum()

    def compute(self) -> torch.Tensor:
        return (self.error / self.norm.clamp(min=1e-30)).sqrt()


def eval_metrics(num_classes: int, task: str = "classification") -> MetricCollection:
    if task == "regression":
        return MetricCollection({"mse": MeanSquaredError(), "mae": MeanAbsoluteError(), "rel_l2": RelativeL2Error()})
    # acc is micro accuracy (fraction of samples right); f1/precision/recall are macro
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes, average="micro"),
            "f1": MulticlassF1Score(num_classes, average="macro"),
            "precision": MulticlassPrecision(num_classes, average="macro"),
            "recall": MulticlassRecall(num_classes, average="macro"),
        }
    )


def confusion_matrix(num_classes: int) -> MulticlassConfusionMatrix:
    return MulticlassConfusionMatrix(num_classes)


def hard_labels(target: torch.Tensor) -> torch.Tensor:
    """Class indices from index or probability targets."""
    return target.argmax(dim=1) if target.dim() > 1 else target


def observed(outputs: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Regression pairs where the target is known: data sets mark unobserved targets NaN
    (e.g. PINN collocation points, which only the physics term of the loss uses)."""
    outputs = outputs.float().reshape(target.shape)
    known = ~torch.isnan(target)
    return outputs[known], target[known]


def check_metric_name(key: str, name: str, splits: tuple[str, ...] = SPLITS, task: str | None = None) -> str:
    """Return name if the run reports it, else raise a ConfigError listing the ones it does."""
    from runner.errors import ConfigError

    known = [metric for metric in metric_names(task) if metric.split("/")[0] in splits or (splits == SPLITS and metric.startswith("model/"))]
    if name not in known:
        what = f"a {task} run" if task else "this run"
        # a classification default (val/acc) on regression data: say where the regression settings are
        hint = " (regression data: experiment=regression monitors val/mse)" if task == "regression" and name in metric_names() else ""
        raise ConfigError(f"{key}='{name}' is not a metric {what} reports{hint}; use one of {', '.join(known)}")
    return name


def metric_direction(name: str) -> str:
    """Whether a sweep wants the metric small (losses, errors) or large (everything else)."""
    return "minimize" if name.split("/")[-1] in ("loss", "params", "mse", "mae", "rel_l2") else "maximize"
