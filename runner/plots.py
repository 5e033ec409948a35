"""Pictures people would rather look at than read. matplotlib, headless (Agg)."""

from pathlib import Path
from typing import Sequence


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display needed, also on Slurm nodes
    import matplotlib.pyplot as plt

    return plt


def confusion_matrix_png(matrix: Sequence[Sequence[int]], class_names: Sequence[str], path: Path, title: str = "test confusion matrix") -> Path:
    plt = _pyplot()
    size = len(class_names)
    # names longer than a digit or two (synthetic_audio's rising_chirp) need room and a slant
    longest = max((len(str(name)) for name in class_names), default=1)
    margin = 0.07 * longest if longest > 2 else 0.0
    figure, axes = plt.subplots(figsize=(1.8 + 0.5 * size + margin, 1.4 + 0.5 * size + margin), dpi=110)
    image = axes.imshow(matrix, cmap="Blues")
    slanted = size > 10 or longest > 2
    axes.set_xticks(range(size), labels=class_names, rotation=40 if slanted else 0, ha="right" if slanted else "center", rotation_mode="anchor")
    axes.set_yticks(range(size), labels=class_names)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    axes.set_title(title)
    peak = max(max(row) for row in matrix) or 1
    for row, values in enumerate(matrix):
        for column, value in enumerate(values):
            if value:
                axes.text(column, row, str(value), ha="center", va="center", fontsize=8, color="white" if value > peak / 2 else "black")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def objective_per_job_png(jobs: Sequence[int], values: Sequence[float | None], metric: str, path: Path, best: int | None = None) -> Path:
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(max(4.0, 0.4 * len(jobs) + 2), 3.2), dpi=110)
    shown = [(job, value) for job, value in zip(jobs, values) if value is not None]
    failed = [job for job, value in zip(jobs, values) if value is None]
    if shown:
        axes.bar([job for job, _ in shown], [value for _, value in shown], color=["tab:orange" if job == best else "tab:blue" for job, _ in shown])
    for job in failed:
        axes.axvline(job, color="tab:red", linestyle="--")
    axes.set_xticks(list(jobs))
    axes.set_xlabel("job number" + (" (red line: failed)" if failed else ""))
    axes.set_ylabel(metric)
    axes.set_title(f"{metric} per job" + (f" (best: job {best})" if best is not None else ""))
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


# ------------------------------------------------------------------ training curves
# which logged series share a panel, in the order the panels appear
CURVE_PANELS = (
    ("loss", ("train/loss", "train/step_loss", "val/loss")),
    ("metrics", ("val/acc", "val/f1", "val/precision", "val/recall", "train/acc", "val/mse", "val/mae", "val/rel_l2")),
    ("learning rate", ("lr",)),
)


def _spans_decades(values: Sequence[float], decades: float = 1.5) -> bool:
    """Positive values over more than ~1.5 decades read better on a log axis."""
    positive = [value for value in values if value > 0 and value == value]
    return len(positive) > 1 and max(positive) / min(positive) > 10**decades


def training_curves_png(series: dict[str, tuple[Sequence[int], Sequence[float]]], path: Path, title: str = "training curves") -> Path | None:
    """One panel each for the losses, the validation metrics and the learning rate (and its
    other parameter groups), against the optimizer step. ``series`` maps a logged name to
    (steps, values); panels with nothing logged are left out. None when nothing is drawn."""
    panels = []
    for name, keys in CURVE_PANELS:
        extra = sorted(key for key in series if key.startswith("lr/group")) if name == "learning rate" else []
        present = [key for key in (*keys, *extra) if key in series and len(series[key][0])]
        if present:
            panels.append((name, present))
    if not panels:
        return None
    plt = _pyplot()
    figure, axes_row = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.0), dpi=110, squeeze=False)
    for axes, (name, keys) in zip(axes_row[0], panels):
        values = [value for key in keys for value in series[key][1]]
        log_scale = _spans_decades(values)
        hidden = log_scale and any(value <= 0 for value in values)
        for key in keys:
            steps, ys = series[key]
            if log_scale:  # a log axis cannot show zero (a cosine schedule's last rate)
                steps, ys = zip(*[(s, v) for s, v in zip(steps, ys) if v > 0]) if any(v > 0 for v in ys) else ([], [])
            thin = key == "train/step_loss"
            axes.plot(steps, ys, label=key, linewidth=0.8 if thin else 1.6, alpha=0.6 if thin else 1.0,
                      marker=None if thin or len(steps) > 40 else "o", markersize=3)
        if log_scale:
            axes.set_yscale("log")
        else:
            axes.ticklabel_format(axis="y", useOffset=False)
            if values and min(values) == max(values) != 0:  # a constant rate: around it, not noise digits
                axes.set_ylim(sorted((0.0, 2 * values[0])))
        axes.set_title(name + (" (log scale" + ("; values <= 0 not shown)" if hidden else ")") if log_scale else ""))
        axes.set_xlabel("optimizer step")
        axes.set_ylabel({"loss": "loss", "learning rate": "learning rate"}.get(name, "value"))
        axes.grid(True, which="major", alpha=0.3)
        axes.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


