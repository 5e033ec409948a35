"""Hugging Face ``datasets`` on disk: what ``save_to_disk`` wrote (a Dataset, or a DatasetDict
with splits), or a folder of Parquet/CSV files laid out as on the Hub.

    python -m runner data=hf data.path=beans/ data.input=image data.label=labels

Nothing is downloaded: ``HF_DATASETS_OFFLINE`` and ``HF_HUB_OFFLINE`` are set before
``datasets`` is imported (the ``hf`` extra), so a Hub name stops with how to save it first.

Splits: a DatasetDict's ``train`` (or its only split), ``validation``/``val``/``valid``/``dev``
and ``test`` are taken as they are; a missing held-out split is split off train, stratified by
class (runner.data.module.split_indices), like a plain Dataset or a folder of images.

The input column is decoded by its feature type in DataLoader workers, which read a batch of
rows at a time from the memory-mapped Arrow files (nothing is converted up front, nothing is
written anywhere; a Parquet/CSV folder is read into memory, as Arrow):

* ``Image``: converted and resized exactly as data=image_folder does (runner.data.image_folder's
  ``decode``: PIL, bilinear), scaled to [0, 1], normalised per channel with a mean/std measured
  on a seeded sample of training rows (or given);
* ``Audio``: read from the cell's bytes (or the file it names) with soundfile, never with the
  datasets library's own decoder (torchcodec), and turned into a sample exactly as
  data=audio_folder turns a file into one (runner.data.audio_folder's ``decode_clip``,
  ``featurise``, ``crop_window`` and ``clip_statistics``): mono, resampled to ``sample_rate``
  (scipy resample_poly), the centre ``duration`` seconds kept (training: a window drawn from
  (seed, epoch, index) with ``train_crop=random``) or zeros padded at the end, turned into
  ``features`` (logmel, multi or none) and standardised per channel and frequency with a
  mean/std measured on a seeded sample of training rows; the sample shape follows from those
  keys, as for audio folders (the ``soundfile`` of the ``audio`` extra reads the clips);
* a numeric ``Array2D``..``Array5D``, ``List``/``Sequence`` (nested or not): a float tensor of
  that shape, as stored (every row must have the same shape);
* several numeric columns, ``data.input=[a,b,c]`` (or one): a [D] vector standardised with the
  training mean and std; these small tables are read into memory once.

The label column: a ``ClassLabel`` gives its names; integers, booleans or text give their
sorted distinct values (over every split) as the classes.

Facts the other groups read at compose time (``${hf_facts:num_classes}``,
``${hf_facts:input_shape}``) come from the same cached reading as the factory's.
"""

import io
import logging
import os
import re
from dataclasses import dataclass, fields, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from runner.data.audio import _check as _check_clip, front_end
from runner.data.audio_folder import (
    TRAIN_CROPS, _reason as _sound_reason, _soundfile, clip_header, clip_statistics, crop_window, decode_clip, feature_shape,
    featurise,
)
from runner.data.module import DataModule, modality_of, split_indices
from runner.data.image_folder import parse_image_size
from runner.errors import ConfigError

log = logging.getLogger("runner")

INSTALL = "pip install 'runner[hf]'"
# canonical split -> the names a DatasetDict or a file layout may give it (first found wins)
SPLIT_NAMES = {"train": ("train",), "val": ("validation", "val", "valid", "dev"), "test": ("test",)}
TABLE_FILES = (".parquet", ".csv", ".tsv")
SAVE = ("save one with datasets.Dataset.from_dict({...}).save_to_disk(DIR), or "
        "datasets.load_dataset(NAME).save_to_disk(DIR) on a machine with network, and give data.path=DIR")
# what a Hub repository id looks like ("mnist", "user/name"); a path that exists is never one
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
NUMERIC = ("int", "uint", "float", "bool", "double", "half")


@dataclass(frozen=True)
class HfFacts:
    """What a data=hf config reads from the dataset: classes, and the sample's kind and shape."""

    class_names: tuple[str, ...]
    kind: str  # image, audio, array or columns
    shape: tuple[int, ...]
    columns: tuple[str, ...]  # the input column(s)
    modality: str  # what DataModule.modality says of the samples


@dataclass(frozen=True)
class ClipSettings:
    """The keys that turn an Audio cell into a sample, with data=audio_folder's meanings and
    defaults (hashable: part of the facts' cache key)."""

    sample_rate: int = 16000
    duration: float = 1.0
    features: str = "logmel"
    n_fft: int = 1024
    hop_length: int = 512
    n_mels: int = 32
    f_min: float = 0.0
    f_max: float | None = None
    multi_n_ffts: tuple[int, ...] = (1024, 2048)

    def __post_init__(self) -> None:
        object.__setattr__(self, "multi_n_ffts", tuple(int(size) for size in self.multi_n_ffts))

    @classmethod
    def of(cls, data: Mapping[str, Any]) -> "ClipSettings":
        """The settings a data node gives (keys it lacks keep their defaults)."""
        return cls(**{key.name: data[key.name] for key in fields(cls) if key.name in data})

    def shape(self) -> tuple[int, ...]:
        """[C, n_mels, frames] (or [1, L] for features=none), after checking the keys as
        data=audio_folder checks them."""
        _check_clip(1, self.sample_rate, self.duration, 0.0, self.features, self.n_fft, self.multi_n_ffts)
        return tuple(feature_shape(self.features, self.sample_rate, self.duration, self.hop_length, self.n_mels, self.multi_n_ffts))


