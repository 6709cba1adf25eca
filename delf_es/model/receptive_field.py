"""Receptive fields computed from a network's layer configuration.

A feature-map cell ``(row, col)`` at the end of a chain of convolutions "sees" a
square window of the input.  Its centre, in input pixel coordinates (pixel
centres at integers), is ``start + index * jump`` and its side is ``size``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ConvSpec:
    """One spatial layer: kernel size, stride and padding before the input (px of its input)."""

    kernel: int
    stride: int
    pad_before: int
    name: str = ""


@dataclass(frozen=True)
class ReceptiveField:
    """Where a cell of a feature map looks, in input pixels.

    Attributes:
        size: side of the receptive field, px.
        jump: distance between neighbouring cells' centres (the total stride), px.
        start: centre of cell 0 in input pixel coordinates (pixel centres at integers), px.
    """

    size: int
    jump: int
    start: float

    def centres(self, num_cells: int) -> "list[float]":
        return [self.start + i * self.jump for i in range(num_cells)]


def compose(specs: list[ConvSpec]) -> ReceptiveField:
    """Receptive field of a chain of layers (standard recurrence, Araujo et al. 2019)."""
    size, jump, start = 1, 1, 0.0
    for spec in specs:
        size += (spec.kernel - 1) * jump
        start += ((spec.kernel - 1) / 2 - spec.pad_before) * jump
        jump *= spec.stride
    return ReceptiveField(size=size, jump=jump, start=start)


def tf_same_pad_before(kernel: int, stride: int) -> int:
    """Leading padding of TensorFlow 'SAME' for an input whose size is a multiple of the
    stride (extraction keeps every pyramid level a multiple of the local stride, so this
    holds at every layer up to the local map)."""
    total = max(kernel - stride, 0)
    return total // 2


def spec_of(module: nn.Module, name: str = "") -> ConvSpec | None:
    """ConvSpec of a spatial layer, or None for layers that do not move the window."""
    if isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
        kernel = _first(module.kernel_size)
        stride = _first(module.stride)
        if kernel == 1 and stride == 1:
            return None
        if getattr(module, "tf_same_padding", False) or type(module).__name__.endswith("SamePadding"):
            pad = tf_same_pad_before(kernel, stride)
        else:
            pad = _first(module.padding)
        return ConvSpec(kernel=kernel, stride=stride, pad_before=pad, name=name)
    return None


def _first(value: int | tuple[int, ...] | list[int]) -> int:
    if isinstance(value, (tuple, list)):
        if len(set(value)) != 1:
            raise ValueError(f"anisotropic layer {value} is not supported")
        return int(value[0])
    return int(value)


def specs_along(modules: list[tuple[str, nn.Module]]) -> list[ConvSpec]:
    """Specs of the spatial layers among (name, module) pairs given in forward order."""
    out = []
    for name, module in modules:
        spec = spec_of(module, name)
        if spec is not None:
            out.append(spec)
    return out


def level_size(length: int, stride: int) -> int:
    """Length (px) a pyramid level is resized to: the nearest positive multiple of ``stride``."""
    return max(stride, int(math.floor(length / stride + 0.5)) * stride)
