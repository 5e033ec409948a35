"""DataModule, the resumable batch sampler and the split shared by every data factory."""

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, TensorDataset

from runner.errors import ConfigError


class ResumableBatchSampler(Sampler[list[int]]):
    """Batches of indices from a permutation that depends only on (seed, epoch).

    ``set_epoch(epoch, start_batch)`` picks the permutation and skips the batches already
    trained on, which is what an exact mid-epoch resume needs; no RNG state is involved.
    With several ranks each takes every world_size-th index of the same permutation (padded
    by wrapping around when ``pad``, so every rank has as many batches), which makes global
    batch k of a ``world_size x batch_size`` run the same samples as batch k of one process
    with ``world_size * batch_size``.
    """

    def __init__(self, size: int, batch_size: int, shuffle: bool, seed: int, limit: int = -1,
                 rank: int = 0, world_size: int = 1, pad: bool = True, weights: torch.Tensor | None = None,
                 with_epoch: bool = False):
        self.size, self.batch_size, self.shuffle, self.seed = size, batch_size, shuffle, seed
        # batches of (epoch, index) keys, for datasets whose random transforms are seeded per sample
        self.with_epoch = with_epoch
        self.limit, self.rank, self.world_size, self.pad = limit, rank, world_size, pad
        # per-sample weights: the epoch's order is drawn with replacement in proportion to
        # them (hard-example mining sets these); None is a plain permutation
        self.weights = weights
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def _shard_size(self) -> int:
        if self.pad:
            return -(-self.size // self.world_size)
        return len(range(self.rank, self.size, self.world_size))

    def num_batches(self) -> int:
        full = -(-self._shard_size() // self.batch_size)
        return full if self.limit < 0 else min(full, self.limit)

    def __len__(self) -> int:
        return max(0, self.num_batches() - self.start_batch)

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            if self.weights is not None:
                order = torch.multinomial(self.weights.double(), self.size, replacement=True, generator=generator).tolist()
            else:
                order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        if self.world_size > 1:
            if self.pad:
                total = self._shard_size() * self.world_size
                order = (order * (total // max(len(order), 1) + 1))[:total]
            order = order[self.rank :: self.world_size]
        for batch in range(self.start_batch, self.num_batches()):
            indices = order[batch * self.batch_size : (batch + 1) * self.batch_size]
            yield [(self.epoch, index) for index in indices] if self.with_epoch else indices


MODALITIES = ("image", "signal", "spectrogram", "coordinates", "tabular")
TASKS = ("classification", "regression")


@dataclass
class DataModule:
    """The splits and the facts other parts check at build time.

    ``modality`` says what a sample is (image [C, H, W], signal [C, L], spectrogram
    [C, F, T], coordinates [D], tabular [D]); augmentations and models that only make sense
    for some modalities declare ``modalities`` and build.py refuses a wrong pairing.
    ``task`` picks the metrics: classification (integer labels) or regression (float
    targets shaped like the model's output; NaN marks a target that is not observed).
    For regression ``num_classes`` is the number of outputs.
    """

    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, ...]
    batch_size: int = 64
    num_workers: int = 0
    class_names: list[str] = field(default_factory=list)
    modality: str = "image"
    task: str = "classification"
    # training-sample weights for the sampler (hard-example mining); None: uniform order
    sample_weights: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ConfigError(f"data.modality='{self.modality}' is not known; use one of {', '.join(MODALITIES)}")
        if self.task not in TASKS:
            raise ConfigError(f"data.task='{self.task}' is not known; use one of {', '.join(TASKS)}")
        if not self.class_names and self.task == "classification":
            self.class_names = [str(i) for i in range(self.num_classes)]

    def class_counts(self) -> torch.Tensor:
        """Samples per class in the training split (for class weights)."""
        labels = getattr(self.train, "labels", None)  # a lazily decoded split knows its labels
        if labels is None:
            labels = torch.as_tensor([int(self.train[i][1]) for i in range(len(self.train))])
        return torch.bincount(labels, minlength=self.num_classes)

    def batches_per_epoch(self, limit: int = -1, world_size: int = 1) -> int:
        """Training micro-batches per epoch and rank (what the loop and schedulers plan with)."""
        if isinstance(self.train, IterableDataset):  # a stream knows how it batches
            return self.train.num_batches(self.batch_size, self.num_workers, limit, world_size)
        return ResumableBatchSampler(len(self.train), self.batch_size, True, 0, limit, world_size=world_size).num_batches()

    def start(self, loader: DataLoader, split: str, epoch: int, start_batch: int = 0) -> None:
        """Set where the loader's next pass begins: the epoch's order, the batches already
        trained on, and (training) the sample weights a callback chose."""
        if isinstance(loader.dataset, IterableDataset):
            if split == "train" and self.sample_weights is not None:
                raise ConfigError("hard-example mining reweights samples, which a streamed data set cannot; remove callbacks.hard_example_mining")
            loader.dataset.set_epoch(epoch, start_batch)
            return
        if split == "train":
            loader.batch_sampler.weights = self.sample_weights
        loader.batch_sampler.set_epoch(epoch, start_batch)

    def loader(self, split: str, *, seed: int = 0, limit: int = -1, pin_memory: bool = False,
               rank: int = 0, world_size: int = 1) -> DataLoader:
        """Training batches are shuffled and padded to equal counts per rank (DDP needs every
        rank to step together); evaluation batches are neither."""
        dataset = getattr(self, split)
        train = split == "train"
        if isinstance(dataset, IterableDataset):  # streamed: it divides itself over ranks and workers
            dataset.configure(batch_size=self.batch_size, num_workers=self.num_workers, seed=seed, limit=limit,
                              rank=rank, world_size=world_size, train=train)
            return DataLoader(dataset, batch_size=self.batch_size, num_workers=self.num_workers, pin_memory=pin_memory,
                              persistent_workers=self.num_workers > 0, generator=torch.Generator().manual_seed(seed))
        weights = self.sample_weights if train else None
        sampler = ResumableBatchSampler(len(dataset), self.batch_size, train, seed, limit, rank, world_size, pad=train,
                                        weights=weights, with_epoch=getattr(dataset, "takes_epoch", False))
        return DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=pin_memory,
            persistent_workers=self.num_workers > 0,
            # a private generator: creating an iterator must not draw from the global RNG,
            # or a resumed run's random stream would drift from an unbroken run's
            generator=torch.Generator().manual_seed(seed),
        )


def modality_of(input_shape: Sequence[int]) -> str:
    """The usual reading of a sample shape: [C, H, W] image, [C, L] signal, [D] tabular."""
    return {3: "image", 2: "signal"}.get(len(input_shape), "tabular")


def split(
    x: torch.Tensor,
    y: torch.Tensor,
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """Split (x, y) into train/val/test, stratified by class, reproducibly for a seed."""
    parts = split_indices(y.tolist(), val_fraction, test_fraction, seed)
    return tuple(TensorDataset(x[i], y[i]) for i in parts)


def split_indices(labels: Sequence[int], val_fraction: float, test_fraction: float, seed: int) -> tuple[list[int], list[int], list[int]]:
    """Indices of train/val/test, stratified by class where every class allows it, reproducibly
    for a seed (each part in the order train_test_split returns it)."""
    from sklearn.model_selection import train_test_split

    for key, value in (("data.val_fraction", val_fraction), ("data.test_fraction", test_fraction)):
        if not 0.0 < value < 1.0:
            raise ConfigError(f"{key}={value} is out of range; use a fraction between 0 and 1")
    if val_fraction + test_fraction >= 1.0:
        raise ConfigError(
            f"data.val_fraction + data.test_fraction = {val_fraction + test_fraction:g} leaves "
            "nothing to train on; keep their sum below 1"
        )

    indices = torch.arange(len(labels)).numpy()
    labels = torch.as_tensor(list(labels)).numpy()
    held_out = val_fraction + test_fraction
    train_idx, rest_idx = train_test_split(
        indices, test_size=held_out, random_state=seed, stratify=_stratify(labels)
    )
    val_idx, test_idx = train_test_split(
        rest_idx,
        test_size=test_fraction / held_out,
        random_state=seed,
        stratify=_stratify(labels[rest_idx]),
    )
    return train_idx.tolist(), val_idx.tolist(), test_idx.tolist()


def _stratify(labels: Sequence[int]):
    """Stratify only when every class has at least two samples (sklearn's requirement)."""
    counts = torch.bincount(torch.as_tensor(labels))
    return labels if bool((counts[counts > 0] >= 2).all()) else None