def hf(
    path: str,
    input: str | Sequence[str],
    label: str,
    image_size: int | Sequence[int] | None = None,
    channels: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    sample_rate: int = 16000,
    duration: float = 1.0,
    features: str = "logmel",
    n_fft: int = 1024,
    hop_length: int = 512,
    n_mels: int = 32,
    f_min: float = 0.0,
    f_max: float | None = None,
    multi_n_ffts: Sequence[int] = (1024, 2048),
    train_crop: str = "random",
    stats_samples: int = 1000,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    split_seed: int = 0,
    seed: int = 0,
    batch_size: int = 64,
    num_workers: int = 2,
    num_classes: int | None = None,
    input_shape: Sequence[int] | None = None,
) -> DataModule:
    clip = ClipSettings(sample_rate, duration, features, n_fft, hop_length, n_mels, f_min, f_max, multi_n_ffts)
    settings = _settings(path, input, label, image_size, channels, clip)
    facts = hf_facts(*settings)
    _check_published(settings, facts, num_classes, input_shape)
    if train_crop not in TRAIN_CROPS:
        raise ConfigError(f"data.train_crop='{train_crop}' is not supported; use random or centre")
    parts = _parts(settings[0], settings[2], val_fraction, test_fraction, split_seed)
    if facts.kind == "columns":
        splits, preprocessing = _columns(parts, facts.columns)
    elif facts.kind == "audio":
        splits, preprocessing = _clips(parts, facts.columns[0], clip, train_crop == "random", stats_samples, seed, batch_size, num_workers)
    else:
        decoding = _decoding(facts, parts["train"], mean, std, stats_samples, seed)
        splits = {name: HfRows(dataset, rows, labels, facts.columns[0], decoding) for name, (dataset, rows, labels) in parts.items()}
        preprocessing = decoding.describe()
    used = [dataset for dataset, _, _ in parts.values()]
    unused = [name for name, dataset in _load(settings[0]).items() if all(dataset is not other for other in used)]
    log.info(
        "hf %s: %d train, %d val, %d test rows%s; input %s -> %s; classes %s", path, len(splits["train"]), len(splits["val"]),
        len(splits["test"]), f" (split(s) {', '.join(unused)} not used)" if unused else "", ", ".join(facts.columns),
        list(facts.shape), ", ".join(facts.class_names),
    )
    data = DataModule(
        splits["train"], splits["val"], splits["test"], len(facts.class_names), facts.shape, batch_size, num_workers,
        class_names=list(facts.class_names), modality=facts.modality,
    )
    data.preprocessing = preprocessing  # what the export bundle's model.json tells a user of the model to do
    return data


def published(data: Mapping[str, Any], key: str) -> Any:
    """num_classes or input_shape of a data=hf config (the ``${hf_facts:...}`` resolver hands it
    the data node: path, input, label, image_size, channels and the clip keys change the answer)."""
    facts = hf_facts(*_settings(data.get("path"), data.get("input"), data.get("label"), data.get("image_size"), data.get("channels"),
                                ClipSettings.of(data)))
    return len(facts.class_names) if key == "num_classes" else list(facts.shape)


