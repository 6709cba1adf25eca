"""``GET /healthz`` (no token: for load balancers) and ``GET /v1/stats``."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from delf_es.api.deps import get_engine, get_settings, get_slots, require_token
from delf_es.api.errors import RETRY_AFTER_S, error_body
from delf_es.api.limits import ExtractionSlots
from delf_es.api.models import ERRORS, ErrorResponse, Health, Stats
from delf_es.errors import DelfEsError
from delf_es.sdk import DelfEs
from delf_es.settings import Settings

router = APIRouter(tags=["health"])


def _redis_state(settings: Settings) -> str | None:
    url = settings.redis_url or settings.worker_redis_url
    if not url:
        return None
    import redis

    client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    try:
        client.ping()
        return "ok"
    except redis.RedisError:
        return "down"
    finally:
        client.close()


@router.get("/healthz", response_model=Health, responses={503: {"model": ErrorResponse}})
def healthz(engine: DelfEs = Depends(get_engine), settings: Settings = Depends(get_settings)):
    """ok, or degraded (Redis down: searches still work, slower); 503 when the index is unreachable."""
    backend = settings.index_backend()
    try:
        images = engine.count()
    except DelfEsError as error:
        body = error_body(type(error).__name__, f"index unreachable: {error}", 503)
        return JSONResponse(body, status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})
    redis_state = _redis_state(settings)
    return Health(status="degraded" if redis_state == "down" else "ok", backend=backend, images=images,
                  model_id=engine.model_id, elasticsearch="ok" if settings.index_backend() == "elasticsearch" else None, redis=redis_state)


@router.get("/v1/stats", response_model=Stats, dependencies=[Depends(require_token)], responses=ERRORS)
def stats(engine: DelfEs = Depends(get_engine), settings: Settings = Depends(get_settings),
          slots: ExtractionSlots = Depends(get_slots)) -> Stats:
    """Images, model, backend, thumbnail bytes, and the extraction queue."""
    images = engine.count()
    thumbnail_bytes = engine.thumbnail_bytes()
    return Stats(
        images=images, model_id=engine.model_id, backend=settings.index_backend(),
        index=settings.index_alias, thumbnails=settings.thumbnails, thumbnail_bytes=thumbnail_bytes,
        thumbnail_bytes_per_image=None if thumbnail_bytes is None or not images else round(thumbnail_bytes / images, 1),
        extractions_running=slots.running, extractions_queued=slots.queued,
    )
