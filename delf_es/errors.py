"""Every error delf-es raises on purpose derives from :class:`DelfEsError`.

Callers catch by meaning (bad input, missing weights, index down) rather than by
library.  Each exception passes its arguments to ``Exception.__init__`` so it
survives a pickle round trip (Celery moves exceptions between processes).
"""

from __future__ import annotations

from dataclasses import dataclass


class DelfEsError(Exception):
    """Root of all delf-es errors."""


class InvalidRequest(DelfEsError, ValueError, TypeError):
    """Arguments that cannot describe an image, its id, its metadata or a search: a wrong type
    (``limit="5"``, an id that is a list), an id that is empty, too long or not encodable,
    metadata that is not JSON or is nested too deep.  Never worth retrying."""


class ConfigurationError(DelfEsError, ValueError):
    """The settings do not allow what was asked: a service URL missing (workers need Redis,
    reindexing needs Elasticsearch), an index knob out of range, an unknown layer name."""


class JobTimeout(DelfEsError, TimeoutError):
    """Waiting for a worker job (or a service to come up) took longer than the caller allowed."""


class InvalidImage(DelfEsError, ValueError):
    """The input cannot be decoded as a usable image (corrupt, truncated, not an
    image, too small, too many pixels).  Never worth retrying."""

    def __init__(self, message: str, source: str = "") -> None:
        super().__init__(message, source)
        self.message = message
        self.source = source

    def __str__(self) -> str:
        return f"{self.source}: {self.message}" if self.source else self.message


class ImageTooLarge(InvalidImage):
    """The image has more pixels than the configured cap (decompression-bomb guard)."""


class UnsafeURL(DelfEsError, ValueError):
    """A URL was refused: wrong scheme, private/loopback address, too large, timed out."""

    def __init__(self, message: str, url: str = "") -> None:
        super().__init__(message, url)
        self.message = message
        self.url = url

    def __str__(self) -> str:
        return f"{self.url}: {self.message}" if self.url else self.message


class FeatureShapeError(DelfEsError, ValueError):
    """An array handed across a stage boundary has the wrong shape or dtype."""

    def __init__(self, field: str, expected: str, got: str) -> None:
        super().__init__(field, expected, got)
        self.field = field
        self.expected = expected
        self.got = got

    def __str__(self) -> str:
        return f"{self.field}: expected {self.expected}, got {self.got}"


class WeightsNotFound(DelfEsError, FileNotFoundError):
    """A weight file (backbone, attention head, PCA) is missing or unreadable."""

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(message, path)
        self.message = message
        self.path = path

    def __str__(self) -> str:
        return f"{self.message} ({self.path})" if self.path else self.message


class ModelMismatch(DelfEsError, ValueError):
    """Two artifacts that must agree do not (e.g. a PCA fitted for another backbone)."""


class UnknownBackbone(DelfEsError, KeyError):
    """The requested backbone name is not in the registry."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "unknown backbone"


class ImageNotFound(DelfEsError, KeyError):
    """No image with that id is in the index."""

    def __str__(self) -> str:
        return f"no image with id {self.args[0]!r}" if self.args else "image not found"


class IndexUnavailable(DelfEsError, ConnectionError):
    """The index server cannot be reached or is overloaded (timeout, 429, 503).
    The only error workers retry automatically."""


class RequestRejected(DelfEsError):
    """Elasticsearch refused a request for a reason other than load (a 4xx other than 429):
    a malformed query, a mapping conflict.  Not worth retrying; ``status`` is the HTTP status."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message, status)
        self.message = message
        self.status = status

    def __str__(self) -> str:
        return self.message


class ReindexError(DelfEsError, RuntimeError):
    """A reindex cannot proceed (counts differ, another model's build is in progress...)."""


class KibanaUnavailable(DelfEsError, RuntimeError):
    """Kibana could not be reached or refused the saved objects."""


class EvaluationFailed(DelfEsError, RuntimeError):
    """An evaluation cannot produce numbers (e.g. database images failed to index)."""


class InvalidGroundTruth(DelfEsError, ValueError):
    """A gt.json file that does not follow the format."""


class RetriesExhausted(DelfEsError):
    """A worker gave up on an image after retrying a transient error (index or Redis outage)
    ``retries`` times; ``last_error`` is the last one, e.g. ``"IndexUnavailable: ..."``."""

    def __init__(self, last_error: str, retries: int) -> None:
        super().__init__(last_error, retries)
        self.last_error = last_error
        self.retries = retries

    def __str__(self) -> str:
        return f"gave up after {self.retries} retries: {self.last_error}"


@dataclass(frozen=True)
class ItemFailure:
    """One item of a bulk operation that failed, with why."""

    item_id: str
    error: str


class BulkIndexFailed(DelfEsError):
    """Some items of a bulk write were rejected; ``failures`` lists each one."""

    def __init__(self, message: str, failures: list[ItemFailure]) -> None:
        super().__init__(message, failures)
        self.failures = failures


class FetchFailed(DelfEsError):
    """Downloading a URL failed for a network or HTTP reason: the host does not
    resolve or refuses the connection, TLS fails, the deadline passed, the status is
    not 2xx, there are too many redirects or the body is cut short.  A URL refused by
    policy (scheme, private address, size) raises :class:`UnsafeURL` instead.
    ``status`` is the HTTP status code when the server sent one, else ``None``."""

    def __init__(self, message: str, url: str = "", status: int | None = None) -> None:
        super().__init__(message, url, status)
        self.message = message
        self.url = url
        self.status = status

    def __str__(self) -> str:
        return f"{self.url}: {self.message}" if self.url else self.message


