"""Stage 1 (optional): fine-tune the backbone's feature layers with cross-entropy on image labels.

DELF's first step: the local-feature layers are trained as a classifier (global average
pooling of the local map, then a linear layer) on landmark labels.  This needs a landmark
set and a GPU to matter; on this machine it is exercised on a smoke set only.  BatchNorm
stays in eval mode (small batches would corrupt its ImageNet statistics).  The result is a
state_dict in the preset's own file format, usable with ``--backbone-weights``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from delf_es.errors import ConfigurationError, DelfEsError
from delf_es.imageio import load_image
from delf_es.model.registry import get_preset
from delf_es.settings import Settings
from delf_es.train.attention_stage import cosine_lr
from delf_es.train.augment import render_view, sample_views
from delf_es.train.checkpoint import EpochLog, load_checkpoint, save_atomic
from delf_es.train.data import TrainSet, split_holdout
from delf_es.train.objective import BACKGROUND_MODES, loss_and_correct, num_outputs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackboneConfig:
    """Attributes:
    epochs, batch_size, lr: SGD (momentum 0.9, cosine decay).
    size: training crop side, px (multiple of 32).
    views_per_epoch: fresh random views of every training image per epoch.
    holdout: held-out fraction (see data.split_holdout).
    """

    epochs: int = 10
    batch_size: int = 16
    lr: float = 1e-3
    size: int = 224
    views_per_epoch: int = 2
    holdout: float = 0.2
    background_mode: str = "negative"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.background_mode not in BACKGROUND_MODES:
            raise ConfigurationError(f"background_mode must be one of {BACKGROUND_MODES}")


class BackboneClassifier(nn.Module):
    """Backbone up to the local map -> global average pool -> linear."""

    def __init__(self, backbone: nn.Module, outputs: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = nn.Linear(backbone.local_channels, outputs)
        mean, std = torch.tensor(backbone.mean).view(1, 3, 1, 1), torch.tensor(backbone.std).view(1, 3, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) float 0..255 -> (B, outputs) logits."""
        local = self.backbone((pixels - self.mean) / self.std, with_global=False).local
        return self.classifier(local.mean(dim=(-2, -1)))

    def train(self, mode: bool = True) -> "BackboneClassifier":
        super().train(mode)
        for module in self.backbone.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()
        return self


def epoch_views(train_set: TrainSet, pixels: dict, config: BackboneConfig, epoch: int, held: set, view_level: set):
    """(pixels (S, S, 3), label, split) for this epoch: fresh crops per epoch for training;
    the validation views are the same every epoch (seeded without the epoch)."""
    out = []
    for index, item in enumerate(train_set.items):
        image = pixels.get(item.path)
        if image is None:
            continue
        height, width = image.shape[:2]
        train_rng = np.random.default_rng([config.seed, epoch, index])
        val_rng = np.random.default_rng([config.seed, 10**6, index])
        if item.path in held:
            specs = [(v, "val") for v in sample_views(width, height, config.views_per_epoch, (config.size,), (0.5, 1.0), val_rng)]
        else:
            specs = [(v, "train") for v in sample_views(width, height, config.views_per_epoch, (config.size,), (0.5, 1.0), train_rng)]
            if item.label in view_level and config.holdout > 0:
                specs += [(v, "val") for v in sample_views(width, height, 1, (config.size,), (0.5, 1.0), val_rng)]
        out += [(render_view(image, view), item.label, split) for view, split in specs]
    return out


def run_views(model, views, config, optimizer=None, rng=None) -> tuple[float, float]:
    model.train(optimizer is not None)
    order = rng.permutation(len(views)) if rng is not None else np.arange(len(views))
    total_loss, total, correct, counted = 0.0, 0, 0, 0
    with torch.set_grad_enabled(optimizer is not None):
        for start in tqdm(range(0, len(order), config.batch_size), desc="train" if optimizer else "val", leave=False):
            chosen = [views[i] for i in order[start : start + config.batch_size]]
            pixels = torch.from_numpy(np.stack([v[0] for v in chosen])).permute(0, 3, 1, 2).float()
            labels = torch.tensor([v[1] for v in chosen])
            loss, right, count = loss_and_correct(model(pixels), labels, config.background_mode)
            if optimizer is not None:
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            total_loss += float(loss.detach()) * len(chosen)
            total, correct, counted = total + len(chosen), correct + right, counted + count
    return (total_loss / total if total else float("nan"), correct / counted if counted else float("nan"))


def export_weights(model: BackboneClassifier, original: Path, out: Path) -> Path:
    """The preset's weight file with the fine-tuned tensors swapped in (other keys, e.g. the
    ImageNet classifier, kept), so the preset's loader reads it unchanged."""
    state = torch.load(original, map_location="cpu", weights_only=True)
    trained = model.backbone.net.state_dict()
    merged = {k: trained[k].detach().clone() if k in trained else v for k, v in state.items()}
    return save_atomic(merged, out)


def train_backbone(train_set: TrainSet, settings: Settings, config: BackboneConfig, out_dir: Path, resume: bool = False) -> dict:
    """Train (or resume) and write ``out_dir``/{last.pt, log.csv, backbone.pt, train.json}."""
    out_dir = Path(out_dir)
    preset = get_preset(settings.backbone)
    weights = preset.weights_path(settings.backbone_weights)
    torch.manual_seed(config.seed)
    model = BackboneClassifier(preset.build(weights, settings.local_layer or preset.local_layer),
                               num_outputs(train_set.num_classes, config.background_mode))
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9, weight_decay=1e-4)
    rng = np.random.default_rng(config.seed)
    start, history, seconds = 0, [], 0.0
    if resume and (out_dir / "last.pt").is_file():
        checkpoint = load_checkpoint(out_dir / "last.pt", "backbone")
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        rng.bit_generator.state = checkpoint["rng"]
        start, history, seconds = checkpoint["epoch"], checkpoint["history"], checkpoint["seconds"]
    epoch_log = EpochLog(out_dir / "log.csv", resume=resume and start > 0)
    held, view_level = split_holdout(train_set, config.holdout, config.seed)
    pixels = {}
    for item in train_set.items:
        try:
            pixels[item.path] = load_image(item.path, settings).pixels
        except DelfEsError as error:
            log.warning("skipped %s", error)
    for epoch in range(start + 1, config.epochs + 1):
        started = time.perf_counter()
        lr = cosine_lr(config.lr, epoch, config.epochs)
        for group in optimizer.param_groups:
            group["lr"] = lr
        views = epoch_views(train_set, pixels, config, epoch, held, view_level)
        train_loss, train_acc = run_views(model, [v for v in views if v[2] == "train"], config, optimizer, rng)
        val = [v for v in views if v[2] == "val"]
        val_loss, val_acc = run_views(model, val, config) if val else (None, None)
        seconds += time.perf_counter() - started
        row = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc, "val_loss": val_loss,
               "val_acc": val_acc, "lr": lr, "seconds": round(seconds, 2)}
        history.append(row)
        epoch_log.append(row)
        save_atomic({"stage": "backbone", "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "rng": rng.bit_generator.state, "history": history, "seconds": seconds, "config": asdict(config),
                     "classes": list(train_set.classes)}, out_dir / "last.pt")
    export_weights(model, weights, out_dir / "backbone.pt")
    summary = {"epochs": len(history), "train_seconds": round(seconds, 1), "history": history,
               "backbone": preset.name, "config": asdict(config), "classes": train_set.num_classes}
    (out_dir / "train.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
