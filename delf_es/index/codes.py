"""int8 codes of unit descriptors: how keypoint vectors are stored in Elasticsearch and cached.

A code is the descriptor scaled so that its largest |component| is 127, then rounded: cosine
ignores each vector's scale, so every row gets the whole int8 range (for unit 40-d PCA
descriptors about twice the resolution of a fixed x127).  Cosines between codes are within
~0.01 of the float ones (tests/unit/test_int8_codes.py).
"""

from __future__ import annotations

import numpy as np


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
