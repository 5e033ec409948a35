from typing import Sequence

from torch import nn

from runner.models import arguments
from runner.models.cnn import image_channels


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a skip connection (1x1 projection when the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.skip = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.skip = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.body(x) + self.skip(x))


class ResNet(nn.Module):
    """A stem convolution and stages of basic blocks; stages after the first halve resolution."""

    # any [C, H, W] grid: images, and spectrograms [C, F, T]
    modalities = ("image", "spectrogram")

    def __init__(self, input_shape: Sequence[int], num_classes: int, widths: Sequence[int] = (32, 64), blocks_per_stage: int = 1):
        super().__init__()
        channels = image_channels(input_shape, "resnet")
        widths = arguments.widths(widths, "model.widths", "[32,64]", allow_empty=False)
        blocks_per_stage = arguments.count(blocks_per_stage, "model.blocks_per_stage", "1")
        width = widths[0]
        self.stem = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        stages: list[nn.Module] = []
        for index, size in enumerate(widths):
            for block in range(blocks_per_stage):
                stride = 2 if index > 0 and block == 0 else 1
                stages.append(BasicBlock(width, size, stride))
                width = size
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))

    def forward(self, x):
        return self.head(self.stages(self.stem(x)))
