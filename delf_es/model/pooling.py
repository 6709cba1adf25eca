"""Generalised-mean pooling (Radenovic et al. 2018), function and module forms."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def gem(features: torch.Tensor, p: float | torch.Tensor = 3.0, eps: float = 1e-6) -> torch.Tensor:
    """GeM over the spatial dimensions.

    Args:
        features: (B, C, H, W) non-negative activations.
        p: pooling exponent (1 = average, large = max).
    Returns:
        (B, C) pooled vectors (not normalised).
    """
    if features.ndim != 4:
        raise ValueError(f"gem expects (B, C, H, W), got {tuple(features.shape)}")
    return features.clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


def l2n(vectors: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """L2-normalise the last dimension."""
    return F.normalize(vectors, p=2, dim=-1, eps=eps)


class GeM(nn.Module):
    """Module form of :func:`gem` with a learnable exponent (fixed at 3 unless trained)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return gem(features, self.p, self.eps)
