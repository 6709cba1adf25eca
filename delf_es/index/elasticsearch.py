"""Elasticsearch index: one document per image plus one document per keypoint.

Usage::

    backend = ElasticsearchBackend(Settings(es_url="http://127.0.0.1:9200"), model_id=extractor.model_id)
    report = backend.upsert(records, refresh=True)   # BulkReport: per-item failures
    hits = backend.knn(query.descriptors, k=10)       # Neighbours, via _msearch
    backend.close()

Layout (chosen by ``benchmarks/es_layout.py``; numbers in ``benchmarks/results/es_layout.json``):

* the **images index** (template ``mappings/images-v1.json``, alias ``settings.index_alias``):
  one document per image with its path, metadata, size, model, global descriptor
  (``global_vector``), keypoint geometry as packed float32 arrays (``keypoint_xy`` ...), and
  ``generation`` / ``slot`` naming its live keypoints;
* the **keypoints index** (``mappings/keypoints-v1.json``, alias ``<alias>-keypoints``): one
  document per keypoint (``image_id``, ``keypoint`` index, ``generation``, a copy of the image's
  ``metadata``, ``vector``).  A kNN search returns keypoint documents directly.  Keypoint
  vectors are int8 codes (``element_type: byte``, cosine; :func:`int8_codes`): 40 bytes per
  40-d descriptor instead of 160, and Elasticsearch then keeps no float copy (its ``int8_hnsw``
  quantisation stores the floats *as well*).

One document per keypoint was measured 4x cheaper per query descriptor than nested vectors in
the image document (whose ``inner_hits`` cost as much as the search), and it has no cliff on a
live index: nested kNN collects ``num_candidates`` distinct *images* per segment, so every
segment holding fewer images than that is searched exhaustively (50-100 ms per descriptor
measured on 300 unmerged images).

Consistency without transactions.  Each image has two keypoint *slots*; keypoint ``j`` of slot
``s`` has ``_id`` ``<key>.<s>.<j>`` (``key`` = 16 characters of a hash of the image id).  A write:

1. writes the new keypoints, with a fresh random ``generation``, into the slot the live version
   does not use (and deletes that slot's surplus keypoints from an older version);
2. only if every keypoint was accepted, writes the image document naming the new generation and
   slot: the commit point;
3. deletes the previous version's keypoints (best effort: a leftover is never counted, see
   below, and is deleted by the next write of that image, which knows its count).

A keypoint hit counts only if its ``generation`` equals its image document's (one search of the
images index per ``knn`` call), so a search sees a whole version of each image or nothing of a
version: a crash or a rejected keypoint leaves the previous version intact and searchable, never
half an image.  A delete removes the keypoints, then the image document; interrupted, the image
stays partly searchable until the delete is retried (deletes are idempotent).  The ``metadata``
copy on each keypoint makes the metadata filter a kNN pre-filter (correct ``k`` results among
the allowed images); the ``image_ids`` restriction is a ``terms`` pre-filter on ``image_id``.

Index and aliases: the concrete indices are ``<alias>-v1-<h>`` and ``<alias>-keypoints-v1-<h>``
(``h`` = 12 hex of sha1(model_id)), created on the first write (dims from the first record) and
aliased in one atomic ``_aliases`` call; everything goes through the aliases, so a later reindex
can fill new indices and swap both aliases at once.  Model and dims live in the mappings'
``_meta``; a record of another model_id is refused client-side as a failed item (this build has
neither ``constant_keyword`` nor ingest processors to enforce it server-side).

Failures: connection errors, timeouts, HTTP 429 and 5xx become
:class:`~delf_es.errors.IndexUnavailable` naming the URL.  Requests time out after
``settings.es_timeout`` s (bulk writes: 6x, at least 60 s, since inserting into the HNSW graph
costs ~0.3-0.5 ms of CPU per keypoint) with one transport retry, so a dead server fails in
milliseconds to seconds, never hangs.  Only 429s are retried, with capped exponential backoff
(0.5, 1, 2 s); bulk items still rejected then raise IndexUnavailable (writes are idempotent).

Elasticsearch build notes (the integ-test-zip of scripts/services.sh): no painless, reindex,
``_delete_by_query`` (hence deterministic keypoint ids), ingest processors, ``constant_keyword``
or parent-join; ``GET /`` answers 405, so the client's ``info()``/``ping()`` fail (use
``cluster.health``); dense vectors are left out of ``_source``
(``index.mapping.exclude_source_vectors``: a reindex must ask for them); vectors travel as
base64 big-endian float32 (global) or hexadecimal int8 (keypoints), which this version accepts
for indexing and queries.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping
from urllib.parse import urlsplit, urlunsplit

import elastic_transport
import numpy as np
from elasticsearch import ApiError, Elasticsearch, NotFoundError, helpers

from delf_es.errors import (
    ConfigurationError,
    DelfEsError,
    FeatureShapeError,
    ImageNotFound,
    IndexUnavailable,
    InvalidRequest,
    ItemFailure,
    RequestRejected,
    UnsupportedFilter,
)
from delf_es.index.codes import int8_codes, non_unit_rows
from delf_es.index.base import BulkReport, ImageRecord, MetadataFilter, Neighbours, StoredImage
from delf_es.settings import Settings

__all__ = [
    "ElasticsearchBackend",
    "RequestRejected",
    "render_template",
    "document_id",
    "keypoint_id",
    "index_names",
    "MAPPINGS_DIR",
    "SCHEMA",
]

logger = logging.getLogger(__name__)


def _mappings_dir() -> Path:
    """The top-level ``mappings/``: shipped as ``delf_es/mappings/`` in a wheel (pyproject.toml),
    read from the source tree in a checkout or an editable install."""
    packaged = Path(__file__).resolve().parents[1] / "mappings"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "mappings"


#: Versioned index templates: ``images-<SCHEMA>.json`` and ``keypoints-<SCHEMA>.json``.
MAPPINGS_DIR = _mappings_dir()
SCHEMA = "v1"
#: Suffix of the keypoints alias and index names.
KEYPOINTS_SUFFIX = "-keypoints"
#: ``num_candidates`` multiplier for a kNN restricted to ``image_ids``: HNSW search under a
#: selective filter loses recall (0.81 -> 0.99 at 100 of 300 images for x10, ~2 ms per descriptor).
RESTRICTED_CANDIDATES_FACTOR = 10
#: Elasticsearch's caps on kNN ``k`` / ``num_candidates``, and on a search's ``size``.
MAX_KNN = 10_000
MAX_RESULT_WINDOW = 10_000
#: Searches per ``_msearch`` request: large enough to amortise the round trip, small enough to
#: finish well inside ``es_timeout`` on a loaded node.
KNN_SEARCHES_PER_REQUEST = 100
#: Ids per ``mget`` request; image ids per generation-check search.
MGET_CHUNK = 500
CHECK_CHUNK = 5_000
#: Images per write round (one mget, then keypoints, image documents, old keypoints).
IMAGES_PER_ROUND = 10
#: Bulk requests, by count and by bytes (a keypoint document is ~250 bytes of JSON).
BULK_CHUNK_DOCS = 2_000
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
_BULKY_FIELDS = ["keypoint_xy", "keypoint_scale", "keypoint_score", "keypoint_codes", "global_vector", "thumbnail"]
#: What a write needs to know of the live version of an image.
_VERSION_FIELDS = ["generation", "slot", "num_keypoints", "other_slot_keypoints"]


# --------------------------------------------------------------------------------------
# Templates, ids, encodings.
# --------------------------------------------------------------------------------------


def render_template(
    name: str = f"images-{SCHEMA}.json",
    *,
    model_id: str,
    local_dims: int,
    global_dims: int | None = None,
    directory: Path = MAPPINGS_DIR,
) -> dict[str, Any]:
    """The index body (``settings``, ``mappings``) of template ``name`` with its parameters filled.

    A string value that is exactly ``{{param}}`` becomes the parameter's value (numbers stay
    numbers); a ``dims`` whose value is None is dropped (Elasticsearch then takes the dimension
    from the first vector); top-level keys starting with ``_`` (comments) are dropped.
    """
    params = {"model_id": model_id, "local_dims": local_dims, "global_dims": global_dims}
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


def index_names(alias: str, model_id: str) -> tuple[str, str]:
    """The concrete, versioned (images, keypoints) indices behind ``alias`` for ``model_id``."""
    digest = hashlib.sha1(model_id.encode()).hexdigest()[:12]
    return f"{alias}-{SCHEMA}-{digest}", f"{alias}{KEYPOINTS_SUFFIX}-{SCHEMA}-{digest}"


def document_id(image_id: str) -> str:
    """The Elasticsearch ``_id`` of an image document: the image id itself when it fits in 512
    bytes, else ``~sha256:<hex>`` of it (the full id stays in the ``image_id`` field)."""
    if len(image_id.encode("utf-8")) <= MAX_ID_BYTES and not image_id.startswith(_HASHED_ID_PREFIX):
        return image_id
    return _HASHED_ID_PREFIX + hashlib.sha256(image_id.encode("utf-8")).hexdigest()


def _image_key(image_id: str) -> str:
    """16 url-safe characters (96 bits) of a hash of ``image_id``: short keypoint ids."""
    digest = hashlib.sha256(image_id.encode("utf-8")).digest()
    return base64.urlsafe_b64encode(digest[:12]).decode("ascii")


def keypoint_id(image_id: str, slot: int, index: int) -> str:
    """The ``_id`` of keypoint ``index`` of ``image_id`` in ``slot`` (0 or 1)."""
    return f"{_image_key(image_id)}.{slot}.{index}"


def _vector(values: np.ndarray) -> str:
    """A float32 vector in Elasticsearch's base64 form (big-endian float32)."""
    return base64.b64encode(np.asarray(values, ">f4").tobytes()).decode("ascii")


