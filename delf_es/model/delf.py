"""The DELF/DELG network: backbone + attention (or norm) scoring + GeM, one forward pass."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from delf_es.errors import ModelMismatch, WeightsNotFound
from delf_es.model.attention import AttentionHead
from delf_es.model.backbone import Backbone
from delf_es.model.pooling import gem, l2n
from delf_es.model.receptive_field import ReceptiveField
from delf_es.model.spec import ModelSpec, resolve_network
from delf_es.model.weights import default_attention_path, file_digest, load_state  # noqa: F401 - default_attention_path re-exported
from delf_es.settings import Settings


@dataclass(frozen=True)
class ModelMeta:
    """Everything needed to interpret the model's outputs; travels with the features.

    Attributes:
        backbone, local_layer: which activation the local descriptors come from.
        backbone_digest: content hash of the backbone weight file.
        scoring: "norm" (descriptor L2 norm) or "attention".
        attention_digest: hash of the attention head's weights ("" for norm scoring).
        local_dim, global_dim: channels of the raw local and global descriptors.
        mean, std: input normalisation on the 0..255 scale.
        receptive_field: of the local map, in input px of its pyramid level.
        provenance: where the backbone weights come from.
        attention_provenance: how the attention head was trained ("" for norm scoring).
    """

    backbone: str
    local_layer: str
    backbone_digest: str
    scoring: str
    attention_digest: str
    local_dim: int
    global_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    receptive_field: ReceptiveField
    provenance: str
    attention_provenance: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class LevelOutput:
    """Outputs of one pyramid level (batch of one image).

    Attributes:
        local: (C, h, w) raw local descriptors.
        scores: (h, w) keypoint scores >= 0.
        global_: (G,) L2-normalised GeM vector, or None if not computed.
    """

    local: torch.Tensor
    scores: torch.Tensor
    global_: torch.Tensor | None


class DelfModel(nn.Module):
    """Backbone with an attention head on the local map and GeM on the deeper map."""

    def __init__(self, backbone: Backbone, attention: AttentionHead | None, gem_p: float = 3.0) -> None:
        super().__init__()
        self.backbone = backbone
        self.attention = attention
        self.gem_p = gem_p

    @property
    def scoring(self) -> str:
        return "attention" if self.attention is not None else "norm"

    def forward_level(self, image: torch.Tensor, with_global: bool) -> LevelOutput:
        """Args: image (1, 3, H, W) normalised, H and W multiples of 32."""
        return self.forward_levels(image, with_global)[0]

    def forward_levels(self, images: torch.Tensor, with_global: bool) -> list[LevelOutput]:
        """One forward pass over a batch of same-size levels (of different images).

        Args:
            images: (B, 3, H, W) normalised, H and W multiples of 32.
        Returns:
            B outputs, in batch order.
        """
        maps = self.backbone(images, with_global=with_global)
        local = maps.local
        scores = self.attention(local)[:, 0] if self.attention is not None else local.norm(dim=1)
        global_ = l2n(gem(maps.global_, self.gem_p)) if maps.global_ is not None else None
        return [
            LevelOutput(local=local[b], scores=scores[b], global_=None if global_ is None else global_[b])
            for b in range(len(images))
        ]


def head_provenance(meta: dict, path: Path) -> str:
    """One line on how a head file was trained, from the record ``delf-es train attention`` stores in it."""
    if not meta:
        return f"attention head {path.name} (no training record)"
    classes = len(meta.get("classes", []))
    return (f"attention head trained by delf-es on {meta.get('images', '?')} images ({classes} classes, "
            f"{meta.get('background_images', 0)} background) for {meta.get('backbone', '?')}/{meta.get('local_layer', '?')}; "
            f"command: {meta.get('command', '?')}")


def build_model(source: Settings | ModelSpec) -> tuple[DelfModel, ModelMeta]:
    """Build the network and its metadata from settings or a spec (weights from installed
    packages or files; which files: :func:`delf_es.model.spec.resolve_network`)."""
    files = resolve_network(source)
    preset, local_layer = files.preset, files.local_layer
    backbone = preset.build(files.weights, local_layer)
    if backbone.local_channels != preset.local_dims[local_layer]:  # the registry's table names model ids
        raise ModelMismatch(f"{preset.name}/{local_layer} has {backbone.local_channels}-d local features, the "
                            f"registry says {preset.local_dims[local_layer]}")
    attention, attention_digest, attention_provenance = None, "", ""
    attention_path = files.attention
    if attention_path is not None:
        checkpoint = load_state(attention_path, "attention head")
        try:
            state = checkpoint.get("state_dict", checkpoint)
            attention = AttentionHead(backbone.local_channels, hidden=state["conv1.weight"].shape[0])
            attention.load_state_dict(state)
        except (AttributeError, KeyError, RuntimeError, TypeError) as error:  # a torch file, not our head
            raise WeightsNotFound(f"not an attention head for {backbone.local_channels}-d features "
                                  f"({str(error).splitlines()[0][:160]})", str(attention_path)) from None
        attention_digest = file_digest(Path(attention_path))
        attention_provenance = head_provenance(checkpoint.get("meta", {}), Path(attention_path))
    backbone.eval().fold_for_inference()
    model = DelfModel(backbone, attention).eval()
    meta = ModelMeta(
        backbone=preset.name,
        local_layer=local_layer,
        backbone_digest=file_digest(Path(files.weights)),
        scoring=model.scoring,
        attention_digest=attention_digest,
        local_dim=backbone.local_channels,
        global_dim=backbone.global_channels,
        mean=tuple(backbone.mean),
        std=tuple(backbone.std),
        receptive_field=backbone.receptive_field(),
        provenance=preset.provenance,
        attention_provenance=attention_provenance,
    )
    return model, meta
