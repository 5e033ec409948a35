"""Synthetic keyword-like sounds: six classes of tones, chirps and pulses in noise.

A stand-in for spoken keywords that needs no download: each class is a pattern over time
and frequency (a glide up, a glide down, a steady low or high tone, a step between two
tones, a train of short bursts) with random onset, length, pitch and loudness, plus white
noise. Features are computed once here, on the CPU, so training batches are ready-made.
"""

import math
from typing import Sequence

import torch

from runner.errors import ConfigError
from runner.data.module import DataModule, split

CLASS_NAMES = ["rising_chirp", "falling_chirp", "low_tone", "high_tone", "two_tone", "pulses"]
# start and end pitch as fractions of the Nyquist frequency, so any sample rate works
PITCH = torch.tensor([[0.10, 0.45], [0.45, 0.10], [0.12, 0.12], [0.50, 0.50], [0.20, 0.35], [0.28, 0.28]])
# how the pitch moves from start to end: 0 stays, 1 glides linearly, 2 steps halfway
GLIDE, STEP = 1, 2
PITCH_PATH = torch.tensor([GLIDE, GLIDE, 0, 0, STEP, 0])
PULSES = CLASS_NAMES.index("pulses")
FEATURES = ("logmel", "multi", "none")


def synthetic_audio(
    num_samples: int = 1200,
    sample_rate: int = 8000,
    duration: float = 0.5,
    noise: float = 0.3,
    features: str = "logmel",
    n_fft: int = 256,
    hop_length: int = 128,
    n_mels: int = 32,
    f_min: float = 0.0,
    f_max: float | None = None,
    multi_n_ffts: Sequence[int] = (256, 512),
    data_seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    split_seed: int = 0,
    batch_size: int = 32,
    num_workers: int = 0,
    num_classes: int = 6,
    input_shape: Sequence[int] = (1, 32, 32),
) -> DataModule:
    length = _check(num_samples, sample_rate, duration, noise, features, n_fft, multi_n_ffts)
    generator = torch.Generator().manual_seed(data_seed)
    # equal counts per class (off by one at most), in a seeded random order
    labels = (torch.arange(num_samples) % len(CLASS_NAMES))[torch.randperm(num_samples, generator=generator)]
    waveforms = _waveforms(labels, length, sample_rate, noise, generator).unsqueeze(1)
    x = _features(waveforms, features, sample_rate, n_fft, hop_length, n_mels, f_min, f_max, multi_n_ffts)
    _check_published(num_classes, input_shape, tuple(x.shape[1:]), features)
    train, val, test = split(x, labels, val_fraction, test_fraction, split_seed)
    _standardise(train.tensors[0], val.tensors[0], test.tensors[0])
    return DataModule(
        train, val, test, len(CLASS_NAMES), tuple(x.shape[1:]), batch_size, num_workers,
        class_names=list(CLASS_NAMES), modality="signal" if features == "none" else "spectrogram",
    )


def _waveforms(labels: torch.Tensor, length: int, sample_rate: int, noise: float, generator: torch.Generator) -> torch.Tensor:
    """[N, length] clips: each class's pitch path under an attack-release envelope at a random
    place, then white noise. Built for all clips at once (no loop over samples)."""
    count = len(labels)

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(count, *shape, generator=generator)

    nyquist = sample_rate / 2
    # +-10% pitch jitter, start and end independently
    start, end = (PITCH[labels] * uniform(0.9, 1.1, 2) * nyquist).unbind(1)
    active = uniform(0.35, 0.7, 1) * length  # sound length, in samples
    onset = uniform(0.0, 1.0, 1) * (length - active)
    # position within the sound: 0 at onset, 1 at its end
    progress = (torch.arange(length) - onset) / active
    path = PITCH_PATH[labels, None]
    shape = torch.where(path == GLIDE, progress.clamp(0, 1), (progress >= 0.5).float())
    shape = torch.where(path == 0, 0.0, shape)
    pitch = start[:, None] + (end - start)[:, None] * shape
    # the phase integrates the pitch, so glides and steps stay continuous; in cycles, summed
    # in float64 (float32 would drift over thousands of samples) and wrapped to [0, 1)
    phase = 2 * math.pi * (torch.cumsum(pitch, dim=1, dtype=torch.float64) / sample_rate % 1.0).float()
    # 10% linear attack and release, silent outside the sound
    envelope = (torch.minimum(progress, 1 - progress) / 0.1).clamp(0, 1)
    bursts = torch.randint(3, 5, (count, 1), generator=generator)
    gate = torch.sin(math.pi * bursts * progress.clamp(0, 1)).square()
    envelope = torch.where(labels[:, None] == PULSES, envelope * gate, envelope)
    loudness = uniform(0.3, 1.0, 1)
    clean = loudness * envelope * torch.sin(phase + uniform(0, 2 * math.pi, 1))
    return clean + noise * torch.randn(clean.shape, generator=generator)


