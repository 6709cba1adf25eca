"""The SDK's pieces that need no engine: the result records and dicts, query crops and
orientations, bulk item fields, timestamps, and holding signals back while a batch is written
(split from sdk.py)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterator, Mapping

import numpy as np

from delf_es.errors import InvalidRequest
from delf_es.index.base import StoredImage
from delf_es.items import parse_item
from delf_es.types import SearchHit


@dataclass(frozen=True)
class QueryResult:
    """What :meth:`DelfEs.search_loaded` found: the query's size (px, the whole image even with
    a region), its keypoint count and the hits (dicts as :meth:`DelfEs.search_image` returns)."""

    width: int
    height: int
    keypoints: int
    hits: list[dict[str, Any]]


def crop(pixels: np.ndarray, bbox: tuple[float, float, float, float], min_side: int) -> tuple[np.ndarray, tuple[float, float]]:
    """The region ``(x1, y1, x2, y2)`` px (clipped to the image) of (H, W, 3) ``pixels`` and its
    top-left corner (x, y) px; :class:`InvalidRequest` when it is not a box of at least ``min_side``."""
    try:
        x1, y1, x2, y2 = (float(v) for v in bbox)
    except (TypeError, ValueError):
        raise InvalidRequest(f"bbox must be 4 numbers x1,y1,x2,y2 px, got {bbox!r}") from None
    if not all(np.isfinite([x1, y1, x2, y2])) or x2 <= x1 or y2 <= y1:
        raise InvalidRequest(f"bbox must have x1 < x2 and y1 < y2 (finite px), got {list(bbox)}")
    height, width = pixels.shape[:2]
    left, top = int(max(0, np.floor(x1))), int(max(0, np.floor(y1)))
    right, bottom = int(min(width, np.ceil(x2))), int(min(height, np.ceil(y2)))
    if right - left < min_side or bottom - top < min_side:
        raise InvalidRequest(
            f"bbox {list(bbox)} leaves {max(0, right - left)}x{max(0, bottom - top)} px of the "
            f"{width}x{height} image; at least {min_side} px a side is needed")
    return np.ascontiguousarray(pixels[top:bottom, left:right]), (float(left), float(top))


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back while a batch is written, then deliver them: the write and its
    bookkeeping (what was saved) happen entirely or not at all.  Only in the main thread (the
    only one Python delivers signals to); elsewhere a no-op."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def hold(signum, frame) -> None:
        received.append(signum)

    for sig in previous:
        signal.signal(sig, hold)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for signum in received:
            handler = previous[signum]
            if callable(handler):
                handler(signum, None)
            elif handler == signal.SIG_DFL and signum == signal.SIGINT:
                raise KeyboardInterrupt
            elif handler == signal.SIG_DFL:
                signal.raise_signal(signum)


def orientations(pixels: np.ndarray) -> list[np.ndarray]:
    """The 8 orientations (4 rotations x mirror), the original first."""
    out = []
    for mirrored in (pixels, pixels[:, ::-1]):
        for turns in range(4):
            out.append(np.ascontiguousarray(np.rot90(mirrored, turns)))
    return out


def stored_dict(stored: StoredImage) -> dict[str, Any]:
    return {
        "id": stored.image_id, "path": stored.path, "metadata": stored.metadata, "width": stored.width,
        "height": stored.height, "num_keypoints": stored.num_keypoints, "model_id": stored.model_id,
        "created_at": stored.created_at, "thumbnail_bytes": stored.thumbnail_bytes,
    }


def result_dict(hit: SearchHit, query_keypoints: int, stored: StoredImage) -> dict[str, Any]:
    return {
        "id": hit.image_id,
        "path": stored.path,
        "score": float(hit.score),
        "dist": 1.0 - min(1.0, (hit.inliers or 0) / max(1, query_keypoints)),
        "metadata": stored.metadata,
        "inliers": int(hit.inliers or 0),
        "votes": int(hit.votes),
        "global_similarity": None if np.isnan(hit.global_similarity) else float(hit.global_similarity),
    }


def utc_now() -> str:
    """The time stored as an image's ``created_at``: ISO 8601 UTC, microseconds."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def item_label(fields: Mapping[str, Any]) -> str:
    """How a bulk item is named in a failure report: its path, or ``<bytes>``."""
    return fields["path"] if isinstance(fields["path"], str) else "<bytes>"


def item_fields(item: Any) -> dict[str, Any]:
    """The fields of one bulk-add item (the shared parser, delf_es/items.py), as ``DelfEs.load`` takes them."""
    parsed = parse_item(item)
    fields = {"path": parsed.path, "metadata": parsed.metadata, "img": parsed.img, "bytestream": parsed.bytestream}
    return {**fields, "invalid": True} if parsed.invalid else fields
