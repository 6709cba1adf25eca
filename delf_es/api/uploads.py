"""Reading the image (and its options) out of a request: raw ``image/*`` bytes, multipart
``file`` (+ fields) or JSON.  The bytes are decoded here with the same checks as the SDK
(:func:`delf_es.imageio.load_image`: pixel cap, corrupt data), so a bad upload is refused
before it waits for an extraction slot."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from starlette.datastructures import FormData, UploadFile
from starlette.requests import Request

from delf_es.api.errors import describe_validation
from delf_es.api.limits import media_type, read_body, read_form
from delf_es.imageio import LoadedImage, load_image
from delf_es.errors import InvalidRequest
from delf_es.settings import Settings

#: Most bytes of a JSON request body (search by URL / id: a few hundred bytes).
MAX_JSON_BYTES = 256 * 1024


@dataclass
class Upload:
    """One uploaded file: its bytes and the name the client gave it."""

    data: bytes
    filename: str


async def read_image_request(request: Request, settings: Settings) -> tuple[Upload, FormData | None]:
    """The image of a PUT (raw ``image/*`` or ``application/octet-stream`` body, or multipart
    with ``file``) and the multipart form (None for a raw body)."""
    kind = media_type(request)
    if kind == "multipart/form-data":
        form = await read_form(request, settings.api_max_upload_bytes, settings.api_body_timeout)
        return await single_file(form, "file"), form
    if kind.startswith("image/") or kind == "application/octet-stream":
        data = await read_body(request, settings.api_max_upload_bytes, settings.api_body_timeout)
        return Upload(data, "<body>"), None
    raise InvalidRequest(f"send the image as image/* bytes or multipart/form-data with 'file', not {kind or 'no Content-Type'!r}")


async def single_file(form: FormData, name: str) -> Upload:
    files = [v for v in form.getlist(name) if isinstance(v, UploadFile)]
    if len(files) != 1:
        raise InvalidRequest(f"multipart body needs exactly one file field {name!r}, got {len(files)}")
    return Upload(await files[0].read(), files[0].filename or "<file>")


def form_text(form: FormData | None, name: str) -> str | None:
    if form is None:
        return None
    value = form.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidRequest(f"form field {name!r} must be text, not a file")
    return value


def json_object(text: str | None, what: str) -> dict[str, Any] | None:
    if text is None or text.strip() == "":
        return None
    try:
        value = json.loads(text)
    except ValueError as error:
        raise InvalidRequest(f"{what} must be a JSON object: {error}") from None
    if not isinstance(value, dict):
        raise InvalidRequest(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def parse_model(model, data: dict[str, Any] | bytes):
    """``model`` validated from a dict or JSON bytes; 400 :class:`InvalidRequest` otherwise."""
    try:
        if isinstance(data, (bytes, bytearray)):
            return model.model_validate_json(data)
        return model.model_validate(data)
    except ValidationError as error:
        raise InvalidRequest(describe_validation(error.errors())) from None


def decode(upload: Upload, settings: Settings) -> LoadedImage:
    if not upload.data:
        raise InvalidRequest("empty image body")
    return load_image(upload.data, settings, name=upload.filename)
