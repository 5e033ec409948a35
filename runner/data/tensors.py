"""A user's own arrays from an .npz or .pt file holding ``x`` and ``y``."""

from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from runner.data.module import DataModule, modality_of, split
from runner.errors import ConfigError

FIX = "give data.path=<file> holding arrays x (samples first) and y (integer class labels)"


def tensors(
    path: str,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    split_seed: int = 0,
    batch_size: int = 64,
    num_workers: int = 0,
    num_classes: int | None = None,
    input_shape: tuple[int, ...] | None = None,
    modality: str | None = None,
) -> DataModule:
    import torch

    x, y = _load(str(path))
    x = torch.as_tensor(x, dtype=torch.float32)
    y = torch.as_tensor(y, dtype=torch.long)
    info = file_info(str(path))
    train, val, test = split(x, y, val_fraction, test_fraction, split_seed)
    _check_finite(str(path), {"train": train, "val": val, "test": test})
    shape = tuple(info["input_shape"])
    # set in a recipe or on the command line, they must say what the file holds (a model or an
    # export built for another shape would fail later, or describe the wrong input)
    if input_shape is not None and tuple(int(v) for v in input_shape) != shape:
        raise ConfigError(
            f"data.input_shape={list(input_shape)}, but the samples of data.path='{path}' are {list(shape)}; "
            "remove data.input_shape (it is read from the file) or reshape x in the file"
        )
    if num_classes is not None and int(num_classes) != int(info["num_classes"]):
        raise ConfigError(
            f"data.num_classes={num_classes}, but the labels of data.path='{path}' give {info['num_classes']} classes; "
            "remove data.num_classes (it is read from the file)"
        )
    return DataModule(
        train, val, test,
        int(info["num_classes"]),
        shape, batch_size, num_workers,
        modality=modality or modality_of(shape),
    )


def _check_finite(path: str, splits: dict) -> None:
    """NaN or inf inputs make the first loss NaN, which would be blamed on the learning rate:
    say where they are before training."""
    import torch

    bad = {name: ~torch.isfinite(dataset.tensors[0].flatten(1)).all(1) for name, dataset in splits.items()}
    if not any(rows.any() for rows in bad.values()):
        return
    x = torch.cat([dataset.tensors[0] for dataset in splits.values()])
    counts = " and ".join(f"{count} {kind}" for count, kind in ((int(x.isnan().sum()), "NaN"), (int(x.isinf().sum()), "inf")) if count)
    samples = sum(int(rows.sum()) for rows in bad.values())
    where = ", ".join(f"{name}: {int(rows.sum())} of {len(rows)}" for name, rows in bad.items())
    raise ConfigError(
        f"data.path='{path}': array x holds {counts} values, in {samples} samples ({where}); "
        "remove or fill them before training, e.g. keep = np.isfinite(x).reshape(len(x), -1).all(1); x, y = x[keep], y[keep]"
    )


@lru_cache(maxsize=8)
def file_info(path: str) -> dict[str, Any]:
    """num_classes and input_shape of a data file (also the ``tensor_file`` resolver)."""
    x, y = _load(path)
    return {"num_classes": int(y.max()) + 1, "input_shape": list(x.shape[1:])}


@lru_cache(maxsize=2)
def _load(path: str) -> tuple[np.ndarray, np.ndarray]:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"data.path='{path}': no such file; {FIX}")
    try:
        if file.suffix == ".npz":
            with np.load(file, allow_pickle=False) as arrays:
                content = {key: arrays[key] for key in arrays.files}
        elif file.suffix == ".pt":
            import torch

            content = {
                key: np.asarray(value)
                for key, value in torch.load(file, map_location="cpu", weights_only=True).items()
            }
        else:
            raise ConfigError(f"data.path='{path}': unsupported file type '{file.suffix}'; use .npz or .pt")
    except ConfigError:
        raise
    except Exception as error:  # a damaged or foreign file: say which and why
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if "pickled" in reason or "Weights only load failed" in reason:
            # numpy and torch both suggest loading unsafely here; runner never does
            reason = f"not a {file.suffix} file of plain arrays: damaged, or it holds pickled Python objects, which runner does not load"
        raise ConfigError(f"data.path='{path}' could not be read ({reason[:200]}); {FIX}") from None
    return _validated(path, content)


def _validated(path: str, content: dict) -> tuple[np.ndarray, np.ndarray]:
    missing = [key for key in ("x", "y") if key not in content]
    if missing:
        raise ConfigError(
            f"data.path='{path}' has no array {' or '.join(missing)} (found: {sorted(content)}); {FIX}"
        )
    x, y = content["x"], content["y"]
    if x.ndim < 2:
        raise ConfigError(
            f"data.path='{path}': x has shape {x.shape}, but x must hold samples first and then each sample's "
            "values, e.g. shape (N, features) for tabular data or (N, C, H, W) for images "
            "(one value per sample: save x.reshape(-1, 1))"
        )
    if len(x) != len(y):
        raise ConfigError(
            f"data.path='{path}': x has {len(x)} samples but y has {len(y)}; "
            "x and y must have the same length"
        )
    if len(y) == 0 or not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
        raise ConfigError(
            f"data.path='{path}': y must be non-empty non-negative integer class labels "
            f"(got dtype {y.dtype}); {FIX}"
        )
    return x, y
