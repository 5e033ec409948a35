"""Metrics, named the way they are logged. Which ones a run reports depends on the data's
task: classification (acc, f1, ...) or regression (mse, mae, rel_l2).

Each is a sum accumulated on the device (a confusion matrix; squared and absolute errors),
summed over DDP ranks once when computed. They replace torchmetrics, whose import (its
text metrics pull in transformers, its audio ones scipy.signal) cost 1.5 s of every run's
start-up on this project's 2-core machine; the definitions are torchmetrics' (acc micro;
f1, precision, recall macro over the classes that occur in targets or predictions, 0 where a
class's denominator is 0), and tests/test_metrics.py checks them against it.
"""

import torch

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


def _summed_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
    return tensor


def _divide(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    return torch.where(denominator > 0, numerator / denominator.clamp(min=1), torch.zeros_like(numerator))


class ConfusionMatrix:
    """Counts [target class, predicted class] of class scores [N, C] (argmax) or class indices."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu"):
        self.num_classes = int(num_classes)
        self.counts = torch.zeros(self.num_classes * self.num_classes, dtype=torch.long, device=device)

    def to(self, device: torch.device | str) -> "ConfusionMatrix":
        self.counts = self.counts.to(device)
        return self

    def update(self, scores: torch.Tensor, labels: torch.Tensor) -> None:
        predicted = scores.argmax(dim=1) if scores.dim() > 1 else scores.long()
        labels = labels.long()
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"labels run from {int(labels.min())} to {int(labels.max())}, outside 0..{self.num_classes - 1}")
        self.counts += torch.bincount(labels * self.num_classes + predicted, minlength=self.num_classes**2)

    def compute(self) -> torch.Tensor:
        """The matrix summed over ranks: rows are targets, columns predictions."""
        return _summed_over_ranks(self.counts).view(self.num_classes, self.num_classes)


class ClassificationScores(ConfusionMatrix):
    """acc (micro: the fraction right) and macro f1, precision and recall."""

    def compute(self) -> dict[str, torch.Tensor]:
        matrix = super().compute().double()
        true_positives = matrix.diagonal()
        false_positives, false_negatives = matrix.sum(0) - true_positives, matrix.sum(1) - true_positives
        present = (true_positives + false_positives + false_negatives) > 0  # torchmetrics' macro weights

        def macro(per_class: torch.Tensor) -> torch.Tensor:
            return per_class[present].mean() if bool(present.any()) else per_class.new_zeros(())

        return {
            "acc": _divide(true_positives.sum(), matrix.sum()),
            "f1": macro(_divide(2 * true_positives, 2 * true_positives + false_positives + false_negatives)),
            "precision": macro(_divide(true_positives, true_positives + false_positives)),
            "recall": macro(_divide(true_positives, true_positives + false_negatives)),
        }


class RegressionScores:
    """mse, mae and rel_l2 = ||prediction - target||_2 / ||target||_2 over every value seen."""

    def __init__(self, device: torch.device | str = "cpu"):
        # squared error, absolute error, count, squared target
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)

    def to(self, device: torch.device | str) -> "RegressionScores":
        self.sums = self.sums.to(device)
        return self

    def update(self, predictions: torch.Tensor, targets: torch.Tensor) -> None:
        error = predictions.double() - targets.double()
        self.sums += torch.stack([error.pow(2).sum(), error.abs().sum(), torch.tensor(float(error.numel()), dtype=torch.float64,
                                  device=error.device), targets.double().pow(2).sum()])

    def compute(self) -> dict[str, torch.Tensor]:
        squared, absolute, count, norm = _summed_over_ranks(self.sums).unbind()
        return {"mse": _divide(squared, count), "mae": _divide(absolute, count), "rel_l2": (squared / norm.clamp(min=1e-30)).sqrt()}


def eval_metrics(num_classes: int, task: str = "classification") -> ClassificationScores | RegressionScores:
    return RegressionScores() if task == "regression" else ClassificationScores(num_classes)


def confusion_matrix(num_classes: int) -> ConfusionMatrix:
    return ConfusionMatrix(num_classes)


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