# ------------------------------------------------------------------ samples
class HfRows(Dataset):
    """One split: row numbers into an Arrow-backed dataset, decoded on access (in a worker)."""

    def __init__(self, dataset: Any, rows: np.ndarray, labels: np.ndarray, column: str, decoding: Any):
        self.table = decoding.view(dataset, column)
        self.rows, self.column, self.decoding = rows, column, decoding
        self.labels = torch.as_tensor(labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        row = int(self.rows[index])
        return self.decoding(self.table[row][self.column], row), self.labels[index]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A whole batch in one Arrow read (the DataLoader calls this when it exists)."""
        rows = [int(self.rows[index]) for index in indices]
        values = self.table[rows][self.column]
        return [(self.decoding(value, row), self.labels[index]) for value, row, index in zip(values, rows, indices)]


@dataclass(frozen=True)
class ImageDecoding:
    """An Image cell ({bytes, path}) as data=image_folder turns a file into a sample."""

    channels: int
    size: tuple[int, int]
    mean: torch.Tensor
    std: torch.Tensor
    column: str

    def view(self, dataset: Any, column: str) -> Any:
        # undecoded: the cell's bytes, decoded here with image_folder's conversion
        return dataset.select_columns([column]).cast_column(column, _datasets().Image(decode=False))

    def __call__(self, value: Any, row: int) -> torch.Tensor:
        x = image_pixels(value, self.channels, self.size, self.column, row).float().div_(255)
        return (x - self.mean.view(-1, 1, 1)) / self.std.view(-1, 1, 1)

    def describe(self) -> str:
        return (
            f"images converted to {'grey (PIL mode L)' if self.channels == 1 else 'RGB'}, resized to {self.size[0]}x{self.size[1]} "
            f"(height x width, PIL bilinear), as [C, H, W] float32 scaled to [0, 1], then (x - mean) / std per channel with "
            f"mean={[round(v, 6) for v in self.mean.tolist()]}, std={[round(v, 6) for v in self.std.tolist()]}"
        )


@dataclass(frozen=True)
class ArrayDecoding:
    """A numeric array cell as a float32 tensor of the shape every row has."""

    shape: tuple[int, ...]
    column: str

    def view(self, dataset: Any, column: str) -> Any:
        return dataset.select_columns([column]).with_format("numpy")

    def __call__(self, value: Any, row: int) -> torch.Tensor:
        try:
            array = np.asarray(value, dtype=np.float32)
        except (TypeError, ValueError):
            array = None
        if array is None or tuple(array.shape) != self.shape:
            raise BadRow(
                f"data.input='{self.column}': row {row} is not a numeric array of shape {list(self.shape)} (the first "
                f"training row's shape); give every row the same shape (pad or cut them) before saving"
            )
        return torch.from_numpy(array.copy())

    def describe(self) -> str:
        return f"column '{self.column}' as a float32 tensor of shape {list(self.shape)}, as stored (not normalised)"


class HfClips(HfRows):
    """One split of an Audio column. Keys are indices, or (epoch, index) as DataModule.loader
    passes them to a split that takes the epoch: with ``random_crop`` a clip longer than
    data.duration is cut to the window audio_folder draws from (seed, epoch, index), the same
    in every run, resume and worker; without, to its centre."""

    takes_epoch = True

    def __init__(self, dataset: Any, rows: np.ndarray, labels: np.ndarray, column: str, decoding: "AudioDecoding",
                 random_crop: bool = False, seed: int = 0):
        super().__init__(dataset, rows, labels, column, decoding)
        self.random_crop, self.seed = random_crop, seed

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list) -> list[tuple[torch.Tensor, torch.Tensor]]:
        where = [key if isinstance(key, tuple) else (None, key) for key in keys]
        rows = [int(self.rows[index]) for _, index in where]
        values = self.table[rows][self.column]  # a batch in one Arrow read
        return [
            (self.decoding(value, row, crop_window(self.seed, epoch, index) if self.random_crop else None), self.labels[index])
            for value, row, (epoch, index) in zip(values, rows, where)
        ]


@dataclass(frozen=True)
class AudioDecoding:
    """An Audio cell ({bytes, path}) as data=audio_folder turns a file into a sample."""

    clip: ClipSettings
    column: str
    transform: torch.nn.Module | None
    mean: torch.Tensor | float = 0.0
    std: torch.Tensor | float = 1.0
    measured: int = 0  # training rows the mean and std were measured on

    def view(self, dataset: Any, column: str) -> Any:
        # undecoded: the cell's bytes, read here with soundfile (datasets would need torchcodec)
        return dataset.select_columns([column]).cast_column(column, _datasets().Audio(decode=False))

    def __call__(self, value: Any, row: int, window: np.random.Generator | None = None) -> torch.Tensor:
        length = round(self.clip.sample_rate * self.clip.duration)
        wave = clip_wave(value, self.column, row, self.clip.sample_rate, length, window)
        return (featurise(self.transform, torch.from_numpy(wave)) - self.mean) / self.std

    def describe(self) -> str:
        clip = self.clip
        return (
            f"audio mixed down to mono, resampled to {clip.sample_rate} Hz (scipy.signal.resample_poly), the centre "
            f"{clip.duration} s kept or zeros padded at the end, turned into {clip.features} (runner/audio.py: n_fft={clip.n_fft}, "
            f"hop_length={clip.hop_length}, n_mels={clip.n_mels}, f_min={clip.f_min}, f_max={clip.f_max}, "
            f"multi_n_ffts={list(clip.multi_n_ffts)}), then standardised per channel and frequency with the mean and std of "
            f"{self.measured} training rows (not stored here)"
        )


def clip_wave(value: Any, column: str, row: int, sample_rate: int, length: int,
              window: np.random.Generator | None = None) -> np.ndarray:
    """An Audio cell as float32 mono [length] at sample_rate, as audio_folder's read_clip gives
    a file: its header checked as audio_folder checks a file's (clip_header), then decode_clip."""
    source = _cell_source(value, column, row, "clip")
    header, problem = clip_header(source, "data=hf")
    if problem is None:
        try:
            if hasattr(source, "seek"):
                source.seek(0)
            return decode_clip(source, header.frames, header.samplerate, sample_rate, length, window)
        except (RuntimeError, OSError, ValueError) as error:  # soundfile's LibsndfileError is a RuntimeError
            problem = f"does not decode ({_sound_reason(error)})"
    raise BadRow(
        f"data.input='{column}': the clip in row {row}{f' ({source})' if isinstance(source, str) else ''} {problem}; "
        "fix or remove that row before saving"
    )


class BadRow(ConfigError):
    """A row that does not decode. A DataLoader worker's error comes back to the training
    process as ``type(error)("Caught ... Original Traceback ...")``: keep only its last line,
    so runner still prints one line naming the row (as audio_folder's UnreadableClip does)."""

    def __init__(self, message: str):
        if message.startswith("Caught "):
            last = message.strip().splitlines()[-1]
            message = last.split(": ", 1)[1] if ": " in last else last
        super().__init__(message)


def image_pixels(value: Any, channels: int, size: tuple[int, int] | None, column: str, row: int) -> torch.Tensor:
    """An Image cell as uint8 [channels, H, W] via runner.data.image_folder.decode."""
    from runner.data.image_folder import decode

    if size is None:  # the published shape: the first training image's own size
        from PIL import Image

        try:
            with Image.open(_cell_source(value, column, row)) as image:
                size = (image.height, image.width)
        except (OSError, ValueError, SyntaxError):
            pass  # decode below says what is wrong
    try:
        return decode(_cell_source(value, column, row), channels, size or (1, 1))
    except ConfigError as error:  # image_folder's words name a file and its data.root: say it for a row
        source = _cell_source(value, column, row)
        reason = re.search(r"cannot be decoded \((.*)\); ", re.sub(r"<_io\.BytesIO object at \w+>", "its bytes", str(error)))
        raise BadRow(
            f"data.input='{column}': the image in row {row}{f' ({source})' if isinstance(source, str) else ''} cannot be decoded"
            f"{f' ({reason.group(1)})' if reason else ''}; fix or remove that row before saving"
        ) from None


def _cell_source(value: Any, column: str, row: int, what: str = "image") -> Any:
    """What PIL or soundfile opens for an undecoded Image or Audio cell: its bytes, else the
    file it names."""
    value = value or {}
    if value.get("bytes"):
        return io.BytesIO(value["bytes"])
    if value.get("path"):
        return value["path"]
    raise BadRow(f"data.input='{column}': row {row} holds no {what} (null); remove such rows before saving")


# ------------------------------------------------------------------ reading the dataset
def _datasets():
    """The datasets package, kept offline: it reads local files only."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"data=hf reads Hugging Face datasets with the datasets package, which is not installed; {INSTALL}") from None
    return datasets


def _load(path: str) -> dict[str, Any]:
    """A dataset's splits by their stored names (a plain Dataset: {"": dataset})."""
    return _load_cached(path, _stamp(path))


def _stamp(path: str) -> tuple[int, int]:
    """When the files two levels down last changed, and how many there are: part of every cache
    key, so a dataset saved again in the same process (a notebook) is read again."""
    root = Path(path)
    if not root.exists():
        return 0, 0
    entries = [root]
    if root.is_dir():
        children = list(root.iterdir())
        entries += children + [entry for child in children if child.is_dir() for entry in child.iterdir()]
    return max(entry.stat().st_mtime_ns for entry in entries), len(entries)


@lru_cache(maxsize=4)
def _load_cached(path: str, stamp: tuple[int, int]) -> dict[str, Any]:
    folder = Path(path)
    if not folder.exists():
        if HUB_NAME.match(path) and not path.endswith(TABLE_FILES):
            raise ConfigError(
                f"data.path='{path}': no such folder; if '{path}' is a Hugging Face Hub name, runner does not download: "
                f"download and save it first, on a machine with network: "
                f"python -c \"import datasets; datasets.load_dataset('{path}').save_to_disk('{folder.name}')\", then data.path={folder.name}"
            )
        raise ConfigError(f"data.path='{path}': no such folder or file; {SAVE}")
    datasets = _datasets()
    if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
        try:
            loaded = datasets.load_from_disk(str(folder))
        except Exception as error:  # damaged: a missing shard, bad JSON
            raise ConfigError(f"data.path='{path}' looks like a saved dataset but cannot be loaded ({_reason(error)}); save it again") from None
        return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"": loaded}
    files = _table_files(folder)
    if not files:
        raise ConfigError(f"data.path='{path}' is not a saved dataset: {_contents(folder)}, but no dataset_dict.json or state.json "
                          f"(what save_to_disk writes) and no {'/'.join(TABLE_FILES)} files; {SAVE}")
    return {name: datasets.Dataset(_read_tables(path, paths)) for name, paths in files.items()}


