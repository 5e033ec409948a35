"""Audio folders: ROOT/<class>/<clip> (or ROOT/train|val|test/<class>/<clip>, see
runner.data.folders), decoded one clip at a time in DataLoader workers.

A clip is read with soundfile (WAV, FLAC, OGG; the ``audio`` extra), mixed down to mono,
resampled to ``sample_rate`` with ``scipy.signal.resample_poly`` (a polyphase low-pass FIR
filter at the exact ratio of the two rates, reduced by their gcd, so nothing above the new
Nyquist frequency folds back; scipy comes with scikit-learn, and it works on the numpy array
soundfile returns, before torch), cut or padded with zeros at the end to ``duration`` seconds,
and turned into ``features`` by synthetic_audio's front end (runner/audio.py). Only the window
that is kept is read from disk, so long recordings cost no more than short ones.

A clip longer than ``duration`` is cut to its centre for validation and test. Training takes
a random window drawn from (seed, epoch, index) with ``train_crop=random`` (the same window
in every run and after a resume, whichever worker reads it), or the centre with
``train_crop=centre``; other keys (drift report, mining) read the centre of training clips too.

Standardisation, per channel and frequency (per channel for waveforms) as synthetic_audio's:
mean and std over a seeded sample (split_seed) of at most ``stats_samples`` training clips,
centre-cut, measured at build time by the same workers and kept in memory. Nothing is
written beside the data, and the same settings measure the same numbers, so a resumed run
standardises as the first one did.

Bad files are found at build time from headers, before anything trains: soundfile cannot
open it, it holds no audio, or (WAV) its data chunk runs past the end of the file (a
truncated recording). ``on_bad_file=fail`` stops naming the file, ``skip`` leaves such files
out and logs how many. A file whose header reads but whose audio does not decode still stops
the run when it is reached, naming the file.
"""

import logging
import math
import os
import struct
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from runner.data.audio import FEATURES, _check, front_end
from runner.data.folders import FolderSplits, scan, suffixes
from runner.data.module import DataModule
from runner.errors import ConfigError

log = logging.getLogger("runner")

EXTENSIONS = (".wav", ".flac", ".ogg")
TRAIN_CROPS = ("random", "centre")
ON_BAD_FILE = ("fail", "skip")
INSTALL = "pip install 'runner[audio]'"


def audio_folder(
    root: str,
    extensions: Sequence[str] = EXTENSIONS,
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
    stats_samples: int = 2000,
    on_bad_file: str = "fail",
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    split_seed: int = 0,
    seed: int = 0,
    batch_size: int = 32,
    num_workers: int = 2,
    num_classes: int | None = None,
    input_shape: Sequence[int] | None = None,
) -> DataModule:
    _check_choices(train_crop, on_bad_file, stats_samples)
    # synthetic_audio's checks of the clip keys (its num_samples and noise do not apply here)
    length = _check(1, sample_rate, duration, 0.0, features, n_fft, multi_n_ffts)
    shape = tuple(feature_shape(features, sample_rate, duration, hop_length, n_mels, multi_n_ffts))
    files = scan(str(root), suffixes(extensions), val_fraction, test_fraction, split_seed)
    _check_published(str(root), num_classes, input_shape, files.class_names, shape,
                     f"data.features={features} with data.sample_rate={sample_rate}, data.duration={duration}, "
                     f"data.hop_length={hop_length}, data.n_mels={n_mels}")
    clips = _readable(files, str(root), on_bad_file)
    transform = front_end(features, sample_rate, n_fft, hop_length, n_mels, f_min, f_max, multi_n_ffts)

    def split(name: str, random_crop: bool, mean: Any = 0.0, std: Any = 1.0) -> "AudioFiles":
        return AudioFiles(clips[name], sample_rate, length, transform, mean, std, random_crop, seed)

    mean, std, measured = clip_statistics(split("train", False), stats_samples, split_seed, batch_size, num_workers)
    module = DataModule(
        split("train", train_crop == "random", mean, std), split("val", False, mean, std), split("test", False, mean, std),
        len(files.class_names), shape, batch_size, num_workers,
        class_names=list(files.class_names), modality="signal" if features == "none" else "spectrogram",
    )
    module.preprocessing = (  # the exported model card says what its inputs must be
        f"audio files mixed down to mono, resampled to {sample_rate} Hz (scipy.signal.resample_poly), the centre "
        f"{duration} s kept or zeros padded at the end, turned into {features} (runner/audio.py: n_fft={n_fft}, "
        f"hop_length={hop_length}, n_mels={n_mels}, f_min={f_min}, f_max={f_max}, multi_n_ffts={list(multi_n_ffts)}), "
        f"then standardised per channel and frequency with the mean and std of {measured} training clips (not stored here)"
    )
    return module


