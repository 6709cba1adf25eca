"""The checks both backends apply, written once: what a valid record and a valid query are.

A backend calls :func:`record_problem` for each record it is asked to write (a problem makes the
record a failed item of the :class:`~delf_es.index.base.BulkReport`, never an exception) and
:func:`check_k`, :func:`check_descriptors`, :func:`check_vector` on entry to its searches
(typed errors: :class:`~delf_es.errors.InvalidRequest`, :class:`~delf_es.errors.FeatureShapeError`).
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import numpy as np

from delf_es.errors import FeatureShapeError, InvalidRequest
from delf_es.index.base import ImageRecord
from delf_es.index.codes import UNIT_NORM_TOLERANCE, non_unit_rows
from delf_es.types import Features


def check_k(k: Any) -> int:
    """``k`` as an int >= 1 (a bool or a string is refused: ``k="5"`` is a caller's bug)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise InvalidRequest(f"k must be a positive integer, got {k!r}")
    return int(k)


def check_descriptors(descriptors: Any, dims: int | None = None) -> np.ndarray:
    """(Q, D) query descriptors as float32 (``dims``: the index's D, None = not yet known)."""
    if not isinstance(descriptors, np.ndarray) or descriptors.ndim != 2:
        got = str(descriptors.shape) if isinstance(descriptors, np.ndarray) else type(descriptors).__name__
        raise FeatureShapeError("descriptors", "(Q, D) array", got)
    if dims is not None and descriptors.shape[1] != dims:
        raise FeatureShapeError("descriptors", f"(Q, {dims})", str(descriptors.shape))
    return np.ascontiguousarray(descriptors, dtype=np.float32)


def check_vector(vector: Any, dims: int | None = None) -> np.ndarray:
    """A (G,) global query vector (``dims``: the index's G, None = not yet known)."""
    if not isinstance(vector, np.ndarray) or vector.ndim != 1:
        got = str(vector.shape) if isinstance(vector, np.ndarray) else type(vector).__name__
        raise FeatureShapeError("vector", "(G,) array", got)
    if dims is not None and len(vector) != dims:
        raise FeatureShapeError("vector", f"({dims},)", str(vector.shape))
    return vector


def record_problem(
    record: Any,
    *,
    model_id: str | None,
    local_dims: int | None,
    global_dims: int | None,
    index_name: str = "the index",
) -> str | None:
    """Why ``record`` cannot be written to an index of ``model_id`` with ``local_dims`` /
    ``global_dims`` (None: not bound yet, anything goes), or None if it can."""
    if not isinstance(record, ImageRecord):
        return f"expected an ImageRecord, got {type(record).__name__}"
    image_id, features = record.image_id, record.features
    if not isinstance(image_id, str) or not image_id:
        return f"image_id must be a non-empty string, got {image_id!r}"
    if not isinstance(features, Features):
        return f"features must be a Features, got {type(features).__name__}"
    if not isinstance(record.path, str) or not isinstance(record.created_at, str):
        return "path and created_at must be strings"
    if not isinstance(record.metadata, Mapping):
        return f"metadata must be a mapping, got {type(record.metadata).__name__}"
    try:
        json.dumps(dict(record.metadata), allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        return f"metadata is not JSON-serialisable: {exc}"
    if model_id is not None and features.model_id != model_id:
        return (f"model_id {features.model_id!r} differs from the model of {index_name} ({model_id!r}); "
                "features of different models must not be mixed in one index")
    if features.num_keypoints and local_dims is not None and features.descriptor_dim != local_dims:
        return f"descriptors: expected (N, {local_dims}), got {features.descriptors.shape} ({index_name})"
    global_size = len(features.global_desc)
    if global_size and global_dims is not None and global_size != global_dims:
        return f"global_desc: expected ({global_dims},), got {features.global_desc.shape} ({index_name})"
    problem = non_unit_rows(features.descriptors)  # both backends need unit rows (cosine / inner products)
    if problem:
        return problem
    if global_size and not abs(float(np.linalg.norm(features.global_desc)) - 1.0) <= UNIT_NORM_TOLERANCE:
        return "global_desc: rows must be L2-normalised (unit length)"
    return None
