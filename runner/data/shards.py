"""Tar shards streamed from disk, for data that does not fit in memory (the WebDataset
layout: consecutive members ``<key>.<field>`` make one sample).

    'data.train="shards/train-{0000..0099}.tar"'   brace ranges, {a,b} lists and * globs

A sample's input is its ``.npy`` array (loaded without pickle) or its image (``.png``,
``.jpg``, ... decoded like data=image_folder); its label is the integer text of ``.cls``.
``python -m runner.data.pack`` writes such shards from any data option.

How an epoch streams: the shards are dealt to ranks, then to DataLoader workers; each worker
reads its shards in an order drawn from (seed, epoch), through a shuffle buffer seeded by
(seed, epoch, rank, worker), and makes its own batches; the DataLoader takes them from the
workers in turn. Every rank gets as many samples (a rank short of them repeats its first
ones, for DDP). Nothing of a shard is held beyond the shuffle buffer.

Resume is exact: the batch sequence of an epoch is a function of (seed, epoch, the shard
sizes, batch size, workers), so a run restarted at batch k lets each worker skip (read, not
decode) what it had already produced, and hands the workers their roles so that batch k
comes next from the same worker as in an unbroken run. The same number of workers is
needed for that; the skipped part is read again from disk.
"""

import io
import itertools
import re
import tarfile
from dataclasses import dataclass
from functools import lru_cache
from glob import glob
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from runner.data.module import DataModule, modality_of
from runner.data.image_folder import parse_image_size
from runner.errors import ConfigError

IMAGE_FIELDS = ("png", "jpg", "jpeg", "bmp", "webp", "gif", "tif", "tiff")
INPUT_FIELDS = ("npy", *IMAGE_FIELDS)
LABEL_FIELDS = ("cls", "label")


def shards(
    train: str,
    val: str | None = None,
    test: str | None = None,
    shuffle_buffer: int = 1000,
    image_size: int | Sequence[int] | None = None,
    channels: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    batch_size: int = 64,
    num_workers: int = 2,
    num_classes: int | None = None,
    input_shape: Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
    modality: str | None = None,
) -> DataModule:
    if val is None or test is None:
        raise ConfigError("data.val and data.test are needed with data=shards (a stream is not split); give their shard patterns, e.g. 'data.val=\"shards/val-{0000..0001}.tar\"'")
    if shuffle_buffer < 1:
        raise ConfigError(f"data.shuffle_buffer={shuffle_buffer} must be at least 1 (1: no shuffling within shards)")
    decoding = Decoding(parse_image_size(image_size, "as stored"), channels,
                        torch.tensor(list(mean), dtype=torch.float32) if mean is not None else None,
                        torch.tensor(list(std), dtype=torch.float32) if std is not None else None)
    streams = {name: ShardStream(expand(pattern, f"data.{name}"), decoding, shuffle_buffer) for name, pattern in (("train", train), ("val", val), ("test", test))}
    facts = shard_facts(tuple(streams["train"].paths), decoding)
    shape = tuple(facts["input_shape"])
    classes = max(facts["num_classes"], *(shard_facts(tuple(s.paths), decoding)["num_classes"] for s in (streams["val"], streams["test"])))
    if num_classes is not None and int(num_classes) != classes:
        raise ConfigError(f"data.num_classes={num_classes}, but the shards' labels give {classes} classes; remove data.num_classes (it is read from the shards)")
    if input_shape is not None and tuple(int(v) for v in input_shape) != shape:
        raise ConfigError(f"data.input_shape={list(input_shape)}, but the shards' samples are {list(shape)}; remove data.input_shape (it is read from the shards)")
    return DataModule(
        streams["train"], streams["val"], streams["test"], classes, shape, batch_size, num_workers,
        class_names=[str(name) for name in class_names] if class_names else [], modality=modality or modality_of(shape),
    )


