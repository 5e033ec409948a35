"""Any map-style ``torch.utils.data.Dataset`` built from config (a ``torchvision.datasets``
class over a local ``root``, a user's own class), with runner's split rules: the training
dataset is split into train/val/test, stratified by class, unless validation and test
datasets are given too (a missing one is split off train).

Samples may be (tensor, label), (PIL image, label) or (ndarray, label); images become
[C, H, W] float32 in [0, 1]. ``num_classes`` and ``input_shape`` are given in the config
(other groups interpolate them before anything is built) and checked against the data.
"""

from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from runner.data.module import DataModule, modality_of, split_indices
from runner.errors import ConfigError


def dataset(
    train: Dataset,
    num_classes: int,
    input_shape: Sequence[int],
    val: Dataset | None = None,
    test: Dataset | None = None,
    class_names: Sequence[str] | None = None,
    modality: str | None = None,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    split_seed: int = 0,
    batch_size: int = 64,
    num_workers: int = 0,
) -> DataModule:
    for key, part in (("data.train", train), ("data.val", val), ("data.test", test)):
        if part is not None and not (hasattr(part, "__getitem__") and hasattr(part, "__len__")):
            raise ConfigError(f"{key} is a {type(part).__name__}, not a map-style Dataset (with __getitem__ and __len__); give a Dataset class")
    if len(train) == 0:
        raise ConfigError(f"data.train ({type(train).__name__}) is empty; point it at data (e.g. its root=...)")
    labels = _labels(train)
    if val is None or test is None:
        kept, first, second = split_indices(labels, val_fraction, test_fraction, split_seed)
        if val is None and test is None:
            val, test = Subset(train, first), Subset(train, second)
        elif val is None:
            val, kept = Subset(train, first), kept + second
        else:
            test, kept = Subset(train, second), kept + first
        train = Subset(train, kept)
    shape = _check(train, labels, int(num_classes), tuple(int(v) for v in input_shape))
    names = list(class_names) if class_names else list(getattr(getattr(train, "dataset", train), "classes", []) or [])
    return DataModule(
        Samples(train), Samples(val), Samples(test), int(num_classes), shape, batch_size, num_workers,
        class_names=[str(name) for name in names][: int(num_classes)], modality=modality or modality_of(shape),
    )


class Samples(Dataset):
    """A dataset's samples as (float32 tensor, long label)."""

    def __init__(self, source: Dataset):
        self.source = source
        labels = _known_labels(source)
        if labels is not None:
            self.labels = torch.as_tensor(labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.source[index][:2]
        return as_tensor(x), torch.as_tensor(int(y), dtype=torch.long)


def as_tensor(x: Any) -> torch.Tensor:
    """A sample as float32: PIL images and uint8 arrays [H, W(, C)] become [C, H, W] in [0, 1]."""
    if isinstance(x, torch.Tensor):
        return x.float() if x.dtype != torch.uint8 else x.float().div(255)
    if hasattr(x, "mode") and hasattr(x, "size") and hasattr(x, "convert"):  # a PIL image
        x = np.asarray(x)
        x = x[:, :, None] if x.ndim == 2 else x
        return torch.from_numpy(x.copy()).permute(2, 0, 1).float().div(255)
    array = np.asarray(x)
    tensor = torch.from_numpy(array.copy())
    return tensor.float().div(255) if array.dtype == np.uint8 else tensor.float()


def _labels(source: Dataset) -> list[int]:
    known = _known_labels(source)
    return [int(label) for label in known] if known is not None else [int(source[i][1]) for i in range(len(source))]


def _known_labels(source: Dataset) -> list[int] | None:
    """Labels a dataset holds without loading samples (torchvision's .targets, .labels), also
    through a Subset."""
    if isinstance(source, Subset):
        inner = _known_labels(source.dataset)
        return None if inner is None else [inner[i] for i in source.indices]
    for name in ("targets", "labels"):
        labels = getattr(source, name, None)
        if labels is not None and len(labels) == len(source):
            return [int(label) for label in (labels.tolist() if hasattr(labels, "tolist") else labels)]
    return None


def _check(train: Dataset, labels: list[int], num_classes: int, input_shape: tuple[int, ...]) -> tuple[int, ...]:
    shape = tuple(as_tensor(train[0][0]).shape)
    if shape != input_shape:
        raise ConfigError(f"data.input_shape={list(input_shape)}, but the dataset's samples are {list(shape)}; set data.input_shape={list(shape)}")
    if labels and (max(labels) >= num_classes or min(labels) < 0):
        raise ConfigError(
            f"data.num_classes={num_classes}, but the dataset's labels run from {min(labels)} to {max(labels)}; "
            f"set data.num_classes={max(labels) + 1}"
        )
    return shape
