"""scikit-learn's bundled handwritten digits: 1797 8x8 images, shipped with the package."""

import torch

from runner.data.module import DataModule, split


def digits(
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    split_seed: int = 0,
    batch_size: int = 64,
    num_workers: int = 0,
    num_classes: int = 10,
    input_shape: tuple[int, ...] = (1, 8, 8),
) -> DataModule:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # pixel values are counts 0..16; scale to [0, 1]
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.long)
    _check_published(num_classes, input_shape, 10, tuple(x.shape[1:]))
    train, val, test = split(x, y, val_fraction, test_fraction, split_seed)
    return DataModule(
        train, val, test, 10, tuple(x.shape[1:]), batch_size, num_workers,
        class_names=[str(d) for d in range(10)], modality="image",
    )


def _check_published(num_classes, input_shape, actual_classes, actual_shape) -> None:
    from runner.errors import ConfigError

    if int(num_classes) != actual_classes:
        raise ConfigError(
            f"data.num_classes={num_classes} but the data has {actual_classes} classes; "
            f"remove the override or set data.num_classes={actual_classes}"
        )
    if tuple(input_shape) != actual_shape:
        raise ConfigError(
            f"data.input_shape={list(input_shape)} but samples have shape {list(actual_shape)}; "
            f"remove the override or set data.input_shape={list(actual_shape)}"
        )
