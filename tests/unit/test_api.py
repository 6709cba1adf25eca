"""The HTTP API's guards, in process, without running the model: auth, error shape, id rules,
the streamed upload cap, extraction slots, CORS, serve's refusals, the page's assets and
thumbnails.  No fakes: a real DelfEs on an embedded index in a temporary folder (its model is
loaded only where a route needs the index)."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading

import numpy as np
import pytest
from fastapi.testclient import TestClient

from delf_es.api import create_app
from delf_es.api.deps import check_image_id
from delf_es.api.errors import status_of
from delf_es.api.limits import ExtractionSlots
from delf_es.api.serve import check_config, environment_for, is_loopback
from delf_es.errors import ImageNotFound, ImageTooLarge, IndexUnavailable, InvalidRequest, Overloaded, UploadTooLarge
from delf_es.sdk import DelfEs
from delf_es.settings import Settings
from delf_es.thumbnails import MAX_BYTES, MAX_SIDE, make_thumbnail

FAST = dict(backbone="efficientnet-lite0", scales=(0.7071, 1.0, 1.4142), global_scales=(1.0,))
TOKEN = "s3cret-token"


def assert_error(response, status: int, error_type: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "status"} and body["status"] == status
    assert set(body["error"]) == {"type", "reason"} and body["error"]["reason"]
    assert "Traceback" not in response.text
    if error_type:
        assert body["error"]["type"] == error_type
    return body


@pytest.fixture(scope="module")
def lite0():
    from delf_es.features import Extractor

    return Extractor(Settings(**FAST))


@pytest.fixture()
def client(tmp_path, lite0):
    settings = Settings(**FAST, data_dir=tmp_path, api_token=TOKEN, api_max_upload_bytes=100_000)
    engine = DelfEs(settings, extractor=lite0)
    with TestClient(create_app(settings, engine, warm_up=False)) as test_client:
        yield test_client
    engine.close()


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_v1_routes_need_the_token_401_without_403_wrong(client):
    for method, path in [("get", "/v1/stats"), ("get", "/v1/images/a"), ("delete", "/v1/images/a"),
                         ("post", "/v1/search"), ("get", "/v1/tasks/abc"), ("put", "/v1/images/a")]:
        response = client.request(method.upper(), path)
        assert_error(response, 401, "AuthenticationRequired")
        assert response.headers["www-authenticate"] == "Bearer"
        assert_error(client.request(method.upper(), path, headers={"Authorization": "Bearer wrong"}), 403, "AccessDenied")
        assert_error(client.request(method.upper(), path, headers={"Authorization": f"Basic {TOKEN}"}), 401)


def test_healthz_needs_no_token_and_reports_the_embedded_index(client):
    body = client.get("/healthz").json()
    assert body["status"] == "ok" and body["backend"] == "embedded" and body["images"] == 0
    assert body["elasticsearch"] is None and body["redis"] is None and body["model_id"]


def test_unknown_image_is_404_in_the_json_shape(client):
    assert_error(client.get("/v1/images/nope", headers=AUTH), 404, "ImageNotFound")
    assert_error(client.delete("/v1/images/nope", headers=AUTH), 404, "ImageNotFound")
    assert_error(client.get("/v1/images/nope/thumbnail", headers=AUTH), 404, "ImageNotFound")


@pytest.mark.parametrize("path", ["/v1/images/..%2F..%2Fetc%2Fpasswd", "/v1/images/a%00b", "/v1/images/" + "x" * 10_000,
                                  "/v1/images/a%2F..%2Fb", "/v1/images/_secret", "/v1/images/%2Fetc%2Fpasswd"])
def test_ids_with_path_tricks_are_refused(client, path):
    assert_error(client.get(path, headers=AUTH), 400, "InvalidRequest")
    assert_error(client.put(path, content=b"\xff\xd8", headers={**AUTH, "Content-Type": "image/jpeg"}), 400)


def test_check_image_id_keeps_ordinary_ids():
    for ok in ["a.jpg", "paris/eiffel/1.jpg", "sha1:abc", "é.png", "x" * 512]:
        assert check_image_id(ok) == ok
    for bad in ["", "a\x00", "a\nb", "../a", "a/./b", "/a", "_bulk", "x" * 513]:
        with pytest.raises(InvalidRequest):
            check_image_id(bad)


def test_malformed_bodies_are_400_with_the_json_error(client):
    cases = [
        dict(content=b"not json", headers={"Content-Type": "application/json"}),
        dict(json={"url": "http://x", "id": "y"}),
        dict(json={}),
        dict(json={"id": "a", "limit": 0}),
        dict(json={"id": "a", "limit": "many"}),
        dict(json={"id": "a", "bbox": [1, 2, 3]}),
        dict(json={"id": "a", "unknown": 1}),
        dict(json={"id": "a", "filter": "not an object"}),
        dict(json={"url": "file:///etc/passwd"}),
        dict(json={"url": "http://127.0.0.1/a.jpg"}),
        dict(content=b"\x89PNG", headers={"Content-Type": "image/png"}),
        dict(files={"file": ("q.jpg", b"definitely not an image")}),
        dict(files={"nofile": ("q.jpg", b"x")}),
        dict(files={"file": ("q.jpg", b"x")}, data={"bbox": "1,2,x,4"}),
        dict(files={"file": ("q.jpg", b"x")}, data={"filter": "[1, 2]"}),
        dict(files={"file": ("q.jpg", b"x")}, data={"limit": "-3"}),
        dict(content=b"--b\r\nbroken", headers={"Content-Type": "multipart/form-data; boundary=b"}),
    ]
    for case in cases:
        headers = {**AUTH, **case.pop("headers", {})}
        response = client.post("/v1/search", headers=headers, **case)
        assert 400 <= response.status_code < 500, (case, response.text)
        assert_error(response, response.status_code)


def test_malformed_filter_is_refused_before_the_model_runs(client):
    response = client.post("/v1/search", headers=AUTH, files={"file": ("q.jpg", b"x")},
                           data={"filter": json.dumps({"wildcard": {"metadata.a": "x*"}})})
    assert_error(response, 400, "UnsupportedFilter")


def test_declared_oversize_body_is_413_before_reading(client):
    response = client.put("/v1/images/a", content=b"x" * 100_001, headers={**AUTH, "Content-Type": "image/jpeg"})
    assert_error(response, 413, "UploadTooLarge")


def test_upload_cap_stops_reading_a_chunked_body_at_the_cap(tmp_path, lite0):
    """Drive the ASGI app with a body of 50 x 16 KB chunks and no Content-Length: the answer is
    413 and the app stopped pulling chunks just past the 100 kB cap (not all 800 kB)."""
    settings = Settings(**FAST, data_dir=tmp_path, api_max_upload_bytes=100_000)
    app = create_app(settings, DelfEs(settings, extractor=lite0), warm_up=False)
    for content_type in (b"image/jpeg", b"multipart/form-data; boundary=xyz"):
        pulled = 0
        sent: list[dict] = []

        async def receive():
            nonlocal pulled
            pulled += 1
            chunk = (b"--xyz\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\"\r\n\r\n"
                     if pulled == 1 and b"multipart" in content_type else b"\0" * 16_384)
            return {"type": "http.request", "body": chunk, "more_body": pulled < 50}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "PUT",
                 "scheme": "http", "path": "/v1/images/a", "raw_path": b"/v1/images/a", "query_string": b"",
                 "headers": [(b"content-type", content_type), (b"host", b"test")],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "root_path": "", "state": {}}
        asyncio.run(app(scope, receive, send))
        start = next(m for m in sent if m["type"] == "http.response.start")
        assert start["status"] == 413
        body = json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))
        assert body["error"]["type"] == "UploadTooLarge"
        assert pulled <= 100_000 // 16_384 + 2, pulled


def test_extraction_slots_bound_the_work_and_refuse_beyond_the_queue():
    async def scenario():
        slots = ExtractionSlots(size=1, max_queued=1)
        gate = threading.Event()
        peak = 0

        def work():
            nonlocal peak
            peak = max(peak, slots.running)
            gate.wait(5)
            return "done"

        first = asyncio.ensure_future(slots.run(work, timeout_s=10))
        await asyncio.sleep(0.05)
        second = asyncio.ensure_future(slots.run(work, timeout_s=10))  # waits in the queue
        await asyncio.sleep(0.05)
        assert (slots.running, slots.queued) == (1, 1)
        with pytest.raises(Overloaded) as refused:
            await slots.run(work, timeout_s=10)  # queue full: refused at once
        assert refused.value.retry_after >= 1
        gate.set()
        assert await first == "done" and await second == "done"
        assert peak == 1 and slots.running == 0 and slots.queued == 0

    asyncio.run(scenario())


def test_extraction_slots_time_limit_answers_503_and_keeps_the_slot_until_the_work_ends():
    async def scenario():
        slots = ExtractionSlots(size=1, max_queued=4)
        gate = threading.Event()
        with pytest.raises(Overloaded):
            await slots.run(gate.wait, 5, timeout_s=0.1)
        assert slots.running == 1  # the thread still runs: its slot is still taken
        gate.set()
        for _ in range(100):
            if slots.running == 0:
                break
            await asyncio.sleep(0.02)
        assert slots.running == 0

    asyncio.run(scenario())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_backend_down_is_503_with_retry_after(tmp_path, lite0):
    settings = Settings(**FAST, es_url=f"http://127.0.0.1:{_free_port()}", es_timeout=2, data_dir=tmp_path)
    engine = DelfEs(settings, extractor=lite0)
    with TestClient(create_app(settings, engine, warm_up=False)) as client:
        response = client.get("/healthz")
        assert_error(response, 503, "IndexUnavailable")
        assert int(response.headers["retry-after"]) >= 1
        response = client.get("/v1/images/a")
        assert_error(response, 503, "IndexUnavailable")
        assert "retry-after" in response.headers


def test_status_of_follows_the_error_classes():
    assert status_of(ImageNotFound("a")) == 404
    assert status_of(ImageTooLarge("too many pixels")) == 413
    assert status_of(UploadTooLarge(10)) == 413
    assert status_of(IndexUnavailable("down")) == 503
    assert status_of(InvalidRequest("bad")) == 400


def test_unknown_route_and_method_keep_the_json_shape(client):
    assert_error(client.get("/v2/nothing"), 404, "RouteNotFound")
    assert_error(client.patch("/v1/search", headers=AUTH), 405, "MethodNotAllowed")


def test_cors_is_off_unless_configured(tmp_path, lite0):
    origin = {"Origin": "https://elsewhere.example", "Access-Control-Request-Method": "GET"}
    settings = Settings(**FAST, data_dir=tmp_path / "a")
    with TestClient(create_app(settings, DelfEs(settings, extractor=lite0), warm_up=False)) as client:
        assert "access-control-allow-origin" not in client.get("/healthz", headers=origin).headers
    settings = Settings(**FAST, data_dir=tmp_path / "b", api_cors_origins=("https://elsewhere.example",))
    with TestClient(create_app(settings, DelfEs(settings, extractor=lite0), warm_up=False)) as client:
        preflight = client.options("/v1/stats", headers=origin)
        assert preflight.headers["access-control-allow-origin"] == "https://elsewhere.example"


def test_serve_refuses_non_loopback_without_token_and_workers_on_embedded():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("example.org")
    check_config(Settings(), "127.0.0.1", 1)
    check_config(Settings(api_token="t"), "0.0.0.0", 1)
    with pytest.raises(InvalidRequest, match="without a token"):
        check_config(Settings(), "0.0.0.0", 1)
    with pytest.raises(InvalidRequest, match="needs Elasticsearch"):
        check_config(Settings(), "127.0.0.1", 2)
    env = environment_for({"scales": (0.5, 1.0), "use_pca": False, "backbone": "efficientnet-lite0"})
    assert Settings(**{k[len("DELF_ES_"):].lower(): json.loads(v) if v[0] in "[tf" else v for k, v in env.items()}).scales == (0.5, 1.0)


def test_page_and_its_assets_load_nothing_from_elsewhere(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert assets and all(a.startswith("/static/") for a in assets)
    for asset in assets:
        text = client.get(asset).text
        assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", text), asset


def test_openapi_lists_every_route(client):
    paths = client.get("/openapi.json").json()["paths"]
    for path in ["/healthz", "/v1/stats", "/v1/search", "/v1/images/_bulk", "/v1/images/{image_id}",
                 "/v1/images/{image_id}/thumbnail", "/v1/tasks/{task_id}"]:
        assert path in paths, sorted(paths)


@pytest.mark.parametrize("shape", [(1024, 768), (300, 4000), (40, 40)])
def test_thumbnails_fit_256_px_and_16_kb_even_for_noise(shape):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    data = make_thumbnail(pixels)
    from PIL import Image
    import io

    image = Image.open(io.BytesIO(data))
    assert image.format == "JPEG" and max(image.size) <= MAX_SIDE and len(data) <= MAX_BYTES
    assert image.size[0] / image.size[1] == pytest.approx(shape[1] / shape[0], rel=0.2)


def test_staged_features_carry_the_thumbnail_to_the_index_writer():
    from delf_es.workers.store import Staged

    from delf_es.types import Features

    features = Features("a", "m@1", (10, 10), np.zeros((1, 2), np.float32), np.ones(1, np.float32),
                        np.ones(1, np.float32), np.eye(1, 4, dtype=np.float32))
    jpeg = make_thumbnail(np.zeros((20, 30, 3), np.uint8))
    for thumbnail in (jpeg, None):
        staged = Staged("k", "alias", "a.jpg", {"x": 1}, "failures", features, thumbnail)
        back = Staged.decode("k", staged.encode())
        assert back.thumbnail == thumbnail and back.features.image_id == "a" and back.metadata == {"x": 1}
