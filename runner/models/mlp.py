import math
from typing import Sequence

from torch import nn

from runner.models.arguments import probability, widths


class MLP(nn.Module):
    """Flatten, then Linear-ReLU-Dropout blocks and a linear head."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (128, 64), dropout: float = 0.0):
        super().__init__()
        hidden = widths(hidden, "model.hidden", "[128,64]")
        dropout = probability(dropout, "model.dropout")
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(dropout)]
            width = size
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)
