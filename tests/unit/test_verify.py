"""Behaviour of descriptor matching and RANSAC verification (delf_es.verify)."""

from __future__ import annotations

import numpy as np
import pytest

from delf_es.errors import FeatureShapeError
from delf_es.settings import Settings
from delf_es.types import Features
from delf_es.verify import (
    MIN_CORRESPONDENCES,
    Verifier,
    estimate_model,
    match_descriptors,
    reprojection_errors,
    verify,
)

KINDS = ("homography", "fundamental", "affine", "homography-magsac")
TRUE_H = np.array([[0.92, 0.12, 35.0], [-0.08, 1.05, -18.0], [1.5e-4, -1.0e-4, 1.0]])
TRUE_AFFINE = np.array([[0.85, 0.2, 40.0], [-0.15, 1.1, -25.0], [0.0, 0.0, 1.0]])
W, H = 640, 480
RANSAC = dict(px_threshold=4.0, confidence=0.999, max_iters=2000, seed=0)


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def features(image_id: str, keypoints: np.ndarray, descriptors: np.ndarray) -> Features:
    n = len(keypoints)
    return Features(
        image_id=image_id,
        model_id="test",
        image_size=(W, H),
        keypoints=np.asarray(keypoints, np.float32).reshape(n, 2),
        scales=np.ones(n, np.float32),
        scores=np.ones(n, np.float32),
        descriptors=np.asarray(descriptors, np.float32).reshape(n, np.shape(descriptors)[-1]),
    )


def apply(model: np.ndarray, points: np.ndarray) -> np.ndarray:
    p = np.c_[points, np.ones(len(points))] @ model.T
    return p[:, :2] / p[:, 2:]


