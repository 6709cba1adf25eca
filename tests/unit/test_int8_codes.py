"""int8 codes of keypoint descriptors (the Elasticsearch keypoint field stores these)."""

import numpy as np

from delf_es.index.codes import int8_codes, non_unit_rows
from delf_es.index.es.codec import byte_vector as _byte_vector


def unit_rows(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_codes_use_the_whole_int8_range_and_keep_cosines():
    rows = unit_rows(2000, 40)
    codes = int8_codes(rows)
    assert codes.dtype == np.int8 and codes.shape == rows.shape
    assert np.all(np.abs(codes).max(axis=1) == 127)
    decoded = codes.astype(np.float32)
    decoded /= np.linalg.norm(decoded, axis=1, keepdims=True)
    assert np.min(np.sum(decoded * rows, axis=1)) > 0.999
    # cosines between different descriptors move by little more than a rounding step
    exact = rows[:200] @ rows[200:400].T
    quantised = decoded[:200] @ decoded[200:400].T
    assert np.max(np.abs(exact - quantised)) < 0.02


def test_zero_rows_stay_zero_and_scale_does_not_matter():
    rows = unit_rows(3, 8)
    rows[1] = 0.0
    codes = int8_codes(rows)
    assert not codes[1].any()
    np.testing.assert_array_equal(int8_codes(rows * 5.0), codes)


def test_hex_form_is_one_byte_per_dimension_twos_complement():
    assert _byte_vector(np.array([0, 1, -1, 127, -127], np.int8)) == "0001ff7f81"


def test_non_unit_rows_names_the_first_bad_keypoint():
    rows = unit_rows(5, 8)
    assert non_unit_rows(rows) is None
    assert non_unit_rows(np.zeros((0, 8), np.float32)) is None
    rows[3] *= 2.0
    assert non_unit_rows(rows).startswith("keypoint 3:")
    rows[1] = np.nan
    assert non_unit_rows(rows).startswith("keypoint 1:")
