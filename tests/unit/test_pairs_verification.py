"""Real photos: HPatches viewpoint pairs verify with many accurate inliers, unrelated pairs do not.

Numbers (default model, 7 scales, 1000 keypoints, PCA 40, homography RANSAC 12 px) are
recorded by benchmarks/verification_pairs.py; these tests hold the floor under them.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import shared
from delf_es.imageio import load_image
from delf_es.settings import Settings
from delf_es.verify import reprojection_errors, verify

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dogman(extractor):
    folder = shared("pairs/hpatches_v_dogman")
    settings = Settings()
    feats = {k: extractor.extract(load_image(folder / f"{k}.ppm", settings).pixels, f"dogman/{k}") for k in range(1, 7)}
    homographies = {k: np.loadtxt(folder / f"H_1_{k}") for k in range(2, 7)}
    return feats, homographies


@pytest.mark.parametrize("k", [2, 3, 4, 5, 6])
def test_hpatches_viewpoint_pair_verifies_with_accurate_inliers(dogman, k):
    feats, homographies = dogman
    result = verify(feats[1], feats[k], Settings())
    assert result.num_inliers >= 40, f"1-{k}: only {result.num_inliers} inliers"
    inliers = result.matches[result.inlier_mask]
    errors = reprojection_errors(homographies[k], feats[1].keypoints[inliers[:, 0]], feats[k].keypoints[inliers[:, 1]])
    # stride-16 features: their centres are quantised to 16 px at scale 1
    assert np.median(errors) < 12.0, f"1-{k}: median reprojection error {np.median(errors):.1f} px"


def test_unrelated_photos_get_few_inliers(dogman, extractor):
    feats, _ = dogman
    settings = Settings()
    others = [shared("pairs/evd/1/adam.png"), shared("paris250/db/eiffel_tower/paris_eiffel_000000.jpg")]
    for path in others:
        other = extractor.extract(load_image(path, settings).pixels, str(path))
        result = verify(feats[1], other, settings)
        true_pair = verify(feats[1], feats[2], settings)
        assert result.num_inliers <= 15, f"{path.name}: {result.num_inliers} inliers"
        assert result.num_inliers * 5 < true_pair.num_inliers
