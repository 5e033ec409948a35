"""A user's table, CSV or Parquet: one column is the target, the others are features.

    python -m runner data=table data.path=wine.csv data.target=class model=mlp

Reading: a CSV (or .tsv) with the standard library's csv module, so it needs no extra: a
header row, UTF-8. A CSV column is numeric when every cell that is not missing parses as a
number, and integer when every one is an integer literal; a missing cell is empty or one
of NA, N/A, NaN, null, None (any case). Parquet is read with pyarrow
(``pip install 'runner[tables]'``); there the column's type decides, and null or NaN is missing.

Encoding, fitted on the training split only, so nothing about val or test leaks into it:

* numeric features are standardised with the training mean and standard deviation;
* categorical features (text columns declared in ``data.categorical``, and numeric ones
  listed there) are one-hot over the categories seen in training, sorted; a category the
  training split never saw encodes as all zeros;
* the target: integer or text values -> classification, the classes its sorted distinct
  values; floats -> regression with one output; ``data.task`` overrides the guess.

The file is read once per process and each encoding is cached: the compose-time resolver
(``${table_file:num_classes}``, ``${table_file:input_shape}``) and the factory share it.
"""

import csv
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from runner.data.module import TASKS, DataModule, split_indices
from runner.errors import ConfigError

MISSING_CELLS = frozenset({"", "na", "n/a", "nan", "null", "none"})
DELIMITERS = {".csv": ",", ".tsv": "\t"}
PARQUET = (".parquet", ".pq")
FILL_MISSING = ("mean",)
FIX = "give data.path=<a .csv or .parquet file with a header row> and data.target=<its label column>"
INSTALL = "pip install 'runner[tables]'"


@dataclass(frozen=True)
class Column:
    """One column as read: kind integer or float (values float64, NaN where missing), text
    (values str or None where missing), or another type (its name; encoded only on request)."""

    kind: str
    values: np.ndarray


@dataclass(frozen=True)
class Encoded:
    """A table turned into model inputs and targets, and the facts other groups read."""

    x: np.ndarray  # float32 [N, D]
    y: np.ndarray  # int64 [N] class indices, or float32 [N, 1] regression targets
    parts: tuple[list[int], list[int], list[int]]  # train, val, test row indices
    task: str
    class_names: tuple[str, ...]
    inputs: tuple[str, ...]  # one name per encoded column: "alcohol", "region=north"

    @property
    def num_classes(self) -> int:
        return len(self.class_names) if self.task == "classification" else 1


def table(
    path: str,
    target: str,
    features: Sequence[str] | None = None,
    categorical: Sequence[str] = (),
    task: str | None = None,
    fill_missing: str | None = None,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    split_seed: int = 0,
    batch_size: int = 64,
    num_workers: int = 0,
    num_classes: int | None = None,
    input_shape: Sequence[int] | None = None,
) -> DataModule:
    import torch
    from torch.utils.data import TensorDataset

    encoded = _encoded(*_settings(locals()))
    _check_published(path, target, encoded, num_classes, input_shape)
    x = torch.from_numpy(encoded.x)
    y = torch.from_numpy(encoded.y)
    train, val, test = (TensorDataset(x[index], y[index]) for index in (torch.as_tensor(part) for part in encoded.parts))
    logging.getLogger("runner").info(
        "table %s: %d rows -> %d train, %d val, %d test; %d inputs; %s%s", path, len(x), len(train), len(val), len(test),
        x.shape[1], encoded.task, f", classes {', '.join(encoded.class_names)}" if encoded.task == "classification" else "",
    )
    return DataModule(
        train, val, test, encoded.num_classes, (x.shape[1],), batch_size, num_workers,
        class_names=list(encoded.class_names), modality="tabular", task=encoded.task,
    )


def table_info(data: Mapping[str, Any]) -> dict[str, Any]:
    """num_classes, input_shape, task and class_names of a data=table config (the
    ``table_file`` resolver hands it the data node: every key that changes the answer)."""
    encoded = _encoded(*_settings({key: data.get(key) for key in _KEYS if key in data}))
    return {
        "num_classes": encoded.num_classes, "input_shape": [encoded.x.shape[1]],
        "task": encoded.task, "class_names": list(encoded.class_names),
    }


_KEYS = ("path", "target", "features", "categorical", "task", "fill_missing", "val_fraction", "test_fraction", "split_seed")
_DEFAULTS = {"features": None, "categorical": (), "task": None, "fill_missing": None, "val_fraction": 0.15, "test_fraction": 0.15, "split_seed": 0}


