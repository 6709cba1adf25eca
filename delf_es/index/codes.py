"""int8 codes of unit descriptors: how keypoint vectors are stored in Elasticsearch and cached.

A code is the descriptor scaled so that its largest |component| is 127, then rounded: cosine
ignores each vector's scale, so every row gets the whole int8 range (for unit 40-d PCA
descriptors about twice the resolution of a fixed x127).  Cosines between codes are within
~0.01 of the float ones (tests/unit/test_int8_codes.py).
"""

from __future__ import annotations

import numpy as np

#: Tolerance on the L2 norm of stored descriptors: both backends require unit rows.
UNIT_NORM_TOLERANCE = 1e-3


def int8_codes(descriptors: np.ndarray) -> np.ndarray:
    """(N, D) float rows -> (N, D) int8 codes.  An all-zero row stays zero."""
    rows = np.asarray(descriptors, np.float32)
    peak = np.abs(rows).max(axis=1, keepdims=True) if rows.size else np.zeros((len(rows), 1), np.float32)
    scale = np.divide(127.0, peak, out=np.zeros_like(peak), where=peak > 0)
    return np.clip(np.rint(rows * scale), -127, 127).astype(np.int8)


def decode_codes(codes: np.ndarray) -> np.ndarray:
    """(N, D) int8 codes -> (N, D) float32 unit rows (zero rows stay zero)."""
    rows = np.asarray(codes, np.float32)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return np.divide(rows, norms, out=np.zeros_like(rows), where=norms > 0)


def non_unit_rows(descriptors: np.ndarray) -> str | None:
    """Why (N, D) ``descriptors`` are not unit rows, or None.  The Elasticsearch backend checks
    this client-side: cosine on int8 codes would accept any non-zero vector."""
    if not descriptors.size:
        return None
    norms = np.linalg.norm(descriptors, axis=1)
    bad = np.flatnonzero(~(np.abs(norms - 1.0) <= UNIT_NORM_TOLERANCE))
    if bad.size:
        return f"keypoint {bad[0]}: descriptors must be L2-normalised (unit length), norm {norms[bad[0]]:.4g}"
    return None
