"""Evaluation-side cache of raw backbone outputs, so every head variant is scored in minutes.

A new attention head or a new descriptor projection changes the features of every image, so
its benchmark row would re-run the backbone over the whole set (~35 min for paris250 on this
machine).  The backbone itself does not change: :class:`MapStore` keeps, per image, the raw
(C, h, w) local map of every pyramid level (float16) and the summed per-scale global vectors
(float32), keyed by a hash of the pixels, under a folder named after the backbone weights,
layer and pyramid.  :class:`MapCachedExtractor` is an :class:`~delf_es.features.Extractor`
that reads those maps instead of running the network (and fills the store on a miss), then
scores, selects and reduces exactly as extraction does.  Caching the backbone's outputs of
evaluation images is not training on them: nothing is fitted here.

The maps are float16, so features from the store equal real extraction up to that rounding
(benchmarks/results/eval/map-cache-check.json measures the keypoint overlap).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from delf_es.features import LEVEL_MULTIPLE, Extractor, RawFeatures, _Levels, _resize, check_pixels
from delf_es.model.delf import LevelOutput
from delf_es.model.receptive_field import level_size
from delf_es.settings import Settings


class MapStore:
    """``root/<backbone>.<layer>@<digest>+<pyramid hash>/<pixel hash>.npz``."""

    def __init__(self, root: Path, backbone: str, local_layer: str, backbone_digest: str, settings: Settings) -> None:
        pyramid = json.dumps([list(settings.scales), list(settings.global_scales), settings.max_image_size, settings.precision])
        tag = hashlib.sha1(pyramid.encode()).hexdigest()[:8]
        self.directory = Path(root) / f"{backbone}.{local_layer}@{backbone_digest}+{tag}"
        self.directory.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(pixels: np.ndarray) -> str:
        digest = hashlib.sha1(str(pixels.shape).encode())
        digest.update(np.ascontiguousarray(pixels).tobytes())
        return digest.hexdigest()

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.npz"

    def load(self, key: str) -> tuple[list[tuple[float, tuple[int, int], np.ndarray]], np.ndarray | None] | None:
        """[(scale, (level w, level h), (C, h, w) float16 local map)], summed global vector or None."""
        path = self.path(key)
        if not path.is_file():
            return None
        with np.load(path, allow_pickle=False) as npz:
            meta = json.loads(npz["meta"].tobytes().decode())
            levels = [(float(s), (int(w), int(h)), npz[f"local_{i}"]) for i, (s, w, h) in enumerate(meta["levels"])]
            global_sum = npz["global_sum"] if meta["has_global"] else None
        return levels, global_sum

    def save(self, key: str, levels: list[tuple[float, tuple[int, int], np.ndarray]], global_sum: np.ndarray | None) -> None:
        meta = {"levels": [[s, wh[0], wh[1]] for s, wh, _ in levels], "has_global": global_sum is not None}
        arrays = {f"local_{i}": local.astype(np.float16) for i, (_, _, local) in enumerate(levels)}
        handle, scratch = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
        os.close(handle)
        with open(scratch, "wb") as out:  # uncompressed: float maps barely compress, and reads stay fast
            np.savez(out, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8),
                     global_sum=np.zeros(0, np.float32) if global_sum is None else global_sum.astype(np.float32), **arrays)
        os.replace(scratch, self.path(key))


class MapCachedExtractor(Extractor):
    """An Extractor whose backbone outputs come from a :class:`MapStore` (filled on a miss)."""

    def __init__(self, settings: Settings, root: Path) -> None:
        super().__init__(settings)
        meta = self.meta
        # the runtime (and an INT8 calibration) changes the maps: part of the store's name
        digest = f"{meta.backbone_digest}-{self.runtime.name}{getattr(self, '_id_suffix', '')}".replace("/", "-")
        self.store = MapStore(root, meta.backbone, meta.local_layer, digest, settings)

    @torch.inference_mode()
    def extract_raw_many(self, images: Sequence[np.ndarray]) -> list[RawFeatures]:
        return [self._one(pixels) for pixels in images]

    def _one(self, pixels: np.ndarray) -> RawFeatures:
        check_pixels(pixels)
        key = self.store.key(pixels)
        stored = self.store.load(key)
        if stored is None:
            self.store.misses += 1
            stored = self._run_backbone(pixels)
            self.store.save(key, *stored)
        else:
            self.store.hits += 1
        levels, global_sum = stored
        height, width = pixels.shape[:2]
        acc = _Levels()
        for scale, level_wh, local in levels:
            if scale not in self.settings.scales:
                continue
            local_t = torch.from_numpy(np.asarray(local, np.float32)).to(self.device)
            scores = self._score(local_t)
            acc.add(LevelOutput(local=local_t, scores=scores, global_=None), scale, True, level_wh, (width, height), self)
        if global_sum is not None:
            acc.global_sum = torch.from_numpy(np.asarray(global_sum, np.float32))
        return acc.finish(width, height, self)

    def _score(self, local: torch.Tensor) -> torch.Tensor:
        """(C, h, w) raw map -> (h, w) scores, as DelfModel.forward_levels scores."""
        attention = self.model.attention
        if attention is None:
            return local.norm(dim=0)
        return attention(local[None])[0, 0].float()

    def _run_backbone(self, pixels: np.ndarray):
        settings = self.settings
        base = self._base(pixels)
        global_scales = {round(s, 4) for s in settings.global_scales}
        levels, global_sum = [], None
        for scale in sorted(set(settings.scales) | set(settings.global_scales)):
            level_h = level_size(base.shape[-2] * scale, LEVEL_MULTIPLE)
            level_w = level_size(base.shape[-1] * scale, LEVEL_MULTIPLE)
            level = (_resize(base, level_h, level_w) - self._mean) / self._std
            out = self.network.forward_levels(level, with_global=round(scale, 4) in global_scales)[0]
            if out.global_ is not None:
                vector = out.global_.float().cpu().numpy()
                global_sum = vector if global_sum is None else global_sum + vector
            if scale in settings.scales:
                levels.append((scale, (level_w, level_h), out.local.float().cpu().numpy().astype(np.float16)))
        return levels, global_sum
