"""The HTTP API in process (FastAPI TestClient) on real photos and the real model (the fast
EfficientNet-Lite0 settings of test_sdk.py), embedded index: what each route answers, and
that a search over HTTP gives exactly the SDK's hits."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from conftest import shared
from delf_es.api import create_app
from delf_es.sdk import DelfEs
from delf_es.settings import Settings
from delf_es.thumbnails import MAX_BYTES, MAX_SIDE

pytestmark = pytest.mark.slow

FAST = dict(backbone="efficientnet-lite0", scales=(0.7071, 1.0, 1.4142), global_scales=(1.0,))
PHOTOS = {
    "eiffel.jpg": "paris250/db/eiffel_tower/paris_eiffel_000000.jpg",
    "louvre.jpg": "paris250/db/louvre/paris_louvre_000004.jpg",
    "defense.jpg": "paris250/db/defense/paris_defense_000000.jpg",
}
SCALE = 0.6  # the query is the Louvre photo at 60 %


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    from delf_es.features import Extractor

    settings = Settings(**FAST, data_dir=tmp_path_factory.mktemp("api-index"))
    engine = DelfEs(settings, extractor=Extractor(settings))
    client = TestClient(create_app(settings, engine))
    with client:
        for position, (name, path) in enumerate(PHOTOS.items()):
            data = shared(path).read_bytes()
            if position == 0:  # one as raw bytes, the others as multipart with metadata
                response = client.put(f"/v1/images/{name}", content=data, headers={"Content-Type": "image/jpeg"})
            else:
                response = client.put(f"/v1/images/{name}?refresh=true", files={"file": (name, data)},
                                      data={"metadata": json.dumps({"landmark": name.split(".")[0]})})
            assert response.status_code == 201, response.text
        yield client, engine


@pytest.fixture(scope="module")
def query(tmp_path_factory) -> tuple[bytes, str]:
    image = Image.open(shared(PHOTOS["louvre.jpg"])).convert("RGB")
    small = image.resize((round(image.width * SCALE), round(image.height * SCALE)), Image.Resampling.LANCZOS)
    path = tmp_path_factory.mktemp("query") / "louvre-small.jpg"
    path.write_bytes(jpeg(small))
    return path.read_bytes(), str(path)


def test_put_answers_the_written_record_and_replacing_is_200(api):
    client, _ = api
    data = shared(PHOTOS["defense.jpg"]).read_bytes()
    response = client.put("/v1/images/defense.jpg", files={"file": ("d.jpg", data)},
                          data={"metadata": json.dumps({"landmark": "defense"})})
    assert response.status_code == 200
    body = response.json()
    assert body["result"] == "updated" and body["id"] == "defense.jpg" and body["keypoints"] > 100
    record = client.get("/v1/images/defense.jpg").json()
    assert record["metadata"] == {"landmark": "defense"} and record["width"] > 0 and record["thumbnail_bytes"] > 0
    assert client.get("/v1/stats").json()["images"] == 3


def test_http_search_gives_the_sdks_hits_in_the_sdks_order(api, query):
    client, engine = api
    data, path = query
    response = client.post("/v1/search", files={"file": ("q.jpg", data)}, data={"limit": "10"})
    assert response.status_code == 200, response.text
    body = response.json()
    expected = engine.search_image(path, limit=10)
    assert [h["id"] for h in body["hits"]] == [h["id"] for h in expected] and expected
    assert [h["inliers"] for h in body["hits"]] == [h["inliers"] for h in expected]
    assert [h["score"] for h in body["hits"]] == pytest.approx([h["score"] for h in expected])
    assert body["hits"][0]["id"] == "louvre.jpg" and body["hits"][0]["metadata"] == {"landmark": "louvre"}
    assert body["query"]["width"] == Image.open(io.BytesIO(data)).width and body["query"]["keypoints"] > 100


def test_matches_are_pairs_in_original_pixels_of_both_images(api, query):
    client, _ = api
    response = client.post("/v1/search", files={"file": ("q.jpg", query[0])}, data={"matches": "true", "limit": "1"})
    hit = response.json()["hits"][0]
    pairs = np.array(hit["matches"])
    assert pairs.shape == (hit["inliers"], 4) and hit["inliers"] >= 12
    # the query is the hit at 60 %: a hit pixel is the query pixel / 0.6 (within the RANSAC threshold)
    error = np.hypot(pairs[:, 2] - pairs[:, 0] / SCALE, pairs[:, 3] - pairs[:, 1] / SCALE)
    assert np.median(error) < 12


def test_bbox_searches_with_the_region_and_reports_pairs_in_whole_query_pixels(api, query):
    client, _ = api
    width, height = Image.open(io.BytesIO(query[0])).size
    box = [width * 0.4, height * 0.2, width * 0.95, height * 0.9]
    response = client.post("/v1/search", files={"file": ("q.jpg", query[0])},
                           data={"matches": "true", "bbox": ",".join(f"{v:.1f}" for v in box)})
    body = response.json()
    assert response.status_code == 200 and body["query"]["width"] == width
    hit = next(h for h in body["hits"] if h["id"] == "louvre.jpg")
    pairs = np.array(hit["matches"])
    assert len(pairs) >= 12
    assert (pairs[:, 0] >= box[0] - 1).all() and (pairs[:, 0] <= box[2] + 1).all()
    assert (pairs[:, 1] >= box[1] - 1).all() and (pairs[:, 1] <= box[3] + 1).all()
    error = np.hypot(pairs[:, 2] - pairs[:, 0] / SCALE, pairs[:, 3] - pairs[:, 1] / SCALE)
    assert np.median(error) < 12  # offset added back: still the whole query's pixels


def test_filter_restricts_the_hits(api, query):
    client, _ = api
    only_eiffel = json.dumps({"term": {"metadata.landmark": "eiffel"}})
    body = client.post("/v1/search", files={"file": ("q.jpg", query[0])}, data={"filter": only_eiffel, "min_inliers": "0"}).json()
    assert all(h["id"] != "louvre.jpg" for h in body["hits"])


def test_search_by_indexed_id_finds_the_image_itself_first(api):
    client, _ = api
    body = client.post("/v1/search", json={"id": "louvre.jpg", "matches": True, "limit": 3}).json()
    assert body["hits"][0]["id"] == "louvre.jpg" and body["hits"][0]["inliers"] >= 100
    pairs = np.array(body["hits"][0]["matches"])
    assert np.abs(pairs[:, :2] - pairs[:, 2:]).max() < 1e-3  # the same keypoints on both sides


def test_bulk_reports_each_item_and_writes_the_good_ones(api):
    client, _ = api
    good = jpeg(Image.open(shared(PHOTOS["eiffel.jpg"])).convert("RGB").rotate(3))
    response = client.post("/v1/images/_bulk", files=[("file", ("eiffel-tilted.jpg", good)),
                                                      ("file", ("broken.jpg", b"\xff\xd8\xff garbage"))])
    body = response.json()
    assert response.status_code == 200 and body["errors"] is True
    first, second = body["items"]
    assert (first["id"], first["result"], first["status"]) == ("eiffel-tilted.jpg", "created", 201)
    assert (second["id"], second["result"], second["status"]) == ("broken.jpg", "failed", 400)
    assert second["error"]["type"] == "InvalidImage"
    assert client.get("/v1/images/eiffel-tilted.jpg").status_code == 200
    assert client.get("/v1/images/broken.jpg").status_code == 404
    assert client.delete("/v1/images/eiffel-tilted.jpg").json() == {"id": "eiffel-tilted.jpg", "result": "deleted"}
    assert client.get("/v1/images/eiffel-tilted.jpg").status_code == 404


def test_thumbnails_are_small_jpegs_counted_in_stats(api):
    client, _ = api
    total = 0
    for name in PHOTOS:
        response = client.get(f"/v1/images/{name}/thumbnail")
        assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
        image = Image.open(io.BytesIO(response.content))
        assert max(image.size) <= MAX_SIDE and len(response.content) <= MAX_BYTES
        total += len(response.content)
    stats = client.get("/v1/stats").json()
    assert stats["thumbnail_bytes"] == total and stats["thumbnail_bytes_per_image"] == pytest.approx(total / 3, abs=0.1)


def test_thumbnails_can_be_turned_off(tmp_path):
    from delf_es.features import Extractor

    settings = Settings(**FAST, data_dir=tmp_path, thumbnails=False)
    with DelfEs(settings, extractor=Extractor(settings)) as engine, TestClient(create_app(settings, engine)) as client:
        data = shared(PHOTOS["defense.jpg"]).read_bytes()
        assert client.put("/v1/images/d.jpg", content=data, headers={"Content-Type": "image/jpeg"}).status_code == 201
        assert client.get("/v1/images/d.jpg").json()["thumbnail_bytes"] == 0
        assert client.get("/v1/images/d.jpg/thumbnail").json()["error"]["type"] == "ImageNotFound"
        assert client.get("/v1/stats").json()["thumbnail_bytes"] == 0