@dataclass(frozen=True)
class Decoding:
    """How a sample's fields become (x, y)."""

    size: tuple[int, int] | None
    channels: int
    mean: torch.Tensor | None
    std: torch.Tensor | None

    def __call__(self, fields: dict[str, bytes], where: str) -> tuple[torch.Tensor, torch.Tensor]:
        label = next((fields[name] for name in LABEL_FIELDS if name in fields), None)
        data = next(((name, fields[name]) for name in INPUT_FIELDS if name in fields), None)
        if label is None or data is None:
            raise ConfigError(f"{where}: a sample without {'a label (.cls)' if label is None else 'an input (.npy or an image)'} (fields: {', '.join(sorted(fields))}); write shards with python -m runner.data.pack")
        name, payload = data
        if name == "npy":
            x = torch.from_numpy(np.load(io.BytesIO(payload), allow_pickle=False).copy()).float()
        else:
            x = self._image(payload)
        return x, torch.tensor(int(label.decode().strip()), dtype=torch.long)

    def _image(self, payload: bytes) -> torch.Tensor:
        from PIL import Image

        with Image.open(io.BytesIO(payload)) as image:
            image = image.convert("L" if self.channels == 1 else "RGB")
            if self.size is not None and image.size != (self.size[1], self.size[0]):
                image = image.resize((self.size[1], self.size[0]), Image.Resampling.BILINEAR)
            array = np.asarray(image, dtype=np.uint8)
        x = torch.from_numpy(array.copy()).float().div_(255)
        x = x.unsqueeze(0) if x.dim() == 2 else x.permute(2, 0, 1)
        if self.mean is not None:
            x = (x - self.mean.view(-1, 1, 1)) / self.std.view(-1, 1, 1)
        return x


