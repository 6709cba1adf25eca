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

from elasticsearch import NotFoundError

from delf_es.errors import RequestRejected
from delf_es.index.es.codec import document_id
from delf_es.index.es.templates import MAPPINGS_DIR
from delf_es.index.es.transport import Transport

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
    """Read and write ``<alias>-failures`` through ``transport`` (its error map: an outage is
    IndexUnavailable, retried by the workers; a refusal is RequestRejected, never retried)."""

    def __init__(self, transport: Transport, index: str, replicas: int = 0) -> None:
        self.transport = transport
        self.index = index
        self.replicas = replicas  # es_number_of_replicas: on a cluster the log survives a lost node too
        self._created = False

    def _ensure(self) -> None:
        if self._created:
            return
        body = {k: v for k, v in json.loads(MAPPING.read_text()).items() if not k.startswith("_")}
        body["settings"] = {**body.get("settings", {}), "number_of_replicas": int(self.replicas)}
        try:
            self.transport.call(f"creating {self.index}", self.transport.client.indices.create, index=self.index, **body)
        except RequestRejected as exc:
            if exc.status != 400 or "resource_already_exists" not in exc.message:
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
        self._ensure()
        refused = [error for _, error, ok in self.transport.bulk(f"recording failures in {self.index}", actions) if not ok]
        if refused:
            raise RequestRejected(f"{self.index} refused {len(refused)} failure record(s): {refused[0]}")

    def clear(self, image_ids: Iterable[str]) -> None:
        """Forget failures of images that are now indexed (missing ones are fine)."""
        actions = [{"_op_type": "delete", "_index": self.index, "_id": document_id(i)} for i in image_ids]
        if not actions:
            return
        client = self.transport.client
        if self.transport.call(f"checking {self.index}", client.indices.exists, index=self.index):
            for _ in self.transport.bulk(f"clearing failures in {self.index}", actions):
                pass  # a record that cannot be cleared is overwritten by the image's next failure, or harmless

    def list(self, limit: int = 1000) -> list[FailedImage]:
        """The recorded failures, newest first (at most ``limit``)."""
        try:
            found = self.transport.call(f"reading {self.index}", self.transport.client.search, index=self.index,
                                        size=limit, sort=[{"failed_at": "desc"}], query={"match_all": {}})
        except NotFoundError:
            return []
        return [FailedImage(**hit["_source"]) for hit in found["hits"]["hits"]]


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