def _table_files(folder: Path) -> dict[str, list[str]]:
    """Parquet/CSV files by split, named as the Hub names them (train-00000-of-00001.parquet,
    data/test.csv, ...: datasets' own patterns); a single file is the training split."""
    if folder.is_file():
        return {"train": [str(folder)]} if folder.suffix.lower() in TABLE_FILES else {}
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        found = DataFilesDict.from_patterns(get_data_patterns(str(folder)), base_path=str(folder))
    except Exception:  # datasets' EmptyDatasetError and friends: nothing it recognises
        return {}
    files = {str(name): [file for file in paths if Path(file).suffix.lower() in TABLE_FILES] for name, paths in found.items()}
    return {name: sorted(paths) for name, paths in files.items() if paths}


def _read_tables(path: str, files: list[str]) -> Any:
    """One split's Parquet/CSV files as one Arrow table (in memory; keeps datasets' feature
    metadata, e.g. Image and ClassLabel columns of Parquet the Hub wrote)."""
    import pyarrow as pa
    import pyarrow.csv as csv
    import pyarrow.parquet as parquet

    tables = []
    for file in files:
        try:
            if file.lower().endswith(".parquet"):
                tables.append(parquet.read_table(file))
            else:
                delimiter = "\t" if file.lower().endswith(".tsv") else ","
                tables.append(csv.read_csv(file, parse_options=csv.ParseOptions(delimiter=delimiter)))
        except Exception as error:
            raise ConfigError(f"data.path='{path}': '{file}' could not be read ({_reason(error)}); fix or remove it") from None
    try:
        return pa.concat_tables(tables, promote_options="default")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
        raise ConfigError(f"data.path='{path}': the files of one split have different columns ({_reason(error)}); "
                          f"give them the same columns: {', '.join(files[:4])}") from None


