"""The audio front end (mel filterbank, spectrograms), its augmentations, synthetic_audio, and
the audio recipe end to end."""

import json
import math

import pytest
import torch

from runner.audio import LogMelSpectrogram, LogSpectrogram, MultiResolutionSpectrogram, mel_filterbank
from runner.augment import RandomGain, SpecAugment
from runner.build import build
from runner.data import synthetic_audio
from runner.errors import ConfigError
from tests.conftest import compose_config, run_cli

SAMPLE_RATE, N_FFT, N_MELS = 8000, 256, 32


def htk_mel(hz: float) -> float:
    return 2595.0 * math.log10(1.0 + hz / 700.0)


def band_centres(n_mels: int, f_max: float) -> torch.Tensor:
    """Centre frequencies (Hz) of HTK mel bands between 0 and f_max, from the textbook formula."""
    mels = torch.linspace(0.0, htk_mel(f_max), n_mels + 2, dtype=torch.float64)[1:-1]
    return 700.0 * (10.0 ** (mels / 2595.0) - 1.0)


def tone(frequency: float, length: int = 4000) -> torch.Tensor:
    return torch.sin(2 * math.pi * frequency * torch.arange(length) / SAMPLE_RATE)


# ------------------------------------------------------------------- filterbank and views
def test_filterbank_filters_are_triangles_peaking_at_their_centres():
    filters = mel_filterbank(N_FFT, N_MELS, SAMPLE_RATE)
    assert filters.shape == (N_MELS, N_FFT // 2 + 1)
    assert bool((filters >= 0).all()) and float(filters.max()) <= 1.0
    bin_hz = SAMPLE_RATE / N_FFT
    for band, (weights, centre) in enumerate(zip(filters, band_centres(N_MELS, SAMPLE_RATE / 2))):
        support = weights.nonzero().flatten()
        assert len(support) > 0 and bool((support.diff() == 1).all()), f"band {band}: support not contiguous"
        peak = int(weights.argmax())
        rising, falling = weights[support[0] : peak + 1], weights[peak : support[-1] + 1]
        assert bool((rising.diff() > 0).all()) and bool((falling.diff() < 0).all()), f"band {band} is not a triangle"
        assert abs(peak * bin_hz - float(centre)) < bin_hz, f"band {band} peaks at {peak * bin_hz} Hz, not {float(centre):.0f}"


def test_filterbank_refuses_bands_narrower_than_fft_bins_and_bad_ranges():
    with pytest.raises(ConfigError, match="lower n_mels or raise n_fft"):
        mel_filterbank(64, 64, SAMPLE_RATE)
    with pytest.raises(ConfigError, match="f_max=5000"):
        mel_filterbank(N_FFT, N_MELS, SAMPLE_RATE, f_max=5000)


@pytest.mark.parametrize("frequency", [300.0, 1000.0, 2500.0])
def test_a_pure_tone_is_loudest_in_the_mel_band_around_its_frequency(frequency):
    energy = LogMelSpectrogram(SAMPLE_RATE, N_FFT, 128, N_MELS)(tone(frequency)).mean(dim=-1)
    centres = band_centres(N_MELS, SAMPLE_RATE / 2)
    nearest = int((2595.0 * torch.log10(1.0 + centres / 700.0) - htk_mel(frequency)).abs().argmin())
    assert int(energy.argmax()) == nearest


def test_spectrogram_shapes_keep_leading_dimensions():
    waveforms = torch.randn(3, 2, 4000)
    frames = 1 + 4000 // 128  # centred STFT
    assert LogSpectrogram(N_FFT, 128)(waveforms).shape == (3, 2, N_FFT // 2 + 1, frames)
    assert LogMelSpectrogram(SAMPLE_RATE, N_FFT, 128, N_MELS)(waveforms).shape == (3, 2, N_MELS, frames)
    assert LogMelSpectrogram(SAMPLE_RATE, N_FFT, 128, N_MELS)(waveforms[0, 0]).shape == (N_MELS, frames)


def test_multi_resolution_stacks_one_channel_per_view():
    waveforms = torch.randn(4, 4000)
    stacked = MultiResolutionSpectrogram(SAMPLE_RATE, (256, 512), 128, N_MELS, stft_n_fft=256)(waveforms)
    assert stacked.shape == (4, 3, N_MELS, 32)
    assert torch.isfinite(stacked).all()
    # the first view is the plain log-mel, untouched by resizing
    assert torch.allclose(stacked[:, 0], LogMelSpectrogram(SAMPLE_RATE, 256, 128, N_MELS)(waveforms))
    without_stft = MultiResolutionSpectrogram(SAMPLE_RATE, (128, 256, 512), 128, N_MELS, stft_n_fft=None)(waveforms)
    assert without_stft.shape == (4, 3, N_MELS, 32)
    assert MultiResolutionSpectrogram(SAMPLE_RATE, (256,), 128, N_MELS)(waveforms[0]).shape == (2, N_MELS, 32)


# ------------------------------------------------------------------- augmentations
def test_specaugment_masks_exactly_the_forced_widths_per_sample():
    x = torch.randn(64, 2, 20, 30) + 10.0  # no cell is zero before masking
    masked, _ = SpecAugment(freq_masks=1, min_freq_width=3, max_freq_width=3, time_masks=0)(x, None)
    rows = (masked == 0).all(dim=-1)  # [N, C, F]: whole frequency rows blanked
    assert bool((rows.sum(dim=-1) == 3).all())
    assert torch.equal(rows[:, 0], rows[:, 1])  # every channel masked alike
    assert len({tuple(r.nonzero().flatten().tolist()) for r in rows[:, 0]}) > 1  # each sample its own place
    masked, _ = SpecAugment(freq_masks=0, time_masks=1, min_time_width=5, max_time_width=5, fill="mean")(x, None)
    columns = (masked != x).all(dim=-2)  # [N, C, T]
    assert bool((columns.sum(dim=-1) == 5).all())
    mean = x.mean(dim=(-2, -1), keepdim=True).expand_as(x)
    assert torch.equal(masked[masked != x], mean[masked != x])


def test_specaugment_stays_within_width_bounds_and_leaves_its_input_alone():
    x = torch.randn(256, 1, 16, 16) + 10.0
    before = x.clone()
    labels = torch.arange(256)
    masked, out_labels = SpecAugment(freq_masks=1, min_freq_width=2, max_freq_width=4, time_masks=0)(x, labels)
    widths = (masked == 0).all(dim=-1).sum(dim=(-2, -1))
    assert int(widths.min()) == 2 and int(widths.max()) == 4
    assert torch.equal(x, before) and out_labels is labels


def test_specaugment_with_no_masks_is_the_identity():
    x = torch.randn(8, 1, 16, 16)
    for transform in (SpecAugment(freq_masks=0, time_masks=0), SpecAugment(max_freq_width=0, max_time_width=0)):
        assert torch.equal(transform(x, None)[0], x)


@pytest.mark.parametrize("kwargs,key", [({"fill": "noise"}, "fill='noise'"), ({"min_time_width": 5, "max_time_width": 2}, "min_time_width=5")])
def test_specaugment_refuses_bad_settings(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        SpecAugment(**kwargs)


def test_random_gain():
    x = torch.randn(16, 1, 100)
    assert torch.equal(RandomGain(0.0, 0.0)(x, None)[0], x)
    assert torch.allclose(RandomGain(6.0, 6.0)(x, None)[0], x * 10 ** (6 / 20))
    ratio = RandomGain(-6.0, 6.0)(x, None)[0] / x  # one gain per sample, within the range
    assert torch.allclose(ratio, ratio[:, :, :1].expand_as(ratio), rtol=1e-4)
    assert 10 ** (-6 / 20) - 1e-4 <= float(ratio.min()) and float(ratio.max()) <= 10 ** (6 / 20) + 1e-4


def test_specaugment_on_images_is_refused_at_build_time():
    cfg = compose_config(["trainer.device=cpu", "logger=none", "data=digits", "augmentation=specaugment"])
    with pytest.raises(ConfigError) as raised:
        build(cfg)
    text = str(raised.value)
    assert "augmentation.specaugment" in text and "spectrogram" in text and "image" in text


# ------------------------------------------------------------------- synthetic_audio
def test_synthetic_audio_is_fixed_by_its_seed_and_balanced():
    first, second = synthetic_audio(num_samples=120), synthetic_audio(num_samples=120)
    assert torch.equal(first.train[:][0], second.train[:][0]) and torch.equal(first.test[:][1], second.test[:][1])
    other = synthetic_audio(num_samples=120, data_seed=1)
    assert not torch.equal(first.train[:][0], other.train[:][0])
    labels = torch.cat([first.train[:][1], first.val[:][1], first.test[:][1]])
    assert torch.bincount(labels).tolist() == [20] * 6
    assert first.class_names[0] == "rising_chirp" and len(first.class_names) == 6
    assert (first.modality, first.input_shape) == ("spectrogram", (1, 32, 32))
    train = first.train[:][0]  # standardised per frequency with training statistics
    assert torch.allclose(train.mean(dim=(0, 3)), torch.zeros(1, 32), atol=1e-4)
    assert torch.allclose(train.std(dim=(0, 3)), torch.ones(1, 32), atol=1e-3)


@pytest.mark.parametrize("features,shape,modality", [("multi", (3, 32, 32), "spectrogram"), ("none", (1, 4000), "signal")])
def test_synthetic_audio_features(features, shape, modality):
    data = synthetic_audio(num_samples=60, features=features, input_shape=shape)
    assert (data.input_shape, data.modality, tuple(data.train[0][0].shape)) == (shape, modality, shape)


def test_synthetic_audio_names_the_input_shape_to_set():
    with pytest.raises(ConfigError, match=r"set data.input_shape=\[3, 32, 32\]"):
        synthetic_audio(num_samples=60, features="multi")
    with pytest.raises(ConfigError, match="data.features='mfcc'"):
        synthetic_audio(num_samples=60, features="mfcc")


@pytest.mark.slow
def test_audio_recipe_learns_through_the_cli(tmp_path):
    result = run_cli(
        ["experiment=audio_spectrogram_cnn", "logger=none", "trainer.device=cpu", "data.num_samples=360",
         "trainer.max_epochs=4", "trainer.limit_train_batches=8", "hydra.run.dir=out"],
        # one thread: on a small shared machine, competing OpenMP threads cost far more than they add
        cwd=tmp_path, env={"OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["test/acc"] > 1 / 6 + 0.2  # well above chance for 6 balanced classes
    confusion = json.loads((tmp_path / "out" / "confusion_matrix.json").read_text())
    assert confusion["class_names"][-1] == "pulses"
