"""A real ``delf-es serve`` process on a free port: embedded index, and Elasticsearch + Redis
with a real Celery worker for ``?wait=false``.  Real model (fast Lite0 settings), real photos."""

from __future__ import annotations

import json
import select
import socket

import httpx
import pytest

from api_server import FAST_ENV, Server, check_error, malformed_requests
from conftest import shared
from delf_es.sdk import DelfEs
from delf_es.settings import Settings

pytestmark = pytest.mark.slow

TOKEN = "integration-token"
CAP = 2_000_000
PHOTOS = {
    "eiffel.jpg": "paris250/db/eiffel_tower/paris_eiffel_000000.jpg",
    "louvre.jpg": "paris250/db/louvre/paris_louvre_000004.jpg",
}
QUERY = "paris250/db/louvre/paris_louvre_000004.jpg"
FAST = dict(backbone="efficientnet-lite0", scales=(0.7071, 1.0, 1.4142), global_scales=(1.0,))


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve-embedded")
    server = Server({**FAST_ENV, "DELF_ES_DATA_DIR": str(folder / "data"), "DELF_ES_API_MAX_UPLOAD_BYTES": str(CAP)},
                    folder / "serve.log", token=TOKEN)
    try:
        server.wait_ready()
        with server.client() as client:
            for name, path in PHOTOS.items():
                response = client.put(f"/v1/images/{name}?refresh=true", content=shared(path).read_bytes(),
                                      headers={"Content-Type": "image/jpeg"})
                assert response.status_code == 201, response.text
        yield server, folder / "data"
    finally:
        server.stop()


def test_serve_answers_the_api_and_the_page(embedded):
    server, _ = embedded
    health = httpx.get(server.url + "/healthz").json()
    assert health["status"] == "ok" and health["images"] == 2 and health["backend"] == "embedded"
    assert httpx.get(server.url + "/v1/stats").status_code == 401
    assert "<title>delf-es</title>" in httpx.get(server.url + "/").text
    with server.client() as client:
        body = client.post("/v1/search", files={"file": ("q.jpg", shared(QUERY).read_bytes())},
                           data={"matches": "true"}).json()
        assert body["hits"][0]["id"] == "louvre.jpg" and len(body["hits"][0]["matches"]) == body["hits"][0]["inliers"]


