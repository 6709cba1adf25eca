"""Wiring for ``delf-es train attention``: data set -> frozen model -> view cache -> trainer."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

from delf_es.model.delf import build_model
from delf_es.settings import Settings
from delf_es.train.attention_stage import AttentionConfig, train_attention
from delf_es.train.data import TrainSet, gldv2_csv, image_folder
from delf_es.train.view_cache import ViewConfig, build_view_cache

log = logging.getLogger(__name__)


def load_train_set(data: Path, images: Path | None, background: Path | None) -> TrainSet:
    """``data`` is an ImageFolder root, or a GLDv2 train.csv whose images are under ``images``."""
    data = Path(data)
    if data.suffix.lower() == ".csv":
        return gldv2_csv(data, images or data.parent / "train", background)
    return image_folder(data, background)


def run_attention_training(
    train_set: TrainSet,
    settings: Settings,
    views: ViewConfig,
    config: AttentionConfig,
    out_dir: Path,
    cache_root: Path,
    resume: bool = False,
    command: str = "",
    stop_after: int | None = None,
) -> dict:
    # the frozen backbone only: scoring is irrelevant while caching, 'norm' avoids loading a head
    model, meta = build_model(settings.model_copy(update={"scoring": "norm"}))
    model = model.to(memory_format=torch.channels_last)
    started = time.perf_counter()
    cache = build_view_cache(train_set, model, meta, views, cache_root, settings)
    cache_seconds = time.perf_counter() - started  # ~0 when the cache is reused
    provenance = {
        "backbone": meta.backbone,
        "local_layer": meta.local_layer,
        "backbone_digest": meta.backbone_digest,
        "images": len(train_set.items),
        "background_images": len(train_set.background),
        "views": {"per_image": views.views_per_image, "sizes": list(views.sizes), "crop_range": list(views.crop_range),
                  "holdout": views.holdout, "seed": views.seed},
        "command": command,
        "view_cache_seconds": round(cache_seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "loadavg_start": list(os.getloadavg()),
    }
    return train_attention(cache, config, out_dir, resume=resume, provenance=provenance, stop_after=stop_after)
