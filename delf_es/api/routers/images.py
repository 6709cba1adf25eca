"""``/v1/images``: add (PUT, by id), read, delete, thumbnail, and ``_bulk`` uploads."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Depends, Query, Request, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from delf_es.api import staging
from delf_es.api.deps import check_image_id, get_engine, get_settings, get_slots, require_token
from delf_es.api.errors import status_of
from delf_es.api.limits import ExtractionSlots, media_type, read_form
from delf_es.api.models import ERRORS, BulkItem, BulkResponse, ErrorDetail, ImageDeleted, ImageInfo, ImageWritten, TaskAccepted
from delf_es.api.uploads import Upload, decode, form_text, json_object, read_image_request
from delf_es.errors import DelfEsError, ImageNotFound, InvalidRequest
from delf_es.sdk import DelfEs
from delf_es.settings import Settings

router = APIRouter(prefix="/v1/images", tags=["images"], dependencies=[Depends(require_token)], responses=ERRORS)

_IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["file"],
                "properties": {"file": {"type": "string", "format": "binary"},
                               "metadata": {"type": "string", "description": "a JSON object"}},
            }},
        },
    }
}
_BULK_BODY = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": ["file"],
            "properties": {
                "file": {"type": "array", "items": {"type": "string", "format": "binary"}},
                "id": {"type": "array", "items": {"type": "string"},
                       "description": "one id per file, in order; default: the files' names"},
                "metadata": {"type": "string", "description": "a JSON object: id -> metadata object"},
            },
        }}},
    }
}


def _add(engine: DelfEs, image_id: str, upload: Upload, metadata: dict | None, refresh: bool,
         settings: Settings) -> ImageWritten:
    """Decode, extract and write one image (runs in a worker thread, in an extraction slot)."""
    image = decode(upload, settings)
    existed = bool(engine.backend.existing([image_id]))
    features = engine.add_loaded(image_id, image, metadata=metadata, refresh_after=refresh)
    return ImageWritten(id=image_id, keypoints=features.num_keypoints, model_id=features.model_id,
                        result="updated" if existed else "created")


@router.put("/{image_id:path}", response_model=ImageWritten | TaskAccepted, status_code=201,
            openapi_extra=_IMAGE_BODY, responses={200: {"model": ImageWritten}, 202: {"model": TaskAccepted}})
async def put_image(
    image_id: str, request: Request, response: Response,
    refresh: bool = Query(False, description="searchable before the response"),
    wait: bool = Query(True, description="false: hand the image to the workers and return a task id"),
    engine: DelfEs = Depends(get_engine), settings: Settings = Depends(get_settings),
    slots: ExtractionSlots = Depends(get_slots),
):
    """Add or replace one image: 201 when new, 200 when replaced (never duplicated)."""
    check_image_id(image_id)
    upload, form = await read_image_request(request, settings)
    metadata = json_object(form_text(form, "metadata"), "metadata")
    if not wait:
        response.status_code = 202
        return await run_in_threadpool(staging.submit, engine, settings, [(image_id, upload, metadata)])
    written = await slots.run(_add, engine, image_id, upload, metadata, refresh, settings,
                              timeout_s=settings.api_request_timeout)
    response.status_code = 200 if written.result == "updated" else 201
    return written


@router.post("/_bulk", response_model=BulkResponse | TaskAccepted, openapi_extra=_BULK_BODY,
             responses={202: {"model": TaskAccepted}})
async def bulk(
    request: Request, response: Response,
    refresh: bool = Query(True, description="searchable before the response"),
    wait: bool = Query(True, description="false: hand the images to the workers and return one task id"),
    engine: DelfEs = Depends(get_engine), settings: Settings = Depends(get_settings),
    slots: ExtractionSlots = Depends(get_slots),
):
    """Several files (multipart, repeated ``file``): a result per item, like Elasticsearch's
    ``_bulk``; a bad item fails alone, the others are written."""
    started = time.perf_counter()
    if media_type(request) != "multipart/form-data":
        raise InvalidRequest("_bulk takes multipart/form-data with one or more 'file' fields")
    form = await read_form(request, settings.api_max_upload_bytes, settings.api_body_timeout)
    files = [v for v in form.getlist("file") if isinstance(v, UploadFile)]
    if not files:
        raise InvalidRequest("_bulk needs at least one 'file' field")
    ids = [v for v in form.getlist("id") if isinstance(v, str)]
    if ids and len(ids) != len(files):
        raise InvalidRequest(f"{len(ids)} 'id' fields for {len(files)} files: give one per file or none")
    metadata = json_object(form_text(form, "metadata"), "metadata") or {}
    items: list[tuple[str, Upload | None, Any]] = []
    for position, file in enumerate(files):
        name = ids[position] if ids else (file.filename or f"file-{position}")
        items.append((name, Upload(await file.read(), file.filename or name), metadata.get(name)))
    if not wait:
        for name, _, _ in items:
            check_image_id(name)
        response.status_code = 202
        return await run_in_threadpool(staging.submit, engine, settings, items)
    results: list[BulkItem] = []
    for name, upload, item_metadata in items:
        try:
            check_image_id(name)
            if item_metadata is not None and not isinstance(item_metadata, dict):
                raise InvalidRequest(f"metadata of {name!r} must be a JSON object")
            written = await slots.run(_add, engine, name, upload, item_metadata, False, settings,
                                      timeout_s=settings.api_request_timeout)
            results.append(BulkItem(id=name, result=written.result, keypoints=written.keypoints,
                                    status=200 if written.result == "updated" else 201))
        except DelfEsError as error:
            results.append(BulkItem(id=name, result="failed", status=status_of(error),
                                    error=ErrorDetail(type=type(error).__name__, reason=str(error))))
    if refresh and any(r.result != "failed" for r in results):
        await run_in_threadpool(engine.backend.refresh)
    return BulkResponse(took_ms=round((time.perf_counter() - started) * 1000, 1),
                        errors=any(r.result == "failed" for r in results), items=results)


@router.get("/{image_id:path}/thumbnail", response_class=Response,
            responses={200: {"content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}}}})
def thumbnail(image_id: str, engine: DelfEs = Depends(get_engine)) -> Response:
    """The small JPEG stored with the image (longer side <= 256 px); 404 if it has none."""
    check_image_id(image_id)
    data = engine.thumbnail(image_id)
    if data is None:
        raise ImageNotFound(f"{image_id} (stored without a thumbnail)")
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=60"})


@router.get("/{image_id:path}", response_model=ImageInfo)
def get_image(image_id: str, engine: DelfEs = Depends(get_engine)) -> ImageInfo:
    """The stored record, without vectors."""
    check_image_id(image_id)
    return ImageInfo(**engine.get_image(image_id))


@router.delete("/{image_id:path}", response_model=ImageDeleted)
def delete_image(image_id: str, refresh: bool = Query(False), engine: DelfEs = Depends(get_engine)) -> ImageDeleted:
    """Remove an image; 404 when unknown."""
    check_image_id(image_id)
    engine.delete_image(image_id, refresh_after=refresh)
    return ImageDeleted(id=image_id)