def test_a_chunked_body_over_the_cap_is_refused_while_it_streams(embedded):
    """Send a chunked body 10x the cap and no Content-Length: the 413 arrives before the client
    has sent it all (the server stops reading at the cap, it does not buffer the rest)."""
    server, _ = embedded
    chunk = b"\0" * 65_536
    total = 10 * CAP
    sent = 0
    answer = b""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall((f"PUT /v1/images/big.jpg HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                      "Content-Type: image/jpeg\r\nTransfer-Encoding: chunked\r\n\r\n").encode())
        # select + send (not sendall): a non-blocking sendall can send part of a chunk and then raise,
        # which would corrupt the chunked framing when the server reads slowly (a loaded machine).
        pending = b""
        sock.setblocking(False)
        try:
            while b"\r\n\r\n" not in answer:
                if not pending and sent < total:
                    pending = b"%x\r\n%s\r\n" % (len(chunk), chunk)
                    sent += len(chunk)
                readable, writable, _ = select.select([sock], [sock] if pending else [], [], 30)
                if not readable and not writable:
                    break
                if readable:
                    data = sock.recv(65_536)
                    if not data:
                        break
                    answer += data
                if writable and pending:
                    pending = pending[sock.send(pending):]
        except (BrokenPipeError, ConnectionResetError):
            pass
        sock.setblocking(True)
        sock.settimeout(10)
        while not _complete_response(answer):
            try:
                data = sock.recv(65_536)
            except (ConnectionResetError, TimeoutError):
                break
            if not data:
                break
            answer += data
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), answer[:300]
    assert sent < total, f"sent {sent} of {total} bytes before the answer"
    assert b"UploadTooLarge" in body


def test_malformed_requests_are_4xx_json_and_the_server_keeps_serving(embedded):
    server, _ = embedded
    photo = shared(QUERY).read_bytes()
    with httpx.Client(base_url=server.url, timeout=120) as client:
        for case in malformed_requests(photo, CAP, TOKEN):
            expect = case.pop("expect")
            response = client.request(**case)
            assert response.status_code == expect, (case["method"], case["url"], response.text[:300])
            check_error(response)
    assert httpx.get(server.url + "/healthz").json()["status"] == "ok"
    assert server.proc.poll() is None


def test_the_served_index_gives_the_sdks_hits_after_the_server_stops(embedded):
    """Last in this module: stops the server (the embedded index opens in one process), then
    the SDK on the same folder must find what the server found, in the same order."""
    server, data_dir = embedded
    with server.client() as client:
        served = client.post("/v1/search", files={"file": ("q.jpg", shared(QUERY).read_bytes())}).json()["hits"]
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal: -15 is a clean stop
    assert server.stop() in (0, -15) and "Application shutdown complete" in server.log()
    from delf_es.features import Extractor

    settings = Settings(**FAST, data_dir=data_dir)
    with DelfEs(settings, extractor=Extractor(settings)) as engine:
        direct = engine.search_image(str(shared(QUERY)))
    assert [(h["id"], h["inliers"]) for h in served] == [(h["id"], h["inliers"]) for h in direct]
    assert [h["score"] for h in served] == pytest.approx([h["score"] for h in direct])


@pytest.mark.integration
def test_serve_on_elasticsearch_and_redis_with_a_worker_for_wait_false(services, tmp_path):
    from workers_fleet import Fleet, wait_for

    fleet = Fleet(services, tmp_path, "api")
    server = Server({**{k: v for k, v in fleet.env.items() if k.startswith("DELF_ES_")},
                     "DELF_ES_API_UPLOAD_DIR": str(tmp_path / "uploads"), "DELF_ES_REDIS_URL": fleet.broker},
                    tmp_path / "serve.log", token=TOKEN)
    try:
        health = server.wait_ready()
        assert health["backend"] == "elasticsearch" and health["elasticsearch"] == "ok" and health["redis"] == "ok"
        with server.client() as client:
            eiffel = shared(PHOTOS["eiffel.jpg"]).read_bytes()
            response = client.put("/v1/images/eiffel.jpg?refresh=true", files={"file": ("e.jpg", eiffel)},
                                  data={"metadata": json.dumps({"city": "paris"})})
            assert response.status_code == 201, response.text
            assert client.get("/v1/images/eiffel.jpg/thumbnail").headers["content-type"] == "image/jpeg"
            # the same image through the workers: 202 + a task id, followed to the end
            fleet.start_worker(concurrency=1)
            louvre = shared(PHOTOS["louvre.jpg"]).read_bytes()
            accepted = client.put("/v1/images/louvre.jpg?wait=false", content=louvre, headers={"Content-Type": "image/jpeg"})
            assert accepted.status_code == 202, accepted.text
            task_id = accepted.json()["task_id"]
            state = wait_for(lambda: (s := client.get(f"/v1/tasks/{task_id}").json())["state"] != "pending" and s,
                             timeout=240, what="the worker to index louvre.jpg", poll=1)
            assert state["state"] == "indexed" and state["done"] == 1, state
            assert not (tmp_path / "uploads" / "jobs" / task_id).exists()  # staged upload removed
            thumbnail = client.get("/v1/images/louvre.jpg/thumbnail")  # made by the worker
            assert thumbnail.status_code == 200 and thumbnail.content[:2] == b"\xff\xd8"
            fleet.es.indices.refresh(index=fleet.alias)
            served = client.post("/v1/search", files={"file": ("q.jpg", shared(QUERY).read_bytes())},
                                 data={"matches": "true"}).json()["hits"]
            assert served[0]["id"] == "louvre.jpg"
            from delf_es.features import Extractor

            settings = fleet.settings
            with DelfEs(settings, extractor=Extractor(settings)) as engine:
                direct = engine.search_image(str(shared(QUERY)))
            assert [(h["id"], h["inliers"]) for h in served] == [(h["id"], h["inliers"]) for h in direct]
            for case in malformed_requests(shared(QUERY).read_bytes(), 20 * 1024 * 1024, TOKEN)[:12]:
                expect = case.pop("expect")
                response = client.request(**case)
                assert response.status_code == expect, (case["url"], response.text[:300])
                check_error(response)
    finally:
        server.stop()
        fleet.close()


@pytest.mark.integration
def test_serve_with_two_worker_processes_on_elasticsearch(services, tmp_path):
    """--workers 2: two uvicorn processes, each with its own engine on the same index; the global
    options of the command line reach both (here the fast model, given as options, not variables)."""
    import uuid

    from delf_es.eval.run import drop_indices
    from elasticsearch import Elasticsearch

    alias = f"test-api-workers-{uuid.uuid4().hex[:8]}"
    env = {"DELF_ES_ES_URL": services.es_url, "DELF_ES_REDIS_URL": services.redis_url, "DELF_ES_INDEX_ALIAS": alias}
    server = Server(env, tmp_path / "serve.log", token=TOKEN, args=["--workers", "2"],
                    global_args=["--backbone", "efficientnet-lite0", "--scales", "0.7071,1,1.4142"])
    try:
        server.wait_ready(timeout=240)
        with server.client() as client:
            photo = shared(PHOTOS["eiffel.jpg"]).read_bytes()
            written = client.put("/v1/images/eiffel.jpg?refresh=true", content=photo, headers={"Content-Type": "image/jpeg"})
            assert written.status_code == 201 and written.json()["model_id"].startswith("efficientnet-lite0")
            answers = [client.get("/v1/stats").json() for _ in range(6)]  # served by either process
            assert all(a["images"] == 1 and a["backend"] == "elasticsearch" for a in answers)
        assert "Started parent process" in server.log() or server.log().count("Application startup complete") >= 2
    finally:
        server.stop()
        with Elasticsearch(services.es_url) as es:
            drop_indices(es, f"{alias}*")


def _complete_response(answer: bytes) -> bool:
    """True once the head and a body of its Content-Length have arrived (the head alone may come first)."""
    head, sep, body = answer.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value.strip())
    return bool(body)