def _contents(folder: Path) -> str:
    """What a folder holds, for the message saying it is not a dataset."""
    if folder.is_file():
        return f"it is a {folder.suffix or 'plain'} file"
    entries = sorted(folder.iterdir())
    if not entries:
        return "it is an empty folder"
    shown = ", ".join(entry.name + ("/" if entry.is_dir() else "") for entry in entries[:5])
    more = f", ... ({len(entries)} entries)" if len(entries) > 5 else ""
    from runner.data.image_folder import EXTENSIONS

    images = any(file.suffix.lower() in EXTENSIONS for entry in entries[:20] if entry.is_dir() for file in entry.iterdir())
    hint = " (class folders of images? data=image_folder reads those)" if images else ""
    return f"it holds {shown}{more}{hint}"


def _splits(path: str) -> dict[str, Any]:
    """train and, where stored, val and test datasets."""
    stored = _load(path)
    if list(stored) == [""] or len(stored) == 1:
        return {"train": next(iter(stored.values()))}
    found = {key: next((stored[name] for name in names if name in stored), None) for key, names in SPLIT_NAMES.items()}
    if found["train"] is None:
        raise ConfigError(
            f"data.path='{path}' has the splits {', '.join(stored)} but none named train; save it with one, e.g. "
            "datasets.DatasetDict(train=..., test=...).save_to_disk(DIR)"
        )
    return {key: value for key, value in found.items() if value is not None}


# ------------------------------------------------------------------ facts (compose time)
def _settings(path: Any, input: Any, label: Any, image_size: Any, channels: Any, clip: ClipSettings = ClipSettings()) -> tuple:
    """The keys that decide the facts, checked, as a hashable tuple (the cache key)."""
    fix = "give data.path=<a saved dataset folder> data.input=<its input column> data.label=<its label column>"
    for key, value in (("path", path), ("input", input), ("label", label)):
        if value in (None, "", "???"):
            raise ConfigError(f"data.{key} is not set; {fix}")
    if not isinstance(path, str) or not isinstance(label, str):
        raise ConfigError(f"data.path={path!r} / data.label={label!r} must be a folder and a column name; {fix}")
    columns = (input,) if isinstance(input, str) else tuple(input)
    if not columns or not all(isinstance(name, str) for name in columns):
        raise ConfigError(f"data.input={input!r} is not a column name or a list of them; write e.g. data.input=image or 'data.input=[a,b,c]'")
    if channels not in (None, "None", "null") and int(channels) not in (1, 3):
        raise ConfigError(f"data.channels={channels} is not supported; use 1 (grey), 3 (RGB) or null (the first training image's)")
    channels = None if channels in (None, "None", "null") else int(channels)
    size = parse_image_size(image_size, "the first training image's size")
    return path, columns if not isinstance(input, str) else input, label, size, channels, clip


def hf_facts(path: str, input: str | tuple[str, ...], label: str, size: tuple[int, int] | None, channels: int | None,
             clip: ClipSettings = ClipSettings()) -> HfFacts:
    """Classes and sample shape of a data=hf config (settings as _settings gives them), read
    once per process and dataset version."""
    return _facts(path, _stamp(path), input, label, size, channels, clip)