def _features(waveforms: torch.Tensor, features: str, sample_rate: int, n_fft: int, hop_length: int, n_mels: int,
              f_min: float, f_max: float | None, multi_n_ffts: Sequence[int]) -> torch.Tensor:
    """[N, 1, L] waveforms as [N, 1, L] (none), [N, 1, n_mels, T] (logmel) or [N, C, n_mels, T] (multi)."""
    transform = front_end(features, sample_rate, n_fft, hop_length, n_mels, f_min, f_max, multi_n_ffts)
    if transform is None:
        return waveforms
    with torch.no_grad():
        # [N, 1, L] -> logmel [N, 1, F, T]; multi [N, 1, C, F, T], whose C becomes the channels
        return transform(waveforms).flatten(1, -3)


def front_end(features: str, sample_rate: int, n_fft: int, hop_length: int, n_mels: int, f_min: float,
              f_max: float | None, multi_n_ffts: Sequence[int]) -> torch.nn.Module | None:
    """The module that turns waveforms into data.features (None for features=none); shared
    with audio folders, which apply it per sample in the DataLoader workers."""
    from runner.audio import LogMelSpectrogram, MultiResolutionSpectrogram

    if features == "none":
        return None
    if features == "logmel":
        return LogMelSpectrogram(sample_rate, n_fft, hop_length, n_mels, f_min, f_max)
    return MultiResolutionSpectrogram(sample_rate, list(multi_n_ffts), hop_length, n_mels, f_min, f_max, stft_n_fft=n_fft)


def _standardise(train: torch.Tensor, *others: torch.Tensor) -> None:
    """Zero mean, unit variance per channel and frequency (per channel for waveforms), with
    statistics of the training split only, so validation and test stay unseen. In place."""
    dims = (0, train.dim() - 1)  # over samples and time
    mean, std = train.mean(dim=dims, keepdim=True), train.std(dim=dims, keepdim=True).clamp(min=1e-6)
    for tensor in (train, *others):
        tensor.sub_(mean).div_(std)


def _check(num_samples: int, sample_rate: int, duration: float, noise: float, features: str, n_fft: int,
           multi_n_ffts: Sequence[int]) -> int:
    """The clip length in samples, after checking the keys that make it."""
    if features not in FEATURES:
        raise ConfigError(f"data.features='{features}' is not known; use one of {', '.join(FEATURES)}")
    for key, value, example in (("num_samples", num_samples, 1200), ("sample_rate", sample_rate, 8000), ("duration", duration, 0.5)):
        if value <= 0:
            raise ConfigError(f"data.{key}={value} must be positive; use e.g. data.{key}={example}")
    if noise < 0:
        raise ConfigError(f"data.noise={noise} must be zero or positive; use e.g. data.noise=0.3")
    length = round(sample_rate * duration)
    longest = max([n_fft, *multi_n_ffts]) if features == "multi" else n_fft
    if features != "none" and length <= longest // 2:
        raise ConfigError(
            f"data.duration={duration} gives clips of {length} samples, too short for an FFT of {longest}; "
            f"raise data.duration or lower data.n_fft (and data.multi_n_ffts)"
        )
    return length


def _check_published(num_classes: int, input_shape: Sequence[int], actual_shape: tuple[int, ...], features: str) -> None:
    if int(num_classes) != len(CLASS_NAMES):
        raise ConfigError(
            f"data.num_classes={num_classes} but synthetic_audio has {len(CLASS_NAMES)} classes; "
            f"set data.num_classes={len(CLASS_NAMES)}"
        )
    if tuple(input_shape) != actual_shape:
        raise ConfigError(
            f"data.input_shape={list(input_shape)} but data.features={features} with these settings gives "
            f"samples of shape {list(actual_shape)}; set data.input_shape={list(actual_shape)}"
        )
