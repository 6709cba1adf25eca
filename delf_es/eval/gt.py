"""Ground-truth files in the paris250 ``gt.json`` format (see ../shared/README.md)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from delf_es.errors import InvalidGroundTruth, UnreadableFile
from delf_es.safe_files import read_regular_file
from delf_es.imageio import load_image
from delf_es.settings import Settings


@dataclass(frozen=True)
class Query:
    """Attributes:
    id: query name.  image: path relative to the gt.json folder.
    bbox: (x1, y1, x2, y2) px crop applied before extraction, or None.
    positives, junk: database paths (relative); every other database image is a negative.
    """

    id: str
    image: str
    bbox: tuple[float, float, float, float] | None
    positives: tuple[str, ...]
    junk: tuple[str, ...]
    kind: str = ""


@dataclass(frozen=True)
class GroundTruth:
    name: str
    root: Path
    database: tuple[str, ...]
    queries: tuple[Query, ...]

    def resolve(self, relative: str) -> Path:
        return self.root / relative


def load_ground_truth(path: Path) -> GroundTruth:
    try:
        data = json.loads(read_regular_file(path, 64 * 1024 * 1024).decode("utf-8"))  # a FIFO never blocks
        queries = tuple(
            Query(
                id=q["id"],
                image=q["image"],
                bbox=tuple(float(v) for v in q["bbox"]) if q.get("bbox") else None,
                positives=tuple(q["positives"]),
                junk=tuple(q.get("junk", ())),
                kind=q.get("kind", ""),
            )
            for q in data["queries"]
        )
        return GroundTruth(name=data.get("name", Path(path).parent.name), root=Path(path).parent,
                           database=tuple(data["database"]), queries=queries)
    except UnreadableFile as error:
        raise InvalidGroundTruth(str(error)) from None
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as error:
        raise InvalidGroundTruth(f"{path}: not a gt.json file ({error})") from error


def query_pixels(gt: GroundTruth, query: Query, settings: Settings) -> np.ndarray:
    """(H, W, 3) uint8 of the query image, cropped to its bbox when it has one."""
    pixels = load_image(gt.resolve(query.image), settings).pixels
    if query.bbox is None:
        return pixels
    x1, y1, x2, y2 = query.bbox
    height, width = pixels.shape[:2]
    x1, x2 = int(max(0, np.floor(x1))), int(min(width, np.ceil(x2)))
    y1, y2 = int(max(0, np.floor(y1))), int(min(height, np.ceil(y2)))
    return np.ascontiguousarray(pixels[y1:y2, x1:x2])
