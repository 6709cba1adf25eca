"""The failed-images index ``<alias>-failures``: images that could not be indexed, with why.

Workers record an image here when it cannot be decoded, the index refuses it (never retried) or
an outage outlasts the retries, and remove it once a later attempt indexes it;
``DelfEs.failures()``, ``delf-es failures`` and the Kibana dashboard read it.  Mapping: ``mappings/failures-v1.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Iterable

from elasticsearch import ApiError, Elasticsearch, NotFoundError, helpers
import elastic_transport

from delf_es.errors import IndexUnavailable
from delf_es.index.elasticsearch import MAPPINGS_DIR, document_id

FAILURES_SUFFIX = "-failures"
MAPPING = MAPPINGS_DIR / "failures-v1.json"


def failures_index(alias: str) -> str:
    """The failures index of the image index behind ``alias``."""
    return alias + FAILURES_SUFFIX


@dataclass(frozen=True)
class FailedImage:
    """One image that could not be indexed.

    Attributes:
        stage: ``decode`` (unreadable input), ``extract`` or ``index`` (refused by the index).
        error_type: the exception class name, e.g. ``InvalidImage``.
        failed_at: ISO-8601 UTC timestamp.
    """

    image_id: str
    path: str
    stage: str
    error_type: str
    error: str
    model_id: str
    failed_at: str


class FailureLog:
    """Read and write ``<alias>-failures`` through ``client``."""

    def __init__(self, client: Elasticsearch, index: str) -> None:
        self.client = client
        self.index = index
        self._created = False

    def _ensure(self) -> None:
        if self._created:
            return
        body = {k: v for k, v in json.loads(MAPPING.read_text()).items() if not k.startswith("_")}
        try:
            self.client.indices.create(index=self.index, **body)
        except ApiError as exc:
            if exc.meta is None or exc.meta.status != 400 or "resource_already_exists" not in str(exc.body):
                raise
        self._created = True

    def record(self, failures: Iterable[FailedImage]) -> None:
        """Write (or overwrite) failure documents; raises IndexUnavailable if ES cannot be reached."""
        actions = [
            {"_op_type": "index", "_index": self.index, "_id": document_id(f.image_id), "_source": f.__dict__}
            for f in failures
        ]
        if not actions:
            return
        try:
            self._ensure()
            helpers.bulk(self.client, actions, refresh=False)
        except (elastic_transport.TransportError, ApiError) as exc:
            raise IndexUnavailable(f"Elasticsearch unavailable (recording failures in {self.index}): {exc}") from exc

    def clear(self, image_ids: Iterable[str]) -> None:
        """Forget failures of images that are now indexed (missing ones are fine)."""
        actions = [{"_op_type": "delete", "_index": self.index, "_id": document_id(i)} for i in image_ids]
        if not actions:
            return
        try:
            if self.client.indices.exists(index=self.index):
                helpers.bulk(self.client, actions, raise_on_error=False, refresh=False)
        except (elastic_transport.TransportError, ApiError) as exc:
            raise IndexUnavailable(f"Elasticsearch unavailable (clearing failures in {self.index}): {exc}") from exc

    def list(self, limit: int = 1000) -> list[FailedImage]:
        """The recorded failures, newest first (at most ``limit``)."""
        try:
            found = self.client.search(index=self.index, size=limit, sort=[{"failed_at": "desc"}],
                                       query={"match_all": {}})
        except NotFoundError:
            return []
        except (elastic_transport.TransportError, ApiError) as exc:
            raise IndexUnavailable(f"Elasticsearch unavailable (reading {self.index}): {exc}") from exc
        return [FailedImage(**hit["_source"]) for hit in found["hits"]["hits"]]


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
