"""Degenerate images and geometry never produce matches (issue 15 item 11): flat keypoints are
dropped, and a model whose inliers lie on a line or in a spot is no model.  Thresholds are the
defaults chosen on the pairs and training photos (benchmarks/degenerate_geometry.py)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from delf_es.degenerate import drop_flat_keypoints, inlier_spread, keypoint_contrast
from delf_es.settings import Settings
from delf_es.types import Features
from delf_es.verify import estimate_model

pytestmark = pytest.mark.timeout(300)
DEFAULTS = Settings()


def test_spread_is_zero_on_a_line_and_side_over_sqrt12_on_a_filled_square():
    t = np.linspace(0, 500, 200)
    assert inlier_spread(np.stack([t, 2 * t + 3], 1)) < 1e-6
    assert inlier_spread(np.zeros((10, 2))) == 0.0 and inlier_spread(np.zeros((2, 2))) == 0.0
    grid = np.stack(np.meshgrid(np.linspace(0, 120, 40), np.linspace(0, 120, 40)), -1).reshape(-1, 2)
    assert inlier_spread(grid) == pytest.approx(120 / np.sqrt(12), rel=0.05)


def _homography_points(points: np.ndarray) -> np.ndarray:
    h = np.array([[1.1, 0.05, 20.0], [-0.03, 0.95, 10.0], [1e-5, 2e-5, 1.0]])
    projected = np.c_[points, np.ones(len(points))] @ h.T
    return projected[:, :2] / projected[:, 2:]


@pytest.mark.parametrize("layout", ["line", "spot"])
def test_inliers_on_a_line_or_in_a_spot_are_no_model(layout):
    rng = np.random.default_rng(0)
    if layout == "line":
        t = rng.uniform(0, 600, 300)
        a = np.stack([t, 0.5 * t + 40 + rng.normal(0, 1.0, 300)], 1)
    else:
        a = rng.uniform(200, 208, (300, 2))
    b = _homography_points(a) + rng.normal(0, 0.5, a.shape)
    args = ("homography", 12.0, 0.999, 2000, 0)
    _, loose = estimate_model(a, b, *args)
    assert loose.sum() > 100  # RANSAC alone accepts it
    model, mask = estimate_model(a, b, *args, min_spread_px=DEFAULTS.min_inlier_spread)
    assert DEFAULTS.min_inlier_spread > 0 and model is None and not mask.any()


def test_inliers_spread_over_the_image_are_kept():
    rng = np.random.default_rng(1)
    a = rng.uniform(0, 640, (300, 2))
    b = _homography_points(a) + rng.normal(0, 0.5, a.shape)
    model, mask = estimate_model(a, b, "homography", 12.0, 0.999, 2000, 0, min_spread_px=DEFAULTS.min_inlier_spread)
    assert model is not None and mask.sum() > 280


def _features(keypoints: np.ndarray, size=(512, 512)) -> Features:
    n = len(keypoints)
    d = np.eye(n, 8, dtype=np.float32) if n <= 8 else np.tile(np.eye(1, 8, dtype=np.float32), (n, 1))
    return Features(image_id="x", model_id="m", image_size=size, keypoints=keypoints.astype(np.float32),
                    scales=np.ones(n, np.float32), scores=np.ones(n, np.float32), descriptors=d,
                    global_desc=np.eye(1, 8, dtype=np.float32)[0])


def test_flat_keypoints_are_dropped_and_textured_ones_kept():
    pixels = np.full((512, 512, 3), 255, np.uint8)
    pixels[:, 256:] = (np.random.default_rng(0).random((512, 256, 3)) * 255).astype(np.uint8)
    keypoints = np.array([[100.0, 100.0], [400.0, 300.0], [128.0, 400.0], [300.0, 50.0]])
    contrast = keypoint_contrast(pixels, keypoints, np.full(4, 8.0))
    assert contrast[0] == 0 and contrast[2] == 0 and contrast[1] > 30 and contrast[3] > 30
    kept = drop_flat_keypoints(_features(keypoints), pixels, DEFAULTS.min_keypoint_contrast, 1024)
    assert DEFAULTS.min_keypoint_contrast > 0
    np.testing.assert_array_equal(kept.keypoints, keypoints[[1, 3]].astype(np.float32))
    assert kept.descriptors.shape == (2, 8) and kept.scores.shape == (2,)


def test_a_blank_png_matches_no_transparent_png_and_a_true_pair_still_matches(tmp_path):
    """End to end through the SDK with the default model (embedded index)."""
    from delf_es.samples import sample_pair
    from delf_es.sdk import DelfEs

    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((512, 512, 3), 255, np.uint8)).save(blank)
    transparent = tmp_path / "transparent.png"
    Image.fromarray(np.zeros((512, 512, 4), np.uint8), "RGBA").save(transparent)
    a, b = sample_pair()
    with DelfEs(Settings(data_dir=tmp_path / "index", es_url=None, redis_url=None)) as engine:
        assert engine.extract(np.asarray(Image.open(blank).convert("RGB")), "blank").num_keypoints == 0
        engine.bulk_add([str(transparent), str(a)], progress=False)
        assert engine.search_image(str(blank), min_inliers=0) == [] or all(
            h["inliers"] == 0 for h in engine.search_image(str(blank), min_inliers=0))
        hits = engine.search_image(str(b))
        assert hits and hits[0]["id"] == str(a.resolve()) and hits[0]["inliers"] >= 30, hits


def test_spread_threshold_is_the_larger_of_the_floor_and_the_fraction_of_the_short_side():
    from delf_es.degenerate import spread_threshold

    assert spread_threshold((2000, 1500), 4.0, 0.02) == pytest.approx(30.0)
    assert spread_threshold((300, 200), 8.0, 0.02) == 8.0  # 4 px from the fraction: the floor wins
    assert spread_threshold(None, 4.0, 0.02) == 4.0 and spread_threshold((2000, 1500), 4.0, 0.0) == 4.0


def test_keypoint_extent_is_the_span_from_the_origin():
    from delf_es.degenerate import keypoint_extent

    assert keypoint_extent(np.array([[10.2, 5.0], [630.4, 470.0], [3.0, 2.0]])) == (631, 470)
    assert keypoint_extent(np.zeros((0, 2))) is None


def _cluster(side_px: float, seed: int = 2):
    rng = np.random.default_rng(seed)
    a = 300 + rng.uniform(0, side_px, (200, 2))
    return a, _homography_points(a) + rng.normal(0, 0.3, a.shape)


def test_the_fraction_rule_scales_with_the_image():
    """A 60 px cluster (spread ~17 px) is degenerate in a 2000 x 1500 photo at 2% of the short side
    (30 px), a match in a 640 x 480 one (9.6 px), and left to the px floor when sizes are unknown."""
    a, b = _cluster(60.0)
    args = ("homography", 12.0, 0.999, 2000, 0, 4.0)
    big, _ = estimate_model(a, b, *args, min_spread_fraction=0.02, image_sizes=((2000, 1500), (2000, 1500)))
    small, mask = estimate_model(a, b, *args, min_spread_fraction=0.02, image_sizes=((640, 480), (640, 480)))
    unknown, _ = estimate_model(a, b, *args, min_spread_fraction=0.02)
    one_big, _ = estimate_model(a, b, *args, min_spread_fraction=0.02, image_sizes=((640, 480), (2000, 1500)))
    assert big is None and one_big is None
    assert small is not None and mask.sum() > 190 and unknown is not None


def test_verifier_uses_each_images_size_for_the_fraction_rule():
    from delf_es.verify import Verifier

    a, b = _cluster(60.0)
    rng = np.random.default_rng(3)
    descriptors = rng.normal(size=(len(a), 16)).astype(np.float32)
    descriptors /= np.linalg.norm(descriptors, axis=1, keepdims=True)

    def features(points, size):
        n = len(points)
        return Features(image_id="x", model_id="m", image_size=size, keypoints=points.astype(np.float32),
                        scales=np.ones(n, np.float32), scores=np.ones(n, np.float32), descriptors=descriptors,
                        global_desc=np.eye(1, 8, dtype=np.float32)[0])

    verifier = Verifier(max_distance=0.9, mutual=True, kind="homography", px_threshold=12.0, confidence=0.999,
                        max_iters=2000, seed=0, min_spread_px=4.0, min_spread_fraction=0.02)
    assert verifier(features(a, (640, 480)), features(b, (640, 480))).model is not None
    big = verifier(features(a, (2000, 1500)), features(b, (2000, 1500)))
    assert big.model is None and not big.inlier_mask.any()
    assert Verifier.from_settings(Settings(min_inlier_spread_fraction=0.02)).min_spread_fraction == 0.02