@lru_cache(maxsize=8)
def _facts(path: str, stamp: tuple[int, int], input: str | tuple[str, ...], label: str, size: tuple[int, int] | None,
           channels: int | None, clip: ClipSettings) -> HfFacts:
    splits = _splits(path)
    names, _ = _labels(path, label)
    train = splits["train"]
    columns = (input,) if isinstance(input, str) else input
    for column in (*columns, label):
        for split, dataset in splits.items():
            if column not in dataset.column_names:
                key = "label" if column == label else "input"
                raise ConfigError(
                    f"data.{key}='{column}' is not a column of data.path='{path}'{'' if len(splits) == 1 else f' ({split} split)'} "
                    f"(its columns: {', '.join(dataset.column_names)}); set data.{key} to one of them"
                )
    if label in columns:
        raise ConfigError(f"data.input names the label column '{label}'; leave it out (the label is never an input)")
    if not isinstance(input, str) or _is_number(train.features[input]):
        for column in columns:
            if not _is_number(train.features[column]):
                raise ConfigError(_not_numeric(column, train.features[column], several=not isinstance(input, str)))
        return HfFacts(names, "columns", (len(columns),), columns, "tabular")
    feature = train.features[input]
    kind = type(feature).__name__
    if kind == "Image":
        first = train.select_columns([input]).cast_column(input, _datasets().Image(decode=False))[0][input]
        channels = channels or _first_channels(first, input)
        shape = tuple(image_pixels(first, channels, size, input, 0).shape)
        return HfFacts(names, "image", shape, (input,), "image")
    if kind == "Audio":  # every clip is resampled, cut and padded to the same size: the keys give the shape
        return HfFacts(names, "audio", clip.shape(), (input,), "signal" if clip.features == "none" else "spectrogram")
    if kind.startswith("Array") or kind in ("List", "LargeList", "Sequence"):
        shape = _array_shape(path, train, input, feature)
        return HfFacts(names, "array", shape, (input,), modality_of(shape))
    raise ConfigError(_not_numeric(input, feature, several=False))


def _first_channels(value: Any, column: str) -> int:
    """1 where the first training image is grey (PIL modes without colour), else 3."""
    from PIL import Image

    from runner.data.image_folder import GREY_MODES

    try:
        with Image.open(_cell_source(value, column, 0)) as image:
            return 1 if image.mode in GREY_MODES else 3
    except (OSError, ValueError) as error:
        raise ConfigError(f"data.input='{column}': the image in row 0 cannot be decoded ({_reason(error)}); fix or remove that row before saving") from None


def _array_shape(path: str, train: Any, column: str, feature: Any) -> tuple[int, ...]:
    """The shape of a numeric array column, from the first training row; a list column whose
    rows differ in length stops here (read from Arrow's offsets, not the values)."""
    import pyarrow as pa
    import pyarrow.compute as compute

    leaf = feature
    while hasattr(leaf, "feature") and not hasattr(leaf, "dtype"):
        leaf = leaf.feature
    dtype = getattr(leaf, "dtype", None) or getattr(feature, "dtype", "")
    if isinstance(leaf, dict) or not str(dtype).startswith(NUMERIC):
        raise ConfigError(_not_numeric(column, feature, several=False))
    cells = train.data.column(column)
    if pa.types.is_list(cells.type) or pa.types.is_large_list(cells.type):
        lengths = compute.unique(compute.list_value_length(cells)).to_pylist()
        if len(lengths) > 1 or None in lengths:
            known = sorted(length for length in lengths if length is not None)
            raise ConfigError(
                f"data.input='{column}' of '{path}' holds lists of different lengths ({known[0]} to {known[-1]}"
                f"{', and nulls' if None in lengths else ''}); pad or cut every row to the same length before saving"
            )
    first = train.select_columns([column]).with_format("numpy")[0][column]
    return tuple(np.asarray(first, dtype=np.float32).shape)


def _is_number(feature: Any) -> bool:
    return type(feature).__name__ == "Value" and str(feature.dtype).startswith(NUMERIC)


def _not_numeric(column: str, feature: Any, several: bool) -> str:
    kind = type(feature).__name__
    what = {"ClassLabel": "a ClassLabel column (categories, not numbers)"}.get(kind)
    if what is None:
        name = str(getattr(feature, "dtype", kind)) if kind == "Value" else kind
        what = f"{'an' if name[0].lower() in 'aeiou' else 'a'} {name} column"
    if several:
        return (f"data.input: column '{column}' is {what}; a list of input columns takes numeric columns only: "
                f"give it alone (data.input={column}) or leave it out")
    return (f"data.input='{column}' is {what}; data=hf takes an Image column, an Audio column, a numeric array column, "
            "or numeric columns (data.input=[a,b,c]); pick another column")


def _labels(path: str, label: str) -> tuple[tuple[str, ...], dict[str, np.ndarray]]:
    """The class names and every split's labels as class indices, read from Arrow at once."""
    return _labels_cached(path, _stamp(path), label)


