"""Distribution drift between the training data and the validation/test data, and between
the trained model's predictions on them: does the evaluation data still look like what the
model learned from?

Inputs are compared per feature: each value of a tabular sample or a coordinate, and for
grid inputs (image [C, H, W], signal [C, L], spectrogram [C, F, T]) each channel's mean and
standard deviation within a sample. Two scores per feature:

* PSI, the population stability index: sum over bins of (a - e) ln(a / e), with e and a the
  fractions of the training and evaluated samples in each bin; bins are quantiles of the
  training values. Rule of thumb: < 0.1 stable, 0.1-0.2 a moderate shift, > 0.2 a large one.
* KS, the two-sample Kolmogorov-Smirnov test: the largest gap between the two empirical
  distribution functions, and its p-value.

A feature counts as drifted when PSI > psi_threshold (0.2) or the KS p-value is below
ks_alpha / (number of features) (0.01 with a Bonferroni correction, so the chance that an
undrifted split flags any feature by chance stays near 1%; measured on Gaussian data: 0-3%).
PSI of a small sample is noisy (with no drift it is about (bins - 1) x (1 / train samples +
1 / evaluated samples)), so the evaluated split gets one bin per 25 samples (at most
``bins``, at least 2), and under 100 samples only the KS test counts.
"""

import copy
import itertools
import json
import logging
import time
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset, default_collate

from runner.callbacks import Callback
from runner.errors import ConfigError

log = logging.getLogger("runner")

EPSILON = 1e-4  # the fraction an empty bin counts as, so ln(a / e) stays finite
SAMPLES_PER_BIN = 25
MIN_SAMPLES_FOR_PSI = 100
GRID_MODALITIES = ("image", "signal", "spectrogram")
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


# ------------------------------------------------------------------------- scores
def _finite(values) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64).ravel()
    return values[np.isfinite(values)]


def psi(expected, actual, bins: int = 10) -> float:
    """Population stability index of `actual` against the reference `expected`, over
    `bins` quantile bins of the reference (ties merge bins)."""
    expected, actual = _finite(expected), _finite(actual)
    if not len(expected) or not len(actual):
        return float("nan")
    edges = np.unique(np.quantile(expected, np.linspace(0.0, 1.0, bins + 1)[1:-1]))
    # bin i holds (edge[i-1], edge[i]]: side="left" puts a value equal to an edge below it
    expected_counts = np.bincount(np.searchsorted(edges, expected, side="left"), minlength=len(edges) + 1)
    actual_counts = np.bincount(np.searchsorted(edges, actual, side="left"), minlength=len(edges) + 1)
    return _psi_from_counts(expected_counts, actual_counts)


def _psi_from_counts(expected_counts, actual_counts) -> float:
    e = np.maximum(np.asarray(expected_counts, np.float64) / max(np.sum(expected_counts), 1), EPSILON)
    a = np.maximum(np.asarray(actual_counts, np.float64) / max(np.sum(actual_counts), 1), EPSILON)
    return float(np.sum((a - e) * np.log(a / e)))


def categorical_psi(expected_labels, actual_labels, num_classes: int) -> float:
    """PSI of two label distributions (e.g. predicted classes): one bin per class."""
    expected = np.bincount(np.asarray(expected_labels, np.int64).ravel(), minlength=num_classes)
    actual = np.bincount(np.asarray(actual_labels, np.int64).ravel(), minlength=num_classes)
    return _psi_from_counts(expected, actual)