def _settings(given: Mapping[str, Any]) -> tuple:
    """The keys that decide the encoding, as a hashable tuple (the cache key), checked."""
    values = {**_DEFAULTS, **{key: given[key] for key in _KEYS if key in given}}
    for key in ("path", "target"):
        if values.get(key) in (None, "", "???"):
            raise ConfigError(f"data.{key} is not set; {FIX}")
        if not isinstance(values[key], str):
            raise ConfigError(f"data.{key}={values[key]!r} is not a {'file name' if key == 'path' else 'column name'}; {FIX}")
    for key in ("features", "categorical"):
        names = values[key]
        if names is not None and (isinstance(names, str) or not all(isinstance(name, str) for name in names)):
            raise ConfigError(f"data.{key}={names!r} is not a list of column names; write e.g. 'data.{key}=[col_a,col_b]'")
        values[key] = None if names is None else tuple(names)
    if values["task"] is not None and values["task"] not in TASKS:
        raise ConfigError(f"data.task='{values['task']}' is not known; use one of {', '.join(TASKS)}, or null to infer it from the target column")
    if values["fill_missing"] is not None and values["fill_missing"] not in FILL_MISSING:
        raise ConfigError(f"data.fill_missing='{values['fill_missing']}' is not supported; use mean, or null to stop on a missing value")
    path = str(values["path"])
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"data.path='{path}': no such file; {FIX}")
    stat = file.stat()
    # the file's size and time in the key: an edited file is read again
    return (path, stat.st_mtime_ns, stat.st_size, *(values[key] for key in _KEYS[1:]))


@lru_cache(maxsize=4)
def _encoded(path, mtime, size, target, features, categorical, task, fill_missing, val_fraction, test_fraction, split_seed) -> Encoded:
    columns = _read(path, mtime, size)
    features = _check_columns(path, columns, target, features, categorical or ())
    y, task, class_names = _target(path, target, columns[target], task)
    try:
        parts = split_indices(y.tolist() if task == "classification" else [0] * len(y), val_fraction, test_fraction, split_seed)
    except ValueError as error:  # sklearn: too few rows for these fractions (ConfigError is a ValueError too)
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(
            f"data.path='{path}' has {len(y)} rows, too few to split with data.val_fraction={val_fraction} and "
            f"data.test_fraction={test_fraction} ({str(error).splitlines()[0]}); give more rows or change the fractions"
        ) from None
    _check_missing(path, {name: columns[name] for name in features}, fill_missing)
    blocks, inputs = [], []
    for name in features:
        block, names = _encode_feature(name, columns[name], name in (categorical or ()), parts[0])
        blocks.append(block)
        inputs += names
    x = np.concatenate(blocks, axis=1).astype(np.float32)
    return Encoded(x, y, parts, task, tuple(class_names), tuple(inputs))


# ------------------------------------------------------------------ reading
@lru_cache(maxsize=2)
def _read(path: str, mtime: int, size: int) -> dict[str, Column]:
    suffix = Path(path).suffix.lower()
    if suffix in DELIMITERS:
        columns = _read_csv(path, DELIMITERS[suffix])
    elif suffix in PARQUET:
        columns = _read_parquet(path)
    else:
        raise ConfigError(f"data.path='{path}': unsupported file type '{suffix}'; use .csv, .tsv or .parquet")
    if not columns or not len(next(iter(columns.values())).values):
        raise ConfigError(f"data.path='{path}' has no data rows; {FIX}")
    return columns


def _read_csv(path: str, delimiter: str) -> dict[str, Column]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.reader(handle, delimiter=delimiter))
    except (UnicodeDecodeError, csv.Error) as error:
        raise ConfigError(f"data.path='{path}' could not be read as UTF-8 CSV ({str(error)[:160]}); {FIX}") from None
    rows = [row for row in rows if row]  # blank lines
    if not rows:
        raise ConfigError(f"data.path='{path}' is empty; {FIX}")
    header = [name.strip() for name in rows[0]]
    duplicates = sorted({name for name in header if header.count(name) > 1})
    if duplicates or "" in header:
        problem = f"repeats the column name(s) {duplicates}" if duplicates else "has a column without a name"
        raise ConfigError(f"data.path='{path}': its header row {problem}; give every column a distinct name in the first row")
    for number, row in enumerate(rows[1:], start=1):
        if len(row) != len(header):
            raise ConfigError(
                f"data.path='{path}': data row {number} has {len(row)} fields but the header has {len(header)}; "
                "fix that line (a value with a comma in it needs quotes)"
            )
    return {name: _csv_column([row[index] for row in rows[1:]]) for index, name in enumerate(header)}


