"""Request and response bodies: the API's contract (OpenAPI, validation and docs come from here)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

#: Most hits one search returns.
MAX_LIMIT = 100


class ErrorDetail(BaseModel):
    type: str = Field(description="the error class, e.g. 'ImageNotFound'")
    reason: str


class ErrorResponse(BaseModel):
    """Every error, shaped like Elasticsearch's."""

    error: ErrorDetail
    status: int


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    backend: Literal["elasticsearch", "embedded"]
    images: int
    model_id: str
    elasticsearch: Literal["ok", "down"] | None = Field(description="None when the backend is embedded")
    redis: Literal["ok", "down"] | None = Field(description="None when no Redis is configured")


class Stats(BaseModel):
    images: int
    model_id: str
    backend: Literal["elasticsearch", "embedded"]
    index: str = Field(description="index alias (Elasticsearch) or folder name (embedded)")
    thumbnails: bool = Field(description="whether thumbnails are stored at add time")
    thumbnail_bytes: int | None = Field(description="bytes of all stored thumbnails (None: not known)")
    thumbnail_bytes_per_image: float | None
    extractions_running: int
    extractions_queued: int


class ImageWritten(BaseModel):
    id: str
    keypoints: int
    model_id: str
    result: Literal["created", "updated"]


class TaskAccepted(BaseModel):
    task_id: str
    ids: list[str]
    state: Literal["pending"] = "pending"


class ImageInfo(BaseModel):
    """A stored image without its vectors."""

    id: str
    path: str
    metadata: dict[str, Any]
    width: int
    height: int
    num_keypoints: int
    model_id: str
    created_at: str
    thumbnail_bytes: int = Field(description="size of the stored thumbnail JPEG, 0 = none")


class ImageDeleted(BaseModel):
    id: str
    result: Literal["deleted"] = "deleted"


class BulkItem(BaseModel):
    id: str
    result: Literal["created", "updated", "failed"]
    status: int
    keypoints: int | None = None
    error: ErrorDetail | None = None


class BulkResponse(BaseModel):
    took_ms: float
    errors: bool = Field(description="true when at least one item failed (as Elasticsearch's _bulk)")
    items: list[BulkItem]


class TaskStatus(BaseModel):
    task_id: str
    state: Literal["pending", "indexed", "failed", "partial"]
    total: int
    done: int
    failed: dict[str, str] = Field(description="image id -> error, for the images that will not be indexed")


class SearchOptions(BaseModel):
    """What every search takes besides the query image."""

    model_config = ConfigDict(extra="forbid")

    bbox: list[float] | None = Field(
        default=None, min_length=4, max_length=4, description="x1, y1, x2, y2 px of the query: search with that region"
    )
    filter: dict[str, Any] | None = Field(
        default=None, description="an Elasticsearch query on metadata.* (the SDK's pre_filter), e.g. "
        '{"term": {"metadata.city": "paris"}}',
    )
    limit: int = Field(default=10, ge=1, le=MAX_LIMIT)
    min_inliers: int | None = Field(default=None, ge=0, le=100_000, description="None = the server's setting")
    matches: bool = Field(default=False, description="give each hit its verified pairs [[qx, qy, x, y], ...] px")


class SearchRequest(SearchOptions):
    """JSON search: by URL (fetched under the server's URL safety rules) or by indexed id."""

    url: str | None = Field(default=None, max_length=4096)
    id: str | None = Field(default=None, max_length=512)


class QueryInfo(BaseModel):
    width: int = Field(description="px of the whole query image (a bbox does not change it)")
    height: int
    keypoints: int = Field(description="keypoints extracted from the query (or its region)")


class Hit(BaseModel):
    id: str
    path: str
    score: float
    inliers: int
    votes: int
    dist: float
    global_similarity: float | None
    metadata: dict[str, Any]
    matches: list[list[float]] | None = Field(
        default=None, description="with matches=true: [qx, qy, x, y] px, query image then hit image (originals)"
    )


class SearchResponse(BaseModel):
    took_ms: float
    query: QueryInfo
    hits: list[Hit]


#: Error answers every /v1 route can give (for the OpenAPI document).
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 408, 413, 422, 503)}
