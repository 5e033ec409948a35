"""Pictures (training curves, drift) and the drift scores: identities of PSI and KS, a
synthetic shift that must be found, unshifted splits that must not, and whole runs."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from runner.build import build
from runner.callbacks import TrainingCurves
from runner.drift import DriftReport, categorical_psi, feature_drift, ks, per_class_accuracy, psi
from runner.errors import ConfigError
from runner.loop import Loop
from runner.plots import confusion_matrix_png, training_curves_png
from runner.run import resolved, run
from tests.conftest import compose_config

SHIFTED = (1, 5)  # features of the tabular set moved by +1 training std in the val split


def _valid_png(path, min_width=500, min_height=300):
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        width, height = image.size
    assert min_width <= width <= 4000 and min_height <= height <= 3000, (path.name, image.size)


# ----------------------------------------------------------------------- the scores
def test_psi_is_zero_for_identical_samples_and_large_for_a_shift():
    rng = np.random.default_rng(0)
    reference, same, other = rng.normal(size=3000), rng.normal(size=1000), rng.normal(size=1000)
    assert psi(reference, reference) == pytest.approx(0.0, abs=1e-12)
    assert psi(reference, same) < 0.05 and psi(reference, other) < 0.05
    assert psi(reference, same + 1.0) > 0.2  # +1 std: about 0.9 with 10 bins
    assert psi(reference, same * 3.0) > 0.2  # wider, same mean
    # empty bins count as a small fraction, not as zero: the score stays finite
    assert np.isfinite(psi(reference, np.full(100, 10.0)))


def test_ks_p_value_is_small_for_a_shift_only():
    rng = np.random.default_rng(1)
    reference, sample = rng.normal(size=2000), rng.normal(size=500)
    statistic, p_value = ks(reference, sample + 0.5)
    assert statistic > 0.15 and p_value < 1e-6
    statistic, p_value = ks(reference, sample)
    assert statistic < 0.08 and p_value > 0.01


def test_label_psi_and_per_class_accuracy():
    assert categorical_psi([0, 1, 2, 0, 1, 2], [2, 1, 0, 2, 1, 0], 3) == pytest.approx(0.0)
    assert categorical_psi([0] * 50 + [1] * 50, [0] * 90 + [1] * 10, 2) > 0.2
    outputs = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 2.0]])
    assert per_class_accuracy(outputs, torch.tensor([0, 1, 1, 2]), 4) == [1.0, 0.5, 1.0, None]


def test_digits_splits_show_no_input_drift():
    data = build(compose_config(["trainer.device=cpu", "logger=none"])).data
    train = data.train.tensors[0]
    for split in ("val", "test"):
        report = feature_drift(train, getattr(data, split).tensors[0], data.modality)
        assert [f["name"] for f in report["features"]] == ["ch0 mean", "ch0 std"]
        assert report["features_drifted"] == 0 and report["psi_max"] < 0.1 and report["bins"] == 10


# --------------------------------------------------- a synthetic shift, on a loop
def _tabular_loop(tmp_path, shift: float) -> Loop:
    """An MLP on 8 Gaussian features (data=tensors); the val split's SHIFTED features are
    moved by `shift` training standard deviations after the (random, stratified) split."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 8)).astype("float32") * np.arange(1, 9, dtype="float32")  # features on different scales
    y = (x[:, 0] + x[:, 2] / 3 > 0).astype("int64") + (x[:, 3] > 2).astype("int64")
    np.savez(tmp_path / "tabular.npz", x=x, y=y)
    cfg = compose_config(["data=tensors", f"data.path={tmp_path / 'tabular.npz'}", "model=mlp", "trainer.device=cpu", "logger=none", "callbacks=none"])
    parts = build(cfg)
    train, val = parts.data.train.tensors[0], parts.data.val.tensors[0]
    for feature in SHIFTED:
        val[:, feature] += shift * train[:, feature].std()
    loop = Loop(parts, cfg.trainer, torch.device("cpu"), tmp_path / "checkpoints", resolved(cfg))
    loop.info["output_dir"] = tmp_path
    return loop