def _csv_column(cells: list[str]) -> Column:
    cells = [cell.strip() for cell in cells]
    present = [cell for cell in cells if cell.lower() not in MISSING_CELLS]
    try:
        numbers = [float(cell) for cell in present]
    except ValueError:
        return Column("text", np.array([None if cell.lower() in MISSING_CELLS else cell for cell in cells], dtype=object))
    values = np.array([np.nan if cell.lower() in MISSING_CELLS else float(cell) for cell in cells], dtype=np.float64)
    return Column("integer" if all(_is_integer(cell) for cell in present) and numbers else "float", values)


def _is_integer(cell: str) -> bool:
    try:
        int(cell)
    except ValueError:
        return False
    return True


def _read_parquet(path: str) -> dict[str, Column]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as parquet
    except ImportError:
        raise ConfigError(
            f"data.path='{path}' is a Parquet file, and reading Parquet needs pyarrow, which is not installed; "
            f"{INSTALL} (or save the table as CSV)"
        ) from None
    try:
        arrow = parquet.read_table(path)
    except Exception as error:  # damaged or not Parquet at all
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"data.path='{path}' could not be read as Parquet ({reason[:160]}); {FIX}") from None
    columns = {}
    for name, column in zip(arrow.column_names, arrow.columns):
        kind = column.type.value_type if pa.types.is_dictionary(column.type) else column.type
        if pa.types.is_integer(kind) or pa.types.is_boolean(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind):
            values = np.array([np.nan if value is None else float(value) for value in column.to_pylist()], dtype=np.float64)
            columns[name] = Column("float" if pa.types.is_floating(kind) or pa.types.is_decimal(kind) else "integer", values)
        elif pa.types.is_string(kind) or pa.types.is_large_string(kind):
            columns[name] = Column("text", np.array(column.to_pylist(), dtype=object))
        else:
            columns[name] = Column(str(kind), np.array(column.to_pylist(), dtype=object))
    return columns


# ------------------------------------------------------------------ checks and encoding
def _check_columns(path: str, columns: dict[str, Column], target: str, features, categorical) -> tuple[str, ...]:
    """The feature columns to use; every named column exists and every feature can be encoded."""
    names = list(columns)
    if target not in columns:
        raise ConfigError(f"data.target='{target}' is not a column of '{path}' (its columns: {', '.join(names)}); set data.target to one of them")
    features = tuple(name for name in names if name != target) if features is None else features
    for key, listed in (("features", features), ("categorical", categorical)):
        unknown = [name for name in listed if name not in columns]
        if unknown:
            raise ConfigError(f"data.{key} names {unknown}, not columns of '{path}' (its columns: {', '.join(names)}); name columns it has")
    if target in features:
        raise ConfigError(f"data.features lists the target '{target}'; leave it out (the target is never an input)")
    if not features:
        raise ConfigError(f"data.features is empty: '{path}' has no column besides the target '{target}' to learn from; {FIX}")
    others = [name for name in categorical if name not in features]
    if others:
        raise ConfigError(f"data.categorical names {others}, which data.features leaves out; add them to data.features or drop them from data.categorical")
    for name in features:
        column = columns[name]
        if column.kind == "text" and name not in categorical:
            example = next((value for value in column.values if value is not None), "")
            kept = [other for other in features if other != name]
            listing = f"[{','.join(kept)}]" if len(kept) <= 8 else "[...]"
            raise ConfigError(
                f"data.features: column '{name}' of '{path}' is not numeric (e.g. {example!r}); one-hot encode it with "
                f"data.categorical=[{name}] or leave it out with data.features={listing}"
            )
        if column.kind not in ("integer", "float", "text") and name not in categorical:
            raise ConfigError(
                f"data.features: column '{name}' of '{path}' has type {column.kind}, which runner does not encode; "
                f"declare it with data.categorical=[{name}] or leave it out with data.features=[...]"
            )
    return features


