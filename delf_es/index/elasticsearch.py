"""Elasticsearch index: one document per image, its keypoint vectors nested inside it.

Usage::

    backend = ElasticsearchBackend(Settings(es_url="http://127.0.0.1:9200"), model_id=extractor.model_id)
    report = backend.upsert(records, refresh=True)   # BulkReport: per-item failures, never half an image
    hits = backend.knn(query.descriptors, k=10)       # Neighbours, via _msearch
    backend.close()

Layout (chosen by ``benchmarks/es_layout.py``, numbers in ``benchmarks/results/es_layout.json``):
the index template ``mappings/images-v1.json`` describes one document per image holding its
path, metadata, size, model, global descriptor (``global_vector``) and a ``nested`` field
``keypoints`` whose i-th object holds the i-th local descriptor, so the nested offset
Elasticsearch returns in ``inner_hits`` is the keypoint index.  Keypoint locations, scales and
scores are packed float32 arrays (``keypoint_xy`` ...) in ``_source``.  Because an image is ONE
Elasticsearch document, writing or deleting it is atomic: a crash or a failed item never leaves
half an image, and a re-upsert replaces keypoints and document together.

Index and alias: the concrete index is ``<alias>-v1-<sha1(model_id)[:12]>``, created on the first
write (dims taken from the first record) with ``settings.index_alias`` as its write alias;
everything reads and writes through the alias, so a later reindex can build a new index and swap
the alias atomically.  The model and dims live in the mapping's ``_meta``.  Writing a record of
another model_id is refused client-side as a failed item (this build has neither
``constant_keyword`` nor ingest processors to enforce it server-side).

kNN: one search per query descriptor, batched through ``_msearch`` (``KNN_SEARCHES_PER_REQUEST``
per request).  A nested kNN returns the k best *images* (each scored by its best keypoint) with
``inner_hits`` listing each image's k best keypoints; the union holds the k nearest keypoints
(an image holding one of them ranks among the k best images), which are kept.  The metadata
filter and the ``image_ids`` restriction are kNN ``filter`` clauses on the image document, i.e.
pre-filters: results are the nearest keypoints among the allowed images, never post-filtered
short lists.  Scores come back as ``(1 + cos) / 2`` (dot_product similarity) and are converted
back to cosine.

Failures: connection errors, timeouts, HTTP 429 and 5xx become
:class:`~delf_es.errors.IndexUnavailable` naming the URL; requests time out after
``settings.es_timeout`` seconds with at most one transport retry, so a dead server fails in
seconds.  Bulk writes retry only 429-rejected items, with capped exponential backoff.

Elasticsearch build notes (the integ-test-zip of scripts/services.sh): no painless, reindex,
``_delete_by_query``, ingest processors or ``constant_keyword``; ``GET /`` answers 405, so the
client's ``info()``/``ping()`` fail (health is ``cluster.health``); dense vectors are left out of
``_source`` (``index.mapping.exclude_source_vectors``), and vectors are sent as base64 big-endian
float32, which this version accepts for indexing and queries.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping
from urllib.parse import urlsplit, urlunsplit

import elastic_transport
import numpy as np
from elasticsearch import ApiError, Elasticsearch, NotFoundError, helpers

from delf_es.errors import (
    DelfEsError,
    FeatureShapeError,
    ImageNotFound,
    IndexUnavailable,
    ItemFailure,
    UnsupportedFilter,
)
from delf_es.index.base import BulkReport, ImageRecord, MetadataFilter, Neighbours, StoredImage
from delf_es.settings import Settings

__all__ = [
    "ElasticsearchBackend",
    "RequestRejected",
    "render_template",
    "document_id",
    "index_name",
    "MAPPINGS_DIR",
    "SCHEMA",
]

logger = logging.getLogger(__name__)

#: Versioned index templates; ``images-<SCHEMA>.json`` is the one this module writes.
MAPPINGS_DIR = Path(__file__).resolve().parents[2] / "mappings"
SCHEMA = "v1"
#: Most keypoints one image may hold (nested objects per document and inner_hits window).
MAX_KEYPOINTS = 10_000
#: Elasticsearch's caps on kNN ``k`` / ``num_candidates``.
MAX_KNN = 10_000
#: Searches per ``_msearch`` request: large enough to amortise the round trip, small enough to
#: finish well inside ``es_timeout`` on a loaded node.
KNN_SEARCHES_PER_REQUEST = 100
#: Ids per ``mget`` request.
MGET_CHUNK = 500
#: Bulk chunks, by count and by bytes: an image with 1000 keypoints is ~240 KB of JSON and costs
#: Elasticsearch ~0.3-0.6 s of CPU to insert into the HNSW graph (benchmarks/es_layout.py), so a
#: chunk of 10 such images takes seconds on a small node.
BULK_CHUNK_DOCS = 10
BULK_CHUNK_BYTES = 4 * 1024 * 1024
#: A bulk request may take this many times ``es_timeout`` (at least 60 s): graph insertion is slow,
#: and a write that times out is retried whole by the caller.
BULK_TIMEOUT_FACTOR = 6
#: Retries of 429-rejected bulk items / searches: 0.5 s, 1 s, 2 s (capped at 4 s).
RETRIES_ON_429 = 3
INITIAL_BACKOFF = 0.5
MAX_BACKOFF = 4.0
#: Elasticsearch refuses document ids longer than this many bytes.
MAX_ID_BYTES = 512
_HASHED_ID_PREFIX = "~sha256:"
_PCA_RE = re.compile(r"-(pca\d+-[0-9a-f]+)@")
#: Fields of the image document that ``get`` leaves out.
_BULKY_FIELDS = ["keypoints", "keypoint_xy", "keypoint_scale", "keypoint_score", "global_vector"]


class RequestRejected(DelfEsError):
    """Elasticsearch refused a request for a reason other than load (a 4xx other than 429):
    a malformed query, a mapping conflict.  Not worth retrying."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message, status)
        self.message = message
        self.status = status

    def __str__(self) -> str:
        return self.message


