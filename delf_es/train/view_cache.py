"""Local feature maps of augmented training views, computed once by the frozen backbone.

Stage 2 never changes the backbone, so every view's (C, s/16, s/16) map is computed once
and stored as float16 on disk; the attention head then trains on the stored maps (on 2
CPU cores the backbone is >95% of the cost of a training step).  One ``maps-<size>.npy``
per view size; ``views.json`` says which row is which image, label and split.  The folder
name is a hash of everything that determines its content, so a changed set, backbone or
augmentation never reuses stale maps; it is written to a temp folder and renamed, so an
interrupted build leaves nothing half-written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from delf_es.errors import DelfEsError
from delf_es.imageio import load_image
from delf_es.model.delf import DelfModel, ModelMeta
from delf_es.settings import Settings
from delf_es.train.augment import render_view, sample_views
from delf_es.train.data import TrainSet, split_holdout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ViewConfig:
    """Attributes:
    views_per_image: augmented views computed per training image.
    sizes: view sides, px (multiples of 32; the map is size/16 cells a side).
    crop_range: crop side as a fraction of the image's short side (min, max).
    holdout: fraction of each class's images (or of a single image's views) held out.
    seed: for crops and the split.
    """

    views_per_image: int = 24
    sizes: tuple[int, ...] = (192, 256, 320, 384)
    crop_range: tuple[float, float] = (0.5, 1.0)
    holdout: float = 0.2
    seed: int = 0


@dataclass(frozen=True)
class ViewRecord:
    """One cached view: ``maps-<size>.npy[row]`` holds its (C, size/16, size/16) float16 map."""

    path: str
    label: int
    split: str  # "train" or "val"
    size: int
    row: int


@dataclass(frozen=True)
class ViewCache:
    folder: Path
    records: tuple[ViewRecord, ...]
    classes: tuple[str, ...]
    local_dim: int

    def maps(self, size: int) -> np.ndarray:
        """(N, C, size/16, size/16) float16, memory-mapped read-only."""
        return np.load(self.folder / f"maps-{size}.npy", mmap_mode="r")

    @classmethod
    def load(cls, folder: Path) -> "ViewCache":
        meta = json.loads((folder / "views.json").read_text())
        records = tuple(ViewRecord(**r) for r in meta["records"])
        return cls(folder, records, tuple(meta["classes"]), meta["local_dim"])


def cache_key(train_set: TrainSet, meta: ModelMeta, config: ViewConfig) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps([meta.backbone, meta.local_layer, meta.backbone_digest, asdict(config)]).encode())
    for item in train_set.items:
        stat = item.path.stat()
        digest.update(f"{item.path}|{item.label}|{stat.st_size}|{int(stat.st_mtime)}".encode())
    return digest.hexdigest()[:16]


@torch.inference_mode()
def local_map(model: DelfModel, meta: ModelMeta, view: np.ndarray) -> np.ndarray:
    """(S, S, 3) uint8 view -> (C, S/16, S/16) float16 raw local descriptors."""
    image = torch.from_numpy(np.array(view)).permute(2, 0, 1)[None].float()
    mean = torch.tensor(meta.mean).view(1, 3, 1, 1)
    std = torch.tensor(meta.std).view(1, 3, 1, 1)
    image = ((image - mean) / std).contiguous(memory_format=torch.channels_last)
    return model.backbone(image, with_global=False).local[0].numpy().astype(np.float16)


def build_view_cache(
    train_set: TrainSet, model: DelfModel, meta: ModelMeta, config: ViewConfig, root: Path, settings: Settings
) -> ViewCache:
    """Compute (or reuse) the maps of ``config.views_per_image`` views of every image."""
    folder = Path(root) / cache_key(train_set, meta, config)
    if (folder / "views.json").is_file():
        log.info("reusing view cache %s", folder)
        return ViewCache.load(folder)
    held_images, view_level = split_holdout(train_set, config.holdout, config.seed)
    n_val_views = max(1, round(config.views_per_image * config.holdout)) if config.holdout > 0 else 0
    # plan every view first: the per-size arrays are allocated once at their final length
    plans, skipped = [], []
    for index, item in enumerate(train_set.items):
        try:
            pixels = load_image(item.path, settings).pixels
        except DelfEsError as error:
            skipped.append(str(error))
            continue
        rng = np.random.default_rng([config.seed, index])
        views = sample_views(pixels.shape[1], pixels.shape[0], config.views_per_image, config.sizes, config.crop_range, rng)
        for number, view in enumerate(views):
            if item.path in held_images:
                split = "val"
            elif item.label in view_level and number >= config.views_per_image - n_val_views:
                split = "val"
            else:
                split = "train"
            plans.append((item, view, split))
    for reason in skipped:
        log.warning("skipped %s", reason)
    counts = {size: sum(1 for _, v, _ in plans if v.size == size) for size in config.sizes}
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".building-", dir=root))
    try:
        arrays = {
            size: np.lib.format.open_memmap(
                scratch / f"maps-{size}.npy", mode="w+", dtype=np.float16, shape=(n, meta.local_dim, size // 16, size // 16)
            )
            for size, n in counts.items()
            if n
        }
        rows = dict.fromkeys(counts, 0)
        records, current, pixels = [], None, None
        for item, view, split in tqdm(plans, desc="caching view features", unit="view"):
            if item.path != current:
                current, pixels = item.path, load_image(item.path, settings).pixels
            arrays[view.size][rows[view.size]] = local_map(model, meta, render_view(pixels, view))
            records.append(ViewRecord(str(item.path), item.label, split, view.size, rows[view.size]))
            rows[view.size] += 1
        for array in arrays.values():
            array.flush()
        meta_json = {"classes": list(train_set.classes), "local_dim": meta.local_dim, "config": asdict(config),
                     "records": [asdict(r) for r in records], "skipped": skipped}
        (scratch / "views.json").write_text(json.dumps(meta_json))
        os.replace(scratch, folder)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return ViewCache.load(folder)
