"""``POST /v1/search``: by upload (multipart ``file``), by URL or by indexed id (JSON)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from delf_es.api.deps import check_image_id, get_engine, get_settings, get_slots, require_token
from delf_es.api.limits import ExtractionSlots, media_type, read_body, read_form
from delf_es.api.models import ERRORS, SearchOptions, SearchRequest, SearchResponse
from delf_es.api.uploads import MAX_JSON_BYTES, decode, form_text, json_object, parse_model, single_file
from delf_es.imageio import load_image_from_url
from delf_es.errors import InvalidRequest
from delf_es.sdk import DelfEs, QueryResult
from delf_es.settings import Settings

router = APIRouter(prefix="/v1", tags=["search"], dependencies=[Depends(require_token)], responses=ERRORS)

_FORM_FIELDS = {
    "file": {"type": "string", "format": "binary"},
    "bbox": {"type": "string", "description": "x1,y1,x2,y2 px of the query"},
    "filter": {"type": "string", "description": "a JSON object: an Elasticsearch query on metadata.*"},
    "limit": {"type": "integer", "minimum": 1, "maximum": 100},
    "min_inliers": {"type": "integer", "minimum": 0},
    "matches": {"type": "boolean"},
}
_SEARCH_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": _FORM_FIELDS}},
            "application/json": {"schema": SearchRequest.model_json_schema()},
        },
    }
}


def _form_options(form) -> SearchOptions:
    fields: dict = {}
    bbox = form_text(form, "bbox")
    if bbox is not None and bbox.strip():
        try:
            fields["bbox"] = [float(v) for v in bbox.split(",")]
        except ValueError:
            raise InvalidRequest(f"bbox must be 4 numbers 'x1,y1,x2,y2', got {bbox[:80]!r}") from None
    for name in ("limit", "min_inliers", "matches"):
        value = form_text(form, name)
        if value is not None and value.strip():
            fields[name] = value.strip()
    fields["filter"] = json_object(form_text(form, "filter"), "filter")
    return parse_model(SearchOptions, fields)


def _check_filter(engine: DelfEs, options: SearchOptions) -> None:
    """Refuse a malformed filter before the model runs (the embedded index's subset; on
    Elasticsearch the server judges it at search time)."""
    if options.filter is not None and engine.settings.index_backend() != "elasticsearch":
        from delf_es.index.filters import compile_filter

        compile_filter(options.filter)


def _search_image(engine: DelfEs, image, options: SearchOptions) -> QueryResult:
    return engine.search_loaded(image, bbox=tuple(options.bbox) if options.bbox else None,
                                pre_filter=options.filter, limit=options.limit,
                                min_inliers=options.min_inliers, matches=options.matches)


@router.post("/search", response_model=SearchResponse, openapi_extra=_SEARCH_BODY)
async def search(
    request: Request, engine: DelfEs = Depends(get_engine), settings: Settings = Depends(get_settings),
    slots: ExtractionSlots = Depends(get_slots),
) -> SearchResponse:
    """Images showing the same object or place as the query, best first: the same hits, in
    the same order, as ``DelfEs.search_image``."""
    started = time.perf_counter()
    kind = media_type(request)
    timeout = settings.api_request_timeout
    if kind == "multipart/form-data":
        form = await read_form(request, settings.api_max_upload_bytes, settings.api_body_timeout)
        upload = await single_file(form, "file")
        options = _form_options(form)
        _check_filter(engine, options)
        image = await run_in_threadpool(decode, upload, settings)
        result = await slots.run(_search_image, engine, image, options, timeout_s=timeout)
    elif kind == "application/json":
        body = await read_body(request, MAX_JSON_BYTES, settings.api_body_timeout)
        query = parse_model(SearchRequest, body)
        if (query.url is None) == (query.id is None):
            raise InvalidRequest("a JSON search takes exactly one of 'url' and 'id' (or upload a 'file')")
        _check_filter(engine, query)
        if query.id is not None:
            if query.bbox is not None:
                raise InvalidRequest("bbox applies to an uploaded or fetched query, not to an indexed id")
            check_image_id(query.id)
            result = await run_in_threadpool(
                lambda: engine.search_indexed(query.id, pre_filter=query.filter, limit=query.limit,
                                              min_inliers=query.min_inliers, matches=query.matches))
        else:
            image = await run_in_threadpool(load_image_from_url, query.url, settings)
            result = await slots.run(_search_image, engine, image, query, timeout_s=timeout)
    else:
        raise InvalidRequest(f"search takes multipart/form-data (file) or application/json (url / id), not {kind or 'no Content-Type'!r}")
    return SearchResponse(
        took_ms=round((time.perf_counter() - started) * 1000, 1),
        query={"width": result.width, "height": result.height, "keypoints": result.keypoints},
        hits=result.hits,
    )
