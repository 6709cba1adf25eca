"""DELF attention (keypoint-selection) head: 1x1 conv -> BN -> ReLU -> 1x1 conv -> softplus."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AttentionHead(nn.Module):
    """Scores every cell of a local feature map.

    Input (B, C, H, W) features; output (B, 1, H, W) scores >= 0.
    """

    def __init__(self, in_channels: int, hidden: int = 512) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.hidden = hidden
        self.conv1 = nn.Conv2d(in_channels, hidden, kernel_size=1)
        self.bn = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, 1, kernel_size=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.softplus(self.conv2(F.relu(self.bn(self.conv1(features)))))


def attention_pool(features: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """DELF's attention-weighted pooling used to train the head.

    Args:
        features: (B, C, H, W) L2-normalised local descriptors.
        scores: (B, 1, H, W) attention scores.
    Returns:
        (B, C) score-weighted mean of the descriptors.
    """
    return (features * scores).mean(dim=(-2, -1))
