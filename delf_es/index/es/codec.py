"""How records become Elasticsearch documents and back: ids, vectors, packed arrays.

* ``_id`` of an image document: the image id when it fits Elasticsearch's 512 bytes, else
  ``~sha256:<hex>`` (:func:`document_id`); keypoint ``j`` of slot ``s``: ``<key>.<s>.<j>``
  (:func:`keypoint_id`, ``key`` = 16 characters of a hash of the image id).
* vectors travel as base64 big-endian float32 (global, :func:`float_vector`) or hexadecimal
  int8 (keypoints, :func:`byte_vector`), which this Elasticsearch accepts for indexing and queries;
* keypoint geometry is stored as packed little-endian float32 arrays (:func:`pack`), the int8
  codes of the descriptors as base64 bytes (:func:`pack_codes`).
"""

from __future__ import annotations

import base64
import hashlib
import re
from typing import Any

import numpy as np

from delf_es.index.base import ImageRecord
from delf_es.index.codes import int8_codes

#: Elasticsearch refuses document ids longer than this many bytes.
MAX_ID_BYTES = 512
_HASHED_ID_PREFIX = "~sha256:"
_PCA_RE = re.compile(r"-(pca\d+-[0-9a-f]+)@")
#: Fields of the image document that ``get`` leaves out.
BULKY_FIELDS = ["keypoint_xy", "keypoint_scale", "keypoint_score", "keypoint_codes", "global_vector", "thumbnail"]


def document_id(image_id: str) -> str:
    """The Elasticsearch ``_id`` of an image document: the image id itself when it fits in 512
    bytes, else ``~sha256:<hex>`` of it (the full id stays in the ``image_id`` field)."""
    if len(image_id.encode("utf-8")) <= MAX_ID_BYTES and not image_id.startswith(_HASHED_ID_PREFIX):
        return image_id
    return _HASHED_ID_PREFIX + hashlib.sha256(image_id.encode("utf-8")).hexdigest()


def image_key(image_id: str) -> str:
    """16 url-safe characters (96 bits) of a hash of ``image_id``: short keypoint ids."""
    digest = hashlib.sha256(image_id.encode("utf-8")).digest()
    return base64.urlsafe_b64encode(digest[:12]).decode("ascii")


def keypoint_id(image_id: str, slot: int, index: int) -> str:
    """The ``_id`` of keypoint ``index`` of ``image_id`` in ``slot`` (0 or 1)."""
    return f"{image_key(image_id)}.{slot}.{index}"


def float_vector(values: np.ndarray) -> str:
    """A float32 vector in Elasticsearch's base64 form (big-endian float32)."""
    return base64.b64encode(np.asarray(values, ">f4").tobytes()).decode("ascii")


def decode_float_vector(vector: Any) -> np.ndarray:
    """A (G,) float32 vector as Elasticsearch returns it: the base64 big-endian form it was sent in,
    or a list of numbers."""
    if isinstance(vector, str):
        return np.frombuffer(base64.b64decode(vector), ">f4").astype(np.float32)
    return np.asarray(vector, np.float32)


def byte_vector(codes: np.ndarray) -> str:
    """An int8 vector in Elasticsearch's hexadecimal form for ``element_type: byte``."""
    return np.ascontiguousarray(codes, np.int8).tobytes().hex()


def pack(values: np.ndarray) -> str:
    """(N, C) float values as base64 little-endian float32."""
    return base64.b64encode(np.ascontiguousarray(values, "<f4").tobytes()).decode("ascii")


def unpack(text: str | None, columns: int) -> np.ndarray:
    """The (N, columns) float32 array :func:`pack` wrote (empty for None)."""
    raw = base64.b64decode(text or "")
    return np.frombuffer(raw, "<f4").astype(np.float32).reshape(-1, columns)


def pack_codes(descriptors: np.ndarray) -> str:
    """(N, D) unit descriptors as base64 of their (N, D) int8 codes."""
    return base64.b64encode(int8_codes(descriptors).tobytes()).decode("ascii")


def unpack_codes(text: str | None, dims: int) -> np.ndarray:
    """The (N, dims) int8 codes :func:`pack_codes` wrote."""
    return np.frombuffer(base64.b64decode(text or ""), np.int8).reshape(-1, dims).copy()


def image_document(record: ImageRecord, generation: int, slot: int, other_slot_keypoints: int,
                   thumbnails: bool = False) -> dict[str, Any]:
    """The ``_source`` of ``record``'s image document naming its live keypoints (``generation``,
    ``slot``) and how many keypoints of the previous version remain in the other slot; with
    ``thumbnails`` (the index's mapping has the fields), its thumbnail JPEG."""
    features = record.features
    width, height = features.image_size
    pca = _PCA_RE.search(features.model_id)
    doc: dict[str, Any] = {
        "image_id": record.image_id,
        "path": record.path,
        "metadata": dict(record.metadata),
        "width": int(width),
        "height": int(height),
        "num_keypoints": features.num_keypoints,
        "model_id": features.model_id,
        "pca_id": pca.group(1) if pca else None,
        "created_at": record.created_at,
        "keypoint_xy": pack(features.keypoints),
        "keypoint_scale": pack(features.scales),
        "keypoint_score": pack(features.scores),
        "keypoint_codes": pack_codes(features.descriptors),
        "generation": generation,
        "slot": slot,
        "other_slot_keypoints": other_slot_keypoints,
    }
    if len(features.global_desc):
        doc["global_vector"] = float_vector(features.global_desc)
    if record.thumbnail and thumbnails:
        # (an index created before thumbnails existed has no such field: "dynamic": "strict")
        doc["thumbnail"] = base64.b64encode(record.thumbnail).decode("ascii")
        doc["thumbnail_bytes"] = len(record.thumbnail)
    return doc
