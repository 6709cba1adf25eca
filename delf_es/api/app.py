"""The HTTP application: composes the routers, the error handlers, CORS and the page.

    from delf_es.api import create_app
    app = create_app(Settings(...))          # or create_app(engine=DelfEs(...)) in tests

``delf-es serve`` runs it under uvicorn (``factory=True``: each worker process builds its own
engine from the environment's Settings).
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from delf_es.api import errors
from delf_es.api.limits import ExtractionSlots
from delf_es.api.routers import health, images, search, tasks
from delf_es.sdk import DelfEs
from delf_es.settings import Settings

log = logging.getLogger(__name__)

#: The page's files ship inside the package (no build step, nothing from a CDN).
STATIC = resources.files("delf_es.api") / "static"


def create_app(settings: Settings | None = None, engine: DelfEs | None = None, *, warm_up: bool = True) -> FastAPI:
    """The app on ``engine`` (built from ``settings`` when None; closed at shutdown only then).

    ``warm_up`` loads the model and opens the index at startup, so the first request is not
    the one that pays for it (and a broken configuration fails the start, not a request)."""
    settings = settings or (engine.settings if engine is not None else Settings())
    owned = engine is None
    engine = engine or DelfEs(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if warm_up:
            log.info("model %s, index %s", engine.model_id, settings.index_alias)
            try:
                engine.count()
            except Exception as error:  # a down index is a 503 per request, not a failed start
                log.warning("index not reachable at startup: %s", error)
        yield
        app.state.slots.close()
        if owned:
            engine.close()

    app = FastAPI(
        title="delf-es", version="1", lifespan=lifespan,
        description="Instance-level image search: DELF local features, DELG global descriptor, RANSAC "
        "verification. Errors are shaped like Elasticsearch's: "
        '{"error": {"type", "reason"}, "status"}.',
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.slots = ExtractionSlots(settings.api_max_extractions, settings.api_max_queued)
    errors.install(app)
    if settings.api_cors_origins:  # off unless configured: the page is served from the same origin
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.api_cors_origins),
                           allow_methods=["GET", "PUT", "POST", "DELETE"], allow_headers=["Authorization", "Content-Type"])
    for module in (health, images, search, tasks):
        app.include_router(module.router)
    index_html = (STATIC / "index.html").read_text()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse(index_html, headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(packages=[("delf_es.api", "static")]), name="static")
    return app


def app_from_environment() -> FastAPI:
    """uvicorn's factory (``delf_es.api.app:app_from_environment``): Settings from DELF_ES_*."""
    return create_app(Settings())
