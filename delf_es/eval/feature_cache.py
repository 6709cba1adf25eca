"""On-disk cache of extracted features keyed by (image content hash, model id, extraction settings).

The model id names the backbone weights, layer, scoring and PCA; :func:`cache_name` adds
the extraction settings it does not cover (pyramid scales, image size, keypoint count,
...), so a re-run with another *search* setting never re-extracts, and another model or
pyramid never reads a stale file.  Keypoints are stored strongest first and selected as
the top ``max_feature_num`` over all scales, so a run with fewer keypoints reads the
default cache and keeps its prefix (exactly what extraction would give).  Files are
written atomically (temp file + rename), so an interrupted run resumes cleanly.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from delf_es.settings import Settings
from delf_es.types import Features

if TYPE_CHECKING:  # pragma: no cover
    from delf_es.model.spec import ModelSpec

#: extraction settings that change features but not the model id
EXTRACTION_FIELDS = ("scales", "global_scales", "max_image_size", "score_threshold", "precision")


def cache_name(model_id: str, settings: Settings | ModelSpec, max_feature_num: int | None = None) -> str:
    """Cache folder name: the model id, plus a digest of the extraction settings and the
    keypoint count when they differ from the defaults (so existing default caches stay valid).
    ``settings``: Settings or the extractor's ModelSpec (same field names, same values)."""
    defaults = Settings.model_fields
    changed = {f: getattr(settings, f) for f in EXTRACTION_FIELDS if getattr(settings, f) != defaults[f].get_default(call_default_factory=True)}
    name = model_id.replace("/", "_")
    if changed:
        name += "+x" + hashlib.sha1(repr(sorted(changed.items())).encode()).hexdigest()[:8]
    k = settings.max_feature_num if max_feature_num is None else max_feature_num
    if k != defaults["max_feature_num"].default:
        name += f"+k{k}"
    return name


def content_hash(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class FeatureCache:
    """``FeatureCache(root, model_id)`` for the default extraction settings, or
    ``FeatureCache(root, model_id, spec)`` (a ModelSpec, or Settings) for any (scales, keypoint count, ...)."""

    def __init__(self, root: Path, model_id: str, settings: Settings | ModelSpec | None = None) -> None:
        self.directory = Path(root) / (cache_name(model_id, settings) if settings else model_id.replace("/", "_"))
        default_k = Settings.model_fields["max_feature_num"].default
        self.keep = settings.max_feature_num if settings else default_k
        # fewer keypoints than the default: the default cache's prefix is the same features
        self.fallback = Path(root) / cache_name(model_id, settings, default_k) if self.keep < default_k else None

    def path_for(self, key: str, directory: Path | None = None) -> Path:
        return (directory or self.directory) / key[:2] / f"{key}.npz"

    def _cached(self, key: str) -> Features | None:
        path = self.path_for(key)
        if path.is_file():
            return Features.load(path)
        if self.fallback is not None and self.path_for(key, self.fallback).is_file():
            return truncate(Features.load(self.path_for(key, self.fallback)), self.keep)
        return None

    def get_or_extract(self, key: str, image_id: str, extract: Callable[[], Features]) -> Features:
        """Cached features for ``key`` (stored under ``image_id``), extracting on a miss."""
        path = self.path_for(key)
        cached = self._cached(key)
        if cached is not None:
            if cached.image_id == image_id:
                return cached
            return Features(image_id, cached.model_id, cached.image_size, cached.keypoints, cached.scales,
                            cached.scores, cached.descriptors, cached.global_desc)
        features = extract()
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(handle, "wb") as out:
            out.write(features.to_bytes())
        os.replace(temp, path)
        return features


def truncate(features: Features, keep: int) -> Features:
    """The ``keep`` strongest keypoints (features are stored strongest first)."""
    if features.num_keypoints <= keep:
        return features
    f = features
    return Features(f.image_id, f.model_id, f.image_size, f.keypoints[:keep], f.scales[:keep], f.scores[:keep],
                    f.descriptors[:keep], f.global_desc)


def crop_key(image_key: str, bbox: tuple[float, ...] | None) -> str:
    """Cache key of a (possibly cropped) query image."""
    if bbox is None:
        return image_key
    return hashlib.sha1(f"{image_key}:{np.round(bbox, 2).tolist()}".encode()).hexdigest()
