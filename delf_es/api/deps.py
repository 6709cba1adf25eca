"""Dependencies every route takes (``Depends``), so tests override them instead of patching."""

from __future__ import annotations

import hmac
import re

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from delf_es.api.limits import ExtractionSlots
from delf_es.errors import AccessDenied, AuthenticationRequired, InvalidRequest
from delf_es.sdk import MAX_ID_BYTES, DelfEs
from delf_es.settings import Settings

_bearer = HTTPBearer(auto_error=False, description="DELF_ES_API_TOKEN")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_engine(request: Request) -> DelfEs:
    return request.app.state.engine


def get_slots(request: Request) -> ExtractionSlots:
    return request.app.state.slots


def require_token(
    credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
    settings: Settings = Depends(get_settings),
) -> None:
    """401 without a bearer token, 403 with a wrong one; no check when no token is configured
    (``serve`` then listens on loopback only).  The comparison takes the same time whatever
    the token's prefix, so it cannot be guessed byte by byte."""
    if settings.api_token is None:
        return
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise AuthenticationRequired("this route needs 'Authorization: Bearer <token>' (DELF_ES_API_TOKEN)")
    if not hmac.compare_digest(credentials.credentials.encode(), settings.api_token.encode()):
        raise AccessDenied("wrong bearer token")


def check_image_id(image_id: str) -> str:
    """An id as a client may name it: 1..512 bytes of UTF-8 without control characters (NUL...),
    not starting with '/' or '_' (reserved: ``_bulk``), no '.' or '..' path segments.  Ids are
    never used as file names; the rule only keeps ids unambiguous in URLs and logs."""
    if not image_id or len(image_id.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES:
        raise InvalidRequest(f"image id must be 1..{MAX_ID_BYTES} bytes")
    if _CONTROL.search(image_id):
        raise InvalidRequest("image id must not contain control characters (NUL, newline...)")
    try:
        image_id.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest("image id must be valid UTF-8") from None
    if image_id.startswith(("/", "_")) or any(part in (".", "..") for part in image_id.split("/")):
        raise InvalidRequest("image id must not start with '/' or '_' nor contain '.' or '..' segments")
    return image_id
