"""Image folders: ROOT/<class>/<image> (or ROOT/train|val|test/<class>/<image>, see
runner.data.folders), decoded lazily, one image at a time, in DataLoader workers.

Each image is converted to ``channels`` (1: grey, 3: RGB) and resized to ``image_size``
(bilinear, aspect not kept), scaled to [0, 1], passed through the training transforms
(training split only) and normalised with per-channel mean/std. The mean/std are given, or
measured on a seeded sample of at most ``stats_samples`` training images (resized, before
any augmentation); they are kept in memory, not written beside the data, because a run
writes nothing outside its output directory.

Random training transforms (any ``nn.Module`` taking and returning a [C, H, W] float
tensor, e.g. ``torchvision.transforms.v2`` ones) draw from torch's RNG seeded per
(seed, epoch, index): the same sample gets the same augmentation in every run and after a
resume, whichever worker loads it.
"""

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from runner.data.folders import FolderSplits, scan, suffixes
from runner.data.module import DataModule
from runner.errors import ConfigError

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# PIL modes by the channels they carry (alpha dropped): what "mixed channel counts" means
GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")
ON_BAD_FILE = ("fail", "skip")


@dataclass(frozen=True)
class ImageFacts:
    """What a folder of images is, read from file headers only (cached per process)."""

    class_names: tuple[str, ...]
    channels: int
    size: tuple[int, int]
    bad_files: tuple[str, ...]


def image_folder(
    root: str,
    image_size: int | Sequence[int] = 32,
    channels: int | None = None,
    extensions: Sequence[str] = EXTENSIONS,
    train_transforms: Sequence[nn.Module] = (),
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    stats_samples: int = 1000,
    on_bad_file: str = "fail",
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    split_seed: int = 0,
    seed: int = 0,
    batch_size: int = 64,
    num_workers: int = 0,
    num_classes: int | None = None,
    input_shape: Sequence[int] | None = None,
) -> DataModule:
    if on_bad_file not in ON_BAD_FILE:
        raise ConfigError(f"data.on_bad_file='{on_bad_file}' is not supported; use fail or skip")
    wanted = suffixes(extensions)
    facts = image_facts(str(root), channels, parse_image_size(image_size), wanted, on_bad_file)
    shape = (facts.channels, *facts.size)
    _check_published(num_classes, input_shape, len(facts.class_names), shape)
    files = scan(str(root), wanted, val_fraction, test_fraction, split_seed)
    if facts.bad_files:
        files = _without(files, set(facts.bad_files))
        import logging

        logging.getLogger("runner").warning(
            "data.on_bad_file=skip: %d unreadable file(s) left out, e.g. %s", len(facts.bad_files), facts.bad_files[0])
    transforms = tuple(train_transforms or ())
    for index, transform in enumerate(transforms):
        if not callable(transform):
            raise ConfigError(f"data.train_transforms[{index}] is not callable; give transforms such as torchvision.transforms.v2.RandomHorizontalFlip")
    plain = dict(size=facts.size, channels=facts.channels)
    mean_t, std_t = _statistics(files.train, plain, mean, std, stats_samples, seed)
    make = lambda items, augment: ImageFiles(items, **plain, mean=mean_t, std=std_t, transforms=augment, seed=seed)  # noqa: E731
    data = DataModule(
        make(files.train, transforms), make(files.val, ()), make(files.test, ()),
        len(facts.class_names), shape, batch_size, num_workers,
        class_names=list(facts.class_names), modality="image",
    )
    # what the export bundle's model.json tells a user of the model to do to an image
    data.preprocessing = (
        f"image files converted to {'grey (PIL mode L)' if facts.channels == 1 else 'RGB'}, resized to "
        f"{facts.size[0]}x{facts.size[1]} (height x width, PIL bilinear), as [C, H, W] float32 scaled to [0, 1], "
        f"then (x - mean) / std per channel with mean={[round(v, 6) for v in mean_t.tolist()]}, "
        f"std={[round(v, 6) for v in std_t.tolist()]}"
    )
    return data


class ImageFiles(Dataset):
    """One split of an image folder: (path, label) pairs decoded on access."""

    # DataModule.loader passes (epoch, index) keys, so random transforms are seeded per sample
    takes_epoch = True

    def __init__(self, items: Sequence[tuple[Path, int]], size: tuple[int, int], channels: int,
                 mean: torch.Tensor, std: torch.Tensor, transforms: Sequence[nn.Module] = (), seed: int = 0):
        self.paths = [str(path) for path, _ in items]
        self.labels = torch.as_tensor([label for _, label in items], dtype=torch.long)
        self.size, self.channels, self.transforms, self.seed = size, channels, tuple(transforms), seed
        self.mean, self.std = mean.view(-1, 1, 1), std.view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        x = decode(self.paths[index], self.channels, self.size).float().div_(255)
        if self.transforms:
            # the global RNG of this process is left as it was (it matters with num_workers=0)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_sample_seed(self.seed, epoch, index))
                for transform in self.transforms:
                    x = transform(x)
            if tuple(x.shape) != (self.channels, *self.size):
                raise ConfigError(
                    f"data.train_transforms turned an image into shape {list(x.shape)}, but the data is "
                    f"{[self.channels, *self.size]}; give size-changing transforms data.image_size as their size"
                )
        return (x - self.mean) / self.std, self.labels[index]


