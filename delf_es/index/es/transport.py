"""The one door to Elasticsearch: the only place a client is built (from Settings), the only map
from HTTP status to delf-es errors, and the one retry policy.

    transport = Transport(settings)                  # or Transport(settings, client=my_client)
    transport.call("count", transport.client.count, index="delf-images")
    for action, error, ok in transport.bulk("upsert", actions): ...
    transport.close()

Errors (:meth:`Transport.call`, :meth:`Transport.bulk`, :meth:`Transport.msearch`):

* unreachable, timed out, HTTP 429 (after the retries below) or 5xx -> :class:`IndexUnavailable`
  (naming the URL without credentials): the only error anything retries;
* any other 4xx -> :class:`RequestRejected` (``status`` kept), or :class:`UnsupportedFilter` for a
  search the server refused as malformed (delf-es's own bodies are well-formed: the caller's
  metadata filter is not);
* 404 ``NotFoundError`` is left to the caller (an absent index is often not an error).

Retry policy, layer by layer (so one 429 is retried by at most two layers, never four):

1. the client (elastic-transport): one more try on a dropped or refused connection
   (``max_retries=1``; with several node URLs, one try on each other node, the failed node being
   marked dead); never on a timeout or an HTTP status (``retry_on_timeout=False``,
   ``retry_on_status=()``: a node that hangs costs one timed-out request, then is skipped);
2. this module: HTTP 429 only (a whole request, or bulk items / msearch searches rejected with
   429), :data:`RETRIES_ON_429` times after 0.5, 1, 2 s (capped at :data:`MAX_BACKOFF`), the way
   ``helpers.streaming_bulk`` retries; 5xx and timeouts are raised at once;
3. the Celery workers: :class:`IndexUnavailable` (and Redis connection errors) with exponential
   backoff 2 s ... 5 min, ``worker_max_retries`` times (``delf_es/workers/tasks.py``).

The SDK, CLI, evaluation and reindexer do not retry: they report ``IndexUnavailable``.
Requests time out after ``settings.es_timeout`` s; bulk writes after ``BULK_TIMEOUT_FACTOR`` x
that (at least 60 s), since inserting into the HNSW graph costs ~0.3-0.5 ms of CPU per keypoint.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Iterator, Mapping
from urllib.parse import urlsplit, urlunsplit

import elastic_transport
from elasticsearch import ApiError, Elasticsearch, NotFoundError, helpers

from delf_es.errors import ConfigurationError, DelfEsError, IndexUnavailable, RequestRejected, UnsupportedFilter
from delf_es.settings import Settings

#: Retries of 429-rejected requests, bulk items and searches: 0.5 s, 1 s, 2 s (capped at 4 s).
RETRIES_ON_429 = 3
INITIAL_BACKOFF = 0.5
MAX_BACKOFF = 4.0
#: Bulk requests, by count and by bytes (a keypoint document is ~250 bytes of JSON).
BULK_CHUNK_DOCS = 2_000
BULK_CHUNK_BYTES = 4 * 1024 * 1024
#: A bulk request may take this many times ``es_timeout`` (at least 60 s): graph insertion is slow,
#: and a write that times out is retried whole by the caller.
BULK_TIMEOUT_FACTOR = 6
#: Searches per ``_msearch`` request: large enough to amortise the round trip, small enough to
#: finish well inside ``es_timeout`` on a loaded node.
SEARCHES_PER_REQUEST = 100
#: Ids per ``mget`` request.
MGET_CHUNK = 500


def backoff(attempt: int) -> float:
    """Seconds to wait before retry ``attempt + 1`` (0.5, 1, 2 ... capped), as streaming_bulk waits."""
    return min(MAX_BACKOFF, INITIAL_BACKOFF * 2**attempt)


def redact(url: str) -> str:
    """``url`` without credentials, for messages."""
    parts = urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def reason(error: Any) -> str:
    """One line from an Elasticsearch error object (bulk item, msearch item, ApiError body)."""
    if isinstance(error, Mapping):
        text = f"{error.get('type', 'error')}: {error.get('reason', '')}"
        cause = error.get("caused_by")
        if isinstance(cause, Mapping) and cause.get("reason") and cause.get("reason") != error.get("reason"):
            text += f" ({cause.get('type')}: {cause.get('reason')})"
        return text
    return str(error)


def node_urls(es_url: str | None) -> list[str]:
    """The node URLs of ``es_url``: one URL, or several separated by commas (a cluster's nodes)."""
    return [url.strip() for url in (es_url or "").split(",") if url.strip()]


def connect(settings: Settings, request_timeout: float | None = None) -> Elasticsearch:
    """A client for ``settings.es_url`` (one node URL, or several comma-separated: requests go
    round-robin to the nodes) with the retry policy of layer 1 (module docstring)."""
    hosts = node_urls(settings.es_url)
    if not hosts:
        raise ConfigurationError("Elasticsearch is not configured: set DELF_ES_ES_URL (settings.es_url)")
    return Elasticsearch(
        hosts,
        request_timeout=float(request_timeout or settings.es_timeout),
        # A refused or dropped connection marks the node dead (skipped, with backoff, until it
        # answers again) and is tried once more on each other node: a killed node costs one
        # failed connect, not an error.  429/5xx are handled by Transport.
        max_retries=max(1, len(hosts) - 1),
        retry_on_timeout=False,
        retry_on_status=(),
    )


class Transport:
    """Calls to one Elasticsearch cluster with typed errors and the 429 retries.

    Args:
        settings: ``es_url`` (unless ``client`` is given) and ``es_timeout`` (s per request).
        client: a client to use instead of one built from ``settings`` (tests inject faults this
            way); it is not closed by :meth:`close`.
        request_timeout: s per request instead of ``settings.es_timeout`` (a reindex's scans).
    """

    def __init__(self, settings: Settings, client: Elasticsearch | None = None,
                 request_timeout: float | None = None) -> None:
        self.url = ",".join(redact(url) for url in node_urls(settings.es_url)) or "(client given)"
        self.timeout = float(request_timeout or settings.es_timeout)
        self.owns_client = client is None
        self.client = client if client is not None else connect(settings, self.timeout)

    # ------------------------------------------------------------------ errors

    def unavailable(self, action: str, exc: BaseException) -> IndexUnavailable:
        detail = exc.message if isinstance(exc, elastic_transport.TransportError) else str(exc)
        return IndexUnavailable(f"Elasticsearch at {self.url} unavailable ({action}): {detail}")

    def wrap(self, action: str, exc: ApiError) -> DelfEsError:
        """The delf-es error for an HTTP error answer."""
        status = exc.meta.status if exc.meta is not None else None
        if status == 429 or (status is not None and status >= 500):
            return self.unavailable(action, exc)
        error = exc.body.get("error") if isinstance(exc.body, Mapping) else exc.body
        return RequestRejected(f"Elasticsearch at {self.url} rejected {action} (HTTP {status}): {reason(error)}", status)

    def search_error(self, status: int, error: Mapping[str, Any]) -> DelfEsError:
        """The delf-es error for one failed search of an ``_msearch``."""
        where = f"Elasticsearch at {self.url}"
        if status == 429 or status >= 500:
            return IndexUnavailable(f"{where} unavailable (search, HTTP {status}): {reason(error)}")
        if status == 400:  # our bodies are well-formed: the caller's filter is not
            return UnsupportedFilter(f"{where} refused the search: {reason(error)}", "filter")
        return RequestRejected(f"{where} refused the search (HTTP {status}): {reason(error)}", status)

    # ------------------------------------------------------------------ calls

    def call(self, action: str, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
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
                    time.sleep(backoff(attempt))
                    attempt += 1
                    continue
                raise self.wrap(action, exc) from exc
            except elastic_transport.TransportError as exc:
                raise self.unavailable(action, exc) from exc

    def msearch(self, index: str, bodies: list[dict[str, Any]], fields: list[str]) -> list[dict[str, Any]]:
        """Run searches on ``index`` through ``_msearch``, in chunks; 429s retried, errors raised.
        A search of a missing index answers ``{}``."""
        filter_path = ["responses.status", "responses.error"] + fields
        out: list[dict[str, Any]] = []
        for start in range(0, len(bodies), SEARCHES_PER_REQUEST):
            chunk = bodies[start : start + SEARCHES_PER_REQUEST]
            results: list[dict[str, Any] | None] = [None] * len(chunk)
            pending = list(range(len(chunk)))
            for attempt in range(RETRIES_ON_429 + 1):
                searches: list[dict[str, Any]] = []
                for i in pending:
                    searches += [{"index": index}, chunk[i]]
                try:
                    answer = self.call("search", self.client.msearch, searches=searches, filter_path=filter_path)
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
                        raise self.search_error(status, error)
                if not retry:
                    break
                pending = retry
                time.sleep(backoff(attempt))
            out.extend(result if result is not None else {} for result in results)
        return out

    def mget(self, index: str, ids: list[str], source: Any) -> Iterator[dict[str, Any]]:
        """The found documents among ``ids`` (``_id`` values), :data:`MGET_CHUNK` per request; none
        if the index does not exist."""
        for start in range(0, len(ids), MGET_CHUNK):
            try:
                found = self.call("mget", self.client.mget, index=index, ids=ids[start : start + MGET_CHUNK],
                                  source=source)
            except NotFoundError:
                return
            for doc in found["docs"]:
                if doc.get("found"):
                    yield doc
                elif "error" in doc and doc["error"].get("type") != "index_not_found_exception":
                    raise RequestRejected(f"Elasticsearch at {self.url}: mget failed: {reason(doc['error'])}")

    def bulk(self, action: str, actions: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], str, bool]]:
        """Send ``actions`` with streaming_bulk; yield (action, error or "", ok) for each.

        A delete of a missing document counts as done (and so does a conditional delete of a
        document rewritten since, ``if_seq_no``).  Items still rejected with 429 or 5xx after the
        retries raise IndexUnavailable once every other item has been sent."""
        if not actions:
            return
        by_id = {a["_id"]: a for a in actions}
        overloaded = 0
        try:
            for ok, item in helpers.streaming_bulk(
                self.client.options(request_timeout=max(60.0, BULK_TIMEOUT_FACTOR * self.timeout)),
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
                error = "" if ok else (reason(result["error"]) if result.get("error") else f"HTTP {status}")
                yield sent, error, ok
        except ApiError as exc:
            raise self.wrap(f"bulk {action}", exc) from exc
        except elastic_transport.TransportError as exc:
            raise self.unavailable(f"bulk {action}", exc) from exc
        if overloaded:
            raise IndexUnavailable(
                f"Elasticsearch at {self.url} overloaded: {overloaded} {action} item(s) still rejected "
                f"(429/5xx) after {RETRIES_ON_429} retries; writes are idempotent, retry the call"
            )

    def scan(self, index: str, query: Mapping[str, Any], source: list[str], size: int = 1000) -> Iterable[dict[str, Any]]:
        """Every hit of ``query`` on ``index`` (``helpers.scan``: scroll, cleared at the end)."""
        try:
            yield from helpers.scan(self.client, index=index, query=dict(query), _source=source, size=size)
        except ApiError as exc:
            raise self.wrap(f"scan of {index}", exc) from exc
        except elastic_transport.TransportError as exc:
            raise self.unavailable(f"scan of {index}", exc) from exc

    def close(self) -> None:
        """Close the client if this transport built it.  Idempotent."""
        if self.owns_client:
            self.client.close()

    def __enter__(self) -> "Transport":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
