"""Arguments of the wrong type or shape get typed errors from the SDK, never raw tracebacks,
and asynchronous adds without the workers' Redis say so plainly.

The SDK here runs on a FAKE extractor (fixed features, no model) and a real embedded index: the
checks happen before any extraction, so no model is needed to show them."""

from __future__ import annotations

import numpy as np
import pytest

from delf_es.errors import ConfigurationError, DelfEsError, InvalidRequest
from delf_es.items import MAX_DEPTH, check_id, depth, parse_item
from delf_es.sdk import DelfEs
from delf_es.settings import Settings
from delf_es.types import Features


def unit_rows(n: int, dim: int, seed: int) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


class FakeExtractor:
    """FAKE extractor: the same 30 keypoints for any image (records the calls)."""

    model_id = "fake@1"

    def __init__(self):
        self.calls = 0

    def extract(self, pixels, image_id="<query>"):
        self.calls += 1
        rng = np.random.default_rng(0)
        return Features(image_id=image_id, model_id=self.model_id, image_size=(64, 64),
                        keypoints=rng.uniform(0, 64, (30, 2)).astype(np.float32),
                        scales=np.ones(30, np.float32), scores=np.ones(30, np.float32),
                        descriptors=unit_rows(30, 8, 1), global_desc=unit_rows(1, 16, 2)[0])


def nested(levels: int) -> dict:
    value: dict = {"leaf": 1}
    for _ in range(levels):
        value = {"k": value}
    return value


@pytest.fixture()
def sdk(tmp_path):
    engine = DelfEs(Settings(data_dir=tmp_path, es_url=None, redis_url=None), extractor=FakeExtractor())
    yield engine
    engine.close()


@pytest.fixture()
def photo(tmp_path):
    from PIL import Image

    path = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    return str(path)


@pytest.mark.parametrize("arguments", [
    {"limit": "5"}, {"limit": 0}, {"limit": True}, {"limit": 2.5},
    {"min_inliers": "3"}, {"min_inliers": -1}, {"min_inliers": [3]},
    {"pre_filter": "metadata.city:paris"}, {"pre_filter": nested(5000)},
], ids=lambda a: "-".join(f"{k}={type(v).__name__}" for k, v in a.items()))
def test_search_arguments_of_the_wrong_type_are_invalid_requests(sdk, photo, arguments):
    with pytest.raises(InvalidRequest):
        sdk.search_image(photo, **arguments)
    assert sdk.extractor.calls == 0  # refused before any work


@pytest.mark.parametrize("image_id", [["a", "b"], 42, None, "", "x" * 513, "bad \ud800 surrogate"], ids=repr)
def test_ids_that_cannot_be_ids_are_invalid_requests(sdk, image_id):
    with pytest.raises(InvalidRequest):
        sdk.add_features(replace_id(FakeExtractor().extract(None), image_id))
    with pytest.raises(InvalidRequest):
        sdk.get_image(image_id)
    with pytest.raises(InvalidRequest):
        sdk.delete_image(image_id)


def replace_id(features: Features, image_id) -> Features:
    object.__setattr__(features, "image_id", image_id)  # bypass the dataclass: the id arrives as given
    return features


@pytest.mark.parametrize("metadata", [nested(5000), nested(MAX_DEPTH + 1), {"": 1}, {1: "a"}, ["a"], {"x": {1, 2}}],
                         ids=["5000-deep", "21-deep", "empty-key", "int-key", "list", "set"])
def test_metadata_that_is_not_a_json_object_is_an_invalid_request(sdk, metadata):
    with pytest.raises(InvalidRequest):
        sdk.add_features(FakeExtractor().extract(None), metadata=metadata)
    assert sdk.count() == 0


def test_metadata_nested_within_the_limit_is_stored(sdk):
    sdk.add_features(FakeExtractor().extract(None), metadata=nested(MAX_DEPTH - 1))
    assert sdk.count() == 1


def test_a_lone_surrogate_in_a_path_is_an_invalid_request_not_a_unicode_error(sdk):
    with pytest.raises(InvalidRequest, match="Unicode"):
        sdk.add_image("photo\udc80.jpg")


def test_async_add_without_redis_says_it_needs_the_workers_redis(sdk, photo):
    with pytest.raises(ConfigurationError, match="workers' Redis") as raised:
        sdk.add_image(photo, wait=False)
    assert "DELF_ES_REDIS_URL" in str(raised.value)
    assert isinstance(raised.value, DelfEsError)


def test_depth_counts_without_recursion():
    assert depth(1) == 0 and depth({}) == 1 and depth({"a": [1, {"b": 2}]}) == 3
    assert depth(nested(100_000)) == MAX_DEPTH + 1  # stops early, no RecursionError


def test_one_id_rule_for_the_sdk_and_the_workers():
    assert check_id("a" * 512) == "a" * 512
    with pytest.raises(InvalidRequest):
        check_id("a" * 513)
    assert parse_item(("p.jpg", {"a": 1})).metadata == {"a": 1}
    assert parse_item({"path": "p.jpg", "image_id": "x"}).image_id == "x"
    assert parse_item(3.5).invalid