# -------------------------------------------------------------------------- drift
DRIFT_COLOURS = {"train": "tab:blue", "eval": "tab:orange", "drifted": "tab:red", "steady": "tab:gray"}


def _shown_features(features: Sequence[dict], limit: int = 20) -> list[dict]:
    """All features when few, else the `limit` with the highest PSI, in their own order."""
    if len(features) <= limit:
        return list(features)
    top = sorted(range(len(features)), key=lambda i: -features[i]["psi"])[:limit]
    return [features[i] for i in sorted(top)]


def _feature_rows(axes, shown: Sequence[dict], labels: Sequence[str]) -> None:
    """Features top to bottom; a few features keep rows of a usual height."""
    axes.set_yticks(range(len(shown)), labels=labels, fontsize=8 if len(shown) > 10 else 9)
    axes.set_ylim(max(len(shown), 5) - 0.4, -0.6)


def _input_statistics_panel(axes, report: dict, split: str) -> None:
    """Each feature's distribution in train and in the evaluated split as box plots (box:
    25th-75th percentile, line: median, whiskers: 5th-95th), standardised by the training
    mean and standard deviation so features on different scales share one axis."""
    shown = _shown_features(report["features"])
    boxes, positions, colours = [], [], []
    for row, feature in enumerate(shown):
        scale = feature["train_std"] or 1.0
        for offset, key, colour in ((-0.18, "train", DRIFT_COLOURS["train"]), (0.18, "eval", DRIFT_COLOURS["eval"])):
            low, q1, median, q3, high = ((q - feature["train_mean"]) / scale for q in feature[f"{key}_quantiles"])
            boxes.append({"whislo": low, "q1": q1, "med": median, "q3": q3, "whishi": high, "fliers": []})
            positions.append(row + offset)
            colours.append(colour)
    drawn = axes.bxp(boxes, positions=positions, widths=0.3, orientation="horizontal", patch_artist=True, showfliers=False)
    for patch, colour in zip(drawn["boxes"], colours):
        patch.set(facecolor=colour, alpha=0.55, edgecolor=colour)
    for line in drawn["medians"]:
        line.set(color="black")
    _feature_rows(axes, shown, [f["name"] for f in shown])
    axes.axvline(0.0, color="black", linewidth=0.6)
    axes.set_xlabel("training standard deviations from the training mean (box: 25-75%, whiskers: 5-95%)")
    count = f" ({len(shown)} of {len(report['features'])} features: highest PSI)" if len(shown) < len(report["features"]) else ""
    axes.set_title(f"input statistics: train vs {split}{count}", fontsize=10)
    axes.grid(True, axis="x", alpha=0.3)
    from matplotlib.patches import Patch

    axes.legend(handles=[Patch(color=DRIFT_COLOURS["train"], alpha=0.55, label="train"), Patch(color=DRIFT_COLOURS["eval"], alpha=0.55, label=split)], fontsize=8, loc="lower right")


def _drift_score_panel(axes, report: dict) -> None:
    shown = _shown_features(report["features"])  # the rows of the input statistics panel
    rows = range(len(shown))
    colours = [DRIFT_COLOURS["drifted" if f["drifted"] else "steady"] for f in shown]
    bars = axes.barh(list(rows), [f["psi"] for f in shown], color=colours, height=0.6)
    axes.bar_label(bars, fmt="%.3f", padding=3, fontsize=8)
    _feature_rows(axes, shown, [f["name"] + (" (KS)" if f["ks_flag"] else "") for f in shown])
    threshold = report["psi_threshold"]
    axes.axvline(threshold, color=DRIFT_COLOURS["drifted"], linestyle="--", label=f"PSI threshold {threshold:g}" + ("" if report["psi_used"] else " (not used: split too small)"))
    axes.set_xlim(0, max(threshold * 1.5, max((f["psi"] for f in shown), default=0.0) * 1.2))
    axes.set_xlabel("population stability index (PSI)")
    axes.set_title(f"drift score per feature: {report['features_drifted']} of {len(report['features'])} drifted "
                   f"(red; '(KS)': KS p < {report['ks_alpha']:g}/{len(report['features'])})", fontsize=10)
    axes.grid(True, axis="x", alpha=0.3)
    axes.legend(fontsize=8, loc="lower right")


