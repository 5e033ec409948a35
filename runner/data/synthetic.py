"""Random inputs labelled by a fixed random linear rule: learnable, sized at will."""

import torch

from runner.data.module import DataModule, modality_of, split


def synthetic(
    num_samples: int = 1024,
    num_classes: int = 4,
    input_shape: tuple[int, ...] = (1, 8, 8),
    noise: float = 0.0,
    data_seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    split_seed: int = 0,
    batch_size: int = 32,
    num_workers: int = 0,
    modality: str | None = None,
) -> DataModule:
    generator = torch.Generator().manual_seed(data_seed)
    shape = tuple(int(d) for d in input_shape)
    x = torch.randn(num_samples, *shape, generator=generator)
    rule = torch.randn(x[0].numel(), num_classes, generator=generator)
    scores = x.flatten(1) @ rule
    if noise > 0:
        scores = scores + noise * torch.randn(scores.shape, generator=generator)
    y = scores.argmax(dim=1)
    train, val, test = split(x, y, val_fraction, test_fraction, split_seed)
    return DataModule(train, val, test, num_classes, shape, batch_size, num_workers, modality=modality or modality_of(shape))
