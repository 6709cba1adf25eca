"""One place that turns errors into HTTP answers shaped like Elasticsearch's:

    {"error": {"type": "ImageNotFound", "reason": "no image with id 'x'"}, "status": 404}

``type`` is the :class:`~delf_es.errors.DelfEsError` subclass' name; the status comes from
:data:`STATUS` by walking the class' MRO (so a new subclass inherits its parent's status).
Nothing else reaches the client: an unexpected exception is logged with its traceback and
answered as a 500 ``InternalError`` without one.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from delf_es.errors import DelfEsError, Overloaded

log = logging.getLogger(__name__)

#: HTTP status of each error class, by class name (names, so errors defined outside
#: delf_es/errors.py, such as the SDK's InvalidRequest, need no import here).
STATUS: dict[str, int] = {
    "InvalidRequest": 400,
    "InvalidImage": 400,
    "ImageTooLarge": 413,
    "UploadTooLarge": 413,
    "UploadTimedOut": 408,
    "UnsafeURL": 400,
    "FetchFailed": 422,          # the client's URL could not be fetched: its fault, not ours
    "UnsupportedFilter": 400,
    "RequestRejected": 400,      # Elasticsearch refused the client's filter
    "FeatureShapeError": 400,
    "AuthenticationRequired": 401,
    "AccessDenied": 403,
    "ImageNotFound": 404,
    "TaskNotFound": 404,
    "ModelMismatch": 409,
    "KeypointVectorsDisabled": 409,  # the plan needs keypoint vectors the index was created without
    "IndexUnavailable": 503,
    "RetriesExhausted": 503,
    "Overloaded": 503,
    "WeightsNotFound": 500,
    "DelfEsError": 500,
}

#: Seconds a client is told to wait after a 503 (backend down or server busy).
RETRY_AFTER_S = 5

#: Types of the errors Starlette itself raises (unknown route, wrong method...).
_HTTP_TYPES = {404: "RouteNotFound", 405: "MethodNotAllowed", 413: "UploadTooLarge"}


def status_of(error: DelfEsError) -> int:
    for cls in type(error).__mro__:
        if cls.__name__ in STATUS:
            return STATUS[cls.__name__]
    return 500


def error_body(error_type: str, reason: str, status: int) -> dict:
    return {"error": {"type": error_type, "reason": reason}, "status": status}


def error_response(error_type: str, reason: str, status: int, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(error_type, reason, status), status_code=status, headers=headers)


async def _delf_es_error(request: Request, error: DelfEsError) -> JSONResponse:
    status = status_of(error)
    headers = {}
    if status == 503:
        headers["Retry-After"] = str(error.retry_after if isinstance(error, Overloaded) else RETRY_AFTER_S)
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if status >= 500:
        log.error("%s %s: %s: %s", request.method, request.url.path, type(error).__name__, error)
    return error_response(type(error).__name__, str(error) or type(error).__name__, status, headers)


async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    return error_response("InvalidRequest", describe_validation(error.errors()), 400)


async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    error_type = _HTTP_TYPES.get(error.status_code, "HTTPError")
    return error_response(error_type, str(error.detail), error.status_code, getattr(error, "headers", None))


async def _unexpected(request: Request, error: Exception) -> JSONResponse:
    log.exception("%s %s failed", request.method, request.url.path)
    return error_response("InternalError", "internal server error (logged on the server)", 500)


def describe_validation(errors) -> str:
    """pydantic's error list as one line: ``body.limit: Input should be ...; ...``."""
    parts = []
    for item in list(errors)[:5]:
        where = ".".join(str(p) for p in item.get("loc", ()))
        parts.append(f"{where}: {item.get('msg', 'invalid')}" if where else str(item.get("msg", "invalid")))
    return "; ".join(parts) or "invalid request"


def install(app: FastAPI) -> None:
    app.add_exception_handler(DelfEsError, _delf_es_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
