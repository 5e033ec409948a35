"""Batch augmentations: callables (x, y) -> (x, y) applied on the device to training batches
only. They draw from torch's global RNG, whose state the checkpoint saves."""

from typing import Sequence

import torch


class BatchTransform:
    """The kind of object ``augmentation`` builds: called with a training batch on the
    device, returns the transformed batch. Subclass it for a transform of your own."""

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class Compose(BatchTransform):
    """Apply transforms in order. Its ``modalities`` and ``tasks`` are those every member
    accepts, so build.py checks a composition like a single transform."""

    def __init__(self, transforms: Sequence):
        self.transforms = list(transforms)
        self.modalities = _shared(self.transforms, "modalities")
        self.tasks = _shared(self.transforms, "tasks")

    def __call__(self, x: torch.Tensor, y: torch.Tensor):
        for transform in self.transforms:
            x, y = transform(x, y)
        return x, y


def _shared(transforms: Sequence, attribute: str) -> tuple[str, ...] | None:
    declared = [getattr(t, attribute) for t in transforms if getattr(t, attribute, None)]
    if not declared:
        return None
    return tuple(value for value in declared[0] if all(value in other for other in declared[1:]))


class GaussianNoise(BatchTransform):
    """Add N(0, std^2) noise to every input value."""

    def __init__(self, std: float = 0.05):
        self.std = std

    def __call__(self, x, y):
        return x + self.std * torch.randn_like(x), y


