"""Extraction on the real model: locations, determinism, empty results, serialisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from delf_es.errors import FeatureShapeError, WeightsNotFound
from delf_es.features import Extractor, cell_centres
from delf_es.model.receptive_field import ReceptiveField
from delf_es.settings import Settings
from delf_es.types import Features


def test_cell_centres_map_level_pixels_to_original_pixels():
    rf = ReceptiveField(size=99, jump=16, start=15.0)
    rows, cols = torch.tensor([0, 2]), torch.tensor([0, 3])
    # level 64x32 of a 128x64 image: factor 2; cell (0,0) centre 15 -> (15.5*2 - 0.5) = 30.5
    centres = cell_centres(rows, cols, rf, (64, 32), (128, 64))
    assert centres.tolist() == [[30.5, 30.5], [(15 + 48 + 0.5) * 2 - 0.5, (15 + 32 + 0.5) * 2 - 0.5]]


@pytest.mark.parametrize("height,width", [(333, 517), (1100, 260), (64, 64)])
def test_locations_lie_inside_the_original_image_at_every_scale(height, width):
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    extractor = Extractor(Settings(use_pca=False, backbone="efficientnet-lite0", max_feature_num=100000))
    raw = extractor.extract_raw(pixels)
    assert raw.image_size == (width, height)
    assert set(np.unique(raw.scales)) == set(np.float32(extractor.settings.scales))
    assert (raw.keypoints[:, 0] >= 0).all() and (raw.keypoints[:, 0] <= width - 1).all()
    assert (raw.keypoints[:, 1] >= 0).all() and (raw.keypoints[:, 1] <= height - 1).all()


def test_keypoints_follow_the_content_when_the_image_is_shifted(raw_extractor, photo):
    """The same object shifted by 64 px yields the same strongest keypoints shifted by 64 px."""
    canvas_a = np.full((480, 704, 3), 128, np.uint8)
    canvas_b = canvas_a.copy()
    canvas_a[40:440, 0:600] = photo
    canvas_b[40:440, 64:664] = photo
    a, b = raw_extractor.extract_raw(canvas_a), raw_extractor.extract_raw(canvas_b)
    sel = a.scales == 1.0
    ka, kb = a.keypoints[sel][:50], b.keypoints[b.scales == 1.0]
    # for each strong keypoint of A, B has one 64 px to the right with the same descriptor
    shifted = ka + np.array([64, 0], np.float32)
    distance = np.linalg.norm(shifted[:, None] - kb[None], axis=-1).min(axis=1)
    assert np.median(distance) < 1.0


def test_extraction_is_deterministic(extractor, photo):
    a = extractor.extract(photo, "coffee")
    b = extractor.extract(photo, "coffee")
    for name in ("keypoints", "scales", "scores", "descriptors", "global_desc"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


def test_extract_many_batches_same_size_levels_and_matches_extract(photo):
    """Three images, two of the same size (their levels share batches) and one other: each
    result is extract()'s up to float rounding of the batched kernels."""
    from skimage import data

    extractor = Extractor(Settings(extract_batch=4, scales=(0.5, 1.0), global_scales=(1.0,), max_feature_num=300))
    other = np.ascontiguousarray(data.astronaut())
    images = [(photo, "a"), (other, "b"), (np.ascontiguousarray(photo[:, ::-1]), "c")]
    calls = []
    forward = extractor.network.forward_levels
    extractor.network.forward_levels = lambda level, with_global: calls.append(len(level)) or forward(level, with_global)
    batched = extractor.extract_many(images)
    assert max(calls) == 2 and len(calls) < 6  # the two same-size images went through together
    extractor.network.forward_levels = forward
    for (pixels, image_id), got in zip(images, batched):
        one = extractor.extract(pixels, image_id)
        assert got.image_id == image_id and got.image_size == one.image_size
        same = {tuple(k) for k in got.keypoints.round(1).tolist()} & {tuple(k) for k in one.keypoints.round(1).tolist()}
        assert len(same) >= 0.98 * len(one.keypoints)
        assert float(got.global_desc @ one.global_desc) > 0.9999
        np.testing.assert_allclose(got.descriptors[:100], one.descriptors[:100], atol=1e-4)


