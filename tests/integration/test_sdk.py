"""The SDK end to end on real photos, against both backends (embedded and Elasticsearch + Redis).

Fast model settings (EfficientNet-Lite0, 3 scales) keep the suite quick; the pipeline is
the same as the default's.
"""

from __future__ import annotations

import io
import socket
import time
import uuid

import numpy as np
import pytest
from PIL import Image

from conftest import shared
from delf_es.cache import RedisLocationCache, image_revisions, revision_key
from delf_es.errors import ImageNotFound, IndexUnavailable, InvalidImage
from delf_es.eval.run import drop_indices
from delf_es.sdk import DelfEs
from delf_es.settings import Settings

FAST = dict(backbone="efficientnet-lite0", scales=(0.7071, 1.0, 1.4142), global_scales=(1.0,))
PHOTOS = [
    "paris250/db/eiffel_tower/paris_eiffel_000000.jpg",
    "paris250/db/louvre/paris_louvre_000004.jpg",
    "paris250/db/defense/paris_defense_000000.jpg",
    "paris250/db/invalides/paris_invalides_000002.jpg",
    "paris250/db/moulinrouge/paris_moulinrouge_000003.jpg",
]
KEY = PHOTOS[1]


@pytest.fixture(scope="module")
def extractor():
    from delf_es.features import Extractor

    return Extractor(Settings(**FAST))


@pytest.fixture(params=["embedded", pytest.param("elasticsearch", marks=pytest.mark.integration)])
def engine(request, tmp_path, extractor):
    if request.param == "embedded":
        settings = Settings(**FAST, data_dir=tmp_path)
        sdk = DelfEs(settings, extractor=extractor)
        yield sdk
        sdk.close()
        return
    services = request.getfixturevalue("services")
    alias = f"test-sdk-{uuid.uuid4().hex[:8]}"
    settings = Settings(**FAST, es_url=services.es_url, redis_url=services.redis_url, index_alias=alias)
    sdk = DelfEs(settings, extractor=extractor)
    yield sdk
    sdk.close()
    from elasticsearch import Elasticsearch

    client = Elasticsearch(services.es_url)
    drop_indices(client, f"{alias}*")
    client.close()


@pytest.fixture()
def indexed(engine):
    for i, path in enumerate(PHOTOS):
        engine.add_image(str(shared(path)), metadata={"landmark": path.split("/")[2], "rank": i})
    engine.backend.refresh()
    return engine


def _jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def test_added_photo_is_found_first_with_the_image_match_keys(indexed):
    hits = indexed.search_image(str(shared(KEY)))
    assert hits, "no hit for an indexed photo"
    top = hits[0]
    assert top["id"] == str(shared(KEY)) and top["path"] == str(shared(KEY))
    assert {"id", "path", "score", "dist", "metadata", "inliers"} <= set(top)
    assert top["metadata"] == {"landmark": "louvre", "rank": 1}
    assert top["inliers"] >= 50 and 0.0 <= top["dist"] < 1.0


