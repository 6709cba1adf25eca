"""On-disk cache of extracted features keyed by (image content hash, model id).

The model id already names the backbone weights, layer, scoring and PCA, so a re-run
with another *search* setting never re-extracts, and another model never reads a
stale file.  Files are written atomically (temp file + rename), so an interrupted run
resumes cleanly.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from delf_es.types import Features


def content_hash(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class FeatureCache:
    def __init__(self, root: Path, model_id: str) -> None:
        self.directory = Path(root) / model_id.replace("/", "_")
        self.directory.mkdir(parents=True, exist_ok=True)

    def path_for(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.npz"

    def get_or_extract(self, key: str, image_id: str, extract: Callable[[], Features]) -> Features:
        """Cached features for ``key`` (stored under ``image_id``), extracting on a miss."""
        path = self.path_for(key)
        if path.is_file():
            cached = Features.load(path)
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


def crop_key(image_key: str, bbox: tuple[float, ...] | None) -> str:
    """Cache key of a (possibly cropped) query image."""
    if bbox is None:
        return image_key
    return hashlib.sha1(f"{image_key}:{np.round(bbox, 2).tolist()}".encode()).hexdigest()
