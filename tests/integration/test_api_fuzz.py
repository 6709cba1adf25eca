"""Fuzz every route from the app's own OpenAPI document with schemathesis: no 5xx, responses
that match their declared schema and content type, and every error in the Elasticsearch shape
``{"error": {"type", "reason"}, "status"}``.  In process, real model (fast Lite0 settings) on
an embedded index holding two real photos; examples per operation bounded (~1-2 min)."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import content_type_conformance, not_a_server_error, response_schema_conformance

from conftest import shared
from delf_es.api import create_app
from delf_es.sdk import DelfEs
from delf_es.settings import Settings

pytestmark = pytest.mark.slow

FAST = dict(backbone="efficientnet-lite0", scales=(0.7071, 1.0, 1.4142), global_scales=(1.0,))
TOKEN = "fuzz-token"
EXAMPLES = int(__import__("os").environ.get("DELF_ES_TEST_FUZZ_EXAMPLES", "40"))


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory):
    from delf_es.features import Extractor

    config = Settings(**FAST, data_dir=tmp_path_factory.mktemp("fuzz-index"), api_token=TOKEN,
                      api_max_upload_bytes=2_000_000)
    engine = DelfEs(config, extractor=Extractor(config))
    for name, path in (("eiffel.jpg", "paris250/db/eiffel_tower/paris_eiffel_000000.jpg"),
                       ("louvre.jpg", "paris250/db/louvre/paris_louvre_000004.jpg")):
        engine.add_image(name, str(shared(path)))
    app = create_app(config, engine)
    yield schemathesis.openapi.from_asgi("/openapi.json", app)
    engine.close()


@schemathesis.check
def elasticsearch_shaped_errors(ctx, response, case):
    if response.status_code >= 400:
        body = response.json()
        if set(body) != {"error", "status"} or body["status"] != response.status_code:
            raise AssertionError(f"error body not in the Elasticsearch shape: {body}")
        if not isinstance(body["error"].get("type"), str) or not body["error"].get("reason"):
            raise AssertionError(f"error without type/reason: {body}")
        if "Traceback" in response.text:
            raise AssertionError("a traceback reached the client")


CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance, elasticsearch_shaped_errors]


def test_no_operation_answers_5xx_or_off_schema(api_schema):
    """Each operation of the OpenAPI document, EXAMPLES generated requests each (schemathesis'
    hypothesis strategies; its pytest plugin is not used: it does not load under pytest 9)."""
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 8, [op.label for op in operations]
    seen: dict[str, set[int]] = {}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def fuzz(case):
            response = case.call(headers={"Authorization": f"Bearer {TOKEN}"})
            seen.setdefault(operation.label, set()).add(response.status_code)
            case.validate_response(response, checks=CHECKS)

        fuzz()
    assert set(seen) == {op.label for op in operations}