def _target(path: str, target: str, column: Column, task: str | None) -> tuple[np.ndarray, str, list[str]]:
    """Targets (class indices or float [N, 1]), the task and the class names."""
    missing = _missing(column)
    if missing.any():
        raise ConfigError(
            f"data.target='{target}' of '{path}' is missing (empty or NaN) in {int(missing.sum())} of {len(missing)} rows "
            f"({_rows(missing)}); remove those rows or fill in their labels"
        )
    numeric = column.kind in ("integer", "float")
    task = task or ("regression" if column.kind == "float" else "classification")
    if task == "regression":
        if not numeric:
            example = next(value for value in column.values if value is not None)
            raise ConfigError(
                f"data.task=regression but data.target='{target}' of '{path}' holds {column.kind} values (e.g. {example!r}); "
                "use data.task=classification or a numeric target"
            )
        return column.values.astype(np.float32).reshape(-1, 1), task, []
    classes = np.unique(column.values) if numeric else np.array(sorted(set(column.values)), dtype=object)
    names = [_category(value, column.kind) for value in classes]
    if len(classes) < 2:
        raise ConfigError(
            f"data.target='{target}' of '{path}' holds a single class ({names[0]!r}) in all {len(column.values)} rows; "
            "classification needs at least two: pick another data.target, or data.task=regression for a number to predict"
        )
    if numeric:
        labels = np.searchsorted(classes, column.values)
    else:
        index = {value: position for position, value in enumerate(classes)}
        labels = np.array([index[value] for value in column.values])
    return labels.astype(np.int64), task, names


def _check_missing(path: str, columns: dict[str, Column], fill_missing: str | None) -> None:
    counts = {name: _missing(column) for name, column in columns.items()}
    bad = {name: rows for name, rows in counts.items() if rows.any()}
    if not bad or fill_missing == "mean":
        return
    described = "; ".join(f"'{name}' {int(rows.sum())} ({_rows(rows)})" for name, rows in list(bad.items())[:4])
    more = f"; and {len(bad) - 4} more columns" if len(bad) > 4 else ""
    raise ConfigError(
        f"data.path='{path}': feature columns have missing, NaN or infinite values: {described}{more}; fill them in the file, "
        f"set data.fill_missing=mean (the training mean; a missing category encodes as all zeros), or leave the column out with data.features=[...]"
    )


def _encode_feature(name: str, column: Column, categorical: bool, train: list[int]) -> tuple[np.ndarray, list[str]]:
    """One feature as columns fitted on the training rows: standardised, or one-hot."""
    if categorical:
        values = np.array([_category(value, column.kind) for value in column.values], dtype=object)
        seen = sorted({value for value in values[train] if value is not None})
        index = {value: position for position, value in enumerate(seen)}
        block = np.zeros((len(values), len(seen)), dtype=np.float32)
        for row, value in enumerate(values):
            if value in index:  # unseen in training, or missing: all zeros
                block[row, index[value]] = 1.0
        return block, [f"{name}={value}" for value in seen]
    values = np.where(np.isfinite(column.values), column.values, np.nan)
    known = values[train][~np.isnan(values[train])]
    mean = float(known.mean()) if len(known) else 0.0
    std = float(known.std()) if len(known) else 1.0
    filled = np.where(np.isnan(values), mean, values)  # missing only under fill_missing=mean
    return ((filled - mean) / (std if std > 1e-12 else 1.0)).reshape(-1, 1), [name]


def _category(value: Any, kind: str) -> str | None:
    """A value as a category name: integers without a decimal point, text as it is."""
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return None
    if kind == "integer":
        return str(int(value))
    if kind == "float":
        return repr(float(value))
    return str(value)


def _missing(column: Column) -> np.ndarray:
    if column.kind in ("integer", "float"):
        return ~np.isfinite(column.values)
    return np.array([value is None for value in column.values], dtype=bool)


def _rows(mask: np.ndarray) -> str:
    """Which data rows (1 = the first row under the header), the first few of them."""
    rows = [str(row + 1) for row in np.flatnonzero(mask)]
    shown = ", ".join(rows[:5]) + (f", ... ({len(rows)} in all)" if len(rows) > 5 else "")
    return f"data row{'s' if len(rows) > 1 else ''} {shown}"


def _check_published(path: str, target: str, encoded: Encoded, num_classes, input_shape) -> None:
    """A value typed over the one the file gives would build a model that does not fit."""
    if num_classes is not None and int(num_classes) != encoded.num_classes:
        what = f"{encoded.num_classes} classes" if encoded.task == "classification" else "1 output (regression)"
        raise ConfigError(
            f"data.num_classes={num_classes} but data.target='{target}' of '{path}' gives {what}; "
            f"remove the override or set data.num_classes={encoded.num_classes}"
        )
    if input_shape is not None and list(input_shape) != [encoded.x.shape[1]]:
        raise ConfigError(
            f"data.input_shape={list(input_shape)} but the encoded features of '{path}' are [{encoded.x.shape[1]}] "
            f"({', '.join(encoded.inputs[:6])}{', ...' if len(encoded.inputs) > 6 else ''}); "
            f"remove the override or set data.input_shape=[{encoded.x.shape[1]}]"
        )
