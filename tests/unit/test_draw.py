"""Behaviour of the debugging figures (delf_es.draw)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from delf_es.draw import CAPTION_PX, GAP_PX, draw_keypoints, draw_matches, match_caption, side_by_side
from delf_es.errors import FeatureShapeError
from delf_es.types import Correspondences


def textured(height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def grey(height: int, width: int, value: int = 128) -> np.ndarray:
    return np.full((height, width, 3), value, dtype=np.uint8)


def correspondences(n: int, inliers: np.ndarray | None = None) -> Correspondences:
    matches = np.stack([np.arange(n), np.arange(n)[::-1]], axis=1).astype(np.int64)
    mask = np.ones(n, bool) if inliers is None else np.asarray(inliers, bool)
    return Correspondences(matches=matches, inlier_mask=mask, model=np.eye(3), model_kind="homography")


def keypoints(n: int, width: int, height: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform([10, 10], [width - 10, height - 10], size=(n, 2)).astype(np.float32)


def load(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_draw_matches_writes_a_png_of_the_expected_size(tmp_path):
    # A: 900 x 1200 (H x W) -> scaled to 600 x 800; B: 300 x 400 -> upscaled to 600 x 800.
    image_a, image_b = textured(900, 1200, 0), textured(300, 400, 1)
    kp_a, kp_b = keypoints(20, 1200, 900, 2), keypoints(20, 400, 300, 3)
    out = draw_matches(image_a, image_b, kp_a, kp_b, correspondences(20), tmp_path / "sub" / "pair.png")
    assert out == tmp_path / "sub" / "pair.png"
    with Image.open(out) as image:
        assert image.format == "PNG"
        assert image.size == (800 + GAP_PX + 800, 600 + CAPTION_PX)


def test_small_images_are_not_upscaled_beyond_the_taller_one(tmp_path):
    out = draw_matches(textured(200, 100, 0), textured(100, 300, 1), keypoints(3, 100, 200, 2),
                       keypoints(3, 300, 100, 3), correspondences(3), tmp_path / "pair.png")
    with Image.open(out) as image:
        assert image.size == (100 + GAP_PX + 600, 200 + CAPTION_PX)


def test_inlier_lines_change_the_pixels_of_the_plain_side_by_side(tmp_path):
    image_a, image_b = textured(480, 640, 0), textured(480, 640, 1)
    kp_a, kp_b = keypoints(40, 640, 480, 2), keypoints(40, 640, 480, 3)
    plain, _, _, _ = side_by_side(image_a, image_b)
    lines = load(draw_matches(image_a, image_b, kp_a, kp_b, correspondences(40), tmp_path / "lines.png"))
    none = load(draw_matches(image_a, image_b, kp_a, kp_b, correspondences(40, np.zeros(40)), tmp_path / "none.png"))
    height = plain.height
    # Outliers are not drawn: without inliers the image area is exactly the side-by-side.
    np.testing.assert_array_equal(none[:height], np.asarray(plain))
    changed = np.any(lines[:height] != np.asarray(plain), axis=2)
    assert changed.sum() > 40 * 100  # 40 lines, each hundreds of px long
    # Pixels change between the two images too (lines cross the gap), not only at keypoints.
    assert changed[:, 640:640 + GAP_PX].any()


def test_max_lines_caps_the_number_of_lines_drawn(tmp_path):
    image_a, image_b = grey(480, 640), grey(480, 640)
    kp_a, kp_b = keypoints(200, 640, 480, 2), keypoints(200, 640, 480, 3)
    plain = np.asarray(side_by_side(image_a, image_b)[0])
    changed = {}
    for cap in (0, 5, 200):
        drawn = load(draw_matches(image_a, image_b, kp_a, kp_b, correspondences(200), tmp_path / f"{cap}.png",
                                  max_lines=cap))
        changed[cap] = int(np.any(drawn[:480] != plain, axis=2).sum())
    assert changed[0] == 0
    assert 0 < changed[5] < changed[200] / 5


def test_keypoints_are_scaled_with_their_image(tmp_path):
    # A (1200 x 1200) is shown at 600 x 600: A's (1000, 400) is drawn at canvas (500, 200).
    # B (300 x 300) is upscaled to 600 x 600: B's (150, 250) is drawn at (600 + GAP + 300, 500).
    image_a, image_b = grey(1200, 1200), grey(300, 300)
    kp_a = np.array([[1000.0, 400.0]], np.float32)
    kp_b = np.array([[150.0, 250.0]], np.float32)
    corr = Correspondences(matches=np.array([[0, 0]]), inlier_mask=np.array([True]), model=None,
                           model_kind="homography")
    drawn = load(draw_matches(image_a, image_b, kp_a, kp_b, corr, tmp_path / "one.png"))
    background = np.array([128, 128, 128])
    for x, y in ((500, 200), (600 + GAP_PX + 300, 500)):
        window = drawn[y - 6:y + 7, x - 6:x + 7].reshape(-1, 3)
        assert np.any(np.any(window != background, axis=1)), (x, y)
    # ... and not at the unscaled positions (A's lies inside B's half).
    for x, y in ((1000, 400), (600 + GAP_PX + 150, 250)):
        window = drawn[y - 6:y + 7, x - 6:x + 7].reshape(-1, 3)
        assert not np.any(np.any(window != background, axis=1)), (x, y)


def test_drawing_without_matches_still_writes_the_figure(tmp_path):
    empty = Correspondences(matches=np.zeros((0, 2), np.int64), inlier_mask=np.zeros(0, bool), model=None,
                            model_kind="fundamental")
    out = draw_matches(grey(100, 120), grey(100, 80), np.zeros((0, 2)), np.zeros((0, 2)), empty,
                       tmp_path / "empty.png")
    with Image.open(out) as image:
        assert image.size == (120 + GAP_PX + 80, 100 + CAPTION_PX)
    caption_band = load(out)[100:]
    assert (caption_band < 128).any()  # the caption text is drawn


def test_caption_reports_inliers_matches_and_model():
    corr = correspondences(5, [True, False, True, True, False])
    assert match_caption(corr) == "3 inliers / 5 matches (homography)"


def test_match_index_beyond_the_keypoints_is_rejected(tmp_path):
    corr = Correspondences(matches=np.array([[0, 7]]), inlier_mask=np.array([True]), model=None,
                           model_kind="homography")
    with pytest.raises(FeatureShapeError):
        draw_matches(grey(50, 50), grey(50, 50), np.zeros((1, 2)), np.zeros((3, 2)), corr, tmp_path / "x.png")


def test_draw_matches_rejects_non_rgb_arrays(tmp_path):
    with pytest.raises(FeatureShapeError):
        draw_matches(np.zeros((50, 50, 3), np.float32), grey(50, 50), np.zeros((0, 2)), np.zeros((0, 2)),
                     correspondences(0), tmp_path / "x.png")


def test_draw_keypoints_colours_circles_by_score(tmp_path):
    image = grey(100, 200, 0)
    kp = np.array([[50.0, 50.0], [150.0, 50.0]], np.float32)
    out = draw_keypoints(image, kp, np.array([0.1, 5.0], np.float32), tmp_path / "kp.png")
    drawn = load(out)
    assert drawn.shape == (100, 200, 3)

    def dominant(x: int, y: int) -> np.ndarray:
        window = drawn[y - 5:y + 6, x - 5:x + 6].reshape(-1, 3).astype(int)
        coloured = window[window.sum(axis=1) > 0]
        return coloured.mean(axis=0)

    low, high = dominant(50, 50), dominant(150, 50)
    assert low[2] > low[0]  # lowest score: blue
    assert high[0] > high[2]  # highest score: red


def test_draw_keypoints_without_keypoints_saves_the_image_unchanged(tmp_path):
    image = textured(40, 60, 0)
    out = draw_keypoints(image, np.zeros((0, 2)), np.zeros(0), tmp_path / "kp.png")
    np.testing.assert_array_equal(load(out), image)
