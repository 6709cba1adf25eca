"""``GET /v1/tasks/{id}``: where a ``?wait=false`` ingest stands."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from delf_es.api import staging
from delf_es.api.deps import get_engine, get_settings, require_token
from delf_es.api.models import ERRORS, TaskStatus
from delf_es.sdk import DelfEs
from delf_es.settings import Settings

router = APIRouter(prefix="/v1/tasks", tags=["tasks"], dependencies=[Depends(require_token)], responses=ERRORS)


@router.get("/{task_id}", response_model=TaskStatus)
def task(task_id: str, engine: DelfEs = Depends(get_engine), settings: Settings = Depends(get_settings)) -> TaskStatus:
    """pending, indexed (all written: searchable after the next refresh), failed or partial."""
    return staging.progress(engine, settings, task_id)