def test_a_synthetic_shift_is_found_and_an_unshifted_split_is_not(tmp_path):
    loop = _tabular_loop(tmp_path, shift=1.0)
    drift = DriftReport()
    drift.on_test_end(loop, {})
    val, test = drift.reports["val"], drift.reports["test"]
    flagged = {f["name"] for f in val["features"] if f["drifted"]}
    assert flagged == {f"x{i}" for i in SHIFTED} and val["features_drifted"] == 2
    assert all(f["psi"] > 0.2 and f["ks_flag"] for f in val["features"] if f["drifted"])
    assert val["psi_max"] > 0.5 and val["ks_max"] > 0.3
    assert test["features_drifted"] == 0 and test["psi_max"] < 0.1  # the test split was left alone
    metrics = loop.state.metrics  # what loop.log recorded (and loggers received)
    assert metrics["drift/val/features_drifted"] == 2.0 and metrics["drift/test/features_drifted"] == 0.0
    for split in ("val", "test"):
        for key in ("psi_max", "psi_mean", "ks_max", "prediction_psi", "confidence_psi"):
            assert np.isfinite(metrics[f"drift/{split}/{key}"]), (split, key)
        _valid_png(tmp_path / f"drift_{split}.png", 1000, 700)
    saved = json.loads((tmp_path / "drift.json").read_text())
    assert "Bonferroni" in saved["rule"] and saved["splits"]["val"]["features_drifted"] == 2
    assert "train_values" not in saved["splits"]["val"]["prediction"]
    assert saved["splits"]["val"]["per_class_accuracy"]["class_names"] == ["0", "1", "2"]
    assert sorted(path.name for path, _ in loop.info["artifacts"]) == ["drift.json", "drift_test.png", "drift_val.png"]


def test_without_a_shift_nothing_is_flagged(tmp_path):
    drift = DriftReport()
    drift.on_test_end(_tabular_loop(tmp_path, shift=0.0), {})
    assert [report["features_drifted"] for report in drift.reports.values()] == [0, 0]


def test_a_small_split_is_judged_by_ks_alone():
    rng = np.random.default_rng(2)
    train, small = rng.normal(size=(1000, 4)), rng.normal(size=(40, 4))
    report = feature_drift(train, small, names=["a", "b", "c", "d"])
    assert not report["psi_used"] and report["bins"] == 2 and report["features_drifted"] == 0
    small[:, 2] += 2.0
    report = feature_drift(train, small, names=["a", "b", "c", "d"])
    assert [f["name"] for f in report["features"] if f["drifted"]] == ["c"]


def test_regression_draws_predictions_and_says_why_no_per_class_accuracy(tmp_path):
    cfg = compose_config(["data=ode", "model=pinn", "loss=physics", "optimized_metric=val/rel_l2", "trainer.device=cpu", "logger=none",
                          "callbacks=none", "data.num_collocation=400", "data.num_test=200"])
    loop = Loop(build(cfg), cfg.trainer, torch.device("cpu"), tmp_path / "checkpoints", resolved(cfg))
    loop.info["output_dir"] = tmp_path
    drift = DriftReport(splits=["test"])
    drift.on_test_end(loop, {})
    report = drift.reports["test"]
    assert report["features_drifted"] == 0 and "per_class_accuracy" not in report
    assert report["prediction"]["label"] == "predicted value" and "drift/test/confidence_psi" not in loop.state.metrics
    _valid_png(tmp_path / "drift_test.png", 1000, 700)


def test_drift_settings_are_checked():
    with pytest.raises(ConfigError, match=r"callbacks.drift.splits=\['train'\]"):
        DriftReport(splits=["train"])
    with pytest.raises(ConfigError, match="psi_threshold > 0"):
        DriftReport(psi_threshold=0)


# ------------------------------------------------------------------------ pictures
def test_training_curves_panels_and_log_scale(tmp_path):
    steps = list(range(10, 210, 10))
    series = {
        "train/loss": (steps, [1.0 / s for s in steps]),
        "val/loss": (steps, [1.2 / s for s in steps]),
        "val/rel_l2": (steps, [0.5 / s for s in steps]),
        "lr": (steps, [1e-2 * 0.7**i for i in range(len(steps) - 1)] + [0.0]),  # decades, ending at 0
    }
    path = training_curves_png(series, tmp_path / "curves.png")
    _valid_png(path, 1200, 350)
    assert training_curves_png({"epoch": ([1], [1.0])}, tmp_path / "none.png") is None