def ks(expected, actual) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov test: (statistic, p-value)."""
    from scipy.stats import ks_2samp

    expected, actual = _finite(expected), _finite(actual)
    if not len(expected) or not len(actual):
        return float("nan"), float("nan")
    result = ks_2samp(expected, actual)
    return float(result.statistic), float(result.pvalue)


def psi_bins(eval_samples: int, bins: int = 10) -> int:
    """One bin per SAMPLES_PER_BIN evaluated samples, between 2 and `bins`."""
    return int(min(bins, max(2, eval_samples // SAMPLES_PER_BIN)))


# ----------------------------------------------------------------------- features
def input_features(x: torch.Tensor, modality: str) -> tuple[np.ndarray, list[str]]:
    """Samples as rows of per-feature values: tabular and coordinate samples as they are
    (flattened), grid samples as each channel's mean and standard deviation."""
    x = x.detach().float().cpu()
    if modality in GRID_MODALITIES and x.dim() >= 3:
        values = x.flatten(2)  # [N, C, everything else]
        channels = values.shape[1]
        columns = torch.cat([values.mean(dim=2), values.std(dim=2, correction=0)], dim=1)
        names = [f"ch{c} mean" for c in range(channels)] + [f"ch{c} std" for c in range(channels)]
        return columns.numpy(), names
    columns = x.reshape(len(x), -1)
    return columns.numpy(), [f"x{i}" for i in range(columns.shape[1])]


def feature_drift(train_x, eval_x, modality: str = "tabular", names: Sequence[str] | None = None,
                  psi_threshold: float = 0.2, ks_alpha: float = 0.01, bins: int = 10) -> dict[str, Any]:
    """Per-feature PSI and KS of `eval_x` against `train_x` (tensors of samples, turned into
    features by `input_features`, or 2-D arrays [samples, features] with `names`), and the
    summary: psi_max, psi_mean, ks_max, features_drifted (the rule is in the module's doc)."""
    if names is None:
        (train, names), (held_out, _) = input_features(torch.as_tensor(train_x), modality), input_features(torch.as_tensor(eval_x), modality)
    else:
        train, held_out = np.asarray(train_x, np.float64), np.asarray(eval_x, np.float64)
    count = len(names)
    psi_used = len(held_out) >= MIN_SAMPLES_FOR_PSI
    k = psi_bins(len(held_out), bins)
    features = []
    for i, name in enumerate(names):
        score = psi(train[:, i], held_out[:, i], k)
        statistic, p_value = ks(train[:, i], held_out[:, i])
        ks_flag = bool(p_value < ks_alpha / count)
        features.append({
            "name": name, "psi": score, "ks": statistic, "p_value": p_value, "ks_flag": ks_flag,
            "drifted": bool((psi_used and score > psi_threshold) or ks_flag),
            "train_mean": float(np.nanmean(train[:, i])), "train_std": float(np.nanstd(train[:, i])),
            "eval_mean": float(np.nanmean(held_out[:, i])), "eval_std": float(np.nanstd(held_out[:, i])),
            "train_quantiles": _quantiles(train[:, i]), "eval_quantiles": _quantiles(held_out[:, i]),
        })
    scores = [f["psi"] for f in features]
    return {
        "train_samples": len(train), "eval_samples": len(held_out), "bins": k,
        "psi_threshold": psi_threshold, "ks_alpha": ks_alpha, "psi_used": psi_used,
        "psi_max": float(np.nanmax(scores)), "psi_mean": float(np.nanmean(scores)),
        "ks_max": float(np.nanmax([f["ks"] for f in features])),
        "features_drifted": sum(f["drifted"] for f in features),
        "features": features,
    }


def _quantiles(values) -> list[float]:
    """The 5th, 25th, 50th, 75th and 95th percentiles (what the box plots draw)."""
    values = _finite(values)
    return np.quantile(values, QUANTILES).tolist() if len(values) else [float("nan")] * len(QUANTILES)