def decode(path: str, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """An image file as a uint8 tensor [channels, height, width]."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image = image.convert("L" if channels == 1 else "RGB")
            if image.size != (size[1], size[0]):
                image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            array = np.asarray(image, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as error:
        raise ConfigError(f"data.root: image '{path}' cannot be decoded ({error}); replace or remove it, or pass data.on_bad_file=skip") from None
    tensor = torch.from_numpy(array.copy())
    return tensor.unsqueeze(0) if channels == 1 else tensor.permute(2, 0, 1)  # a view: the batch stack copies once


@lru_cache(maxsize=8)
def image_facts(root: str, channels: int | None, size: tuple[int, int], suffixes: tuple[str, ...], on_bad_file: str = "fail") -> ImageFacts:
    """Class names and channel count of an image folder, from each file's header."""
    from PIL import Image

    from runner.data.folders import _tree, class_names

    names = class_names(root, suffixes)
    counts: dict[int, str] = {}
    bad = []
    for classes in _tree(root, suffixes).values():
        for paths in classes.values():
            for path in paths:
                try:
                    with Image.open(path) as image:
                        mode = image.mode
                except (OSError, ValueError, SyntaxError) as error:
                    if on_bad_file == "fail":
                        raise ConfigError(
                            f"data.root='{root}': '{path}' is not a readable image ({type(error).__name__}: {error}); "
                            "replace or remove it, or pass data.on_bad_file=skip to leave such files out"
                        ) from None
                    bad.append(str(path))
                    continue
                counts.setdefault(1 if mode in GREY_MODES else 3, f"{path} ({mode})")
    if channels is None:
        if len(counts) > 1:
            raise ConfigError(
                f"data.root='{root}' holds images with 1 and 3 channels (e.g. {counts[1]} and {counts[3]}); "
                "set data.channels=3 (or 1) to convert every image to that"
            )
        channels = next(iter(counts), 3)
    elif channels not in (1, 3):
        raise ConfigError(f"data.channels={channels} is not supported; use 1 (grey) or 3 (RGB)")
    return ImageFacts(names, channels, size, tuple(bad))


def published_shape(root: str, channels: Any, image_size: Any, extensions: Any) -> list[int]:
    """input_shape for the config (the ${image_folder_shape:...} resolver): [C, H, W]."""
    channels = None if channels in (None, "None", "null") else int(channels)
    facts = image_facts(str(root), channels, parse_image_size(image_size), suffixes(extensions))
    return [facts.channels, *facts.size]


def _statistics(train: Sequence[tuple[Path, int]], plain: dict, mean, std, samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    channels = plain["channels"]
    if (mean is None) != (std is None):
        raise ConfigError("data.mean and data.std go together: give both (one value per channel) or neither")
    if mean is not None:
        mean_t, std_t = torch.tensor(list(mean), dtype=torch.float32), torch.tensor(list(std), dtype=torch.float32)
        if mean_t.numel() != channels or std_t.numel() != channels or bool((std_t <= 0).any()):
            raise ConfigError(f"data.mean={list(mean)} / data.std={list(std)} need {channels} values each, std > 0")
        return mean_t, std_t
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train), generator=generator)[: max(1, samples)].tolist()
    total = torch.zeros(channels, dtype=torch.float64)
    squares = torch.zeros(channels, dtype=torch.float64)
    pixels = 0
    for index in order:
        x = decode(str(train[index][0]), channels, plain["size"]).double().div_(255)
        total += x.sum(dim=(1, 2))
        squares += (x * x).sum(dim=(1, 2))
        pixels += x[0].numel()
    mean_t = total / pixels
    std_t = (squares / pixels - mean_t * mean_t).clamp(min=0).sqrt().clamp(min=1e-3)
    return mean_t.float(), std_t.float()


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    return ((seed * 1_000_003 + epoch) * 1_000_003 + index) % (2**63 - 1)


def _without(files: FolderSplits, bad: set[str]) -> FolderSplits:
    keep = lambda items: tuple(item for item in items if str(item[0]) not in bad)  # noqa: E731
    return FolderSplits(files.class_names, keep(files.train), keep(files.val), keep(files.test), files.presplit)


def parse_image_size(value: Any, none_means: str | None = None) -> tuple[int, int] | None:
    """data.image_size as (height, width): one number (square) or [height, width]. Where a
    data option reads null as something (``none_means``), null gives None."""
    if none_means is not None and value in (None, "None", "null"):
        return None
    values = [value] if isinstance(value, (int, str)) else list(value or [])
    try:
        size = (int(values[0]), int(values[-1])) if 1 <= len(values) <= 2 else (0, 0)
    except (TypeError, ValueError):
        size = (0, 0)
    if min(size) <= 0:
        choices = f", or null ({none_means})" if none_means else ""
        raise ConfigError(f"data.image_size={value} is not a size; give one number (square) or [height, width]{choices}, e.g. data.image_size=64")
    return size


def _check_published(num_classes: int | None, input_shape: Sequence[int] | None, classes: int, shape: tuple[int, ...]) -> None:
    if num_classes is not None and int(num_classes) != classes:
        raise ConfigError(f"data.num_classes={num_classes}, but the folder has {classes} class folders; remove data.num_classes (it is read from the folder)")
    if input_shape is not None and tuple(int(v) for v in input_shape) != shape:
        raise ConfigError(
            f"data.input_shape={list(input_shape)}, but the images are {list(shape)} (data.channels, data.image_size); "
            "remove data.input_shape or change data.channels / data.image_size"
        )