def test_confusion_matrix_with_long_class_names(tmp_path):
    names = ["rising_chirp", "falling_chirp", "low_tone", "high_tone", "two_tone", "pulses"]
    matrix = [[30 if i == j else (1 if j == i + 1 else 0) for j in range(6)] for i in range(6)]
    _valid_png(confusion_matrix_png(matrix, names, tmp_path / "six.png"), 400, 400)
    _valid_png(confusion_matrix_png([[5] * 10] * 10, [str(i) for i in range(10)], tmp_path / "ten.png"), 500, 500)


def test_curves_state_survives_a_weights_only_checkpoint(tmp_path):
    class FakeLoop:
        class state:
            step = 7

    curves = TrainingCurves()
    curves.on_log(FakeLoop, {"train/loss": 0.5, "lr": 1e-3})
    torch.save({"curves": curves.state_dict()}, tmp_path / "c.pt")
    restored = TrainingCurves()
    restored.load_state_dict(torch.load(tmp_path / "c.pt", weights_only=True)["curves"])
    assert restored.series == {"train/loss": {"steps": [7], "values": [0.5]}, "lr": {"steps": [7], "values": [1e-3]}}


# ----------------------------------------------------------------------- whole runs
@pytest.mark.slow
def test_a_tiny_run_writes_pictures_and_drift_metrics_to_mlflow(cfg, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "out").mkdir()
    result = run(cfg("logger=mlflow", f"logger.tracking_uri={uri}", "logger.log_checkpoint=false"), output_dir=tmp_path / "out")
    out = result.output_dir
    for name in ("training_curves.png", "drift_val.png", "drift_test.png", "confusion_matrix.png"):
        _valid_png(out / name, 400, 300)
    report = json.loads((out / "drift.json").read_text())
    assert set(report["splits"]) == {"val", "test"}
    client = MlflowClient(uri)
    (found,) = client.search_runs([client.get_experiment_by_name("runner").experiment_id])
    metrics = found.data.metrics
    for split in ("val", "test"):
        for key in ("psi_max", "psi_mean", "ks_max", "features_drifted", "prediction_psi"):
            assert f"drift/{split}/{key}" in metrics
        # 38 val/test samples of synthetic data: PSI is not trusted that small, KS finds nothing
        assert metrics[f"drift/{split}/features_drifted"] == 0
    artifacts = {a.path for a in client.list_artifacts(found.info.run_id)}
    assert {"training_curves.png", "drift_val.png", "drift_test.png", "drift.json", "confusion_matrix.png"} <= artifacts


@pytest.mark.slow
def test_training_curves_resume_their_series(cfg, tmp_path):
    for name in ("straight", "resumed"):
        (tmp_path / name).mkdir()
    straight = run(cfg("trainer.max_epochs=2", "trainer.deterministic=true", "~callbacks.drift"), output_dir=tmp_path / "straight")
    run(cfg("trainer.max_epochs=1", "trainer.deterministic=true", "~callbacks.drift"), output_dir=tmp_path / "resumed")
    resumed = run(cfg("trainer.max_epochs=2", "trainer.deterministic=true", "~callbacks.drift"), output_dir=tmp_path / "resumed")

    def series(result):
        payload = torch.load(result.last_checkpoint, weights_only=True)
        return payload["callbacks"]["curves"]["series"]

    one, two = series(straight), series(resumed)
    for key in ("train/loss", "val/loss", "val/acc", "lr", "epoch"):
        assert two[key]["steps"] == one[key]["steps"] and len(one[key]["steps"]) >= 2, key
        assert two[key]["values"] == pytest.approx(one[key]["values"]), key
    # what the first, shorter run tested (after its last.pt) is not in the resumed series
    assert "test/acc" not in two
    _valid_png(resumed.output_dir / "training_curves.png", 1000, 350)
