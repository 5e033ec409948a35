import math
from typing import Sequence

import torch
from torch import nn

from runner.models.arguments import widths


class PINN(nn.Module):
    """An MLP on coordinates with tanh activations, for physics-informed losses: tanh is
    smooth, so the loss can take second derivatives of the output at the inputs (ReLU's are
    zero almost everywhere). Xavier initialization keeps tanh out of saturation."""

    modalities = ("coordinates",)

    def __init__(self, input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (32, 32, 32)):
        super().__init__()
        hidden = widths(hidden, "model.hidden", "[32,32,32]")
        layers: list[nn.Module] = []
        width = math.prod(input_shape)
        for size in hidden:
            layers += [nn.Linear(width, size), nn.Tanh()]
            width = size
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                nn.init.xavier_normal_(layer.weight)
                nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