# --------------------------------------------------------------------------------------
# Templates, ids, encodings.
# --------------------------------------------------------------------------------------


def render_template(
    name: str = f"images-{SCHEMA}.json",
    *,
    model_id: str,
    local_dims: int,
    global_dims: int | None,
    max_keypoints: int = MAX_KEYPOINTS,
    directory: Path = MAPPINGS_DIR,
) -> dict[str, Any]:
    """The index body (``settings``, ``mappings``) of template ``name`` with its parameters filled.

    A string value that is exactly ``{{param}}`` becomes the parameter's value (numbers stay
    numbers); a ``dims`` whose value is None is dropped (Elasticsearch then takes the dimension
    from the first vector); top-level keys starting with ``_`` (comments) are dropped.
    """
    params = {
        "model_id": model_id,
        "local_dims": local_dims,
        "global_dims": global_dims,
        "max_keypoints": max_keypoints,
    }
    template = json.loads((directory / name).read_text())

    def fill(node: Any) -> Any:
        if isinstance(node, dict):
            out = {}
            for key, value in node.items():
                value = fill(value)
                if key == "dims" and value is None:
                    continue
                out[key] = value
            return out
        if isinstance(node, list):
            return [fill(item) for item in node]
        if isinstance(node, str) and node.startswith("{{") and node.endswith("}}"):
            key = node[2:-2].strip()
            if key not in params:
                raise KeyError(f"template {name}: unknown parameter {node}")
            return params[key]
        return node

    return {key: fill(value) for key, value in template.items() if not key.startswith("_")}


def index_name(alias: str, model_id: str) -> str:
    """The concrete, versioned index behind ``alias`` for ``model_id``."""
    return f"{alias}-{SCHEMA}-{hashlib.sha1(model_id.encode()).hexdigest()[:12]}"


def document_id(image_id: str) -> str:
    """The Elasticsearch ``_id`` of an image: the image id itself when it fits in 512 bytes,
    else ``~sha256:<hex>`` of it (the full id stays in the ``image_id`` field)."""
    if len(image_id.encode("utf-8")) <= MAX_ID_BYTES and not image_id.startswith(_HASHED_ID_PREFIX):
        return image_id
    return _HASHED_ID_PREFIX + hashlib.sha256(image_id.encode("utf-8")).hexdigest()