def _prediction_panel(axes, report: dict, split: str) -> None:
    prediction = report.get("prediction")
    if not prediction:
        axes.text(0.5, 0.5, "no model predictions", ha="center", va="center", transform=axes.transAxes)
        axes.set_axis_off()
        return
    train, held_out = prediction["train_values"], prediction["eval_values"]
    low, high = min(train + held_out, default=0.0), max(train + held_out, default=1.0)
    edges = [low + (high - low) * i / 30 for i in range(31)] if high > low else 30
    for name, values in (("train", train), (split, held_out)):
        weights = [1.0 / len(values)] * len(values) if values else None
        axes.hist(values, bins=edges, weights=weights, histtype="step", linewidth=1.8, label=f"{name} ({len(values)})",
                  color=DRIFT_COLOURS["train" if name == "train" else "eval"])
    axes.set_xlabel(prediction["label"])
    axes.set_ylabel("fraction of samples")
    axes.set_title(f"{prediction['label']}: train vs {split} (PSI {prediction['psi_shown']:.3f})", fontsize=10)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8, loc="upper left")


def _per_class_panel(axes, report: dict, split: str) -> None:
    accuracy = report.get("per_class_accuracy")
    if not accuracy:
        axes.text(0.5, 0.5, "per-class accuracy: classification runs only\n(this run's task is regression)",
                  ha="center", va="center", transform=axes.transAxes, fontsize=10)
        axes.set_title("per-class accuracy", fontsize=10)
        axes.set_xticks([])
        axes.set_yticks([])
        return
    shown = list(range(len(accuracy["class_names"])))
    if len(shown) > 20:  # the 20 classes the evaluated split gets most wrong, in class order
        shown = sorted(sorted(shown, key=lambda i: accuracy[split][i] if accuracy[split][i] is not None else 2.0)[:20])
    names = [accuracy["class_names"][i] for i in shown]
    positions = range(len(names))
    for offset, name in ((-0.2, "train"), (0.2, split)):
        values = [accuracy[name][i] if accuracy[name][i] is not None else 0.0 for i in shown]
        axes.bar([p + offset for p in positions], values, width=0.4, label=name, color=DRIFT_COLOURS["train" if name == "train" else "eval"])
    slanted = len(names) > 10 or max(len(str(n)) for n in names) > 2
    axes.set_xticks(list(positions), labels=names, rotation=35 if slanted else 0, ha="right" if slanted else "center", rotation_mode="anchor", fontsize=8)
    axes.set_ylim(0, 1.25)
    axes.set_yticks([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    axes.set_xlabel("true class")
    axes.set_ylabel("accuracy")
    lowest = f" ({len(shown)} of {len(accuracy['class_names'])} classes: lowest {split} accuracy)" if len(shown) < len(accuracy["class_names"]) else ""
    axes.set_title(f"per-class accuracy: train vs {split}{lowest}", fontsize=10)
    axes.grid(True, axis="y", alpha=0.3)
    axes.legend(fontsize=8, loc="upper right", ncols=2)


def drift_png(report: dict, split: str, path: Path) -> Path:
    """The 4-panel drift picture of one evaluation split against the training split, from
    a report of runner.drift.DriftReport.split_report (feature_drift's summary and
    features, plus prediction and, for classification, per_class_accuracy)."""
    plt = _pyplot()
    figure, axes = plt.subplots(2, 2, figsize=(13, 9), dpi=100)
    _input_statistics_panel(axes[0][0], report, split)
    _drift_score_panel(axes[0][1], report)
    _prediction_panel(axes[1][0], report, split)
    _per_class_panel(axes[1][1], report, split)
    verdict = "DRIFT" if report["features_drifted"] else "no drift"
    figure.suptitle(f"train vs {split}: {verdict} ({report['features_drifted']} of {len(report['features'])} input features drifted; "
                    f"{report['train_samples']} train / {report['eval_samples']} {split} samples)",
                    color=DRIFT_COLOURS["drifted"] if report["features_drifted"] else "black", fontsize=12)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path
