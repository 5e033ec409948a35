"""Time-frequency front ends for audio, in plain torch: log-mel, log-magnitude STFT, and
several of them stacked as channels.

Each module maps waveforms [..., L] to images a CNN can read: [..., F, T] for one view,
[..., C, F, T] for the stack. ``torch.stft`` is centred (reflect padding), so every view
with the same hop has 1 + L // hop_length frames.
"""

from typing import Sequence

import torch
from torch import nn

from runner.errors import ConfigError


def hz_to_mel(frequency: torch.Tensor) -> torch.Tensor:
    """HTK mel scale: roughly linear below 1 kHz and logarithmic above, as pitch is heard."""
    return 2595.0 * torch.log10(1.0 + frequency / 700.0)


def mel_to_hz(mel: torch.Tensor) -> torch.Tensor:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def mel_filterbank(n_fft: int, n_mels: int, sample_rate: float, f_min: float = 0.0, f_max: float | None = None) -> torch.Tensor:
    """Triangular filters [n_mels, n_fft // 2 + 1] that sum FFT power bins into mel bands.

    The band edges are n_mels + 2 points equally spaced on the mel scale between f_min and
    f_max; filter m rises linearly from edge m to 1 at edge m + 1 and falls to 0 at edge
    m + 2, evaluated at each FFT bin's frequency (no area normalisation, as HTK).
    """
    nyquist = sample_rate / 2
    f_max = nyquist if f_max is None else f_max
    if not 0 <= f_min < f_max <= nyquist:
        raise ConfigError(
            f"f_min={f_min}, f_max={f_max}: the mel bands need 0 <= f_min < f_max <= {nyquist:g} "
            f"(half of sample_rate={sample_rate:g}); lower f_max or raise sample_rate"
        )
    bin_frequencies = torch.linspace(0.0, nyquist, n_fft // 2 + 1, dtype=torch.float64)
    edges = mel_to_hz(torch.linspace(float(hz_to_mel(torch.tensor(f_min))), float(hz_to_mel(torch.tensor(f_max))), n_mels + 2, dtype=torch.float64))
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bin_frequencies - lower) / (centre - lower)
    falling = (upper - bin_frequencies) / (upper - centre)
    filters = torch.minimum(rising, falling).clamp(min=0.0)
    empty = (filters.sum(dim=1) == 0).nonzero().flatten().tolist()
    if empty:  # bands narrower than the FFT's bin spacing catch no bin and stay silent
        raise ConfigError(
            f"n_mels={n_mels} with n_fft={n_fft}: mel bands {empty} fall between FFT bins "
            f"({sample_rate / n_fft:g} Hz apart) and would always be zero; lower n_mels or raise n_fft"
        )
    return filters.to(torch.float32)


class LogSpectrogram(nn.Module):
    """log(|STFT| + eps), [..., L] -> [..., n_fft // 2 + 1, T]: the linear-frequency view,
    finest where the mel scale is coarse (high frequencies)."""

    def __init__(self, n_fft: int = 256, hop_length: int = 128, eps: float = 1e-6):
        super().__init__()
        _check_frames(n_fft, hop_length)
        self.n_fft, self.hop_length, self.eps = n_fft, hop_length, eps
        # a buffer, so it follows the module to the device and stays out of the optimizer
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)

    def power(self, waveform: torch.Tensor) -> torch.Tensor:
        """|STFT|^2 of [..., L] as [..., n_fft // 2 + 1, T]."""
        leading, length = waveform.shape[:-1], waveform.shape[-1]
        if length <= self.n_fft // 2:
            raise ConfigError(f"waveforms of {length} samples are too short for n_fft={self.n_fft}; use n_fft < {2 * length}")
        spectrum = torch.stft(
            waveform.reshape(-1, length), self.n_fft, self.hop_length, window=self.window,
            center=True, pad_mode="reflect", return_complex=True,
        )
        power = spectrum.real.square() + spectrum.imag.square()
        return power.reshape(*leading, *power.shape[-2:])

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        return torch.log(self.power(waveform).sqrt() + self.eps)


class LogMelSpectrogram(LogSpectrogram):
    """log(mel filterbank @ |STFT|^2 + eps), [..., L] -> [..., n_mels, T].

    The usual input of audio classifiers: mel bands follow perceived pitch and the log
    compresses the huge dynamic range of power, so loud and quiet clips look alike.
    """

    def __init__(self, sample_rate: float = 8000, n_fft: int = 256, hop_length: int = 128, n_mels: int = 32,
                 f_min: float = 0.0, f_max: float | None = None, eps: float = 1e-6):
        super().__init__(n_fft, hop_length, eps)
        self.register_buffer("filterbank", mel_filterbank(n_fft, n_mels, sample_rate, f_min, f_max), persistent=False)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        return torch.log(torch.matmul(self.filterbank, self.power(waveform)) + self.eps)


class MultiResolutionSpectrogram(nn.Module):
    """Several views of one waveform stacked as channels: [..., L] -> [..., C, F, T].

    A short FFT resolves onsets and pulses, a long one resolves close frequencies; the
    log-magnitude STFT keeps the fine high-frequency detail the mel scale pools away. Giving
    all of them lets the network pick. Each view is resized to (n_mels, frames of the first
    view) with antialiased bilinear interpolation, so C = len(n_ffts) + (stft_n_fft is set).
    """

    def __init__(self, sample_rate: float = 8000, n_ffts: Sequence[int] = (256, 512), hop_length: int = 128,
                 n_mels: int = 32, f_min: float = 0.0, f_max: float | None = None,
                 stft_n_fft: int | None = 256, eps: float = 1e-6):
        super().__init__()
        views: list[nn.Module] = [LogMelSpectrogram(sample_rate, n_fft, hop_length, n_mels, f_min, f_max, eps) for n_fft in n_ffts]
        if stft_n_fft:
            views.append(LogSpectrogram(stft_n_fft, hop_length, eps))
        if not views:
            raise ConfigError("n_ffts=[] and stft_n_fft=null leave no view; give at least one FFT size")
        self.views = nn.ModuleList(views)
        self.n_mels = n_mels

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        leading = waveform.shape[:-1]
        flat = waveform.reshape(-1, waveform.shape[-1])
        first = self.views[0](flat)
        size = (self.n_mels, first.shape[-1])
        channels = [first] + [view(flat) for view in self.views[1:]]
        resized = [
            view if tuple(view.shape[-2:]) == size
            else nn.functional.interpolate(view.unsqueeze(1), size=size, mode="bilinear", align_corners=False, antialias=True).squeeze(1)
            for view in channels
        ]
        stacked = torch.stack(resized, dim=1)
        return stacked.reshape(*leading, *stacked.shape[1:])


def _check_frames(n_fft: int, hop_length: int) -> None:
    if n_fft < 2 or hop_length < 1:
        raise ConfigError(f"n_fft={n_fft}, hop_length={hop_length}: the STFT needs n_fft >= 2 and hop_length >= 1; use e.g. n_fft=256 hop_length=128")
