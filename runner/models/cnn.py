from typing import Sequence

from torch import nn

from runner.errors import ConfigError
from runner.models.arguments import probability, widths


def image_channels(input_shape: Sequence[int], model: str) -> int:
    """Channels of a (C, H, W) input, or a message saying which model fits other shapes."""
    if len(input_shape) != 3:
        raise ConfigError(
            f"model={model} needs image inputs shaped [channels, height, width], but "
            f"data.input_shape={list(input_shape)}; use model=mlp for flat or 1-D inputs"
        )
    return int(input_shape[0])


class CNN(nn.Module):
    """Conv-BatchNorm-ReLU-MaxPool blocks, global average pooling, dropout, linear head."""

    # any [C, H, W] grid: images, and spectrograms [C, F, T]
    modalities = ("image", "spectrogram")

    def __init__(self, input_shape: Sequence[int], num_classes: int, channels: Sequence[int] = (32, 64), dropout: float = 0.0):
        super().__init__()
        width = image_channels(input_shape, "cnn")
        channels = widths(channels, "model.channels", "[32,64]")
        dropout = probability(dropout, "model.dropout")
        blocks: list[nn.Module] = []
        for size in channels:
            blocks += [
                nn.Conv2d(width, size, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(size),
                nn.ReLU(inplace=True),
                # ceil_mode keeps odd sizes (e.g. 8 -> 4 -> 2 -> 1) from vanishing
                nn.MaxPool2d(2, ceil_mode=True),
            ]
            width = size
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(width, num_classes)
        )

    def forward(self, x):
        return self.head(self.features(x))