class AudioFiles(Dataset):
    """One split of an audio folder: clips read, resampled, cut and featurised on access.

    A key is an index, or (epoch, index) as DataModule.loader passes them; with
    ``random_crop`` the latter picks a window seeded by (seed, epoch, index). A slice gives a
    stacked batch (``data.train[0:4]``)."""

    takes_epoch = True

    def __init__(self, clips: Sequence[tuple[str, int, int, int]], sample_rate: int, length: int,
                 transform: torch.nn.Module | None, mean: Any, std: Any, random_crop: bool, seed: int):
        self.paths = [path for path, _, _, _ in clips]
        self.labels = torch.as_tensor([label for _, label, _, _ in clips], dtype=torch.long)
        self.frames = [frames for _, _, frames, _ in clips]
        self.rates = [rate for _, _, _, rate in clips]
        self.sample_rate, self.length, self.transform = sample_rate, length, transform
        self.mean, self.std = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
        self.random_crop, self.seed = random_crop, seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: int | tuple[int, int] | slice) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(key, slice):
            items = [self[index] for index in range(*key.indices(len(self)))]
            return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])
        epoch, index = key if isinstance(key, tuple) else (None, key)
        window = crop_window(self.seed, epoch, index) if self.random_crop else None
        wave = read_clip(self.paths[index], self.frames[index], self.rates[index], self.sample_rate, self.length, window)
        return (self.featurise(torch.from_numpy(wave)) - self.mean) / self.std, self.labels[index]

    def featurise(self, waves: torch.Tensor) -> torch.Tensor:
        return featurise(self.transform, waves)


def crop_window(seed: int, epoch: int | None, index: int) -> np.random.Generator | None:
    """The generator that picks a training clip's random window: drawn from (seed, epoch,
    index) alone, so every run, resume and worker reads the same window (None without an
    epoch: the centre)."""
    return None if epoch is None else np.random.default_rng((seed % 2**63, epoch, index))


def featurise(transform: torch.nn.Module | None, waves: torch.Tensor) -> torch.Tensor:
    """[..., L] waveforms as [..., C, F, T] features ([..., 1, L] for features=none)."""
    waves = waves.unsqueeze(-2)
    if transform is None:
        return waves
    with torch.no_grad():
        # logmel [..., 1, F, T]; multi [..., 1, C, F, T], whose C becomes the channels
        features = transform(waves)
        return features.flatten(-4, -3) if features.dim() == waves.dim() + 2 else features


class UnreadableClip(ConfigError):
    """A clip that fails to decode. A DataLoader worker's error comes back to the training
    process as ``type(error)("Caught ... Original Traceback ...")``: keep only its last line,
    so runner still prints one line naming the file."""

    def __init__(self, message: str):
        if message.startswith("Caught "):
            last = message.strip().splitlines()[-1]
            message = last.split(": ", 1)[1] if ": " in last else last
        super().__init__(message)


def read_clip(path: str, frames: int, rate: int, sample_rate: int, length: int,
              window: np.random.Generator | None = None) -> np.ndarray:
    """A clip as float32 mono [length] at sample_rate: the centre (or, with a ``window``
    generator, a random part) of a longer clip, a shorter one padded with zeros at the end.
    ``frames`` and ``rate`` are the file's, from its header."""
    try:
        return decode_clip(path, frames, rate, sample_rate, length, window)
    except (RuntimeError, OSError, ValueError) as error:  # soundfile's LibsndfileError is a RuntimeError
        raise UnreadableClip(
            f"data.root: '{path}' has a readable header but its audio does not decode ({_reason(error)}); "
            "replace or remove it (data.on_bad_file acts on what the headers show at build time)"
        ) from None


