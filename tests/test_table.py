"""data=table: a CSV or Parquet file trains with no code.

Unit tests read and encode tables in process; the slow ones run `python -m runner
data=table ...` as a user would: scikit-learn's wine data as CSV and Parquet (three classes,
a text class column, a text feature added), a regression CSV, and every bad input once."""

import csv
import json
import re
import sqlite3
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from runner.data import table
from runner.data.table import table_info
from runner.errors import ConfigError
from tests.conftest import compose_config, run_cli

FAST = ["trainer.device=cpu", "~callbacks.export", "~callbacks.drift", "~callbacks.curves", "hydra.run.dir=out"]
WINE_FEATURES = 13
REGIONS = ("east", "north", "south")


def write_table(path: Path, rows: int = 60) -> Path:
    """A small classification CSV: two numeric features, a text feature 'color', a text label
    that follows x1 (what tests/test_config.py composes data=table with)."""
    rng = np.random.default_rng(0)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["x1", "x2", "color", "label"])
        for row in range(rows):
            x1 = rng.normal()
            writer.writerow([round(x1, 4), round(rng.normal(), 4), ["red", "green", "blue"][row % 3], "yes" if x1 > 0 else "no"])
    return path


def write_wine(directory: Path) -> tuple[Path, Path]:
    """scikit-learn's wine data as wine.csv and wine.parquet: 13 numeric features, a text
    feature 'region' (random, so it carries nothing), and the text label 'class'."""
    import pyarrow as pa
    import pyarrow.parquet as parquet
    from sklearn.datasets import load_wine

    bunch = load_wine()
    columns = {name: bunch.data[:, index] for index, name in enumerate(bunch.feature_names)}
    columns["region"] = np.random.default_rng(0).choice(REGIONS, size=len(bunch.target)).tolist()
    columns["class"] = [f"class_{label}" for label in bunch.target]
    write_csv(directory / "wine.csv", list(columns), [list(row) for row in zip(*columns.values())])
    parquet.write_table(pa.table(columns), directory / "wine.parquet")
    return directory / "wine.csv", directory / "wine.parquet"