# -------------------------------------------------------------------- predictions
def prediction_drift(train_outputs: torch.Tensor, eval_outputs: torch.Tensor, task: str, bins: int = 10) -> dict[str, Any]:
    """Classification: PSI of the predicted-class distribution (psi) and of the confidence,
    the top softmax probability (confidence_psi). Regression: PSI of the predicted values
    (the largest over outputs)."""
    train_outputs, eval_outputs = train_outputs.float().cpu(), eval_outputs.float().cpu()
    k = psi_bins(len(eval_outputs), bins)
    if task == "classification":
        train_probs, eval_probs = train_outputs.softmax(dim=1), eval_outputs.softmax(dim=1)
        train_conf, train_pred = train_probs.max(dim=1)
        eval_conf, eval_pred = eval_probs.max(dim=1)
        confidence = psi(train_conf.numpy(), eval_conf.numpy(), k)
        return {
            "psi": categorical_psi(train_pred.numpy(), eval_pred.numpy(), train_outputs.shape[1]),
            "confidence_psi": confidence, "psi_shown": confidence, "label": "confidence (top softmax probability)",
            "train_values": train_conf.tolist(), "eval_values": eval_conf.tolist(),
        }
    train_values, eval_values = train_outputs.reshape(len(train_outputs), -1), eval_outputs.reshape(len(eval_outputs), -1)
    score = max(psi(train_values[:, i].numpy(), eval_values[:, i].numpy(), k) for i in range(train_values.shape[1]))
    return {
        "psi": score, "psi_shown": score, "label": "predicted value",
        "train_values": train_values.flatten().tolist(), "eval_values": eval_values.flatten().tolist(),
    }