@pytest.mark.parametrize("variant", ["crop", "rotate15", "half_size", "jpeg_q30"])
def test_modified_copies_find_their_original_first(indexed, variant):
    image = Image.open(shared(KEY)).convert("RGB")
    width, height = image.size
    modified = {
        "crop": lambda: image.crop((width // 4, height // 5, width * 3 // 4, height * 4 // 5)),
        "rotate15": lambda: image.rotate(15, resample=Image.BICUBIC, expand=True),
        "half_size": lambda: image.resize((width // 2, height // 2), Image.LANCZOS),
        "jpeg_q30": lambda: image,
    }[variant]()
    hits = indexed.search_image(_jpeg_bytes(modified, 30 if variant == "jpeg_q30" else 92), bytestream=True)
    assert hits and hits[0]["id"] == str(shared(KEY)), [(h["id"], h["inliers"]) for h in hits]


def test_global_shortlist_with_descriptor_matching_finds_a_crop_first(indexed):
    """correspondences='matching': no keypoint kNN; codes come from the index, then the cache."""
    indexed.settings = indexed.settings.model_copy(update={"shortlist_mode": "global", "correspondences": "matching"})
    image = Image.open(shared(KEY)).convert("RGB")
    width, height = image.size
    crop = _jpeg_bytes(image.crop((width // 4, height // 5, width * 3 // 4, height * 4 // 5)))
    for _ in range(2):  # cold, then cached codes
        hits = indexed.search_image(crop, bytestream=True)
        assert hits[0]["id"] == str(shared(KEY)) and hits[0]["inliers"] >= 20, [(h["id"], h["inliers"]) for h in hits]
        assert all(h["inliers"] < hits[0]["inliers"] / 2 for h in hits[1:])


def test_quarter_turn_is_found_with_all_orientations(indexed):
    turned = Image.open(shared(KEY)).convert("RGB").transpose(Image.Transpose.ROTATE_90)
    hits = indexed.search_image(_jpeg_bytes(turned), bytestream=True, all_orientations=True)
    assert hits and hits[0]["id"] == str(shared(KEY))


def test_bytestream_and_custom_name_adds(engine):
    data = shared(KEY).read_bytes()
    assert engine.add_image("louvre-by-bytes", img=data, bytestream=True, refresh_after=True) == "louvre-by-bytes"
    assert engine.add_image("named-from-path", img=str(shared(PHOTOS[0])), refresh_after=True) == "named-from-path"
    anonymous = engine.add_image(data, bytestream=True, refresh_after=True)
    assert anonymous.startswith("sha1:")
    assert engine.get_image("named-from-path")["path"] == "named-from-path"
    hits = engine.search_image(data, bytestream=True)
    assert {h["id"] for h in hits[:2]} == {"louvre-by-bytes", anonymous}


def test_metadata_round_trip_and_pre_filter(indexed):
    stored = indexed.get_image(str(shared(PHOTOS[2])))
    assert stored["metadata"] == {"landmark": "defense", "rank": 2}
    assert stored["width"] > 0 and stored["num_keypoints"] > 0
    query = str(shared(KEY))
    eiffel = indexed.search_image(query, pre_filter={"term": {"metadata.landmark": "eiffel_tower"}}, min_inliers=0)
    assert eiffel and all(h["metadata"]["landmark"] == "eiffel_tower" for h in eiffel)
    hits = indexed.search_image(query, pre_filter={"range": {"metadata.rank": {"gte": 1, "lte": 1}}})
    assert [h["id"] for h in hits][:1] == [query]
    excluded = indexed.search_image(query, pre_filter={"bool": {"must_not": {"term": {"metadata.landmark": "louvre"}}}})
    assert query not in [h["id"] for h in excluded]


def test_delete_removes_the_image_everywhere(indexed):
    query = str(shared(KEY))
    before = indexed.count()
    indexed.delete_image(query, refresh_after=True)
    assert indexed.count() == before - 1
    with pytest.raises(ImageNotFound):
        indexed.get_image(query)
    assert query not in [h["id"] for h in indexed.search_image(query)]
    with pytest.raises(ImageNotFound):
        indexed.delete_image(query)


def test_readding_an_id_replaces_it_without_duplicates(engine):
    path = str(shared(KEY))
    for _ in range(3):
        engine.add_image(path, metadata={"version": 1}, refresh_after=True)
    engine.add_image(path, metadata={"version": 2}, refresh_after=True)
    assert engine.count() == 1
    assert engine.get_image(path)["metadata"] == {"version": 2}
    hits = engine.search_image(path)
    assert [h["id"] for h in hits] == [path]


def test_refresh_after_makes_the_image_searchable_at_once(engine):
    path = str(shared(KEY))
    engine.add_image(path, refresh_after=True)
    assert engine.count() == 1
    assert engine.search_image(path)[0]["id"] == path


def test_unknown_ids_and_bad_queries_are_typed_errors(engine):
    with pytest.raises(ImageNotFound):
        engine.get_image("no-such-image")
    with pytest.raises(InvalidImage):
        engine.search_image(b"definitely not an image", bytestream=True)
    with pytest.raises(InvalidImage):
        engine.add_image("broken", img=shared(KEY).read_bytes()[:3000], bytestream=True)
    assert engine.count() == 0


def test_bulk_add_reports_each_bad_item_and_keeps_the_rest(engine, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    report = engine.bulk_add([str(shared(PHOTOS[0])), (str(shared(PHOTOS[1])), {"k": "v"}), str(bad)], progress=False)
    assert sorted(report.succeeded) == sorted([str(shared(PHOTOS[0])), str(shared(PHOTOS[1]))])
    assert [f.item_id for f in report.failed] == [str(bad)]
    assert engine.count() == 2
    again = engine.bulk_add([str(shared(PHOTOS[0]))], progress=False, skip_existing=True)
    assert again.succeeded == [] and again.failed == []


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.integration
def test_search_stays_correct_when_redis_is_flushed_or_stopped(services, extractor, tmp_path):
    """On a Redis of its own (started and stopped by the same script on a free port), so the
    shared one (a Celery broker for other tests) is never flushed or stopped."""
    import redis

    from services_fixture import run_services

    port = {"DELF_ES_REDIS_PORT": str(unused_port())}
    started = run_services("start", "redis", env=port)
    assert started.returncode == 0, started.stderr
    redis_url = f"redis://127.0.0.1:{port['DELF_ES_REDIS_PORT']}/0"
    alias = f"test-redis-{uuid.uuid4().hex[:8]}"
    settings = Settings(**FAST, es_url=services.es_url, redis_url=redis_url, index_alias=alias)
    try:
        with DelfEs(settings, extractor=extractor) as engine:
            for path in PHOTOS:
                engine.add_image(str(shared(path)))
            engine.backend.refresh()
            query = str(shared(KEY))
            expected = [(h["id"], h["inliers"]) for h in engine.search_image(query)]
            assert expected[0][0] == query
            ids = [str(shared(path)) for path in PHOTOS]
            # filled on add, under each image's revision key (a cached entry of another write is a miss)
            keys = [revision_key(i, r) for i, r in image_revisions(engine.backend, ids).items()]
            assert len(keys) == len(ids)
            assert set(RedisLocationCache(redis_url).get_many(engine.model_id, keys)) == set(keys)
            redis.Redis.from_url(redis_url).flushall()
            assert [(h["id"], h["inliers"]) for h in engine.search_image(query)] == expected
            assert redis.Redis.from_url(redis_url).dbsize() > 0  # refilled on the miss
            stopped = run_services("stop", "redis", env=port)
            assert stopped.returncode == 0, stopped.stderr
            began = time.monotonic()
            assert [(h["id"], h["inliers"]) for h in engine.search_image(query)] == expected
            assert time.monotonic() - began < 60, "a stopped Redis must not stall search"
    finally:
        run_services("stop", "redis", env=port)
        from elasticsearch import Elasticsearch

        drop_indices(Elasticsearch(services.es_url), f"{alias}*")


def test_elasticsearch_down_is_a_clear_error_not_a_hang(extractor):
    settings = Settings(**FAST, es_url="http://127.0.0.1:9", index_alias="unreachable")
    engine = DelfEs(settings, extractor=extractor)
    started = time.monotonic()
    with pytest.raises(IndexUnavailable, match="127.0.0.1:9"):
        engine.add_image(str(shared(KEY)))
    with pytest.raises(IndexUnavailable):
        engine.search_image(str(shared(KEY)))
    assert time.monotonic() - started < 60