def synthetic_pairs(model: np.ndarray, n: int = 200, outlier_ratio: float = 0.5, noise_px: float = 0.5,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Points in A, their images under ``model`` in B (+noise) and a random B for outliers."""
    rng = np.random.default_rng(seed)
    pa = rng.uniform([0, 0], [W, H], size=(n, 2))
    pb = apply(model, pa) + rng.normal(0, noise_px, size=(n, 2))
    outlier = np.zeros(n, bool)
    outlier[rng.permutation(n)[: int(round(n * outlier_ratio))]] = True
    pb[outlier] = rng.uniform([0, 0], [W, H], size=(int(outlier.sum()), 2))
    return pa, pb, ~outlier


def two_view_pairs(n: int = 200, outlier_ratio: float = 0.5, seed: int = 0):
    """A non-planar 3-D scene seen by two cameras (rotation + translation)."""
    rng = np.random.default_rng(seed)
    k = np.array([[500.0, 0, W / 2], [0, 500.0, H / 2], [0, 0, 1]])
    xyz = np.c_[rng.uniform(-2, 2, n), rng.uniform(-1.5, 1.5, n), rng.uniform(4, 10, n)]
    angle = np.deg2rad(8)
    rot = np.array([[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]])
    cam_b = xyz @ rot.T + np.array([-0.8, 0.1, 0.2])

    def project(points):
        p = points @ k.T
        return p[:, :2] / p[:, 2:]

    pa = project(xyz)
    pb = project(cam_b) + rng.normal(0, 0.5, size=(n, 2))
    outlier = np.zeros(n, bool)
    outlier[rng.permutation(n)[: int(round(n * outlier_ratio))]] = True
    pb[outlier] = rng.uniform([0, 0], [W, H], size=(int(outlier.sum()), 2))
    return pa, pb, ~outlier


def hard_pairs(seed: int = 3):
    """Few inliers (25 %), so RANSAC's result depends on which samples it draws."""
    return synthetic_pairs(TRUE_H, n=200, outlier_ratio=0.75, noise_px=2.0, seed=seed)


# --- match_descriptors -------------------------------------------------------------


def test_matching_pairs_each_descriptor_with_its_nearest_neighbour():
    angles_a = np.deg2rad([0.0, 90.0, 180.0])
    angles_b = np.deg2rad([185.0, 5.0, 100.0])
    a = np.c_[np.cos(angles_a), np.sin(angles_a)].astype(np.float32)
    b = np.c_[np.cos(angles_b), np.sin(angles_b)].astype(np.float32)
    matches = match_descriptors(a, b, max_distance=0.5, mutual=True)
    assert matches.dtype == np.int64 and matches.shape == (3, 2)
    np.testing.assert_array_equal(matches, [[0, 1], [1, 2], [2, 0]])


def test_non_mutual_matching_lets_two_descriptors_share_a_neighbour():
    # a0 at 0 deg and a1 at 20 deg both have b0 (10 deg) nearest; b1 at 90 deg is far from both.
    angles_a = np.deg2rad([0.0, 20.0])
    angles_b = np.deg2rad([10.0, 90.0])
    a = np.c_[np.cos(angles_a), np.sin(angles_a)].astype(np.float32)
    b = np.c_[np.cos(angles_b), np.sin(angles_b)].astype(np.float32)
    np.testing.assert_array_equal(match_descriptors(a, b, 1.9, mutual=False), [[0, 0], [1, 0]])


def test_mutual_matching_keeps_only_the_reciprocal_pair():
    # b0 (10 deg) is 10 deg from a0 and 12 deg from a1 (22 deg): only a0 <-> b0 is mutual.
    angles_a = np.deg2rad([0.0, 22.0])
    angles_b = np.deg2rad([10.0, 90.0])
    a = np.c_[np.cos(angles_a), np.sin(angles_a)].astype(np.float32)
    b = np.c_[np.cos(angles_b), np.sin(angles_b)].astype(np.float32)
    np.testing.assert_array_equal(match_descriptors(a, b, 1.9, mutual=True), [[0, 0]])


def test_threshold_drops_pairs_at_or_beyond_max_distance():
    # Nearest neighbours at 30 deg (L2 = 2 sin 15 deg = 0.5176) and 60 deg (L2 = 1.0).
    a = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    b = np.array([[np.cos(np.pi / 6), np.sin(np.pi / 6)], [-np.sin(np.pi / 3), np.cos(np.pi / 3)]], np.float32)
    assert len(match_descriptors(a, b, 1.01, mutual=False)) == 2
    np.testing.assert_array_equal(match_descriptors(a, b, 0.9, mutual=False), [[0, 0]])
    np.testing.assert_array_equal(match_descriptors(a, b, 0.52, mutual=False), [[0, 0]])
    assert len(match_descriptors(a, b, 0.51, mutual=False)) == 0


def test_matching_uses_true_l2_distance_for_non_unit_descriptors():
    # By dot product b1 (long) would win; by L2 b0 is nearer to a0.
    a = np.array([[1.0, 0.0]], np.float32)
    b = np.array([[0.9, 0.1], [3.0, 0.0]], np.float32)
    np.testing.assert_array_equal(match_descriptors(a, b, 1.0, mutual=False), [[0, 0]])


def test_blocked_matching_equals_a_brute_force_reference(monkeypatch):
    import delf_es.verify as verify_module

    rng = np.random.default_rng(5)
    a, b = unit_rows(rng, 57, 8), unit_rows(rng, 43, 8)
    dist = np.linalg.norm(a[:, None] - b[None], axis=2)
    nn_ab, nn_ba = dist.argmin(1), dist.argmin(0)
    keep = (dist[np.arange(57), nn_ab] < 0.8) & (nn_ba[nn_ab] == np.arange(57))
    expected = np.c_[np.flatnonzero(keep), nn_ab[keep]]
    assert len(expected) > 3
    np.testing.assert_array_equal(match_descriptors(a, b, 0.8, mutual=True), expected)
    monkeypatch.setattr(verify_module, "_BLOCK_ELEMENTS", 43 * 5)  # 5 rows per block
    np.testing.assert_array_equal(match_descriptors(a, b, 0.8, mutual=True), expected)


@pytest.mark.parametrize("mutual", [True, False])
@pytest.mark.parametrize("n_a, n_b", [(0, 5), (5, 0), (0, 0)])
def test_empty_descriptors_on_either_side_give_no_matches(n_a, n_b, mutual):
    rng = np.random.default_rng(0)
    matches = match_descriptors(unit_rows(rng, n_a, 40), unit_rows(rng, n_b, 40), 0.9, mutual)
    assert matches.shape == (0, 2) and matches.dtype == np.int64


def test_matching_rejects_descriptors_of_different_dimensions():
    rng = np.random.default_rng(0)
    with pytest.raises(FeatureShapeError):
        match_descriptors(unit_rows(rng, 3, 40), unit_rows(rng, 3, 128), 0.9, True)


def test_matching_rejects_non_finite_descriptors():
    rng = np.random.default_rng(0)
    bad = unit_rows(rng, 3, 8)
    bad[1, 2] = np.nan
    with pytest.raises(FeatureShapeError):
        match_descriptors(unit_rows(rng, 3, 8), bad, 0.9, True)


# --- estimate_model ---------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_fewer_correspondences_than_the_minimal_sample_give_no_model(kind):
    k = MIN_CORRESPONDENCES[kind] - 1
    pa, pb, _ = synthetic_pairs(TRUE_H, n=k, outlier_ratio=0.0)
    model, mask = estimate_model(pa, pb, kind, **RANSAC)
    assert model is None
    assert mask.shape == (k,) and mask.dtype == bool and not mask.any()


@pytest.mark.parametrize("kind", KINDS)
def test_zero_correspondences_give_no_model_and_empty_mask(kind):
    model, mask = estimate_model(np.zeros((0, 2)), np.zeros((0, 2)), kind, **RANSAC)
    assert model is None and mask.shape == (0,) and mask.dtype == bool


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", ["identical", "collinear"])
def test_degenerate_points_do_not_crash(kind, layout):
    n = 20
    if layout == "identical":
        pa = np.full((n, 2), 7.0)
    else:
        pa = np.c_[np.arange(n, dtype=float), 2.0 * np.arange(n)]
    model, mask = estimate_model(pa, pa.copy(), kind, **RANSAC)
    assert mask.shape == (n,) and mask.dtype == bool
    if model is None:
        assert not mask.any()
    else:
        assert model.shape == (3, 3) and np.isfinite(model).all()


@pytest.mark.parametrize("kind", KINDS)
def test_non_finite_points_are_ignored_and_never_inliers(kind):
    # 85 of 100 rows are NaN/inf; the 15 finite exact rows must still give a model.
    model = TRUE_AFFINE if kind == "affine" else TRUE_H
    pa, pb, _ = synthetic_pairs(model, n=100, outlier_ratio=0.0, noise_px=0.1)
    pa[:50] = np.nan
    pb[50:85, 0] = np.inf
    found, mask = estimate_model(pa, pb, kind, **RANSAC)
    assert found is not None
    np.testing.assert_array_equal(mask, np.arange(100) >= 85)


@pytest.mark.parametrize("kind, model", [("homography", TRUE_H), ("affine", TRUE_AFFINE), ("homography-magsac", TRUE_H)])
def test_known_transform_is_recovered_despite_half_outliers(kind, model):
    pa, pb, truth = synthetic_pairs(model, n=200, outlier_ratio=0.5)
    found, mask = estimate_model(pa, pb, kind, **RANSAC)
    assert found is not None and found.shape == (3, 3)
    assert abs(int(mask.sum()) - int(truth.sum())) <= 5  # ~all 100 true inliers, ~no outliers
    assert (mask & ~truth).sum() <= 2
    assert reprojection_errors(found, pa[mask], pb[mask]).max() < RANSAC["px_threshold"]
    # The model itself is right, not just the mask: true inliers reproject exactly (noise 0.5 px).
    assert np.median(reprojection_errors(found, pa[truth], pb[truth])) < 1.0
    assert abs(found[2, 2] - 1.0) < 1e-9


def test_affine_model_has_an_affine_last_row():
    pa, pb, _ = synthetic_pairs(TRUE_AFFINE, n=50, outlier_ratio=0.2)
    found, _ = estimate_model(pa, pb, "affine", **RANSAC)
    np.testing.assert_allclose(found[2], [0.0, 0.0, 1.0])
    np.testing.assert_allclose(found[:2], TRUE_AFFINE[:2], rtol=0.02, atol=1.0)


def test_fundamental_matrix_of_a_two_view_scene_keeps_many_inliers():
    pa, pb, truth = two_view_pairs(n=200, outlier_ratio=0.5)
    found, mask = estimate_model(pa, pb, "fundamental", **RANSAC)
    assert found is not None and found.shape == (3, 3)
    assert (mask & truth).sum() >= 0.9 * truth.sum()
    assert (mask & ~truth).sum() <= 0.15 * (~truth).sum()
    # x_b^T F x_a ~ 0 on the true inliers (F maps A to B), normalised to unit norm.
    xa, xb = np.c_[pa, np.ones(len(pa))][truth], np.c_[pb, np.ones(len(pb))][truth]
    line = xa @ found.T
    distance_px = np.abs(np.einsum("ij,ij->i", xb, line)) / np.linalg.norm(line[:, :2], axis=1)
    assert np.median(distance_px) < 2.0
    assert abs(np.linalg.norm(found) - 1.0) < 1e-9


@pytest.mark.parametrize(
    "kind, limit", [("homography", 0.05), ("affine", 0.05), ("fundamental", 0.25), ("homography-magsac", 0.05)]
)
def test_unrelated_random_points_give_few_inliers(kind, limit):
    rng = np.random.default_rng(11)
    pa = rng.uniform([0, 0], [W, H], size=(200, 2))
    pb = rng.uniform([0, 0], [W, H], size=(200, 2))
    _, mask = estimate_model(pa, pb, kind, 12.0, 0.999, 2000, 0)
    assert mask.sum() <= limit * 200


@pytest.mark.parametrize("kind", KINDS)
def test_fixed_seed_gives_identical_inliers_twice(kind):
    pa, pb, _ = hard_pairs()
    first_model, first = estimate_model(pa, pb, kind, 4.0, 0.999, 30, 7)
    second_model, second = estimate_model(pa, pb, kind, 4.0, 0.999, 30, 7)
    np.testing.assert_array_equal(first, second)
    assert (first_model is None) == (second_model is None)
    if first_model is not None:
        np.testing.assert_array_equal(first_model, second_model)


@pytest.mark.parametrize("kind", KINDS)
def test_the_order_of_the_correspondences_does_not_change_the_inliers(kind):
    # Runtimes store near-tied keypoints in different orders; with few iterations on a hard
    # problem, RANSAC fed rows in a different order would draw different samples.
    pa, pb, _ = hard_pairs()
    _, mask = estimate_model(pa, pb, kind, 4.0, 0.999, 30, 7)
    for shuffle in range(4):
        order = np.random.default_rng(shuffle).permutation(len(pa))
        _, shuffled = estimate_model(pa[order], pb[order], kind, 4.0, 0.999, 30, 7)
        np.testing.assert_array_equal(shuffled, mask[order])


@pytest.mark.parametrize("kind", ["homography", "fundamental"])
def test_seed_reaches_pydegensac(kind):
    # With few iterations on a hard problem, different seeds draw different samples;
    # if the seed were dropped, pydegensac's clock seed would make these all equal.
    pa, pb, _ = hard_pairs()
    masks = {estimate_model(pa, pb, kind, 4.0, 0.999, 30, seed)[1].tobytes() for seed in range(6)}
    assert len(masks) > 1


def test_estimate_model_rejects_unknown_kind_and_bad_shapes():
    pa, pb, _ = synthetic_pairs(TRUE_H, n=10)
    with pytest.raises(ValueError):
        estimate_model(pa, pb, "similarity", **RANSAC)
    with pytest.raises(FeatureShapeError):
        estimate_model(pa, pb[:9], "homography", **RANSAC)
    with pytest.raises(FeatureShapeError):
        estimate_model(pa[:, :1], pb[:, :1], "homography", **RANSAC)


# --- reprojection_errors ------------------------------------------------------------


def test_reprojection_errors_are_pixel_distances_after_the_transform():
    shift = np.array([[1.0, 0, 10.0], [0, 1.0, 0.0], [0, 0, 1.0]])
    pa = np.array([[0.0, 0.0], [5.0, 5.0]])
    pb = np.array([[10.0, 0.0], [18.0, 9.0]])
    np.testing.assert_allclose(reprojection_errors(shift, pa, pb), [0.0, 5.0])


def test_reprojection_error_of_a_point_sent_to_infinity_is_inf():
    model = np.array([[1.0, 0, 0], [0, 1.0, 0], [1.0, 0, 0.0]])  # w = x
    errors = reprojection_errors(model, np.array([[0.0, 3.0], [2.0, 3.0]]), np.zeros((2, 2)))
    assert np.isinf(errors[0]) and np.isfinite(errors[1])


def test_reprojection_errors_of_no_points_is_empty():
    assert reprojection_errors(np.eye(3), np.zeros((0, 2)), np.zeros((0, 2))).shape == (0,)


# --- verify and Verifier ------------------------------------------------------------


def matching_features(kind_model: np.ndarray, n_true: int = 100, n_outlier: int = 100, n_extra: int = 50,
                      dim: int = 40, seed: int = 0) -> tuple[Features, Features, np.ndarray]:
    """Records where true matches share descriptors; outlier pairs share descriptors but
    sit at random places in B; extra keypoints have unrelated descriptors."""
    rng = np.random.default_rng(seed)
    pa, pb, truth = synthetic_pairs(kind_model, n=n_true + n_outlier, outlier_ratio=n_outlier / (n_true + n_outlier),
                                    seed=seed)
    shared = unit_rows(rng, len(pa), dim)
    extra_a = rng.uniform([0, 0], [W, H], size=(n_extra, 2))
    extra_b = rng.uniform([0, 0], [W, H], size=(n_extra, 2))
    order_b = rng.permutation(len(pb) + n_extra)  # B's keypoints in another order
    kp_b = np.r_[pb, extra_b][order_b]
    desc_b = np.r_[shared, unit_rows(rng, n_extra, dim)][order_b]
    a = features("a", np.r_[pa, extra_a], np.r_[shared, unit_rows(rng, n_extra, dim)])
    b = features("b", kp_b, desc_b)
    return a, b, truth


def test_verify_recovers_the_homography_between_feature_records():
    a, b, truth = matching_features(TRUE_H)
    settings = Settings(ransac_px=4.0, ransac_model="homography")
    corr = verify(a, b, settings)
    assert corr.matches.shape == (200, 2) and corr.model_kind == "homography"
    assert abs(corr.num_inliers - int(truth.sum())) <= 5
    inl = corr.matches[corr.inlier_mask]
    assert (inl[:, 0] < 200).all()  # only keypoints with a shared descriptor match
    assert truth[inl[:, 0]].mean() > 0.97
    errors = reprojection_errors(corr.model, a.keypoints[inl[:, 0]], b.keypoints[inl[:, 1]])
    assert errors.max() < 4.0


def test_verify_of_unrelated_images_gives_few_inliers():
    rng = np.random.default_rng(2)
    a = features("a", rng.uniform([0, 0], [W, H], (300, 2)), unit_rows(rng, 300, 40))
    b = features("b", rng.uniform([0, 0], [W, H], (300, 2)), unit_rows(rng, 300, 40))
    settings = Settings(match_max_distance=1.5)  # loose enough that random descriptors match
    corr = verify(a, b, settings)
    assert len(corr.matches) >= 50
    assert corr.num_inliers <= 0.1 * len(corr.matches)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("empty_side", ["a", "b", "both"])
def test_verify_with_an_image_without_keypoints_gives_zero_inliers_and_no_model(kind, empty_side):
    rng = np.random.default_rng(0)
    full = features("full", rng.uniform(0, 400, (30, 2)), unit_rows(rng, 30, 40))
    empty = features("empty", np.zeros((0, 2)), np.zeros((0, 40)))
    a = empty if empty_side in ("a", "both") else full
    b = empty if empty_side in ("b", "both") else full
    corr = verify(a, b, Settings(ransac_model=kind))
    assert corr.matches.shape == (0, 2) and corr.inlier_mask.shape == (0,)
    assert corr.num_inliers == 0 and corr.model is None and corr.model_kind == kind


@pytest.mark.parametrize("kind", KINDS)
def test_function_and_verifier_module_agree(kind):
    model = TRUE_AFFINE if kind == "affine" else TRUE_H
    a, b, _ = matching_features(model, seed=4)
    settings = Settings(ransac_model=kind, ransac_px=4.0, ransac_max_iters=50, ransac_seed=3, match_mutual=False)
    by_function = verify(a, b, settings)
    by_module = Verifier.from_settings(settings)(a, b)
    np.testing.assert_array_equal(by_function.matches, by_module.matches)
    np.testing.assert_array_equal(by_function.inlier_mask, by_module.inlier_mask)
    np.testing.assert_array_equal(by_function.model, by_module.model)
    assert by_function.num_inliers > 50


def test_verifier_takes_every_parameter_from_settings():
    settings = Settings(match_max_distance=0.7, match_mutual=False, ransac_model="affine", ransac_px=3.5,
                        ransac_confidence=0.99, ransac_max_iters=123, ransac_seed=9, min_inlier_spread=7.5,
                        min_inlier_spread_fraction=0.03)
    assert Verifier.from_settings(settings) == Verifier(
        max_distance=0.7, mutual=False, kind="affine", px_threshold=3.5, confidence=0.99, max_iters=123, seed=9,
        min_spread_px=7.5, min_spread_fraction=0.03,
    )


def test_verifier_rejects_an_unknown_model_kind():
    with pytest.raises(ValueError):
        Verifier(max_distance=0.9, mutual=True, kind="projective", px_threshold=4, confidence=0.99,
                 max_iters=10, seed=0)


# ---- scale-consistent inliers ---------------------------------------------------------------


def test_local_zoom_of_a_homography_is_the_root_of_its_jacobian_determinant():
    from delf_es.verify import local_log2_zoom

    h = np.array([[1.2, 0.1, 5.0], [-0.2, 0.9, 3.0], [1e-4, 2e-4, 1.0]])
    points = np.array([[10.0, 20.0], [300.0, 100.0]])

    def apply(p):
        q = h @ np.array([p[0], p[1], 1.0])
        return q[:2] / q[2]

    for point, zoom in zip(points, local_log2_zoom(h, "homography", points)):
        eps = 1e-4
        jacobian = np.stack([(apply(point + [eps, 0]) - apply(point - [eps, 0])) / (2 * eps),
                             (apply(point + [0, eps]) - apply(point - [0, eps])) / (2 * eps)], axis=1)
        assert zoom == pytest.approx(0.5 * np.log2(abs(np.linalg.det(jacobian))), abs=1e-6)
    assert local_log2_zoom(h, "fundamental", points) is None


def test_scale_consistent_keeps_inliers_whose_scale_ratio_matches_the_zoom():
    from delf_es.verify import scale_consistent

    zoom2 = np.diag([2.0, 2.0, 1.0])  # B shows A twice as large: s_a / s_b should be 2
    points = np.zeros((4, 2))
    scales_a = np.array([1.0, 1.0, 0.5, 2.0])
    scales_b = np.array([0.5, 1.0, 0.354, 1.0])  # ratios 2, 1, 1.412, 2
    inliers = np.array([True, True, True, False])
    kept = scale_consistent(zoom2, "homography", points, scales_a, scales_b, inliers, tolerance=0.25)
    np.testing.assert_array_equal(kept, [True, False, False, False])
    kept = scale_consistent(zoom2, "homography", points, scales_a, scales_b, inliers, tolerance=0.6)
    np.testing.assert_array_equal(kept, [True, False, True, False])  # one level off (0.5) passes 0.6
    # no model: nothing survives; the fundamental matrix uses the inliers' median ratio
    assert not scale_consistent(None, "homography", points, scales_a, scales_b, inliers, 0.5).any()
    fundamental = scale_consistent(np.eye(3), "fundamental", points, np.array([1.0, 1.0, 1.0, 1.0]),
                                   np.array([1.0, 1.0, 0.25, 1.0]), np.ones(4, bool), 0.5)
    np.testing.assert_array_equal(fundamental, [True, True, False, True])


def test_scale_consistent_refuses_a_bad_tolerance_and_mismatched_scales():
    from delf_es.verify import scale_consistent

    with pytest.raises(ValueError):
        scale_consistent(np.eye(3), "homography", np.zeros((1, 2)), np.ones(1), np.ones(1), np.ones(1, bool), 0.0)
    with pytest.raises(FeatureShapeError):
        scale_consistent(np.eye(3), "homography", np.zeros((2, 2)), np.ones(3), np.ones(2), np.ones(2, bool), 0.5)


def test_verifier_with_the_scale_rule_drops_matches_from_the_wrong_level():
    rng = np.random.default_rng(3)
    n = 80
    kp = rng.uniform(0, 500, (n, 2)).astype(np.float32)
    desc = rng.standard_normal((n, 40)).astype(np.float32)
    desc /= np.linalg.norm(desc, axis=1, keepdims=True)
    scales_b = np.ones(n, np.float32)
    scales_b[:30] = 4.0  # 30 keypoints claim a level two octaves away from the rest
    a = Features("a", "m", (512, 512), kp, np.ones(n, np.float32), np.ones(n, np.float32), desc)
    b = Features("b", "m", (512, 512), kp + 3.0, scales_b, np.ones(n, np.float32), desc)
    base = dict(max_distance=0.9, mutual=True, kind="homography", px_threshold=4.0, confidence=0.999, max_iters=2000, seed=0)
    assert Verifier(**base)(a, b).num_inliers == n
    assert Verifier(**base, scale_tolerance=0.5)(a, b).num_inliers == n - 30
    with pytest.raises(ValueError):
        Verifier(**base, scale_tolerance=-1.0)