@lru_cache(maxsize=8)
def _labels_cached(path: str, stamp: tuple[int, int], label: str) -> tuple[tuple[str, ...], dict[str, np.ndarray]]:
    splits = _splits(path)
    for split, dataset in splits.items():
        if label not in dataset.column_names:
            raise ConfigError(
                f"data.label='{label}' is not a column of data.path='{path}'{'' if len(splits) == 1 else f' ({split} split)'} "
                f"(its columns: {', '.join(dataset.column_names)}); set data.label to one of them"
            )
    feature = splits["train"].features[label]
    raw = {}
    for split, dataset in splits.items():
        cells = dataset.data.column(label)
        values = np.asarray(cells.to_pylist(), dtype=object)
        missing = [index for index, value in enumerate(values) if value is None or (type(feature).__name__ == "ClassLabel" and value < 0)]
        if missing:
            raise ConfigError(
                f"data.label='{label}' of '{path}' ({split} split) is missing (null, or -1: no label) in {len(missing)} of "
                f"{len(values)} rows (rows {', '.join(map(str, missing[:5]))}{', ...' if len(missing) > 5 else ''}); "
                "remove those rows or fill in their labels before saving"
            )
        raw[split] = values
    if type(feature).__name__ == "ClassLabel":
        names = tuple(feature.names)
        for split, values in raw.items():
            if max(values.tolist()) >= len(names):
                raise ConfigError(f"data.label='{label}' of '{path}' ({split} split) holds {max(values.tolist())}, past its {len(names)} ClassLabel names; fix the labels or the names before saving")
        return names, {split: values.astype(np.int64) for split, values in raw.items()}
    if type(feature).__name__ != "Value" or not str(feature.dtype).startswith(("int", "uint", "bool", "string", "large_string")):
        raise ConfigError(
            f"data.label='{label}' of '{path}' is a {getattr(feature, 'dtype', type(feature).__name__)} column; data=hf trains "
            "classification on a ClassLabel, integer or text label column (regression on float labels: use data=table); pick another data.label"
        )
    classes = sorted({value for values in raw.values() for value in values.tolist()})
    if len(classes) < 2:
        raise ConfigError(f"data.label='{label}' of '{path}' holds a single class ({classes[0]!r}); classification needs at least two: pick another data.label")
    index = {value: position for position, value in enumerate(classes)}
    return tuple(str(value) for value in classes), {split: np.array([index[value] for value in values.tolist()], dtype=np.int64) for split, values in raw.items()}


# ------------------------------------------------------------------ building
def _parts(path: str, label: str, val_fraction: float, test_fraction: float, split_seed: int) -> dict[str, tuple[Any, np.ndarray, np.ndarray]]:
    """(dataset, row numbers, labels) of train, val and test: stored splits as they are, a
    missing val or test split off train, stratified (as data=dataset does)."""
    splits = _splits(path)
    _, labels = _labels(path, label)
    whole = lambda key: (splits[key], np.arange(len(labels[key])), labels[key])  # noqa: E731
    parts = {key: whole(key) for key in splits}
    if "val" in splits and "test" in splits:
        return parts
    train = labels["train"]
    try:
        kept, first, second = split_indices(train.tolist(), val_fraction, test_fraction, split_seed)
    except ValueError as error:  # sklearn: too few rows (a ConfigError is a ValueError too)
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(
            f"data.path='{path}' has {len(train)} training rows, too few to split with data.val_fraction={val_fraction} and "
            f"data.test_fraction={test_fraction} ({str(error).splitlines()[0]}); give more rows or change the fractions"
        ) from None
    if "val" not in splits:
        parts["val"] = (splits["train"], np.asarray(first), train[first])
    else:
        kept = kept + first
    if "test" not in splits:
        parts["test"] = (splits["train"], np.asarray(second), train[second])
    else:
        kept = kept + second
    parts["train"] = (splits["train"], np.asarray(kept), train[kept])
    log.info("hf %s: %s split off the training rows (stratified, split_seed=%d)", path, " and ".join(key for key in ("val", "test") if key not in splits), split_seed)
    return parts


def _columns(parts: dict[str, tuple[Any, np.ndarray, np.ndarray]], columns: tuple[str, ...]) -> tuple[dict[str, TensorDataset], str]:
    """Numeric columns as [N, D] float32, standardised with the training rows' mean and std."""
    import pyarrow as pa
    import pyarrow.compute as compute

    arrays = {}
    for name, (dataset, rows, _) in parts.items():
        # nulls become NaN; only this split's rows are kept
        block = np.stack([compute.cast(dataset.data.column(column), pa.float64()).to_numpy() for column in columns], axis=1)[rows]
        bad = ~np.isfinite(block)
        if bad.any():
            column = columns[int(np.flatnonzero(bad.any(axis=0))[0])]
            raise ConfigError(f"data.input: column '{column}' is missing, NaN or infinite in {int(bad.any(axis=1).sum())} rows of the {name} split; "
                              "fill them in or leave the column out of data.input before saving")
        arrays[name] = block
    mean = arrays["train"].mean(axis=0)
    std = arrays["train"].std(axis=0)
    std = np.where(std > 1e-12, std, 1.0)
    splits = {
        name: _labelled(TensorDataset(torch.from_numpy(((arrays[name] - mean) / std).astype(np.float32)), torch.as_tensor(labels, dtype=torch.long)))
        for name, (_, _, labels) in parts.items()
    }
    return splits, (f"columns {list(columns)} as a float32 vector, then (x - mean) / std with mean={[round(v, 6) for v in mean.tolist()]}, "
                    f"std={[round(v, 6) for v in std.tolist()]}")