def _byte_vector(codes: np.ndarray) -> str:
    """An int8 vector in Elasticsearch's hexadecimal form for ``element_type: byte``."""
    return np.ascontiguousarray(codes, np.int8).tobytes().hex()


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
class _Indices:
    """The concrete indices behind the aliases, as recorded in their mappings' ``_meta``."""

    images: str
    keypoints: str
    model_id: str
    local_dims: int
    global_dims: int | None
    quantised_global: bool
    thumbnails: bool = False  # the mapping has the thumbnail fields (indexes since the HTTP API)


@dataclass(frozen=True)
class _Version:
    """The live version of an image, from its image document."""

    generation: int
    slot: int
    num_keypoints: int
    other_slot_keypoints: int


@dataclass
class _Write:
    """One image being written (see the module docstring for the steps)."""

    position: int
    record: ImageRecord
    generation: int
    slot: int
    surplus_in_slot: int  # keypoints of an older version that may remain in ``slot``
    previous: _Version | None
    error: str | None = None


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
            raise ConfigurationError("ElasticsearchBackend needs settings.es_url (or a client)")
        self.settings = settings
        self.alias = settings.index_alias
        self.keypoints_alias = settings.index_alias + KEYPOINTS_SUFFIX
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
        self._indices: _Indices | None = None

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

    # ------------------------------------------------------------------ indices and aliases

    def _load_indices(self) -> _Indices | None:
        """Read which indices the aliases point at, and their ``_meta``; None if not both exist."""
        found = self._call(
            "reading the index",
            self._client.indices.get,
            index=f"{self.alias},{self.keypoints_alias}",
            features="aliases,mappings",
            ignore_unavailable=True,
            allow_no_indices=True,
        )
        images = self._behind(found, self.alias)
        keypoints = self._behind(found, self.keypoints_alias)
        if images is None or keypoints is None:
            self._indices = None
            return None
        mapping = found[images]["mappings"]
        meta = mapping.get("_meta") or {}
        if not meta.get("model_id") or not meta.get("local_dims"):
            raise RequestRejected(f"{images} (behind {self.alias}) at {self.url} is not a delf-es image index")
        global_type = mapping.get("properties", {}).get("global_vector", {})
        global_dims = meta.get("global_dims") or global_type.get("dims")
        self._indices = _Indices(
            images=images,
            keypoints=keypoints,
            model_id=str(meta["model_id"]),
            local_dims=int(meta["local_dims"]),
            global_dims=int(global_dims) if global_dims else None,
            quantised_global=global_type.get("index_options", {}).get("type", "hnsw") != "hnsw",
            thumbnails="thumbnail" in mapping.get("properties", {}),
        )
        return self._indices

    def _behind(self, found: Mapping[str, Any], alias: str) -> str | None:
        """The (write) index that ``alias`` points at, among ``found``."""
        names = [name for name, body in found.items() if alias in body.get("aliases", {}) or name == alias]
        if len(names) <= 1:
            return names[0] if names else None
        for name in names:
            if found[name]["aliases"][alias].get("is_write_index"):
                return name
        raise RequestRejected(f"alias {alias} at {self.url} points at {sorted(names)} and none is its write index")

    def _current(self) -> _Indices | None:
        return self._indices if self._indices is not None else self._load_indices()

    def _create_indices(self, model_id: str, local_dims: int, global_dims: int | None) -> _Indices:
        """Create both versioned indices and point the aliases at them in one atomic call
        (idempotent; a concurrent creator of the same model ends with the same indices)."""
        images, keypoints = index_names(self.alias, model_id)
        for name, template in ((keypoints, f"keypoints-{SCHEMA}.json"), (images, f"images-{SCHEMA}.json")):
            body = render_template(template, model_id=model_id, local_dims=local_dims, global_dims=global_dims)
            try:
                self._call(f"creating index {name}", self._client.indices.create, index=name, **body)
                logger.info("created index %s (model %s)", name, model_id)
            except RequestRejected as exc:
                if "resource_already_exists_exception" not in exc.message:
                    raise
        try:
            self._call(
                "pointing the aliases at the new indices",
                self._client.indices.update_aliases,
                actions=[
                    {"add": {"index": images, "alias": self.alias, "is_write_index": True}},
                    {"add": {"index": keypoints, "alias": self.keypoints_alias, "is_write_index": True}},
                ],
            )
        except RequestRejected:
            # The aliases already point elsewhere (another creator, another model): use that.
            if self._load_indices() is None:
                raise
        indices = self._load_indices()
        if indices is None:
            raise RequestRejected(f"indices {images}, {keypoints} were created but the aliases do not point at them")
        return indices

    # ------------------------------------------------------------------ writes

    def _image_document(self, write: _Write) -> dict[str, Any]:
        record, features = write.record, write.record.features
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
            "keypoint_xy": _pack(features.keypoints),
            "keypoint_scale": _pack(features.scales),
            "keypoint_score": _pack(features.scores),
            "keypoint_codes": base64.b64encode(int8_codes(features.descriptors).tobytes()).decode("ascii"),
            "generation": write.generation,
            "slot": write.slot,
            "other_slot_keypoints": write.previous.num_keypoints if write.previous else 0,
        }
        if len(features.global_desc):
            doc["global_vector"] = _vector(features.global_desc)
        if record.thumbnail and self._indices is not None and self._indices.thumbnails:
            # (an index created before thumbnails existed has no such field: "dynamic": "strict")
            doc["thumbnail"] = base64.b64encode(record.thumbnail).decode("ascii")
            doc["thumbnail_bytes"] = len(record.thumbnail)
        return doc

    def _keypoint_actions(self, write: _Write) -> Iterator[dict[str, Any]]:
        """Index the new keypoints into ``write.slot``; delete what an older version left there."""
        record = write.record
        metadata = dict(record.metadata)
        n = record.features.num_keypoints
        for j, row in enumerate(int8_codes(record.features.descriptors)):
            yield {
                "_op_type": "index",
                "_index": self.keypoints_alias,
                "_id": keypoint_id(record.image_id, write.slot, j),
                "_source": {
                    "image_id": record.image_id,
                    "keypoint": j,
                    "generation": write.generation,
                    "metadata": metadata,
                    "vector": _byte_vector(row),
                },
            }
        for j in range(n, write.surplus_in_slot):
            yield {"_op_type": "delete", "_index": self.keypoints_alias, "_id": keypoint_id(record.image_id, write.slot, j)}

    def _refusal(self, record: ImageRecord, indices: _Indices) -> str | None:
        """Why ``record`` cannot go into ``indices``, or None."""
        features = record.features
        if self.model_id is not None and features.model_id != self.model_id:
            return f"model_id {features.model_id!r} differs from this backend's model {self.model_id!r}"
        if features.model_id != indices.model_id:
            return f"model_id {features.model_id!r} differs from the model of index {indices.images} ({indices.model_id!r})"
        if features.descriptor_dim != indices.local_dims:
            return f"local descriptors have {features.descriptor_dim} dims, index {indices.images} holds {indices.local_dims}"
        problem = non_unit_rows(features.descriptors)
        if problem:
            return problem
        if len(features.global_desc) and indices.global_dims and len(features.global_desc) != indices.global_dims:
            return (
                f"global descriptor has {len(features.global_desc)} dims, "
                f"index {indices.images} holds {indices.global_dims}"
            )
        return None

    def _indices_for(self, records: list[ImageRecord]) -> _Indices:
        """The indices to write to, created from the first record of the right model if missing."""
        indices = self._load_indices()  # re-read on every write: the aliases may have been swapped
        if indices is not None:
            return indices
        wanted = self.model_id or records[0].features.model_id
        first = next((r.features for r in records if r.features.model_id == wanted), None)
        if first is None:  # every record is of another model: nothing will be written
            images, keypoints = index_names(self.alias, wanted)
            return _Indices(images, keypoints, wanted, -1, None, False)
        global_sizes = (len(r.features.global_desc) for r in records if r.features.model_id == wanted)
        global_dims = next((size for size in global_sizes if size), None)
        return self._create_indices(wanted, first.descriptor_dim, global_dims)

    def upsert(self, records: Iterable[ImageRecord], refresh: bool = False) -> BulkReport:
        """Write images, each replacing any image of the same id (all or nothing per image, as
        searches see it: the previous version stays whole until the new one is complete).

        Items are refused (failed, not raised) for another model_id, other descriptor dims, or
        any error Elasticsearch reports for the image or one of its keypoints; the previous
        version of a refused image is kept.  An id given twice: the last record wins.
        Raises IndexUnavailable when the server cannot be reached or still answers 429 after
        the retries.
        """
        records = list(records)
        if not records:
            return BulkReport()
        indices = self._indices_for(records)
        outcome: dict[int, str | None] = {}  # position -> None (written) or error
        last: dict[str, int] = {}
        for position, record in enumerate(records):
            refusal = self._refusal(record, indices)
            if refusal is not None:
                outcome[position] = refusal
            else:
                last[record.image_id] = position
        chosen = sorted(last.values())
        for start in range(0, len(chosen), IMAGES_PER_ROUND):
            for write in self._write_round([(p, records[p]) for p in chosen[start : start + IMAGES_PER_ROUND]]):
                outcome[write.position] = write.error
        for position, record in enumerate(records):  # earlier copies of an id share the last one's fate
            if position not in outcome:
                outcome[position] = outcome[last[record.image_id]]
        if refresh:
            self.refresh()
        succeeded = [records[p].image_id for p in sorted(outcome) if outcome[p] is None]
        failed = [ItemFailure(records[p].image_id, str(outcome[p])) for p in sorted(outcome) if outcome[p] is not None]
        return BulkReport(succeeded=succeeded, failed=failed)

    def _write_round(self, items: list[tuple[int, ImageRecord]]) -> list[_Write]:
        """Write a few images: new keypoints, then image documents, then old keypoints."""
        live = self._versions([record.image_id for _, record in items])
        writes = []
        for position, record in items:
            previous = live.get(record.image_id)
            writes.append(
                _Write(
                    position=position,
                    record=record,
                    generation=secrets.randbits(31),
                    slot=1 - previous.slot if previous else 0,
                    surplus_in_slot=previous.other_slot_keypoints if previous else 0,
                    previous=previous,
                )
            )
        # 1. keypoints into the free slot
        by_id: dict[str, _Write] = {}
        actions: list[dict[str, Any]] = []
        for write in writes:
            for action in self._keypoint_actions(write):
                by_id[action["_id"]] = write
                actions.append(action)
        for action, result, ok in self._bulk("upsert (keypoints)", actions):
            write = by_id[action["_id"]]
            if not ok and action["_op_type"] == "index" and write.error is None:
                write.error = f"keypoint {action['_source']['keypoint']}: {result}"
        # 2. image documents: the commit point
        complete = [write for write in writes if write.error is None]
        documents = [
            {"_op_type": "index", "_index": self.alias, "_id": document_id(w.record.image_id), "_source": self._image_document(w)}
            for w in complete
        ]
        by_doc = {document_id(w.record.image_id): w for w in complete}
        for action, result, ok in self._bulk("upsert (images)", documents):
            if not ok:
                by_doc[action["_id"]].error = str(result)
        # 3. the previous version's keypoints, now dead (best effort)
        dead = [
            {"_op_type": "delete", "_index": self.keypoints_alias, "_id": keypoint_id(w.record.image_id, w.previous.slot, j)}
            for w in complete
            if w.error is None and w.previous is not None
            for j in range(w.previous.num_keypoints)
        ]
        leftovers = sum(not ok for _, _, ok in self._bulk("upsert (old keypoints)", dead))
        # 4. anything else not of the new generations (left by a writer that died), as of the last refresh
        committed = {w.record.image_id: w.generation for w in complete if w.error is None}
        leftovers += self._sweep(committed, {action["_id"] for action in dead})
        if leftovers:
            logger.warning("%d dead keypoints could not be deleted; the next write of their images will", leftovers)
        return writes

    def _sweep(self, keep: Mapping[str, int | None], skip: set[str]) -> int:
        """Delete the keypoint documents of images ``keep`` whose generation is not the one given
        (None: every generation), except ids in ``skip``; returns how many could not be deleted.
        Sees the index as of its last refresh: later strays wait for the next write."""
        if not keep:
            return 0
        clauses = [
            {"bool": {"filter": [{"term": {"image_id": image_id}}],
                      "must_not": [] if generation is None else [{"term": {"generation": generation}}]}}
            for image_id, generation in keep.items()
        ]
        body = {"query": {"bool": {"should": clauses, "minimum_should_match": 1}}, "size": MAX_RESULT_WINDOW,
                "_source": False, "seq_no_primary_term": True}
        hits_path = "responses.hits.hits."
        (response,) = self._msearch(
            self.keypoints_alias, [body], [hits_path + "_id", hits_path + "_seq_no", hits_path + "_primary_term"]
        )
        # A hit may be stale: its id may since have been rewritten by the new version (slots reuse
        # ids), so each delete only applies to the document the search saw (409 otherwise: kept).
        actions = [
            {"_op_type": "delete", "_index": self.keypoints_alias, "_id": hit["_id"],
             "if_seq_no": hit["_seq_no"], "if_primary_term": hit["_primary_term"]}
            for hit in response.get("hits", {}).get("hits", [])
            if hit["_id"] not in skip
        ]
        return sum(not ok for _, _, ok in self._bulk("sweep", actions))

    def _versions(self, image_ids: list[str]) -> dict[str, _Version]:
        """The live version of each indexed image among ``image_ids``."""
        return {
            doc["_source"]["image_id"]: _Version(
                generation=int(doc["_source"].get("generation", 0)),
                slot=int(doc["_source"].get("slot", 0)),
                num_keypoints=int(doc["_source"].get("num_keypoints", 0)),
                other_slot_keypoints=int(doc["_source"].get("other_slot_keypoints") or 0),
            )
            for doc in self._mget(image_ids, ["image_id", *_VERSION_FIELDS])
        }

    def delete(self, image_ids: Iterable[str], refresh: bool = False) -> BulkReport:
        """Remove images (keypoints first, then the image document); an unknown id is a failed item."""
        ids = [str(image_id) for image_id in image_ids]
        if not ids:
            return BulkReport()
        if self._current() is None:
            return BulkReport(failed=[ItemFailure(image_id, "not found") for image_id in ids])
        outcome: dict[int, str | None] = {}
        live = self._versions(list(dict.fromkeys(ids)))
        seen: set[str] = set()
        targets: list[int] = []
        for position, image_id in enumerate(ids):
            if image_id not in live or image_id in seen:
                outcome[position] = "not found"
            else:
                seen.add(image_id)
                targets.append(position)
        actions, owner = [], {}
        for position in targets:
            version = live[ids[position]]
            for slot, count in ((version.slot, version.num_keypoints), (1 - version.slot, version.other_slot_keypoints)):
                for j in range(count):
                    key = keypoint_id(ids[position], slot, j)
                    owner[key] = position
                    actions.append({"_op_type": "delete", "_index": self.keypoints_alias, "_id": key})
        for action, result, ok in self._bulk("delete (keypoints)", actions):
            position = owner[action["_id"]]
            if not ok and outcome.get(position) is None:
                outcome[position] = str(result)
        swept = {ids[p]: None for p in targets if p not in outcome}
        if self._sweep(swept, set(owner)):
            logger.warning("some stray keypoints of deleted images could not be deleted")
        documents = [
            {"_op_type": "delete", "_index": self.alias, "_id": document_id(ids[p])} for p in targets if p not in outcome
        ]
        by_doc = {document_id(ids[p]): p for p in targets}
        for action, result, ok in self._bulk("delete (images)", documents):
            outcome[by_doc[action["_id"]]] = None if ok else str(result)
        if refresh:
            self.refresh()
        succeeded = [ids[p] for p in sorted(outcome) if outcome[p] is None]
        failed = [ItemFailure(ids[p], str(outcome[p])) for p in sorted(outcome) if outcome[p] is not None]
        return BulkReport(succeeded=succeeded, failed=failed)

    def _bulk(self, action: str, actions: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], str, bool]]:
        """Send ``actions`` with streaming_bulk; yield (action, error or "", ok) for each.

        A delete of a missing document counts as done.  Items still rejected with 429 or 5xx
        after the retries raise IndexUnavailable once every other item has been sent."""
        if not actions:
            return
        by_id = {a["_id"]: a for a in actions}
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
                ((op, result),) = item.items()
                sent = by_id[str(result.get("_id"))]
                status = result.get("status")
                if not ok and op == "delete" and (status == 404 or (status == 409 and "if_seq_no" in sent)):
                    ok = True  # already gone / rewritten since a sweep saw it
                if not ok and (status == 429 or (isinstance(status, int) and status >= 500)):
                    overloaded += 1
                    continue
                error = "" if ok else (_reason(result["error"]) if result.get("error") else f"HTTP {status}")
                yield sent, error, ok
        except ApiError as exc:
            raise self._wrap(f"bulk {action}", exc) from exc
        except elastic_transport.TransportError as exc:
            raise self._unavailable(f"bulk {action}", exc) from exc
        if overloaded:
            raise IndexUnavailable(
                f"Elasticsearch at {self.url} overloaded: {overloaded} {action} item(s) still rejected "
                f"(429/5xx) after {RETRIES_ON_429} retries; writes are idempotent, retry the call"
            )

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
            thumbnail_bytes=int(source.get("thumbnail_bytes") or 0),
        )

    def thumbnail(self, image_id: str) -> bytes | None:
        """The stored thumbnail JPEG, None if stored without; :class:`ImageNotFound` if unknown."""
        try:
            found = self._call("get", self._client.get, index=self.alias, id=document_id(image_id),
                               source_includes=["thumbnail"])
        except NotFoundError:
            raise ImageNotFound(image_id) from None
        data = (found.get("_source") or {}).get("thumbnail")
        return base64.b64decode(data) if data else None

    def thumbnail_bytes(self) -> int:
        """Bytes of all stored thumbnails (a sum aggregation over ``thumbnail_bytes``)."""
        try:
            found = self._call("stats", self._client.search, index=self.alias, size=0,
                               aggs={"thumbnails": {"sum": {"field": "thumbnail_bytes"}}})
        except NotFoundError:
            return 0
        return int((found.get("aggregations") or {}).get("thumbnails", {}).get("value") or 0)

    def _mget(self, image_ids: list[str], source: Any) -> Iterator[dict[str, Any]]:
        """The found image documents among ``image_ids`` (none if the index does not exist)."""
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
        return {doc["_source"]["image_id"] for doc in self._mget(wanted, ["image_id"])}

    def revisions(self, image_ids: Iterable[str]) -> dict[str, str]:
        """The current revision of each indexed id: its image document's random ``generation``
        (new at every write), read in real time with the locations' own ``mget``."""
        wanted = list(dict.fromkeys(str(image_id) for image_id in image_ids))
        return {doc["_source"]["image_id"]: str(doc["_source"].get("generation", 0))
                for doc in self._mget(wanted, ["image_id", "generation"])}

    def count(self) -> int:
        """Number of indexed images."""
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

    def keypoint_scales(self, image_ids: Iterable[str]) -> dict[str, np.ndarray]:
        """Stored keypoint pyramid scales, (N,) float32 per image; unknown ids left out (one ``mget``
        per 500 ids, reading only the packed scales)."""
        wanted = list(dict.fromkeys(str(image_id) for image_id in image_ids))
        return {
            doc["_source"]["image_id"]: _unpack(doc["_source"].get("keypoint_scale"), 1).reshape(-1)
            for doc in self._mget(wanted, ["image_id", "keypoint_scale"])
        }

    def global_descriptors(self, image_ids: Iterable[str]) -> dict[str, np.ndarray]:
        """Stored (G,) float32 global descriptors; unknown ids and images without one left out.
        Vectors are excluded from ``_source`` (index.mapping.exclude_source_vectors), so the
        ``mget`` asks for them back with ``_source_exclude_vectors=false``."""
        wanted = [document_id(i) for i in dict.fromkeys(str(image_id) for image_id in image_ids)]
        out: dict[str, np.ndarray] = {}
        for start in range(0, len(wanted), MGET_CHUNK):
            try:
                found = self._call(
                    "mget", self._client.perform_request, "POST", f"/{self.alias}/_mget",
                    params={"_source_exclude_vectors": "false", "_source_includes": "image_id,global_vector"},
                    headers={"accept": "application/json", "content-type": "application/json"},
                    body={"ids": wanted[start : start + MGET_CHUNK]},
                )
            except NotFoundError:
                return out
            for doc in found["docs"]:
                vector = doc.get("_source", {}).get("global_vector") if doc.get("found") else None
                if vector is None:
                    continue
                if isinstance(vector, str):  # returned in the base64 big-endian form it was sent in
                    array = np.frombuffer(base64.b64decode(vector), ">f4").astype(np.float32)
                else:
                    array = np.asarray(vector, np.float32)
                out[doc["_source"]["image_id"]] = array
        return out

    def descriptor_codes(self, image_ids: Iterable[str]) -> dict[str, np.ndarray]:
        """Stored descriptors as (N, D) int8 codes (:func:`~delf_es.index.codes.int8_codes`) per
        image; unknown ids left out.  Read from the image documents (one ``mget`` per 500 ids),
        not from the keypoint documents: one document per image instead of N."""
        wanted = list(dict.fromkeys(str(image_id) for image_id in image_ids))
        indices = self._current()
        if indices is None or not wanted:
            return {}
        out = {}
        for doc in self._mget(wanted, ["image_id", "keypoint_codes"]):
            raw = base64.b64decode(doc["_source"].get("keypoint_codes") or "")
            out[doc["_source"]["image_id"]] = np.frombuffer(raw, np.int8).reshape(-1, indices.local_dims).copy()
        return out

    # ------------------------------------------------------------------ search

    @staticmethod
    def _check_k(k: int) -> int:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise InvalidRequest(f"k must be a positive integer, got {k!r}")
        return int(k)

    @staticmethod
    def _filters(metadata_filter: MetadataFilter | None, image_ids: list[str] | None) -> list[Any]:
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
        indices = self._current()
        if indices is None:
            return Neighbours.empty()
        if descriptors.shape[1] != indices.local_dims:
            raise FeatureShapeError("descriptors", f"(Q, {indices.local_dims})", str(descriptors.shape))
        if len(descriptors) == 0 or restrict == []:
            return Neighbours.empty()
        queries = int8_codes(descriptors)
        size = min(k, MAX_KNN)
        candidates = self.num_candidates * (RESTRICTED_CANDIDATES_FACTOR if restrict is not None else 1)
        search: dict[str, Any] = {
            "field": "vector",
            "k": size,
            "num_candidates": min(max(candidates, size), MAX_KNN),
        }
        if filters:
            search["filter"] = filters
        bodies = [
            {"knn": {**search, "query_vector": _byte_vector(row)}, "_source": False, "stored_fields": "_none_",
             "size": size, "docvalue_fields": ["image_id", "keypoint", "generation"]}
            for row in queries
        ]
        responses = self._msearch(
            self.keypoints_alias, bodies,
            ["responses.hits.hits._index", "responses.hits.hits._score", "responses.hits.hits.fields"],
        )
        hits: list[tuple[int, float, str, int, int, str]] = []
        for q, response in enumerate(responses):
            for hit in response.get("hits", {}).get("hits", []):
                fields = hit["fields"]
                hits.append(
                    (q, 2.0 * hit["_score"] - 1.0, fields["image_id"][0], int(fields["keypoint"][0]),
                     int(fields["generation"][0]), hit.get("_index", ""))
                )
        # Generations are read from the images index paired with the keypoints index a hit came
        # from: a search straddling an alias swap (reindex) checks old keypoints against old images.
        live: dict[tuple[str, str], int] = {}
        for source in {hit[5] for hit in hits}:
            found = self._generations({hit[2] for hit in hits if hit[5] == source}, self._paired_images(source))
            live.update({(source, image_id): generation for image_id, generation in found.items()})
        kept = [hit[:5] for hit in hits if live.get((hit[5], hit[2])) == hit[4]]  # only keypoints of live versions
        if not kept:
            return Neighbours.empty()
        kept.sort(key=lambda hit: (hit[0], -hit[1], hit[2], hit[3]))
        return Neighbours(
            query_index=np.array([hit[0] for hit in kept], np.int64),
            image_ids=np.array([hit[2] for hit in kept], dtype=object),
            keypoint_index=np.array([hit[3] for hit in kept], np.int64),
            similarity=np.clip(np.array([hit[1] for hit in kept], np.float32), -1.0, 1.0),
        )

    def _paired_images(self, keypoints_index: str) -> str:
        """The concrete images index created with ``keypoints_index`` (the alias if unknown)."""
        head, sep, tail = keypoints_index.rpartition(f"{KEYPOINTS_SUFFIX}-{SCHEMA}-")
        return f"{head}-{SCHEMA}-{tail}" if sep and head else self.alias

    def _generations(self, image_ids: set[str], index: str | None = None) -> dict[str, int]:
        """The live generation of each of ``image_ids`` that has an image document, as of the last
        refresh (the point in time kNN searched), read by ``terms`` searches of the images index
        (``index``, default the alias)."""
        wanted = sorted(image_ids)
        out: dict[str, int] = {}
        for start in range(0, len(wanted), CHECK_CHUNK):
            chunk = wanted[start : start + CHECK_CHUNK]
            body = {"query": {"terms": {"image_id": chunk}}, "size": len(chunk), "_source": False,
                    "stored_fields": "_none_", "docvalue_fields": ["image_id", "generation"]}
            (response,) = self._msearch(index or self.alias, [body], ["responses.hits.hits.fields"])
            for hit in response.get("hits", {}).get("hits", []):
                out[hit["fields"]["image_id"][0]] = int(hit["fields"].get("generation", [-1])[0])
        return out

    def _msearch(self, index: str, bodies: list[dict[str, Any]], fields: list[str]) -> list[dict[str, Any]]:
        """Run searches on ``index`` through ``_msearch``, in chunks; 429s retried, errors raised."""
        filter_path = ["responses.status", "responses.error"] + fields
        out: list[dict[str, Any]] = []
        for start in range(0, len(bodies), KNN_SEARCHES_PER_REQUEST):
            chunk = bodies[start : start + KNN_SEARCHES_PER_REQUEST]
            results: list[dict[str, Any] | None] = [None] * len(chunk)
            pending = list(range(len(chunk)))
            for attempt in range(RETRIES_ON_429 + 1):
                searches: list[dict[str, Any]] = []
                for i in pending:
                    searches += [{"index": index}, chunk[i]]
                try:
                    answer = self._call("search", self._client.msearch, searches=searches, filter_path=filter_path)
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
            return IndexUnavailable(f"{where} unavailable (search, HTTP {status}): {_reason(error)}")
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
        indices = self._current()
        if indices is not None and indices.global_dims is None:  # no global vector yet when last read
            indices = self._load_indices()
        if indices is None or indices.global_dims is None:
            return []
        if len(vector) != indices.global_dims:
            raise FeatureShapeError("vector", f"({indices.global_dims},)", str(vector.shape))
        size = min(k, MAX_KNN)
        search: dict[str, Any] = {
            "field": "global_vector",
            "query_vector": _vector(vector),
            "k": size,
            "num_candidates": min(max(self.num_candidates, size), MAX_KNN),
        }
        if filters:
            search["filter"] = filters
        if indices.quantised_global:  # re-score the int8 candidates with the float vectors: exact cosines
            search["rescore_vector"] = {"oversample": 2.0}
        (response,) = self._msearch(
            self.alias,
            [{"knn": search, "_source": False, "stored_fields": "_none_", "docvalue_fields": ["image_id"], "size": size}],
            ["responses.hits.hits.fields.image_id", "responses.hits.hits._score"],
        )
        return [
            (hit["fields"]["image_id"][0], float(np.clip(2.0 * hit["_score"] - 1.0, -1.0, 1.0)))
            for hit in response.get("hits", {}).get("hits", [])
        ]

    # ------------------------------------------------------------------ housekeeping

    def refresh(self) -> None:
        """Make all writes visible to search."""
        self._call(
            "refresh",
            self._client.indices.refresh,
            index=f"{self.alias},{self.keypoints_alias}",
            ignore_unavailable=True,
            allow_no_indices=True,
        )

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