def write_linear(path: Path, rows: int = 400) -> Path:
    """A regression CSV: y = 2 x1 - x2 + 0.5 x3 + a shop effect + 3 + noise (sd 0.1); x4 is noise."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, 4))
    shop = rng.choice(["a", "b", "c"], size=rows)
    y = 2 * x[:, 0] - x[:, 1] + 0.5 * x[:, 2] + np.select([shop == "a", shop == "b"], [1.0, -1.0], 0.0) + 3 + 0.1 * rng.normal(size=rows)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["x1", "x2", "x3", "x4", "shop", "y"])
        writer.writerows([*np.round(x[row], 4), shop[row], round(float(y[row]), 4)] for row in range(rows))
    return path


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture
def wine(tmp_path) -> tuple[Path, Path]:
    return write_wine(tmp_path)


# ------------------------------------------------------------------ reading and encoding
def test_csv_and_parquet_encode_the_same(wine):
    from_csv, from_parquet = (table(str(path), "class", categorical=["region"]) for path in wine)
    assert from_csv.input_shape == from_parquet.input_shape == (WINE_FEATURES + len(REGIONS),)
    assert from_csv.class_names == ["class_0", "class_1", "class_2"] and from_csv.num_classes == 3
    assert (from_csv.task, from_csv.modality) == ("classification", "tabular")
    for split in ("train", "val", "test"):
        (x_csv, y_csv), (x_parquet, y_parquet) = getattr(from_csv, split)[:], getattr(from_parquet, split)[:]
        assert torch.allclose(x_csv, x_parquet, atol=1e-6) and torch.equal(y_csv, y_parquet)
        assert y_csv.dtype == torch.long
    assert [len(from_csv.train), len(from_csv.val), len(from_csv.test)] == [124, 27, 27]


def test_numeric_features_are_standardised_on_train_and_categories_one_hot(wine):
    data = table(str(wine[0]), "class", categorical=["region"])
    x = data.train[:][0]
    numeric, one_hot = x[:, :WINE_FEATURES], x[:, WINE_FEATURES:]
    assert torch.allclose(numeric.mean(0), torch.zeros(WINE_FEATURES), atol=1e-5)
    assert torch.allclose(numeric.std(0, unbiased=False), torch.ones(WINE_FEATURES), atol=1e-4)
    # validation is scaled with the training statistics, not its own
    assert not torch.allclose(data.val[:][0][:, :WINE_FEATURES].mean(0), torch.zeros(WINE_FEATURES), atol=1e-3)
    assert torch.equal(one_hot.sum(1), torch.ones(len(x)))  # every training row has exactly one region


def test_a_category_training_never_saw_encodes_as_zeros(tmp_path):
    rows = [[i, "common" if i % 2 else "usual", i % 2] for i in range(59)] + [[59, "rare", 1]]
    path = write_csv(tmp_path / "rare.csv", ["x", "kind", "label"], rows)
    for seed in range(20):  # a split that holds the one "rare" row (the largest x) out of train
        data = table(str(path), "label", categorical=["kind"], split_seed=seed)
        held_out = torch.cat([data.val[:][0], data.test[:][0]])
        if held_out[:, 0].max() > data.train[:][0][:, 0].max():
            break
    else:
        pytest.fail("no split seed in 0..19 holds the rare row out")
    assert data.input_shape == (3,)  # x, kind=common, kind=usual: no column for "rare"
    assert torch.equal(held_out[held_out[:, 0].argmax(), 1:], torch.zeros(2))


def test_a_numeric_column_declared_categorical_is_one_hot(tmp_path):
    rows = [[i / 10, [10, 20, 30][i % 3], i % 2] for i in range(60)]
    path = write_csv(tmp_path / "zip.csv", ["x", "zip", "label"], rows)
    assert table_info({"path": str(path), "target": "label"})["input_shape"] == [2]
    assert table_info({"path": str(path), "target": "label", "categorical": ["zip"]})["input_shape"] == [4]
    assert table_info({"path": str(path), "target": "label", "features": ["zip"], "categorical": ["zip"]})["input_shape"] == [3]


@pytest.mark.parametrize("values, task, names", [
    ([2, 10, 1] * 20, "classification", ["1", "2", "10"]),  # integers: sorted as numbers
    (["b", "a", "c"] * 20, "classification", ["a", "b", "c"]),
    ([0.5, 1.25, 2.0] * 20, "regression", []),
])
def test_the_task_is_inferred_from_the_target(tmp_path, values, task, names):
    path = write_csv(tmp_path / "t.csv", ["x", "y"], [[i, value] for i, value in enumerate(values)])
    data = table(str(path), "y")
    assert (data.task, data.class_names) == (task, names)
    y = data.train[:][1]
    if task == "regression":
        assert y.dtype == torch.float32 and y.shape == (len(data.train), 1) and data.num_classes == 1
    else:
        assert y.dtype == torch.long and data.num_classes == 3


def test_data_task_overrides_the_guess(tmp_path):
    path = write_csv(tmp_path / "t.csv", ["x", "y"], [[i, i % 4] for i in range(60)])
    assert table(str(path), "y", task="regression").task == "regression"
    assert table(str(path), "y").num_classes == 4


def test_fill_missing_mean_fills_with_the_training_mean(tmp_path):
    rows = [[float(i), "" if i == 7 else i % 5, i % 2] for i in range(60)]
    path = write_csv(tmp_path / "gaps.csv", ["x", "z", "label"], rows)
    with pytest.raises(ConfigError, match=r"'z' 1 \(data row 8\)"):
        table(str(path), "label")
    data = table(str(path), "label", fill_missing="mean")
    everything = torch.cat([data.train[:][0], data.val[:][0], data.test[:][0]])
    row = everything[everything[:, 0] == everything[:, 0].unique()[7]]  # x == 7 after scaling
    assert row[0, 1].abs() < 1e-6  # the mean is 0 once standardised


def test_parquet_without_pyarrow_names_the_extra(tmp_path, monkeypatch, wine):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    copy = tmp_path / "copy.parquet"
    copy.write_bytes(wine[1].read_bytes())
    with pytest.raises(ConfigError, match=r"reading Parquet needs pyarrow, which is not installed; pip install 'runner\[tables\]'"):
        table(str(copy), "class", categorical=["region"])


def test_the_file_publishes_classes_and_input_shape_at_compose_time(wine):
    base = ["data=table", f"data.path={wine[0]}", "data.target=class", "model=mlp"]
    cfg = compose_config([*base, "data.categorical=[region]"])
    assert cfg.model.num_classes == 3 and list(cfg.model.input_shape) == [WINE_FEATURES + 3]
    cfg = compose_config([*base, "data.features=[alcohol,region]", "data.categorical=[region]"])
    assert list(cfg.model.input_shape) == [1 + 3]


def test_logistic_regression_on_the_same_split(wine):
    """The reference the MLP is held to (test_wine_trains_from_csv_and_parquet)."""
    assert logistic_regression_accuracy(wine[0]) >= 0.9


def logistic_regression_accuracy(path: Path) -> float:
    from sklearn.linear_model import LogisticRegression

    data = table(str(path), "class", categorical=["region"])
    (x, y), (x_test, y_test) = data.train[:], data.test[:]
    model = LogisticRegression(max_iter=1000).fit(x.numpy(), y.numpy())
    return float(model.score(x_test.numpy(), y_test.numpy()))


def test_mse_loss_leaves_out_unobserved_targets():
    from runner.losses import MSELoss

    outputs, target = torch.tensor([[1.0], [2.0], [5.0]]), torch.tensor([[0.0], [2.0], [float("nan")]])
    assert torch.isclose(MSELoss()(outputs, target), torch.tensor(0.5))
    assert torch.isclose(MSELoss()(outputs[:2], target[:2]), torch.nn.functional.mse_loss(outputs[:2], target[:2]))


# ------------------------------------------------------------------ bad input, in process
def _bad(tmp_path: Path, name: str) -> tuple[str, dict]:
    """A file and the settings of one bad input (also run through the CLI below)."""
    numbers = [[i, i % 3, i % 2] for i in range(40)]
    if name == "missing file":
        return "nowhere.csv", {"target": "label"}
    if name == "no target column":
        return str(write_csv(tmp_path / "t.csv", ["a", "b", "c"], numbers)), {"target": "label"}
    if name == "empty labels":
        rows = [[i, i % 3, "" if i in (4, 9) else i % 2] for i in range(40)]
        return str(write_csv(tmp_path / "t.csv", ["a", "b", "label"], rows)), {"target": "label"}
    if name == "text feature":
        rows = [[i, ["red", "blue"][i % 2], i % 2] for i in range(40)]
        return str(write_csv(tmp_path / "t.csv", ["a", "color", "label"], rows)), {"target": "label"}
    if name == "NaN feature":
        rows = [[i, "nan" if i in (3, 5, 8) else i % 3, i % 2] for i in range(40)]
        return str(write_csv(tmp_path / "t.csv", ["a", "b", "label"], rows)), {"target": "label"}
    if name == "single class":
        return str(write_csv(tmp_path / "t.csv", ["a", "b", "label"], [[i, i % 3, "cat"] for i in range(40)])), {"target": "label"}
    if name == "wrong num_classes":
        return str(write_csv(tmp_path / "t.csv", ["a", "b", "label"], numbers)), {"target": "label", "num_classes": 5}
    raise KeyError(name)


BAD = {
    "missing file": r"data\.path='nowhere\.csv': no such file; give data\.path=<a \.csv or \.parquet file with a header row> and data\.target=",
    "no target column": r"data\.target='label' is not a column of '\S*t\.csv' \(its columns: a, b, c\); set data\.target to one of them",
    "empty labels": r"data\.target='label' of '\S*t\.csv' is missing \(empty or NaN\) in 2 of 40 rows \(data rows 5, 10\); remove those rows or fill in their labels",
    "text feature": r"data\.features: column 'color' of '\S*t\.csv' is not numeric \(e\.g\. 'red'\); one-hot encode it with data\.categorical=\[color\] or leave it out with data\.features=\[a\]",
    "NaN feature": r"data\.path='\S*t\.csv': feature columns have missing, NaN or infinite values: 'b' 3 \(data rows 4, 6, 9\); fill them in the file, set data\.fill_missing=mean .*or leave the column out with data\.features=\[\.\.\.\]",
    "single class": r"data\.target='label' of '\S*t\.csv' holds a single class \('cat'\) in all 40 rows; classification needs at least two",
    "wrong num_classes": r"data\.num_classes=5 but data\.target='label' of '\S*t\.csv' gives 2 classes; remove the override or set data\.num_classes=2",
}


@pytest.mark.parametrize("name", list(BAD), ids=str)
def test_bad_table_gets_one_clear_message(tmp_path, name):
    path, settings = _bad(tmp_path, name)
    with pytest.raises(ConfigError) as error:
        table(path, **settings)
    assert re.match(BAD[name], str(error.value)), str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("settings, message", [
    ({"features": ["a", "nope"]}, r"data\.features names \['nope'\], not columns of .* \(its columns: a, b, label\)"),
    ({"features": ["a", "label"]}, r"data\.features lists the target 'label'; leave it out"),
    ({"categorical": ["b"], "features": ["a"]}, r"data\.categorical names \['b'\], which data\.features leaves out"),
    ({"task": "ranking"}, r"data\.task='ranking' is not known; use one of classification, regression"),
    ({"fill_missing": "median"}, r"data\.fill_missing='median' is not supported; use mean"),
    ({"input_shape": [3]}, r"data\.input_shape=\[3\] but the encoded features of .* are \[2\] \(a, b\); remove the override or set data\.input_shape=\[2\]"),
    ({"val_fraction": 0.5, "test_fraction": 0.49}, r"data\.path=.* has 40 rows, too few to split with data\.val_fraction=0\.5"),
], ids=["unknown feature", "target as feature", "categorical not a feature", "unknown task", "unknown fill", "wrong input_shape", "too few rows"])
def test_bad_settings_name_the_key(tmp_path, settings, message):
    path = write_csv(tmp_path / "t.csv", ["a", "b", "label"], [[i, i % 3, i % 2] for i in range(40)])
    with pytest.raises(ConfigError, match=message):
        table(str(path), "label", **settings)


def test_regression_on_a_text_target_and_other_files(tmp_path):
    path = write_csv(tmp_path / "t.csv", ["a", "label"], [[i, "ab"[i % 2]] for i in range(40)])
    with pytest.raises(ConfigError, match=r"data\.task=regression but data\.target='label' .* holds text values \(e\.g\. 'a'\); use data\.task=classification"):
        table(str(path), "label", task="regression")
    (tmp_path / "t.xlsx").write_bytes(b"PK")
    with pytest.raises(ConfigError, match=r"unsupported file type '\.xlsx'; use \.csv, \.tsv or \.parquet"):
        table(str(tmp_path / "t.xlsx"), "label")
    (tmp_path / "ragged.csv").write_text("a,b,label\n1,2,0\n1,2\n")
    with pytest.raises(ConfigError, match=r"data row 2 has 2 fields but the header has 3"):
        table(str(tmp_path / "ragged.csv"), "label")
    (tmp_path / "fake.parquet").write_text("not parquet")
    with pytest.raises(ConfigError, match=r"could not be read as Parquet"):
        table(str(tmp_path / "fake.parquet"), "label")


# ------------------------------------------------------------------ the CLI, as a user runs it
def _metrics(directory: Path) -> dict:
    return json.loads((directory / "out" / "metrics.json").read_text())


@pytest.mark.slow
def test_wine_trains_from_csv_and_parquet(tmp_path):
    """MLP on wine, 20 epochs: test accuracy >= 0.85 (chance: 0.40, the largest class), and
    within 0.08 (2 of 27 test rows) of logistic regression on the same split; Parquet gives
    the same numbers as CSV."""
    csv_file, parquet_file = write_wine(tmp_path)
    results = {}
    for path in (csv_file, parquet_file):
        directory = tmp_path / path.suffix[1:]
        directory.mkdir()
        result = run_cli([
            "data=table", f"data.path={path}", "data.target=class", "data.categorical=[region]", "model=mlp",
            "trainer.max_epochs=20", "callbacks.checkpoint.monitor=val/loss", "callbacks.checkpoint.mode=min",
            "callbacks.early_stopping.monitor=val/loss", "callbacks.early_stopping.mode=min", "logger=none", *FAST,
        ], cwd=directory)
        assert result.returncode == 0, result.stderr[-3000:]
        results[path.suffix] = _metrics(directory)
    accuracy = results[".csv"]["test/acc"]
    baseline = logistic_regression_accuracy(csv_file)
    print(f"wine test/acc: MLP {accuracy:.3f}, logistic regression {baseline:.3f}")
    assert accuracy >= 0.85 and accuracy >= baseline - 0.08
    assert results[".parquet"] == results[".csv"]
    names = json.loads((tmp_path / "csv" / "out" / "confusion_matrix.json").read_text())["class_names"]
    assert names == ["class_0", "class_1", "class_2"]


@pytest.mark.slow
def test_a_regression_csv_reports_regression_metrics(tmp_path):
    """y is linear in the inputs plus noise of sd 0.1 (variance of y: about 6): the MLP's test
    MSE must be under 0.1, i.e. R^2 above 0.98; predicting the mean would give about 6."""
    path = write_linear(tmp_path / "linear.csv")
    result = run_cli([
        "data=table", f"data.path={path}", "data.target=y", "data.categorical=[shop]", "model=mlp", "experiment=regression",
        "trainer.max_epochs=30", "optimizer.lr=0.01", f"logger.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", *FAST,
    ], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert {"test/mse", "test/mae", "test/rel_l2"} <= set(metrics) and "test/acc" not in metrics
    assert metrics["test/mse"] < 0.1 and metrics["test/rel_l2"] < 0.1, metrics
    with sqlite3.connect(tmp_path / "mlflow.db") as connection:
        assert connection.execute("SELECT status FROM runs").fetchall() == [("FINISHED",)]


@pytest.mark.slow
def test_regression_data_without_regression_settings_says_what_to_add(tmp_path):
    path = write_linear(tmp_path / "linear.csv", rows=60)
    result = run_cli(["data=table", f"data.path={path}", "data.target=y", "data.categorical=[shop]", "model=mlp", "logger=none", *FAST], cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(
        "runner: error: optimized_metric='val/acc' is not a metric a regression run reports (regression data: experiment=regression monitors val/mse)"
    ), result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BAD), ids=str)
def test_bad_table_through_the_cli(tmp_path, name):
    """One line, exit 2, no traceback, nothing trained, no MLflow run left RUNNING."""
    path, settings = _bad(tmp_path, name)
    extra = [f"data.{key}={value}" for key, value in settings.items() if key != "target"]
    result = run_cli([
        "data=table", f"data.path={Path(path).name if name != 'missing file' else path}", f"data.target={settings['target']}",
        "model=mlp", "trainer.max_epochs=1", f"logger.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", *extra, *FAST,
    ], cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("runner: error: ") and re.match(BAD[name], last.removeprefix("runner: error: ")), result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("runner: error: ")] == [last]
    assert not (tmp_path / "out" / "checkpoints").exists()
    if (tmp_path / "mlflow.db").exists():
        with sqlite3.connect(tmp_path / "mlflow.db") as connection:
            assert ("RUNNING",) not in connection.execute("SELECT status FROM runs").fetchall()


@pytest.mark.slow
def test_the_bayesian_preset_searches_only_models_that_take_a_table(tmp_path):
    """hparams_search=optuna_tpe offers mlp and cnn; on a CSV every trial must be an MLP (the
    CNN used to fail trial 0 and stop the sweep)."""
    rng = np.random.default_rng(0)
    rows = [[*(rng.normal(size=3) + label).round(4).tolist(), f"c{label}"] for label in np.arange(90) % 3]
    write_csv(tmp_path / "t.csv", ["a", "b", "c", "label"], rows)
    result = run_cli(["-m", "hparams_search=optuna_tpe", "hydra.sweeper.n_trials=3", "data=table", "data.path=t.csv", "data.target=label",
                      "trainer.max_epochs=1", "trainer.device=cpu", "trainer.num_threads=1", "~callbacks.export", "~callbacks.drift",
                      "~callbacks.curves", "logger=none", "hydra.sweep.dir=sweep"], cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "model choices for tabular data: mlp (left out: cnn)" in result.stdout + result.stderr
    jobs = sorted((tmp_path / "sweep").glob("*/.hydra/overrides.yaml"))
    assert len(jobs) == 3 and all("model=mlp" in job.read_text() for job in jobs)