def per_class_accuracy(outputs: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[float | None]:
    """Fraction right per true class; None for a class with no samples."""
    from runner.metrics import hard_labels

    labels = hard_labels(labels).cpu()
    right = outputs.argmax(dim=1).cpu() == labels
    totals = torch.bincount(labels, minlength=num_classes)
    hits = torch.bincount(labels[right], minlength=num_classes)
    return [float(h) / float(t) if t else None for h, t in zip(hits.tolist(), totals.tolist())]


@torch.no_grad()
def predict(model: torch.nn.Module, x: torch.Tensor, device: torch.device, batch_size: int = 512) -> torch.Tensor:
    """The model's outputs for x, batched, in eval mode (its mode is restored after)."""
    was_training = model.training
    model.eval()
    try:
        return torch.cat([model(x[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)])
    finally:
        model.train(was_training)


def sample(dataset: Dataset, limit: int, seed: int = 0, num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to `limit` samples (x, y) of a dataset: all of them, or a seeded random subset
    (a private generator: the global random streams are left alone). Files decoded on
    access (image and audio folders) are read by `num_workers` DataLoader workers, as in
    training; a stream gives its first `limit` samples."""
    from torch.utils.data import DataLoader, IterableDataset, Subset

    if isinstance(dataset, IterableDataset):
        stream = copy.copy(dataset)  # its own settings and position: the run's loaders keep theirs
        stream.position = torch.zeros(2, dtype=torch.long)
        stream.configure(batch_size=256, num_workers=0)
        taken = list(itertools.islice(iter(stream), limit))
        return default_collate(taken)[:2]
    size = len(dataset)
    if size > limit:
        indices = torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:limit].sort().values
    else:
        indices = torch.arange(size)
    if isinstance(dataset, TensorDataset):
        x, y = dataset.tensors[:2]
        return x[indices], y[indices]
    loader = DataLoader(Subset(dataset, indices.tolist()), batch_size=256, num_workers=num_workers)
    batches = [batch[:2] for batch in loader]
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


# ----------------------------------------------------------------------- callback
class DriftReport(Callback):
    """After the final test: input drift of each evaluation split against the training split
    (per feature, PSI and KS), drift of the model's predictions, per-class accuracy. Logs
    drift/<split>/{psi_max,psi_mean,ks_max,features_drifted,prediction_psi} (and
    confidence_psi for classification), writes drift_<split>.png (4 panels) and drift.json
    to the output directory and lists them as artifacts. Rank 0 only; the evaluation weights
    (loop.eval_model when a callback set one), at most max_samples samples per split."""

    def __init__(self, splits: Sequence[str] = ("val", "test"), max_samples: int = 5000,
                 psi_threshold: float = 0.2, ks_alpha: float = 0.01, bins: int = 10):
        unknown = [split for split in splits if split not in ("val", "test")]
        if unknown:
            raise ConfigError(f"callbacks.drift.splits={list(splits)}: {unknown} not known; use val and/or test (each is compared with train)")
        if max_samples < 10 or bins < 2 or psi_threshold <= 0 or not 0 < ks_alpha < 1:
            raise ConfigError(
                f"callbacks.drift: max_samples={max_samples}, bins={bins}, psi_threshold={psi_threshold}, ks_alpha={ks_alpha} "
                "out of range; use max_samples >= 10, bins >= 2, psi_threshold > 0 and 0 < ks_alpha < 1"
            )
        self.splits, self.max_samples = list(splits), max_samples
        self.psi_threshold, self.ks_alpha, self.bins = psi_threshold, ks_alpha, bins
        self.reports: dict[str, dict] = {}

    def on_test_end(self, loop, metrics):
        from runner.distributed import is_rank_zero

        if not is_rank_zero():
            return
        started = time.perf_counter()
        data = loop.parts.data
        model = loop.eval_model if loop.eval_model is not None else loop.model
        batch_size = max(data.batch_size, 256)
        train_x, train_y = sample(data.train, self.max_samples, num_workers=data.num_workers)
        train_outputs = predict(model, train_x, loop.device, batch_size)
        self.reports = {split: self.split_report(data, split, model, loop.device, batch_size, train_x, train_y, train_outputs) for split in self.splits}
        self._write(loop)
        log.info("drift: %s (%.2f s)", "; ".join(
            f"{split} psi_max {r['psi_max']:.3f} ks_max {r['ks_max']:.3f} drifted {r['features_drifted']}/{len(r['features'])}"
            for split, r in self.reports.items()), time.perf_counter() - started)

    def split_report(self, data, split, model, device, batch_size, train_x, train_y, train_outputs) -> dict[str, Any]:
        x, y = sample(getattr(data, split), self.max_samples, num_workers=data.num_workers)
        report = feature_drift(train_x, x, data.modality, psi_threshold=self.psi_threshold, ks_alpha=self.ks_alpha, bins=self.bins)
        outputs = predict(model, x, device, batch_size)
        report["prediction"] = prediction_drift(train_outputs, outputs, data.task, self.bins)
        if data.task == "classification":
            report["per_class_accuracy"] = {
                "class_names": list(data.class_names),
                "train": per_class_accuracy(train_outputs, train_y, data.num_classes),
                split: per_class_accuracy(outputs, y, data.num_classes),
            }
        return report

    def metrics(self) -> dict[str, float]:
        values = {}
        for split, report in self.reports.items():
            for key in ("psi_max", "psi_mean", "ks_max", "features_drifted"):
                values[f"drift/{split}/{key}"] = float(report[key])
            values[f"drift/{split}/prediction_psi"] = report["prediction"]["psi"]
            if "confidence_psi" in report["prediction"]:
                values[f"drift/{split}/confidence_psi"] = report["prediction"]["confidence_psi"]
        return values

    def _write(self, loop) -> None:
        from runner.plots import drift_png

        output_dir = loop.info["output_dir"]
        artifacts = loop.info.setdefault("artifacts", [])
        loop.log(self.metrics())
        for split, report in self.reports.items():
            artifacts.append((drift_png(report, split, output_dir / f"drift_{split}.png"), None))
        rule = (f"a feature is drifted when PSI > {self.psi_threshold:g} (PSI counts only with at least {MIN_SAMPLES_FOR_PSI} "
                f"evaluated samples) or the KS p-value < {self.ks_alpha:g} / number of features (Bonferroni)")
        summary = {"rule": rule, "splits": {split: _without_values(report) for split, report in self.reports.items()}}
        path = output_dir / "drift.json"
        path.write_text(json.dumps(summary, indent=2, allow_nan=True) + "\n")
        artifacts.append((path, None))


def _without_values(report: dict) -> dict:
    """A report for drift.json: the per-sample prediction values stay out."""
    prediction = {key: value for key, value in report["prediction"].items() if not key.endswith("_values")}
    return {**report, "prediction": prediction}