class ShardStream(IterableDataset):
    """One split's shards as a stream of (x, y), divided over ranks and workers (see the module
    docstring). ``configure`` is called by DataModule.loader; ``set_epoch`` before each pass."""

    def __init__(self, paths: Sequence[str], decoding: Decoding, shuffle_buffer: int):
        self.paths, self.decoding, self.shuffle_buffer = list(paths), decoding, shuffle_buffer
        self.counts = [shard_index(path)[0] for path in self.paths]
        self.labels = torch.as_tensor([label for path in self.paths for label in shard_index(path)[1]], dtype=torch.long)
        # (epoch, start batch), shared with the workers, which live for the whole run
        self.position = torch.zeros(2, dtype=torch.long).share_memory_()
        self.configure()

    def configure(self, batch_size: int = 1, num_workers: int = 0, seed: int = 0, limit: int = -1,
                  rank: int = 0, world_size: int = 1, train: bool = False) -> None:
        self.batch_size, self.num_workers, self.seed, self.limit = batch_size, num_workers, seed, limit
        self.rank, self.world_size, self.train = rank, world_size, train

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.position[0], self.position[1] = epoch, start_batch

    def __len__(self) -> int:  # samples of this rank (the DataLoader's len is in batches)
        return sum(len(samples) for samples in self._worker_samples(0))

    def num_batches(self, batch_size: int, num_workers: int, limit: int = -1, world_size: int = 1) -> int:
        per_worker = [-(-len(samples) // batch_size) for samples in self._plan(0, 0, world_size, max(num_workers, 1))]
        total = sum(per_worker)
        return total if limit < 0 else min(total, limit)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        workers = max(self.num_workers, 1)
        physical = info.id if info is not None else 0
        epoch, start = int(self.position[0]), int(self.position[1])
        counts = [-(-len(samples) // self.batch_size) for samples in self._worker_samples(epoch)]
        done, offset, quota = _resume_plan(counts, start, self.limit)
        logical = (offset + physical) % workers
        skip, keep = done[logical] * self.batch_size, quota[logical] * self.batch_size
        samples = self._worker_samples(epoch)[logical]
        stream = self._shuffled(samples, epoch, logical) if self.train else self._read(samples)
        for fields, where in itertools.islice(stream, skip, skip + keep):
            yield self.decoding(fields, where)

    # the (shard, member range) plan of an epoch: which samples each logical worker streams
    def _worker_samples(self, epoch: int) -> list[list[tuple[int, int]]]:
        return self._plan(epoch, self.rank, self.world_size, max(self.num_workers, 1))

    def _plan(self, epoch: int, rank: int, world_size: int, workers: int) -> list[list[tuple[int, int]]]:
        """Per logical worker, the samples (shard number, index in shard) it streams. Shards are
        dealt to ranks and then to workers by number, the same every epoch (so every epoch
        has the same batch count); training shuffles the order of each worker's shards."""
        if world_size > len(self.paths):
            raise ConfigError(f"{len(self.paths)} shard(s) for {world_size} ranks: every rank needs a shard; write more, smaller shards (python -m runner.data.pack --shard-size ...)")
        chunks = [[(shard, index) for index in range(self.counts[shard])] for shard in range(rank, len(self.paths), world_size)]
        if self.train and world_size > 1:  # equal samples per rank: trim the last shard, or repeat the first samples
            target, have = sum(self.counts) // world_size, sum(len(chunk) for chunk in chunks)
            if have > target:
                chunks[-1] = chunks[-1][: len(chunks[-1]) - (have - target)]
            elif have < target:
                flat = [sample for chunk in chunks for sample in chunk]
                chunks.append((flat * ((target - have) // max(len(flat), 1) + 1))[: target - have])
        per_worker = []
        for worker in range(workers):
            mine = chunks[worker::workers]
            if self.train:
                seed = ((self.seed * 1_000_003 + epoch) * 1_000_003 + rank) * 1_000_003 + worker
                mine = [mine[i] for i in torch.randperm(len(mine), generator=torch.Generator().manual_seed(seed)).tolist()]
            per_worker.append([sample for chunk in mine for sample in chunk])
        return per_worker

    def _shuffled(self, samples: list[tuple[int, int]], epoch: int, worker: int) -> Iterator[tuple[dict, str]]:
        generator = torch.Generator().manual_seed(((self.seed * 1_000_003 + epoch) * 1_000_003 + self.rank) * 1_000_003 + worker)
        buffer: list[tuple[dict, str]] = []
        for item in self._read(samples):
            buffer.append(item)
            if len(buffer) >= self.shuffle_buffer:
                yield buffer.pop(int(torch.randint(len(buffer), (), generator=generator)))
        while buffer:
            yield buffer.pop(int(torch.randint(len(buffer), (), generator=generator)))

    def _read(self, samples: list[tuple[int, int]]) -> Iterator[tuple[dict, str]]:
        """The fields of each planned sample, reading a shard sequentially while its indices
        rise, and opening it again when they do not (a repeated stretch)."""
        members, shard_open, last = None, None, -1
        for shard, index in samples:
            if shard != shard_open or index <= last:
                members, shard_open, last = enumerate(_samples(self.paths[shard])), shard, -1
            for number, fields in members:
                if number == index:
                    last = index
                    yield fields, f"{self.paths[shard]} sample {index}"
                    break
            else:
                raise ConfigError(f"shard '{self.paths[shard]}' ended before sample {index}: it changed while the run read it")


def _resume_plan(counts: list[int], start: int, limit: int) -> tuple[list[int], int, list[int]]:
    """The DataLoader takes batches from its workers in turn, skipping exhausted ones. For an
    epoch whose first `start` batches are done: how many each logical worker has produced,
    which logical worker the physical worker 0 must play (so the next batch comes from the
    right one), and how many batches each still yields (within `limit` batches in all)."""
    workers = len(counts)
    done = [0] * workers
    pointer, produced = 0, 0
    total = sum(counts) if limit < 0 else min(sum(counts), limit)
    while produced < min(start, total):
        if done[pointer] < counts[pointer]:
            done[pointer] += 1
            produced += 1
        pointer = (pointer + 1) % workers
    # the batches still to come, in the same turn order, up to the limit
    quota = list(done)
    remaining, cursor = total - produced, pointer
    while remaining > 0:
        if quota[cursor] < counts[cursor]:
            quota[cursor] += 1
            remaining -= 1
        cursor = (cursor + 1) % workers
    return done, pointer, [quota[w] - done[w] for w in range(workers)]


def _samples(path: str, only: tuple[str, ...] | None = None) -> Iterator[dict[str, bytes]]:
    """A tar shard's samples in order: consecutive members sharing a key (the name up to the
    first dot of its base name) are one sample's fields. With ``only``, just those fields are
    read, and the archive is opened for seeking so the others are skipped, not read."""
    try:
        with tarfile.open(path, "r|*" if only is None else "r:*") as archive:
            key, fields = None, {}
            for member in archive:
                if not member.isfile():
                    continue
                base = member.name.rsplit("/", 1)[-1]
                stem, _, field = base.partition(".")
                sample_key = member.name[: len(member.name) - len(base)] + stem
                if key is not None and sample_key != key:
                    yield fields
                    fields = {}
                key = sample_key
                if only is None or field.lower() in only:
                    fields[field.lower()] = archive.extractfile(member).read()
                else:
                    fields.setdefault(field.lower(), b"")  # counted as a field, not read
            if fields:
                yield fields
    except (tarfile.TarError, OSError, EOFError) as error:
        raise ConfigError(f"shard '{path}' cannot be read ({error}); rewrite it with python -m runner.data.pack") from None


@lru_cache(maxsize=4096)
def shard_index(path: str) -> tuple[int, tuple[int, ...]]:
    """(samples, labels) of a shard, read once per process (labels only: inputs are not decoded)."""
    labels = []
    for number, fields in enumerate(_samples(path, only=LABEL_FIELDS)):
        label = next((fields[name] for name in LABEL_FIELDS if name in fields), None)
        if label is None:
            raise ConfigError(f"shard '{path}' sample {number} has no label (.cls); write shards with python -m runner.data.pack")
        labels.append(int(label.decode().strip()))
    return len(labels), tuple(labels)


@lru_cache(maxsize=16)
def shard_facts(paths: tuple[str, ...], decoding: Decoding) -> dict[str, Any]:
    """num_classes (from every label) and input_shape (from the first sample) of shards."""
    labels = [label for path in paths for label in shard_index(path)[1]]
    if not labels:
        raise ConfigError(f"the shards {paths[0]} ... hold no samples; write them with python -m runner.data.pack")
    first = next(_samples(paths[0]))
    x, _ = decoding(first, f"{paths[0]} sample 0")
    return {"num_classes": max(labels) + 1, "input_shape": list(x.shape)}


def expand(pattern: str, key: str) -> list[str]:
    """Shard files a pattern names: {0000..0099} ranges (zero padding kept), {a,b} lists, globs."""
    if not isinstance(pattern, str) or not pattern:
        raise ConfigError(f"{key}={pattern!r} is not a shard pattern; give e.g. '{key}=\"shards/train-{{0000..0009}}.tar\"'")
    names = _braces(pattern)
    paths = sorted({path for name in names for path in (glob(name) if any(c in name for c in "*?[") else [name]) if Path(path).is_file()})
    if not paths:
        raise ConfigError(f"{key}='{pattern}' matches no file; check the folder and the range, e.g. '{key}=\"shards/train-{{0000..0009}}.tar\"'")
    return paths


def _braces(pattern: str) -> list[str]:
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    body, head, tail = match.group(1), pattern[: match.start()], pattern[match.end():]
    ranged = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if ranged:
        first, last = ranged.groups()
        width = len(first) if first.startswith("0") else 0
        options = [str(number).zfill(width) for number in range(int(first), int(last) + 1)]
    else:
        options = body.split(",")
    return [expanded for option in options for expanded in _braces(head + option + tail)]


def published(data: Any, key: str) -> Any:
    """num_classes or input_shape for the config (the ${shard_facts:...} resolver), from the
    data node's train/val/test patterns and image settings."""
    decoding = Decoding(parse_image_size(data.get("image_size"), "as stored"), int(data.get("channels") or 3), None, None)
    facts = [shard_facts(tuple(expand(data.get(split), f"data.{split}")), decoding) for split in ("train", "val", "test") if data.get(split)]
    return max(fact["num_classes"] for fact in facts) if key == "num_classes" else facts[0]["input_shape"]