class RandomShift(BatchTransform):
    """Shift each sample along its last one (signals) or two (images) axes by up to
    max_shift positions, filling with zeros."""

    def __init__(self, max_shift: int = 1):
        self.max_shift = max_shift

    def __call__(self, x, y):
        if self.max_shift <= 0:
            return x, y
        for dim in ((-2, -1) if x.dim() >= 4 else (-1,)):
            x = self._shift(x, dim)
        return x, y

    def _shift(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        # pad the axis, then gather a window at a random offset per sample: no Python loop
        # over samples and no host-device sync
        pad = self.max_shift
        padding = [0, 0] * (-dim - 1) + [pad, pad]
        padded = torch.nn.functional.pad(x, padding)
        length = x.shape[dim]
        view = [1] * x.dim()
        view[0] = x.shape[0]
        start = torch.randint(0, 2 * pad + 1, (x.shape[0],), device=x.device).view(view)
        view = [1] * x.dim()
        view[dim] = length
        index = (start + torch.arange(length, device=x.device).view(view)).expand_as(x)
        return padded.gather(dim, index)


# ---------------------------------------------------------------- batch mixing
def _soft(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-class probabilities from labels (or from probabilities, unchanged)."""
    return y if y.dim() > 1 else torch.nn.functional.one_hot(y, num_classes).to(torch.float32)


class _BatchMix(BatchTransform):
    """With probability p per batch, mix every sample with another of the same batch (a
    random pairing) in proportion lam, drawn from Beta(alpha, alpha) and folded to
    lam >= 0.5 so the sample keeps its identity: as alpha -> 0, lam -> 1 and nothing changes.
    Targets become soft: lam * own + (1 - lam) * partner's, which every loss of
    runner.losses accepts. The draws come from torch's CPU generator: no device sync."""

    tasks = ("classification",)

    def __init__(self, num_classes: int, alpha: float = 0.2, p: float = 1.0):
        from runner.errors import ConfigError

        if alpha < 0 or not 0.0 <= p <= 1.0:
            raise ConfigError(f"alpha={alpha}, p={p}: mixing needs alpha >= 0 and a probability p in [0, 1]")
        self.num_classes, self.alpha, self.p = num_classes, alpha, p

    def _lam(self) -> float | None:
        if self.p < 1.0 and float(torch.rand(())) >= self.p:
            return None
        if self.alpha == 0:
            return 1.0
        lam = float(torch.distributions.Beta(self.alpha, self.alpha).sample())
        return max(lam, 1.0 - lam)

    def __call__(self, x, y):
        lam = self._lam()
        if lam is None:
            return x, y
        partner = torch.randperm(x.shape[0]).to(x.device, non_blocking=True)
        x, lam = self.mix(x, partner, lam)
        soft = _soft(y, self.num_classes)
        return x, lam * soft + (1.0 - lam) * soft[partner]


class Mixup(_BatchMix):
    """Mixup (Zhang et al. 2018): a convex combination of two samples and their targets.
    Works on any input shape."""

    def mix(self, x: torch.Tensor, partner: torch.Tensor, lam: float):
        return x * lam + x[partner] * (1.0 - lam), lam


class CutMix(_BatchMix):
    """CutMix (Yun et al. 2019): paste a box from the partner sample; the box covers a
    fraction 1 - lam of the last two axes, and lam is corrected to the box actually cut."""

    modalities = ("image", "spectrogram")

    def mix(self, x: torch.Tensor, partner: torch.Tensor, lam: float):
        height, width = x.shape[-2:]
        cut_h, cut_w = round(height * (1.0 - lam) ** 0.5), round(width * (1.0 - lam) ** 0.5)
        top = int(torch.randint(0, height - cut_h + 1, ()))
        left = int(torch.randint(0, width - cut_w + 1, ()))
        mixed = x.clone()
        mixed[..., top : top + cut_h, left : left + cut_w] = x[partner][..., top : top + cut_h, left : left + cut_w]
        return mixed, 1.0 - (cut_h * cut_w) / (height * width)


# ---------------------------------------------------------------- audio
class RandomGain(BatchTransform):
    """Scale each sample by its own gain, drawn uniformly between min_db and max_db decibels
    (amplitude x 10^(dB/20)): the same sound arrives louder or quieter."""

    modalities = ("signal",)

    def __init__(self, min_db: float = -6.0, max_db: float = 6.0):
        from runner.errors import ConfigError

        if min_db > max_db:
            raise ConfigError(f"min_db={min_db} is above max_db={max_db}; give a range with min_db <= max_db, e.g. min_db=-6 max_db=6")
        self.min_db, self.max_db = min_db, max_db

    def __call__(self, x, y):
        if self.min_db == self.max_db == 0:
            return x, y
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        decibels = self.min_db + (self.max_db - self.min_db) * torch.rand(shape, device=x.device)
        return x * 10.0 ** (decibels / 20.0), y


class SpecAugment(BatchTransform):
    """SpecAugment's masking (Park et al. 2019) on [..., F, T] spectrograms: per sample,
    freq_masks bands of min_freq_width..max_freq_width adjacent frequencies and time_masks
    bands of min_time_width..max_time_width adjacent frames, each of random width and place,
    are set to zero or to the sample's mean (per channel). A channel stack of aligned views
    is masked alike in every channel. The network learns not to rely on any one band or
    moment. Masks overlap freely, so a sample may lose less than the sum of widths."""

    modalities = ("spectrogram",)
    FILLS = ("zero", "mean")

    def __init__(self, freq_masks: int = 2, max_freq_width: int = 4, time_masks: int = 2, max_time_width: int = 4,
                 min_freq_width: int = 0, min_time_width: int = 0, fill: str = "zero"):
        from runner.errors import ConfigError

        if fill not in self.FILLS:
            raise ConfigError(f"augmentation.specaugment.fill='{fill}' is not known; use one of {', '.join(self.FILLS)}")
        for axis, masks, low, high in (("freq", freq_masks, min_freq_width, max_freq_width), ("time", time_masks, min_time_width, max_time_width)):
            if masks < 0 or not 0 <= low <= high:
                raise ConfigError(
                    f"augmentation.specaugment: {axis}_masks={masks}, min_{axis}_width={low}, max_{axis}_width={high}; "
                    f"need {axis}_masks >= 0 and 0 <= min_{axis}_width <= max_{axis}_width"
                )
        self.freq = (freq_masks, min_freq_width, max_freq_width)
        self.time = (time_masks, min_time_width, max_time_width)
        self.fill = fill

    def __call__(self, x, y):
        count, frequencies, frames = x.shape[0], x.shape[-2], x.shape[-1]
        masked = self._bands(count, frequencies, *self.freq, x.device)[:, :, None] | self._bands(count, frames, *self.time, x.device)[:, None, :]
        masked = masked.view(count, *(1,) * (x.dim() - 3), frequencies, frames)
        fill = x.mean(dim=(-2, -1), keepdim=True) if self.fill == "mean" else x.new_zeros(())
        return torch.where(masked, fill, x), y

    @staticmethod
    def _bands(count: int, size: int, masks: int, min_width: int, max_width: int, device: torch.device) -> torch.Tensor:
        """[count, size] booleans, True inside any of a sample's ``masks`` bands: widths and
        starts are drawn per sample and compared with arange, without a loop over samples."""
        if masks == 0 or max_width == 0:
            return torch.zeros(count, size, dtype=torch.bool, device=device)
        max_width = min(max_width, size)
        width = torch.randint(min(min_width, max_width), max_width + 1, (count, masks, 1), device=device)
        # a start uniform over the places where the whole band fits
        start = (torch.rand(count, masks, 1, device=device) * (size - width + 1)).long()
        position = torch.arange(size, device=device)
        return ((position >= start) & (position < start + width)).any(dim=1)


class PatchMasking(BatchTransform):
    """Zero round(ratio * patches) random non-overlapping patch_size x patch_size patches of
    every sample (all channels), a different set per sample. Sides that patch_size does not
    divide end in smaller edge patches, which count as patches too."""

    modalities = ("image", "spectrogram")

    def __init__(self, patch_size: int = 2, ratio: float = 0.25):
        from runner.errors import ConfigError

        if patch_size < 1:
            raise ConfigError(f"augmentation.patch.patch_size={patch_size} must be at least 1, e.g. the model's patch size")
        if not 0.0 <= ratio <= 1.0:
            raise ConfigError(f"augmentation.patch.ratio={ratio} is out of range; use a fraction of the patches between 0 and 1")
        self.patch_size, self.ratio = patch_size, ratio

    def __call__(self, x, y):
        size = self.patch_size
        count, height, width = x.shape[0], x.shape[-2], x.shape[-1]
        rows, columns = -(-height // size), -(-width // size)
        patches = rows * columns
        dropped = round(self.ratio * patches)
        if dropped == 0:
            return x, y
        # the `dropped` smallest of uniform scores: exactly that many patches per sample,
        # drawn without replacement, without a loop over samples or a host sync
        chosen = torch.rand(count, patches, device=x.device).topk(dropped, dim=1, largest=False).indices
        masked = torch.zeros(count, patches, dtype=torch.bool, device=x.device).scatter_(1, chosen, True)
        masked = masked.view(count, rows, columns).repeat_interleave(size, 1).repeat_interleave(size, 2)
        masked = masked[:, :height, :width].view(count, *(1,) * (x.dim() - 3), height, width)
        return x.masked_fill(masked, 0.0), y