class UnsupportedFilter(DelfEsError, ValueError):
    """A metadata filter uses a query clause or option the embedded index does not
    implement, or is malformed.  ``clause`` names the offending clause (e.g. ``"wildcard"``)."""

    def __init__(self, message: str, clause: str = "") -> None:
        super().__init__(message, clause)
        self.message = message
        self.clause = clause

    def __str__(self) -> str:
        return self.message


class UnreadableFile(DelfEsError, ValueError):
    """A path named by the user cannot be read as a file: missing, not permitted, a directory,
    a named pipe, a device or a socket (never read: it could block forever), or larger than the
    cap.  ``path`` is the name as given."""

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(message, path)
        self.message = message
        self.path = path

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class OutputConflict(DelfEsError, FileExistsError):
    """Writing an output would overwrite something it must not: a feature file of another
    image, or an output folder that is a file.  ``path`` is the output."""

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(message, path)
        self.message = message
        self.path = path

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class Interrupted(DelfEsError, KeyboardInterrupt):
    """Ctrl-C (or SIGTERM in the CLI) during a bulk add, after what was extracted had been
    committed: ``report`` lists what was saved.  Also a KeyboardInterrupt, so code that stops on
    ``except KeyboardInterrupt`` still stops."""

    def __init__(self, report: object) -> None:
        super().__init__(report)
        self.report = report

    def __str__(self) -> str:
        saved = len(getattr(self.report, "succeeded", []))
        return f"interrupted: {saved} image(s) saved"


class RuntimeUnavailable(DelfEsError, RuntimeError):
    """The inference runtime or precision asked for cannot run here: its package is not
    installed, the CPU lacks the instructions, the device does not support it, or an INT8
    model has no calibration photos.  ``runtime`` names what was asked (e.g. ``"openvino/int8"``)."""

    def __init__(self, message: str, runtime: str = "") -> None:
        super().__init__(message, runtime)
        self.message = message
        self.runtime = runtime

    def __str__(self) -> str:
        return f"{self.runtime}: {self.message}" if self.runtime else self.message


class IndexLocked(IndexUnavailable):
    """Another process is writing the embedded index (one writer at a time; readers are never
    refused).  ``holder`` is what it recorded: pid, command, host, since."""

    def __init__(self, message: str, holder: dict | None = None) -> None:
        super().__init__(message, holder)
        self.message = message
        self.holder = holder

    def __str__(self) -> str:
        return self.message


# ---------------------------------------------------------------- HTTP server (delf_es/api/)


class UploadTooLarge(DelfEsError, ValueError):
    """A request body is larger than ``api_max_upload_bytes`` (refused while it streams in)."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.limit = limit

    def __str__(self) -> str:
        return f"request body larger than the {self.limit}-byte limit"


class AuthenticationRequired(DelfEsError):
    """No ``Authorization: Bearer <token>`` header on a route that needs one (HTTP 401)."""


class AccessDenied(DelfEsError):
    """A bearer token was sent but it is not the server's (HTTP 403)."""


class Overloaded(DelfEsError):
    """The server is busy: too many extractions queued, or the request ran past its time
    limit.  ``retry_after`` s is a hint for the client (HTTP 503 + Retry-After)."""

    def __init__(self, message: str, retry_after: int = 5) -> None:
        super().__init__(message, retry_after)
        self.message = message
        self.retry_after = retry_after

    def __str__(self) -> str:
        return self.message


class TaskNotFound(DelfEsError, KeyError):
    """No worker task with that id is known."""

    def __str__(self) -> str:
        return f"no task with id {self.args[0]!r}" if self.args else "task not found"


class UploadTimedOut(DelfEsError):
    """A request body did not arrive within ``api_body_timeout`` s (HTTP 408)."""


class InvalidSetting(DelfEsError, ValueError):
    """A setting, command-line option or ``DELF_ES_*`` value is invalid.  ``source`` says where
    it came from (``--max-features -5`` or ``DELF_ES_MAX_FEATURE_NUM=-1``)."""

    def __init__(self, message: str, source: str = "", field: str = "") -> None:
        super().__init__(message, source, field)
        self.message = message
        self.source = source
        self.field = field  # the Settings field, when the value is one

    def __str__(self) -> str:
        return f"{self.source}: {self.message}" if self.source else self.message


class KeypointVectorsDisabled(ConfigurationError):
    """A keypoint kNN (the 'local' or 'hybrid' shortlist, 'knn' correspondences) on an index created
    without keypoint vectors (``keypoint_vectors`` off): search with ``shortlist_mode='global'`` and
    ``correspondences='matching'``, or rebuild the index with ``keypoint_vectors=true``."""


# ---------------------------------------------------------------- local services (delf_es/services/)


class ServiceFailed(DelfEsError, RuntimeError):
    """A local service (Elasticsearch node, Redis) cannot be installed, started or stopped, or
    starting it was refused: its port is held by a process delf-es did not start, it already runs
    on another port, a download does not match its pinned SHA-256.  ``service`` names it
    (``"es"``, ``"es node-1"``, ``"redis"``)."""

    def __init__(self, message: str, service: str = "") -> None:
        super().__init__(message, service)
        self.message = message
        self.service = service

    def __str__(self) -> str:
        return f"{self.service}: {self.message}" if self.service else self.message