def _labelled(dataset: TensorDataset) -> TensorDataset:
    dataset.labels = dataset.tensors[1]  # DataModule.class_counts reads it without a pass over the data
    return dataset


def _decoding(facts: HfFacts, train: tuple[Any, np.ndarray, np.ndarray], mean, std, samples: int, seed: int) -> Any:
    if facts.kind == "array":
        return ArrayDecoding(facts.shape, facts.columns[0])
    channels, size, column = facts.shape[0], tuple(facts.shape[1:]), facts.columns[0]
    if (mean is None) != (std is None):
        raise ConfigError("data.mean and data.std go together: give both (one value per channel) or neither")
    if mean is not None:
        mean_t, std_t = torch.tensor(list(mean), dtype=torch.float32), torch.tensor(list(std), dtype=torch.float32)
        if mean_t.numel() != channels or std_t.numel() != channels or bool((std_t <= 0).any()):
            raise ConfigError(f"data.mean={list(mean)} / data.std={list(std)} need {channels} values each, std > 0")
        return ImageDecoding(channels, size, mean_t, std_t, column)
    dataset, rows, _ = train
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[: max(1, samples)].tolist()
    view = ImageDecoding(channels, size, torch.zeros(channels), torch.ones(channels), column)
    table = view.view(dataset, column)
    picked = [int(rows[index]) for index in order]
    total = torch.zeros(channels, dtype=torch.float64)
    squares = torch.zeros(channels, dtype=torch.float64)
    for start in range(0, len(picked), 256):  # a batch of rows per Arrow read
        chunk = picked[start: start + 256]
        for value, row in zip(table[chunk][column], chunk):
            x = image_pixels(value, channels, size, column, row).double().div_(255)
            total += x.sum(dim=(1, 2))
            squares += (x * x).sum(dim=(1, 2))
    pixels = len(picked) * size[0] * size[1]
    mean_t = total / pixels
    std_t = (squares / pixels - mean_t * mean_t).clamp(min=0).sqrt().clamp(min=1e-3)
    return ImageDecoding(channels, size, mean_t.float(), std_t.float(), column)


def _clips(parts: dict[str, tuple[Any, np.ndarray, np.ndarray]], column: str, clip: ClipSettings, random_crop: bool,
           samples: int, seed: int, batch_size: int, num_workers: int) -> tuple[dict[str, HfClips], str]:
    """An Audio column's splits, standardised with audio_folder's clip_statistics over a
    seeded sample of training rows (centre-cut, read by DataLoader workers at build time)."""
    if int(samples) < 1:
        raise ConfigError(f"data.stats_samples={samples} must be at least 1; use e.g. data.stats_samples=1000")
    _soundfile("data=hf")  # here: a missing soundfile found by a worker would come back as its traceback
    transform = front_end(clip.features, clip.sample_rate, clip.n_fft, clip.hop_length, clip.n_mels, clip.f_min, clip.f_max,
                          clip.multi_n_ffts)
    plain = AudioDecoding(clip, column, transform)
    mean, std, measured = clip_statistics(HfClips(*parts["train"], column, plain), samples, seed, batch_size, num_workers)
    decoding = replace(plain, mean=mean, std=std, measured=measured)
    splits = {name: HfClips(dataset, rows, labels, column, decoding, random_crop and name == "train", seed)
              for name, (dataset, rows, labels) in parts.items()}
    return splits, decoding.describe()


def _check_published(settings: tuple, facts: HfFacts, num_classes: int | None, input_shape: Sequence[int] | None) -> None:
    path, _, label, _, _, _ = settings
    if num_classes is not None and int(num_classes) != len(facts.class_names):
        raise ConfigError(
            f"data.num_classes={num_classes}, but data.label='{label}' of '{path}' gives {len(facts.class_names)} classes "
            f"({', '.join(facts.class_names[:6])}{', ...' if len(facts.class_names) > 6 else ''}); remove data.num_classes (it is read from the data)"
        )
    if input_shape is not None and tuple(int(v) for v in input_shape) != facts.shape:
        raise ConfigError(
            f"data.input_shape={list(input_shape)}, but data.input of '{path}' gives samples of shape {list(facts.shape)}; "
            f"remove data.input_shape (it is read from the data){_SHAPE_KEYS.get(facts.kind, '')}"
        )


_SHAPE_KEYS = {"image": ", or change data.image_size / data.channels",
               "audio": ", or change data.features / data.sample_rate / data.duration / data.hop_length / data.n_mels"}


def _reason(error: Exception) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text[:160]
