"""Small models shared by several test files."""

from __future__ import annotations

import torch
from torch import nn


class Residual(nn.Module):
    """A residual ``x + y`` written as plain Python in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x)) + x