def _vector(values: np.ndarray) -> str:
    """A float32 vector in Elasticsearch's base64 form (big-endian float32)."""
    return base64.b64encode(np.asarray(values, ">f4").tobytes()).decode("ascii")


def _pack(values: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(values, "<f4").tobytes()).decode("ascii")


def _unpack(text: str | None, columns: int) -> np.ndarray:
    raw = base64.b64decode(text or "")
    return np.frombuffer(raw, "<f4").astype(np.float32).reshape(-1, columns)


def _backoff(attempt: int) -> float:
    """Seconds to wait before retry ``attempt + 1`` (0.5, 1, 2 ... capped), as streaming_bulk waits."""
    return min(MAX_BACKOFF, INITIAL_BACKOFF * 2**attempt)


def _redact(url: str) -> str:
    """``url`` without credentials, for messages."""
    parts = urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def _reason(error: Any) -> str:
    """One line from an Elasticsearch error object (bulk item, msearch item, ApiError body)."""
    if isinstance(error, Mapping):
        text = f"{error.get('type', 'error')}: {error.get('reason', '')}"
        cause = error.get("caused_by")
        if isinstance(cause, Mapping) and cause.get("reason") and cause.get("reason") != error.get("reason"):
            text += f" ({cause.get('type')}: {cause.get('reason')})"
        return text
    return str(error)


@dataclass(frozen=True)
class _Index:
    """The concrete index behind the alias, as recorded in its mapping's ``_meta``."""

    name: str
    model_id: str
    local_dims: int
    global_dims: int | None
    quantised_keypoints: bool
    quantised_global: bool


# --------------------------------------------------------------------------------------
# The backend.
# --------------------------------------------------------------------------------------


