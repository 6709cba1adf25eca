"""``delf-es serve``: run the app under uvicorn, refusing unsafe configurations first."""

from __future__ import annotations

import ipaddress
import json
import logging
import os
from typing import Any, Mapping

from delf_es.errors import InvalidRequest
from delf_es.settings import Settings

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve anywhere


def check_config(settings: Settings, host: str, workers: int) -> None:
    """Refuse what would be unsafe or cannot work, with the reason (InvalidRequest)."""
    if not is_loopback(host) and not settings.api_token:
        raise InvalidRequest(f"refusing to listen on {host} without a token: set DELF_ES_API_TOKEN (or use --host 127.0.0.1)")
    if workers < 1:
        raise InvalidRequest(f"--workers must be >= 1, got {workers}")
    if workers > 1 and not settings.es_url:
        raise InvalidRequest("the embedded index is opened by one process: --workers > 1 needs Elasticsearch (DELF_ES_ES_URL)")


def environment_for(overrides: Mapping[str, Any]) -> dict[str, str]:
    """DELF_ES_* variables that rebuild ``overrides`` in each worker process (Settings reads them;
    tuples and lists as JSON)."""
    out = {}
    for name, value in overrides.items():
        if isinstance(value, (tuple, list, dict)):
            text = json.dumps(list(value) if not isinstance(value, dict) else value)
        elif isinstance(value, bool):
            text = "true" if value else "false"
        else:
            text = str(value)
        out[f"DELF_ES_{name.upper()}"] = text
    return out


def serve(settings: Settings, host: str = "127.0.0.1", port: int = 8080, workers: int = 1,
          overrides: Mapping[str, Any] | None = None, log_level: str = "info") -> None:
    import uvicorn

    check_config(settings, host, workers)
    # No uvicorn limit_concurrency: its 503 is plain text; ExtractionSlots bounds the costly work.
    common = dict(host=host, port=port, log_level=log_level, timeout_keep_alive=5, timeout_graceful_shutdown=10)
    if workers == 1:
        from delf_es.api.app import create_app

        uvicorn.run(create_app(settings), **common)
        return
    # Several processes: uvicorn imports the factory in each, which builds Settings from the
    # environment; the command line's overrides travel there as DELF_ES_* variables.
    os.environ.update(environment_for(overrides or {}))
    uvicorn.run("delf_es.api.app:app_from_environment", factory=True, workers=workers, **common)
