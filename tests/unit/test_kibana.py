"""Kibana saved objects: valid import ndjson, every field they use exists in the index mappings,
and `delf-es kibana-import` posts them as Kibana's import API expects (against a local fake
Kibana HTTP server: Kibana itself cannot run here)."""

from __future__ import annotations

from email import policy
from email.parser import BytesParser
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from typer.testing import CliRunner

from delf_es.cli import app
from delf_es.index.es.templates import MAPPINGS_DIR
from delf_es.workers.kibana import SAVED_OBJECTS, saved_objects

KNOWN_TYPES = {"index-pattern", "visualization", "search", "dashboard", "lens"}
MAPPING_OF_TITLE = {"delf-images": "images-v1.json", "delf-images-failures": "failures-v1.json"}


def lines():
    return [json.loads(line) for line in SAVED_OBJECTS.read_text().splitlines() if line.strip()]


def field_type(mapping_file: str, field: str) -> str | None:
    """The mapped type of a dotted ``field`` (multi-fields included), None if absent."""
    node = {"properties": json.loads((MAPPINGS_DIR / mapping_file).read_text())["mappings"]["properties"]}
    for part in field.split("."):
        children = {**node.get("properties", {}), **node.get("fields", {})}
        if part not in children:
            return None
        node = children[part]
    return node.get("type", "object")


def test_the_file_is_valid_import_ndjson_with_resolvable_references():
    objects = lines()
    ids = {(o["type"], o["id"]) for o in objects}
    assert len(ids) == len(objects), "duplicate ids"
    for obj in objects:
        assert obj["type"] in KNOWN_TYPES and isinstance(obj["attributes"], dict) and obj["attributes"]["title"]
        for ref in obj["references"]:
            assert (ref["type"], ref["id"]) in ids, f"{obj['id']}: dangling reference {ref}"
        for key in ("visState", "panelsJSON", "optionsJSON", "uiStateJSON", "sourceFilters", "fields"):
            if key in obj["attributes"]:
                json.loads(obj["attributes"][key])
        meta = obj["attributes"].get("kibanaSavedObjectMeta")
        if meta:
            source = json.loads(meta["searchSourceJSON"])
            if "indexRefName" in source:
                assert source["indexRefName"] in {r["name"] for r in obj["references"]}
    (dashboard,) = [o for o in objects if o["type"] == "dashboard"]
    panels = json.loads(dashboard["attributes"]["panelsJSON"])
    assert {p["panelRefName"] for p in panels} == {r["name"] for r in dashboard["references"]}
    titles = " ".join(o["attributes"]["title"] for o in objects if o["type"] != "index-pattern")
    for topic in ("over time", "keypoints per image", "model and PCA", "failed images"):
        assert topic in titles


def test_every_field_used_exists_in_the_mapping_of_its_data_view():
    objects = lines()
    views = {o["id"]: MAPPING_OF_TITLE[o["attributes"]["title"]] for o in objects if o["type"] == "index-pattern"}
    used = 0
    for obj in objects:
        if obj["type"] == "index-pattern":
            assert field_type(views[obj["id"]], obj["attributes"]["timeFieldName"]) == "date"
            continue
        refs = [r["id"] for r in obj["references"] if r["type"] == "index-pattern"]
        if not refs:
            continue
        mapping = views[refs[0]]
        fields: list[tuple[str, str]] = []
        if obj["type"] == "visualization":
            for agg in json.loads(obj["attributes"]["visState"])["aggs"]:
                if "field" in agg["params"]:
                    fields.append((agg["params"]["field"], agg["type"]))
        if obj["type"] == "search":
            fields += [(c, "column") for c in obj["attributes"]["columns"]]
            fields += [(s[0], "sort") for s in obj["attributes"]["sort"]]
        for field, use in fields:
            kind = field_type(mapping, field)
            assert kind is not None, f"{obj['id']}: field {field} not in {mapping}"
            if use in ("terms", "histogram", "date_histogram", "sort"):
                assert kind not in ("text", "binary", "dense_vector", "object"), f"{field} ({kind}) cannot be aggregated"
            used += 1
    assert used >= 10


def test_data_views_follow_the_configured_alias():
    titles = {o["id"]: o["attributes"]["title"] for o in saved_objects(alias="shop-images") if o["type"] == "index-pattern"}
    assert sorted(titles.values()) == ["shop-images", "shop-images-failures"]


class FakeKibana(BaseHTTPRequestHandler):
    """Checks what Kibana's import API checks (xsrf header, multipart `file`), answers like it."""

    received: list[dict] = []

    def do_POST(self):  # noqa: N802
        length = int(self.headers["Content-Length"])
        head = f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode()
        message = BytesParser(policy=policy.default).parsebytes(head + self.rfile.read(length))
        (part,) = [p for p in message.iter_parts() if p.get_param("name", header="content-disposition") == "file"]
        objects = [json.loads(line) for line in part.get_content().decode().splitlines() if line.strip()]
        FakeKibana.received.append({"path": self.path, "xsrf": self.headers.get("kbn-xsrf"), "objects": objects})
        ok = self.headers.get("kbn-xsrf") is not None and self.path.startswith("/api/saved_objects/_import")
        body = json.dumps({"success": ok, "successCount": len(objects) if ok else 0}).encode()
        self.send_response(200 if ok else 400)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture()
def kibana():
    server = HTTPServer(("127.0.0.1", 0), FakeKibana)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    FakeKibana.received.clear()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_kibana_import_posts_the_objects_as_a_multipart_file(kibana):
    result = CliRunner().invoke(app, ["kibana-import", kibana, "--alias", "shop-images"])
    assert result.exit_code == 0, result.output
    (request,) = FakeKibana.received
    assert request["path"] == "/api/saved_objects/_import?overwrite=true" and request["xsrf"]
    assert len(request["objects"]) == len(lines())
    assert "shop-images" in {o["attributes"]["title"] for o in request["objects"]}


def test_kibana_import_reports_an_unreachable_kibana():
    result = CliRunner().invoke(app, ["kibana-import", "http://127.0.0.1:9"])
    assert result.exit_code == 2 and "unreachable" in result.output
