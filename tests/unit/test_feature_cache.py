"""Eval feature cache: folder names separate extraction settings; fewer keypoints read the
default cache's strongest prefix."""

from __future__ import annotations

import numpy as np

from delf_es.eval.feature_cache import FeatureCache, cache_name
from delf_es.settings import Settings
from delf_es.types import Features


def _features(n: int = 10) -> Features:
    rng = np.random.default_rng(0)
    return Features(
        image_id="img", model_id="m", image_size=(100, 80),
        keypoints=rng.uniform(0, 80, (n, 2)).astype(np.float32), scales=np.ones(n, np.float32),
        scores=np.sort(rng.uniform(0, 1, n)).astype(np.float32)[::-1].copy(),
        descriptors=rng.normal(size=(n, 4)).astype(np.float32), global_desc=np.ones(3, np.float32),
    )


def test_cache_name_changes_with_extraction_settings_only():
    assert cache_name("m", Settings()) == "m"  # existing default caches stay valid
    assert cache_name("m", Settings(shortlist_mode="global", ransac_model="affine")) == "m"
    three = cache_name("m", Settings(scales=(0.7071, 1.0, 1.4142)))
    assert three.startswith("m+x") and three != cache_name("m", Settings(max_image_size=512))
    assert cache_name("m", Settings(max_feature_num=300)) == "m+k300"


def test_fewer_keypoints_read_the_default_cache_prefix_without_extracting(tmp_path):
    full = _features(10)
    FeatureCache(tmp_path, "m", Settings()).get_or_extract("key", "img", lambda: full)

    def must_not_extract():
        raise AssertionError("extracted although the default cache holds the image")

    few = FeatureCache(tmp_path, "m", Settings(max_feature_num=4)).get_or_extract("key", "other", must_not_extract)
    assert few.image_id == "other" and few.num_keypoints == 4
    np.testing.assert_array_equal(few.keypoints, full.keypoints[:4])
    np.testing.assert_array_equal(few.descriptors, full.descriptors[:4])
    np.testing.assert_array_equal(few.global_desc, full.global_desc)


def test_other_scales_never_read_the_default_cache(tmp_path):
    FeatureCache(tmp_path, "m", Settings()).get_or_extract("key", "img", lambda: _features(10))
    other = FeatureCache(tmp_path, "m", Settings(scales=(1.0,))).get_or_extract("key", "img", lambda: _features(3))
    assert other.num_keypoints == 3


def test_cache_name_from_the_model_spec_is_the_name_settings_gave():
    """Names computed on main from Settings (before the ModelSpec): existing caches stay valid."""
    from delf_es.model.spec import ModelSpec

    spec = ModelSpec(scales=(0.7071, 1.0, 1.4142))
    assert cache_name("m", spec) == cache_name("m", Settings(scales=(0.7071, 1.0, 1.4142))) == "m+x4c6594ec"
    other = {"precision": "bfloat16", "max_image_size": 512, "max_feature_num": 300}
    assert cache_name("m", ModelSpec(**other)) == cache_name("m", Settings(**other)) == "m+x21f5b931+k300"
    assert cache_name("m", ModelSpec()) == "m"