def test_default_extraction_shapes_and_norms(extractor, photo):
    feats = extractor.extract(photo, "coffee")
    assert feats.image_size == (600, 400)
    assert 0 < feats.num_keypoints <= 1000
    assert feats.descriptors.shape == (feats.num_keypoints, 40)
    np.testing.assert_allclose(np.linalg.norm(feats.descriptors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(feats.global_desc), 1.0, atol=1e-5)
    assert (np.diff(feats.scores) <= 0).all(), "keypoints are sorted by score, best first"
    assert feats.model_id.startswith("efficientnet-lite2.") and "pca40-" in feats.model_id


def test_threshold_above_every_score_gives_an_empty_but_typed_result(photo):
    extractor = Extractor(Settings(score_threshold=1e9, scales=(1.0,), global_scales=(1.0,)))
    feats = extractor.extract(photo, "empty")
    assert feats.num_keypoints == 0
    assert feats.descriptors.shape == (0, 40)
    assert feats.global_desc.shape[0] > 0
    assert Features.from_bytes(feats.to_bytes()).num_keypoints == 0


def test_features_round_trip_through_bytes(extractor, photo, tmp_path):
    feats = extractor.extract(photo, "coffee")
    loaded = Features.load(feats.save(tmp_path / "f.npz"))
    assert loaded.image_id == "coffee" and loaded.model_id == feats.model_id and loaded.image_size == feats.image_size
    np.testing.assert_array_equal(loaded.descriptors, feats.descriptors)
    np.testing.assert_array_equal(loaded.keypoints, feats.keypoints)


def test_foreign_bytes_are_a_typed_error():
    with pytest.raises(FeatureShapeError):
        Features.from_bytes(b"not an npz file")


def test_mismatched_arrays_are_rejected():
    with pytest.raises(FeatureShapeError, match="descriptors"):
        Features("x", "m", (10, 10), np.zeros((3, 2), np.float32), np.zeros(3, np.float32),
                 np.zeros(3, np.float32), np.zeros((2, 40), np.float32))
    with pytest.raises(FeatureShapeError, match="keypoints"):
        Features("x", "m", (10, 10), np.zeros((3, 2), np.float64), np.zeros(3, np.float32),
                 np.zeros(3, np.float32), np.zeros((3, 40), np.float32))


def test_pixels_of_the_wrong_shape_are_rejected(raw_extractor):
    with pytest.raises(FeatureShapeError, match="pixels"):
        raw_extractor.extract_raw(np.zeros((32, 32), np.uint8))


def test_resnet50_runs_from_a_user_state_dict(tmp_path, photo):
    from torchvision.models import resnet50

    path = tmp_path / "resnet50-random.pth"
    torch.manual_seed(0)
    torch.save(resnet50(weights=None).state_dict(), path)
    extractor = Extractor(Settings(backbone="resnet50", backbone_weights=path, use_pca=False, scales=(1.0,), global_scales=(1.0,)))
    feats = extractor.extract(photo, "coffee")
    assert feats.descriptors.shape[1] == 1024 and feats.global_desc.shape == (2048,)
    assert extractor.meta.receptive_field.jump == 16


def test_resnet50_without_weights_is_a_clear_error(tmp_path):
    with pytest.raises(WeightsNotFound, match="resnet50"):
        Extractor(Settings(backbone="resnet50", use_pca=False))
    with pytest.raises(WeightsNotFound):
        Extractor(Settings(backbone="resnet50", backbone_weights=tmp_path / "missing.pth", use_pca=False))


def test_unknown_backbone_is_a_clear_error():
    from delf_es.errors import UnknownBackbone

    with pytest.raises(UnknownBackbone, match="choose from"):
        Extractor(Settings(backbone="vgg16"))