def decode_clip(source: Any, frames: int, rate: int, sample_rate: int, length: int,
                window: np.random.Generator | None = None) -> np.ndarray:
    """read_clip of a path or a binary file object (data=hf reads a cell's bytes), raising
    soundfile's own error when the audio does not decode: only the kept window is read."""
    soundfile = _soundfile()
    needed = math.ceil(length * rate / sample_rate)  # frames at the file's rate
    spare = max(0, frames - needed)
    start = int(window.integers(0, spare + 1)) if window is not None else spare // 2
    data, rate = soundfile.read(source, frames=needed, start=start, dtype="float32", always_2d=True)
    wave = data.mean(axis=1)
    if rate != sample_rate:
        from scipy.signal import resample_poly

        common = math.gcd(int(rate), int(sample_rate))
        wave = resample_poly(wave, sample_rate // common, int(rate) // common)
    clip = np.zeros(length, dtype=np.float32)
    kept = min(length, len(wave))
    clip[:kept] = wave[:kept]
    return clip


def feature_shape(features: str, sample_rate: Any, duration: Any, hop_length: Any, n_mels: Any, multi_n_ffts: Any) -> list[int]:
    """The sample shape (the ``${audio_shape:...}`` resolver): [1, L] waveforms with
    L = round(sample_rate * duration); [C, n_mels, 1 + L // hop_length] spectrograms (torch.stft
    is centred), C = 1 for logmel and len(multi_n_ffts) + 1 for multi (its STFT channel)."""
    if features not in FEATURES:
        raise ConfigError(f"data.features='{features}' is not known; use one of {', '.join(FEATURES)}")
    if int(hop_length) < 1:
        raise ConfigError(f"data.hop_length={hop_length} must be at least 1; use e.g. data.hop_length=512")
    length = round(float(sample_rate) * float(duration))
    if features == "none":
        return [1, length]
    channels = 1 if features == "logmel" else len(list(multi_n_ffts)) + 1
    return [channels, int(n_mels), 1 + length // int(hop_length)]


def _readable(files: FolderSplits, root: str, on_bad_file: str) -> dict[str, list[tuple[str, int, int, int]]]:
    """(path, label, frames, rate) of every file whose header reads, per split; bad files
    stop the build (fail) or are left out and counted (skip)."""
    clips: dict[str, list[tuple[str, int, int, int]]] = {}
    bad: list[str] = []
    for name in ("train", "val", "test"):
        clips[name] = []
        for path, label in getattr(files, name):
            header, problem = clip_header(str(path))
            if problem is None:
                clips[name].append((str(path), label, header.frames, header.samplerate))
            elif on_bad_file == "fail":
                raise ConfigError(
                    f"data.root='{root}': '{path}' {problem}; replace or remove it, "
                    "or pass data.on_bad_file=skip to leave such files out"
                )
            else:
                bad.append(str(path))
    if bad:
        log.warning("data.on_bad_file=skip: left out %d unreadable audio file(s): %s%s",
                    len(bad), ", ".join(bad[:5]), ", ..." if len(bad) > 5 else "")
        empty = [name for name, kept in clips.items() if not kept]
        if empty:
            raise ConfigError(
                f"data.root='{root}': no readable files are left in the {' and '.join(empty)} split after leaving out "
                f"{len(bad)} bad file(s) (e.g. '{bad[0]}'); replace them or add more files"
            )
    return clips


def clip_header(source: Any, option: str = "data=audio_folder") -> tuple[Any, str | None]:
    """soundfile's header info of a path or a seekable binary file object, and what is wrong
    with the file (None: nothing found)."""
    soundfile = _soundfile(option)
    try:
        header = soundfile.info(source)
    except (RuntimeError, OSError, ValueError) as error:
        return None, f"is not audio soundfile can read ({_reason(error)})"
    if header.frames <= 0:
        return header, "holds no audio (0 frames: empty, or cut short)"
    missing = _wav_shortfall(source) if header.format in ("WAV", "WAVEX") else 0
    if missing:
        return header, f"is truncated (its header declares {missing} more bytes of audio than the file holds)"
    return header, None


def _wav_shortfall(source: Any) -> int:
    """Bytes a RIFF WAV's data chunk declares beyond the end of the file (a path or a seekable
    binary file object): 0 when it is whole (or written as a stream, whose size fields say 0
    or 0xFFFFFFFF: unknown)."""
    if not hasattr(source, "read"):
        with open(source, "rb") as file:
            return _wav_shortfall(file)
    file = source
    size = file.seek(0, os.SEEK_END)
    file.seek(0)
    head = file.read(12)
    if len(head) < 12 or head[:4] not in (b"RIFF", b"RIFX") or head[8:12] != b"WAVE":
        return 0
    order = "<" if head[:4] == b"RIFF" else ">"
    position = 12
    while position + 8 <= size:
        file.seek(position)
        chunk, length = struct.unpack(order + "4sI", file.read(8))
        if chunk == b"data":
            return 0 if length in (0, 0xFFFFFFFF) else max(0, position + 8 + length - size)
        position += 8 + length + (length & 1)  # chunks are padded to an even length
    return 0


def clip_statistics(train: Dataset, samples: int, seed: int, batch_size: int, num_workers: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Mean and std [C, F, 1] ([C, 1] for waveforms) over samples and time of a seeded sample
    of training clips (any split whose items are unstandardised (features, label): data=hf's
    Audio rows too), featurised by DataLoader workers as in training; and the clip count."""
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:samples].sort().values.tolist()
    total = squares = None
    count = 0
    loader = DataLoader(torch.utils.data.Subset(train, order), batch_size=max(batch_size, 64), num_workers=num_workers)
    for x, _ in loader:
        x = x.double()
        if total is None:
            total, squares = torch.zeros_like(x[0, ..., :1]), torch.zeros_like(x[0, ..., :1])
        total += x.sum(dim=(0, x.dim() - 1)).unsqueeze(-1)
        squares += x.square().sum(dim=(0, x.dim() - 1)).unsqueeze(-1)
        count += x.shape[0] * x.shape[-1]
    mean = total / count
    std = (squares / count - mean.square()).clamp(min=0).sqrt().clamp(min=1e-6)
    return mean.float(), std.float(), len(order)


def _soundfile(option: str = "data=audio_folder"):
    try:
        import soundfile
    except ImportError:  # an optional extra; OSError too where libsndfile itself is missing
        raise ConfigError(f"{option} reads audio with soundfile, which is not installed; {INSTALL}") from None
    except OSError as error:
        raise ConfigError(f"{option}: soundfile cannot load libsndfile ({error}); {INSTALL} (its wheels bundle libsndfile)") from None
    return soundfile


def _reason(error: Exception) -> str:
    """soundfile's own words without the path it repeats, else the first line of the error."""
    text = getattr(error, "error_string", None) or (str(error).strip().splitlines() or [type(error).__name__])[0]
    return str(text)[:200]


def _check_choices(train_crop: str, on_bad_file: str, stats_samples: int) -> None:
    if train_crop not in TRAIN_CROPS:
        raise ConfigError(f"data.train_crop='{train_crop}' is not supported; use random or centre")
    if on_bad_file not in ON_BAD_FILE:
        raise ConfigError(f"data.on_bad_file='{on_bad_file}' is not supported; use fail or skip")
    if int(stats_samples) < 1:
        raise ConfigError(f"data.stats_samples={stats_samples} must be at least 1; use e.g. data.stats_samples=2000")


def _check_published(root: str, num_classes: int | None, input_shape: Sequence[int] | None, names: Sequence[str],
                     shape: tuple[int, ...], made_by: str) -> None:
    if num_classes is not None and int(num_classes) != len(names):
        raise ConfigError(
            f"data.num_classes={num_classes}, but data.root='{root}' has {len(names)} class folders "
            f"({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}); remove data.num_classes (it is read from the folder)"
        )
    if input_shape is not None and tuple(int(size) for size in input_shape) != shape:
        wanted = ",".join(str(size) for size in shape)
        raise ConfigError(
            f"data.input_shape={list(input_shape)}, but {made_by} gives samples of shape [{wanted}]; "
            f"set data.input_shape=[{wanted}] or drop your setting of it (data=audio_folder computes it)"
        )
