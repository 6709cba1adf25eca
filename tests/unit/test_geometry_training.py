"""Heads learned from known geometry (delf_es/train/geometry*.py) and the eval-side map cache.

The training tests use a synthetic pair cache written by hand (no backbone): 'textured' cells
(3x the norm) are copied, with noise, to where a known shift sends them; 'flat' cells are noise
in both views.  So matchability is learnable from the map, and the targets are known."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from delf_es.pca import PcaArtifact, PcaProvenance, fit_pca
from delf_es.train.geometry import (PairCache, WarpConfig, cell_centres_px, correspondence_targets, render_pair,
                                    restrict_to_photos, warp_points)
from delf_es.train.geometry_stage import (DescriptorConfig, MatchabilityConfig, correspondences, matchability_loss,
                                          train_descriptor, train_matchability)

CELLS, CHANNELS, START, JUMP = 8, 32, 7.5, 16.0


def synthetic_cache(folder: Path, n: int = 12, seed: int = 0) -> tuple[PairCache, PcaArtifact]:
    rng = np.random.default_rng(seed)
    maps_a = np.zeros((n, CHANNELS, CELLS, CELLS), np.float16)
    maps_b = np.zeros_like(maps_a)
    homographies = []
    centres = cell_centres_px(CELLS, START, JUMP)
    for i in range(n):
        h = np.array([[1, 0, JUMP * rng.integers(-2, 3)], [0, 1, JUMP * rng.integers(-2, 3)], [0, 0, 1]], float)
        a = rng.standard_normal((CELLS * CELLS, CHANNELS)).astype(np.float32)
        textured = rng.random(CELLS * CELLS) < 0.5
        a[textured] *= 3.0
        b = rng.standard_normal((CELLS * CELLS, CHANNELS)).astype(np.float32)
        grid = np.round((warp_points(h, centres) - START) / JUMP).astype(int)
        inside = (grid >= 0).all(1) & (grid < CELLS).all(1)
        for j in np.flatnonzero(inside & textured):
            b[grid[j, 1] * CELLS + grid[j, 0]] = a[j] + 0.3 * rng.standard_normal(CHANNELS)
        maps_a[i] = a.T.reshape(CHANNELS, CELLS, CELLS)
        maps_b[i] = b.T.reshape(CHANNELS, CELLS, CELLS)
        homographies.append(h.tolist())
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "maps-a.npy", maps_a)
    np.save(folder / "maps-b.npy", maps_b)
    (folder / "pairs.json").write_text(json.dumps({
        "config": {"size": CELLS * 16}, "local_dim": CHANNELS, "rf_start": START, "rf_jump": JUMP,
        "homographies": homographies, "photos": list(range(n)), "split": ["train"] * (n - 3) + ["val"] * 3,
        "photo_paths": [f"/photos/p{i}.jpg" for i in range(n)]}))
    flat = np.concatenate([m.reshape(CHANNELS, -1).T for m in maps_a]).astype(np.float32)
    flat /= np.linalg.norm(flat, axis=1, keepdims=True)
    pca = fit_pca(flat, 8, PcaProvenance("synthetic", "layer", "norm", "synthetic maps", n, len(flat)))
    return PairCache.load(folder), pca


def test_render_pair_returns_the_homography_that_maps_view_a_onto_view_b():
    import cv2

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:300, 0:400]
    photo = np.stack([(xx * 7 + yy * 3) % 256, (np.sin(xx / 9.0) * 120 + 128), (yy * 5) % 256], -1).astype(np.uint8)
    config = WarpConfig(size=160)
    view_a, view_b, h = render_pair(photo, config, rng)
    assert view_a.shape == view_b.shape == (160, 160, 3)
    moved = cv2.warpPerspective(view_a, h, (160, 160))
    valid = (moved.sum(2) > 0) & (view_b.sum(2) > 0)
    assert valid.mean() > 0.2
    correlation = np.corrcoef(moved.mean(2)[valid], view_b.mean(2)[valid])[0, 1]
    assert correlation > 0.8


def test_random_homography_stays_within_the_configured_rotation_and_scale():
    from delf_es.train.geometry import random_homography

    config = WarpConfig(size=320, perspective=0.0)
    rng = np.random.default_rng(5)
    for _ in range(50):
        h = random_homography(320, config, rng)
        linear = h[:2, :2]
        scale = np.sqrt(abs(np.linalg.det(linear)))
        angle = np.degrees(np.arctan2(linear[1, 0], linear[0, 0]))
        assert config.scale_range[0] - 1e-9 <= scale <= config.scale_range[1] + 1e-9
        assert abs(angle) <= config.max_rotation_deg + 1e-6


def test_correspondences_follow_a_one_cell_shift(tmp_path):
    cache, _ = synthetic_cache(tmp_path / "pairs")
    index = next(i for i, h in enumerate(cache.homographies) if h[0, 2] == JUMP and h[1, 2] == 0)
    truth = correspondences(cache, index)
    # cell (row 0, col 0) lands on (row 0, col 1); the last column lands outside
    assert truth.target_ab[0] == 1
    assert truth.target_ab[CELLS - 1] == -1
    assert truth.target_ba[1] == 0
    target, distance = correspondence_targets(cache, index)
    assert target[0] == 1 and distance[0] == pytest.approx(0.0)


def test_ranking_and_bce_losses_prefer_scores_that_order_matchable_cells_first():
    targets = torch.tensor([[1.0, 0.0, float("nan"), 1.0, 0.0]])
    good = torch.tensor([[5.0, 0.1, 3.0, 4.0, 0.2]])
    bad = torch.tensor([[0.1, 5.0, 3.0, 0.2, 4.0]])
    for objective in ("bce", "rank"):
        assert matchability_loss(good, targets, objective) < matchability_loss(bad, targets, objective)


@pytest.mark.parametrize("objective", ["bce", "rank"])
def test_matchability_head_learns_to_select_matchable_cells(tmp_path, objective):
    cache, pca = synthetic_cache(tmp_path / "pairs")
    config = MatchabilityConfig(objective=objective, epochs=20, batch_pairs=4, hidden=16, lr=1e-2)
    summary = train_matchability(cache, pca, config, tmp_path / "run", {"command": "test"})
    assert summary["history"][-1]["train_loss"] < summary["history"][0]["train_loss"]
    assert summary["val"]["head"]["selected_matchable_fraction"] >= 0.8
    head = torch.load(tmp_path / "run" / "attention.pt", weights_only=True)
    assert head["format"] == "delf-es-attention/1" and head["meta"]["objective"] == objective


def test_learned_descriptor_ships_as_a_projection_artifact(tmp_path):
    cache, pca = synthetic_cache(tmp_path / "pairs")
    summary = train_descriptor(cache, pca, DescriptorConfig(epochs=3, batch_pairs=4, anchors=16), tmp_path / "proj.npz")
    artifact = PcaArtifact.load(tmp_path / "proj.npz")
    assert artifact.id.startswith("proj8-") and summary["artifact"] == artifact.id
    assert artifact.provenance.method == "proj" and pca.id.startswith("pca8-")
    unit = np.random.default_rng(0).standard_normal((5, CHANNELS)).astype(np.float32)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    reduced = artifact.transform(unit)
    np.testing.assert_allclose(np.linalg.norm(reduced, axis=1), 1.0, rtol=1e-5)
    assert json.loads((tmp_path / "proj.train.json").read_text())["initialised_from"] == pca.id


def test_restrict_to_photos_marks_other_photos_pairs_unused(tmp_path):
    cache, _ = synthetic_cache(tmp_path / "pairs")
    kept = restrict_to_photos(cache, {"p0.jpg", "p11.jpg"})
    assert list(kept.split[[0, 11]]) == ["train", "val"]
    assert (kept.split[1:11] == "unused").all() and kept.num_photos == 2


def test_map_cached_extractor_matches_extraction_up_to_float16(tmp_path):
    from delf_es.eval.map_cache import MapCachedExtractor
    from delf_es.features import Extractor
    from delf_es.settings import Settings

    rng = np.random.default_rng(0)
    pixels = np.clip(rng.normal(128, 60, (96, 128, 3)), 0, 255).astype(np.uint8)
    settings = Settings(torch_threads=1, scales=(0.7071, 1.0), max_feature_num=200)
    direct = Extractor(settings).extract(pixels, "x")
    cached = MapCachedExtractor(settings, tmp_path / "maps")
    first = cached.extract(pixels, "x")
    again = cached.extract(pixels, "x")
    assert (cached.store.misses, cached.store.hits) == (1, 1)
    assert first.model_id == direct.model_id
    np.testing.assert_allclose(first.keypoints, again.keypoints)
    np.testing.assert_allclose(direct.global_desc, again.global_desc, atol=1e-3)
    same = {tuple(k) + (s,) for k, s in zip(np.round(direct.keypoints, 1), direct.scales)}
    other = {tuple(k) + (s,) for k, s in zip(np.round(again.keypoints, 1), again.scales)}
    assert len(same & other) >= 0.95 * len(same)