class ElasticsearchBackend:
    """An image index on Elasticsearch (see the module docstring for the layout).

    Args:
        settings: ``es_url`` (required unless ``client`` is given), ``index_alias``,
            ``es_timeout`` (s per request), ``es_knn_num_candidates``.
        model_id: the model whose features this index holds; records of another model are
            refused.  None: the model of the existing index, or of the first record written.
        client: an Elasticsearch client to use instead of one built from ``settings``
            (it is not closed by :meth:`close`).
    """

    def __init__(self, settings: Settings, model_id: str | None = None, client: Elasticsearch | None = None) -> None:
        if client is None and not settings.es_url:
            raise ValueError("ElasticsearchBackend needs settings.es_url (or a client)")
        self.settings = settings
        self.alias = settings.index_alias
        self.model_id = model_id
        self.url = _redact(settings.es_url or "(client given)")
        self.timeout = float(settings.es_timeout)
        self.num_candidates = int(settings.es_knn_num_candidates)
        self._owns_client = client is None
        self._client = client or Elasticsearch(
            settings.es_url,
            request_timeout=self.timeout,
            max_retries=1,  # one more try on a dropped connection; 429/5xx are handled here
            retry_on_timeout=False,
            retry_on_status=(),
        )
        self._index: _Index | None = None

    # ------------------------------------------------------------------ errors

    def _unavailable(self, action: str, exc: BaseException) -> IndexUnavailable:
        detail = exc.message if isinstance(exc, elastic_transport.TransportError) else str(exc)
        return IndexUnavailable(f"Elasticsearch at {self.url} unavailable ({action}): {detail}")

    def _wrap(self, action: str, exc: ApiError) -> DelfEsError:
        """The delf-es error for an HTTP error answer."""
        status = exc.meta.status if exc.meta is not None else None
        if status == 429 or (status is not None and status >= 500):
            return self._unavailable(action, exc)
        error = exc.body.get("error") if isinstance(exc.body, Mapping) else exc.body
        message = f"Elasticsearch at {self.url} rejected {action} (HTTP {status}): {_reason(error)}"
        return RequestRejected(message, status)

    def _call(self, action: str, function: Any, *args: Any, **kwargs: Any) -> Any:
        """Run a client call.  429 is retried with capped backoff; NotFoundError is left to the
        caller; other failures become IndexUnavailable (unreachable, 429, 5xx) or RequestRejected."""
        attempt = 0
        while True:
            try:
                return function(*args, **kwargs)
            except NotFoundError:
                raise
            except ApiError as exc:
                if exc.meta is not None and exc.meta.status == 429 and attempt < RETRIES_ON_429:
                    time.sleep(_backoff(attempt))
                    attempt += 1
                    continue
                raise self._wrap(action, exc) from exc
            except elastic_transport.TransportError as exc:
                raise self._unavailable(action, exc) from exc

    # ------------------------------------------------------------------ index and alias

    def _load_index(self) -> _Index | None:
        """Read which index the alias points at, and its ``_meta``; None if there is none."""
        try:
            found = self._call(
                "reading the index", self._client.indices.get, index=self.alias, features="aliases,mappings"
            )
        except NotFoundError:
            self._index = None
            return None
        name = self._write_index(found)
        mapping = found[name]["mappings"]
        meta = mapping.get("_meta") or {}
        if not meta.get("model_id") or not meta.get("local_dims"):
            raise RequestRejected(f"{name} (behind {self.alias}) at {self.url} is not a delf-es image index")
        properties = mapping.get("properties", {})
        keypoint_type = properties.get("keypoints", {}).get("properties", {}).get("vector", {})
        global_type = properties.get("global_vector", {})
        global_dims = meta.get("global_dims") or global_type.get("dims")
        self._index = _Index(
            name=name,
            model_id=str(meta["model_id"]),
            local_dims=int(meta["local_dims"]),
            global_dims=int(global_dims) if global_dims else None,
            quantised_keypoints=keypoint_type.get("index_options", {}).get("type", "hnsw") != "hnsw",
            quantised_global=global_type.get("index_options", {}).get("type", "hnsw") != "hnsw",
        )
        return self._index

    def _write_index(self, found: Mapping[str, Any]) -> str:
        if len(found) == 1:
            return next(iter(found))
        for name, body in found.items():
            if body.get("aliases", {}).get(self.alias, {}).get("is_write_index"):
                return name
        raise RequestRejected(f"alias {self.alias} at {self.url} points at {sorted(found)} and none is its write index")

    def _current(self) -> _Index | None:
        return self._index if self._index is not None else self._load_index()

    def _create_index(self, model_id: str, local_dims: int, global_dims: int | None) -> _Index:
        """Create the versioned index with the alias (idempotent, safe against a concurrent creator)."""
        name = index_name(self.alias, model_id)
        body = render_template(model_id=model_id, local_dims=local_dims, global_dims=global_dims)
        try:
            self._call(
                f"creating index {name}",
                self._client.indices.create,
                index=name,
                settings=body["settings"],
                mappings=body["mappings"],
                aliases={self.alias: {"is_write_index": True}},
            )
            logger.info("created index %s behind alias %s (model %s)", name, self.alias, model_id)
        except RequestRejected as exc:
            # Someone else created the index or the alias first: use what is there.
            if self._load_index() is None:
                raise exc
        index = self._load_index()
        if index is None:
            raise RequestRejected(f"index {name} was created but alias {self.alias} does not point at it")
        return index

    # ------------------------------------------------------------------ writes

    def _document(self, record: ImageRecord) -> dict[str, Any]:
        features = record.features
        width, height = features.image_size
        pca = _PCA_RE.search(features.model_id)
        doc: dict[str, Any] = {
            "image_id": record.image_id,
            "path": record.path,
            "metadata": dict(record.metadata),
            "width": int(width),
            "height": int(height),
            "num_keypoints": features.num_keypoints,
            "model_id": features.model_id,
            "pca_id": pca.group(1) if pca else None,
            "created_at": record.created_at,
            "keypoints": [{"vector": _vector(row)} for row in features.descriptors],
            "keypoint_xy": _pack(features.keypoints),
            "keypoint_scale": _pack(features.scales),
            "keypoint_score": _pack(features.scores),
        }
        if len(features.global_desc):
            doc["global_vector"] = _vector(features.global_desc)
        return doc

    def _refusal(self, record: ImageRecord, index: _Index) -> str | None:
        """Why ``record`` cannot go into ``index``, or None."""
        features = record.features
        if self.model_id is not None and features.model_id != self.model_id:
            return f"model_id {features.model_id!r} differs from this backend's model {self.model_id!r}"
        if features.model_id != index.model_id:
            return f"model_id {features.model_id!r} differs from the model of index {index.name} ({index.model_id!r})"
        if features.descriptor_dim != index.local_dims:
            return f"local descriptors have {features.descriptor_dim} dims, index {index.name} holds {index.local_dims}"
        if len(features.global_desc) and index.global_dims and len(features.global_desc) != index.global_dims:
            return (
                f"global descriptor has {len(features.global_desc)} dims, "
                f"index {index.name} holds {index.global_dims}"
            )
        if features.num_keypoints > MAX_KEYPOINTS:
            return f"{features.num_keypoints} keypoints, more than the {MAX_KEYPOINTS} an image may hold"
        return None

    def _index_for(self, records: list[ImageRecord]) -> _Index:
        """The index to write to, created from the first record of the right model if missing."""
        index = self._load_index()  # re-read on every write: the alias may have been swapped
        if index is not None:
            return index
        wanted = self.model_id or records[0].features.model_id
        first = next((r.features for r in records if r.features.model_id == wanted), None)
        if first is None:  # every record is of another model: nothing will be written
            return _Index(index_name(self.alias, wanted), wanted, -1, None, False, False)
        global_sizes = (len(r.features.global_desc) for r in records if r.features.model_id == wanted)
        global_dims = next((size for size in global_sizes if size), None)
        return self._create_index(wanted, first.descriptor_dim, global_dims)

    def upsert(self, records: Iterable[ImageRecord], refresh: bool = False) -> BulkReport:
        """Write images, each replacing any image of the same id (one document: atomic).

        Items are refused (failed, not raised) for another model_id, other descriptor dims, or
        any error Elasticsearch reports for the document.  Raises IndexUnavailable when the
        server cannot be reached or still rejects items with 429 after the retries.
        """
        records = list(records)
        if not records:
            return BulkReport()
        index = self._index_for(records)
        outcome: dict[int, str | None] = {}  # position -> None (written) or error
        positions: dict[str, list[int]] = {}  # _id -> positions awaiting a bulk result

        def actions() -> Iterator[dict[str, Any]]:
            for position, record in enumerate(records):
                refusal = self._refusal(record, index)
                if refusal is not None:
                    outcome[position] = refusal
                    continue
                doc_id = document_id(record.image_id)
                positions.setdefault(doc_id, []).append(position)
                yield {"_op_type": "index", "_index": self.alias, "_id": doc_id, "_source": self._document(record)}

        overloaded = self._bulk("upsert", actions(), positions, outcome)
        if refresh:
            self.refresh()
        return self._report([r.image_id for r in records], outcome, overloaded, "upsert")

    def delete(self, image_ids: Iterable[str], refresh: bool = False) -> BulkReport:
        """Remove images; an unknown id is a failed item."""
        ids = [str(image_id) for image_id in image_ids]
        if not ids:
            return BulkReport()
        outcome: dict[int, str | None] = {}
        if self._current() is None:
            return BulkReport(failed=[ItemFailure(image_id, "not found") for image_id in ids])
        positions: dict[str, list[int]] = {}

        def actions() -> Iterator[dict[str, Any]]:
            for position, image_id in enumerate(ids):
                doc_id = document_id(image_id)
                positions.setdefault(doc_id, []).append(position)
                yield {"_op_type": "delete", "_index": self.alias, "_id": doc_id}

        overloaded = self._bulk("delete", actions(), positions, outcome)
        if refresh:
            self.refresh()
        return self._report(ids, outcome, overloaded, "delete")

    def _bulk(
        self,
        action: str,
        actions: Iterator[dict[str, Any]],
        positions: dict[str, list[int]],
        outcome: dict[int, str | None],
    ) -> int:
        """Send ``actions`` with streaming_bulk; fill ``outcome``; return how many items stayed 429."""
        overloaded = 0
        try:
            for ok, item in helpers.streaming_bulk(
                self._client.options(request_timeout=max(60.0, BULK_TIMEOUT_FACTOR * self.timeout)),
                actions,
                chunk_size=BULK_CHUNK_DOCS,
                max_chunk_bytes=BULK_CHUNK_BYTES,
                raise_on_error=False,
                max_retries=RETRIES_ON_429,
                initial_backoff=INITIAL_BACKOFF,
                max_backoff=MAX_BACKOFF,
            ):
                result = next(iter(item.values()))
                queue = positions.get(str(result.get("_id")))
                if not queue:  # pragma: no cover - Elasticsearch always echoes the _id
                    logger.warning("bulk %s: result for unknown id %r", action, result.get("_id"))
                    continue
                position = queue.pop(0)
                if ok:
                    outcome[position] = None
                    continue
                status = result.get("status")
                if status == 429 or (isinstance(status, int) and status >= 500):
                    overloaded += 1
                if status == 404 and result.get("result") == "not_found":
                    outcome[position] = "not found"
                else:
                    outcome[position] = _reason(result.get("error")) if result.get("error") else f"HTTP {status}"
        except ApiError as exc:
            raise self._wrap(f"bulk {action}", exc) from exc
        except elastic_transport.TransportError as exc:
            raise self._unavailable(f"bulk {action}", exc) from exc
        return overloaded

    def _report(self, ids: list[str], outcome: dict[int, str | None], overloaded: int, action: str) -> BulkReport:
        if overloaded:
            written = sum(error is None for error in outcome.values())
            raise IndexUnavailable(
                f"Elasticsearch at {self.url} overloaded: {overloaded} {action} item(s) still rejected "
                f"(429/5xx) after {RETRIES_ON_429} retries; {written} item(s) were written"
            )
        succeeded = [ids[p] for p in sorted(outcome) if outcome[p] is None]
        failed = [ItemFailure(ids[p], str(outcome[p])) for p in sorted(outcome) if outcome[p] is not None]
        return BulkReport(succeeded=succeeded, failed=failed)

    # ------------------------------------------------------------------ reads

    def get(self, image_id: str) -> StoredImage:
        """The stored document of ``image_id``; :class:`ImageNotFound` if unknown."""
        try:
            found = self._call(
                "get", self._client.get, index=self.alias, id=document_id(image_id), source_excludes=_BULKY_FIELDS
            )
        except NotFoundError:
            raise ImageNotFound(image_id) from None
        source = found["_source"]
        return StoredImage(
            image_id=source["image_id"],
            path=source["path"],
            metadata=source.get("metadata") or {},
            width=int(source["width"]),
            height=int(source["height"]),
            num_keypoints=int(source["num_keypoints"]),
            model_id=source["model_id"],
            created_at=source["created_at"],
        )

    def _mget(self, image_ids: list[str], source: Any) -> Iterator[dict[str, Any]]:
        """The found documents among ``image_ids`` (ids of a missing index are not found)."""
        for start in range(0, len(image_ids), MGET_CHUNK):
            chunk = [document_id(image_id) for image_id in image_ids[start : start + MGET_CHUNK]]
            try:
                found = self._call("mget", self._client.mget, index=self.alias, ids=chunk, source=source)
            except NotFoundError:
                return
            for doc in found["docs"]:
                if doc.get("found"):
                    yield doc
                elif "error" in doc and doc["error"].get("type") != "index_not_found_exception":
                    raise RequestRejected(f"Elasticsearch at {self.url}: mget failed: {_reason(doc['error'])}")

    def existing(self, image_ids: Iterable[str]) -> set[str]:
        """The subset of ``image_ids`` that is indexed."""
        wanted = list(dict.fromkeys(str(image_id) for image_id in image_ids))
        by_doc = {document_id(image_id): image_id for image_id in wanted}
        return {by_doc[doc["_id"]] for doc in self._mget(wanted, False)}

    def count(self) -> int:
        """Number of indexed images (top-level documents; nested keypoints are not counted)."""
        try:
            return int(self._call("count", self._client.count, index=self.alias)["count"])
        except NotFoundError:
            return 0

    def keypoints(self, image_ids: Iterable[str]) -> dict[str, np.ndarray]:
        """Stored keypoint locations, (N, 2) float32 (x, y) px per image; unknown ids left out.
        One ``mget`` per 500 ids, reading only the packed locations."""
        wanted = list(dict.fromkeys(str(image_id) for image_id in image_ids))
        return {
            doc["_source"]["image_id"]: _unpack(doc["_source"].get("keypoint_xy"), 2)
            for doc in self._mget(wanted, ["image_id", "keypoint_xy"])
        }

    # ------------------------------------------------------------------ search

    @staticmethod
    def _check_k(k: int) -> int:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        return int(k)

    def _filters(self, metadata_filter: MetadataFilter | None, image_ids: list[str] | None) -> list[Any]:
        filters: list[Any] = []
        if metadata_filter is not None:
            if not isinstance(metadata_filter, Mapping):
                raise UnsupportedFilter(f"a metadata filter is an Elasticsearch query object, got {metadata_filter!r}")
            filters.append(dict(metadata_filter))
        if image_ids is not None:
            filters.append({"terms": {"image_id": image_ids}})
        return filters

    def knn(
        self,
        descriptors: np.ndarray,
        k: int,
        metadata_filter: MetadataFilter | None = None,
        image_ids: Iterable[str] | None = None,
    ) -> Neighbours:
        """The ``k`` (at most 10 000) nearest stored keypoints of each query descriptor.

        Args:
            descriptors: (Q, D) float32 unit rows.
            k: neighbours per query (fewer when fewer keypoints are allowed).
            metadata_filter: an Elasticsearch query on ``metadata.*``; a pre-filter.
            image_ids: only these images (None: all).

        Returns:
            Neighbours grouped by query (ascending), best first within a query.
        """
        k = self._check_k(k)
        if not isinstance(descriptors, np.ndarray) or descriptors.ndim != 2:
            got = str(descriptors.shape) if isinstance(descriptors, np.ndarray) else type(descriptors).__name__
            raise FeatureShapeError("descriptors", "(Q, D) array", got)
        restrict = None if image_ids is None else list(dict.fromkeys(str(i) for i in image_ids))
        filters = self._filters(metadata_filter, restrict)
        index = self._current()
        if index is None:
            return Neighbours.empty()
        if descriptors.shape[1] != index.local_dims:
            raise FeatureShapeError("descriptors", f"(Q, {index.local_dims})", str(descriptors.shape))
        if len(descriptors) == 0 or restrict == []:
            return Neighbours.empty()
        queries = np.ascontiguousarray(descriptors, dtype=np.float32)
        images = min(k, MAX_KNN)
        search: dict[str, Any] = {
            "field": "keypoints.vector",
            "k": images,
            "num_candidates": min(max(self.num_candidates, images), MAX_KNN),
            "inner_hits": {"size": min(k, MAX_KEYPOINTS), "_source": False},
        }
        if filters:
            search["filter"] = filters
        if index.quantised_keypoints:  # re-score candidates with the float vectors: exact similarities
            search["rescore_vector"] = {"oversample": 1.0}
        bodies = []
        for row in queries:
            bodies.append({"knn": {**search, "query_vector": _vector(row)}, "_source": False,
                           "docvalue_fields": ["image_id"], "size": images})
        responses = self._msearch(bodies, [
            "responses.hits.hits.fields.image_id",
            "responses.hits.hits.inner_hits.keypoints.hits.hits._score",
            "responses.hits.hits.inner_hits.keypoints.hits.hits._nested.offset",
        ])
        query_index: list[int] = []
        names: list[str] = []
        keypoint: list[int] = []
        similarity: list[float] = []
        for q, response in enumerate(responses):
            found: list[tuple[float, str, int]] = []
            for hit in response.get("hits", {}).get("hits", []):
                image_id = hit["fields"]["image_id"][0]
                for inner in hit["inner_hits"]["keypoints"]["hits"]["hits"]:
                    found.append((2.0 * inner["_score"] - 1.0, image_id, int(inner["_nested"]["offset"])))
            found.sort(key=lambda item: (-item[0], item[1], item[2]))
            for score, image_id, offset in found[:k]:
                query_index.append(q)
                names.append(image_id)
                keypoint.append(offset)
                similarity.append(score)
        if not query_index:
            return Neighbours.empty()
        return Neighbours(
            query_index=np.array(query_index, np.int64),
            image_ids=np.array(names, dtype=object),
            keypoint_index=np.array(keypoint, np.int64),
            similarity=np.clip(np.array(similarity, np.float32), -1.0, 1.0),
        )

    def _msearch(self, bodies: list[dict[str, Any]], fields: list[str]) -> list[dict[str, Any]]:
        """Run searches on the alias through ``_msearch``, in chunks; 429s retried, errors raised."""
        filter_path = ["responses.status", "responses.error"] + fields
        out: list[dict[str, Any]] = []
        for start in range(0, len(bodies), KNN_SEARCHES_PER_REQUEST):
            chunk = bodies[start : start + KNN_SEARCHES_PER_REQUEST]
            results: list[dict[str, Any] | None] = [None] * len(chunk)
            pending = list(range(len(chunk)))
            for attempt in range(RETRIES_ON_429 + 1):
                searches: list[dict[str, Any]] = []
                for i in pending:
                    searches += [{"index": self.alias}, chunk[i]]
                try:
                    answer = self._call("kNN search", self._client.msearch, searches=searches, filter_path=filter_path)
                except RequestRejected as exc:  # our bodies are well-formed: the caller's filter is not
                    if exc.status == 400:
                        raise UnsupportedFilter(f"{exc.message} (check the metadata filter)", "filter") from exc
                    raise
                retry = []
                for i, response in zip(pending, answer["responses"]):
                    status = response.get("status", 200)
                    error = response.get("error")
                    if error is None:
                        results[i] = response
                    elif status == 429 and attempt < RETRIES_ON_429:
                        retry.append(i)
                    elif error.get("type") == "index_not_found_exception":
                        results[i] = {}
                    else:
                        raise self._search_error(status, error)
                if not retry:
                    break
                pending = retry
                time.sleep(_backoff(attempt))
            out.extend(result if result is not None else {} for result in results)
        return out

    def _search_error(self, status: int, error: Mapping[str, Any]) -> DelfEsError:
        """The delf-es error for one failed search of an ``_msearch``."""
        where = f"Elasticsearch at {self.url}"
        if status == 429 or status >= 500:
            return IndexUnavailable(f"{where} unavailable (kNN search, HTTP {status}): {_reason(error)}")
        if status == 400:  # our bodies are well-formed: the caller's filter is not
            return UnsupportedFilter(f"{where} refused the search: {_reason(error)}", "filter")
        return RequestRejected(f"{where} refused the search (HTTP {status}): {_reason(error)}", status)

    def global_knn(
        self, vector: np.ndarray, k: int, metadata_filter: MetadataFilter | None = None
    ) -> list[tuple[str, float]]:
        """Images whose global descriptor is nearest to (G,) ``vector``: (image_id, cosine), best first."""
        k = self._check_k(k)
        if not isinstance(vector, np.ndarray) or vector.ndim != 1:
            got = str(vector.shape) if isinstance(vector, np.ndarray) else type(vector).__name__
            raise FeatureShapeError("vector", "(G,) array", got)
        filters = self._filters(metadata_filter, None)
        index = self._current()
        if index is None:
            return []
        if index.global_dims is None:  # the first images had no global descriptor: look again
            index = self._load_index()
            if index is None or index.global_dims is None:
                return []
        if len(vector) != index.global_dims:
            raise FeatureShapeError("vector", f"({index.global_dims},)", str(vector.shape))
        size = min(k, MAX_KNN)
        search: dict[str, Any] = {
            "field": "global_vector",
            "query_vector": _vector(vector),
            "k": size,
            "num_candidates": min(max(self.num_candidates, size), MAX_KNN),
        }
        if filters:
            search["filter"] = filters
        if index.quantised_global:
            search["rescore_vector"] = {"oversample": 2.0}
        (response,) = self._msearch(
            [{"knn": search, "_source": False, "docvalue_fields": ["image_id"], "size": size}],
            ["responses.hits.hits.fields.image_id", "responses.hits.hits._score"],
        )
        return [
            (hit["fields"]["image_id"][0], float(np.clip(2.0 * hit["_score"] - 1.0, -1.0, 1.0)))
            for hit in response.get("hits", {}).get("hits", [])
        ]

    # ------------------------------------------------------------------ housekeeping

    def refresh(self) -> None:
        """Make all writes visible to search."""
        try:
            self._call("refresh", self._client.indices.refresh, index=self.alias)
        except NotFoundError:
            pass

    def close(self) -> None:
        """Close the client if this backend built it.  Idempotent."""
        if self._owns_client:
            self._client.close()

    def __enter__(self) -> "ElasticsearchBackend":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ElasticsearchBackend({self.url!r}, alias={self.alias!r}, model_id={self.model_id!r})"
