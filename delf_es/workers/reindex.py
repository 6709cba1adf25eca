"""Zero-downtime reindexing for a new model or PCA, through the worker fleet.

    delf-es reindex --backbone mobilenetv2 [--pca new.npz] [--delete-old]

1. The live alias (``delf-images`` -> ``delf-images-v1-<h>``) lists every image (scan: id, path,
   metadata).  This Elasticsearch build has no ``_reindex``, and new features need the pixels
   anyway: images are re-extracted from their stored paths/URLs.
2. A *build* alias ``<alias>-g<N>`` (indices ``<alias>-g<N>-v1-<h'>`` and
   ``<alias>-g<N>-keypoints-v1-<h'>``, created by the first write) receives the workers' output;
   ids already in it are skipped, so an interrupted reindex resumes where it stopped.
3. When the job is done, images added to the live index meanwhile are caught up (a few rounds),
   then the counts must be equal (or ``allow_missing``: images that failed are reported).
4. One ``_aliases`` call moves both live aliases to the new indices and drops the build aliases:
   searches see the old index or the new one, never a mix (the backend checks keypoint
   generations against the images index paired with the keypoints index they came from).
5. The old indices are kept (roll back by swapping the aliases again) or deleted by flag.

Searchers keep their model: after a model change they must load the new one (the live model id
is in the index's ``_meta``); a PCA refit of the same dims stays queryable meanwhile.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

from delf_es.errors import ConfigurationError, InvalidRequest, ReindexError
from delf_es.index.es import KEYPOINTS_SUFFIX, ElasticsearchBackend
from delf_es.index.es.templates import is_keypoints_index
from delf_es.index.es.transport import Transport
from delf_es.index.es.failures import failures_index
from delf_es.settings import Settings
from delf_es.workers.submit import Submitter
from delf_es.workers.store import JobProgress

if TYPE_CHECKING:  # pragma: no cover - at run time imported where used: the model code loads torch
    from delf_es.model.spec import ModelSpec

log = logging.getLogger(__name__)

#: Seconds an old index lives after the swap before ``delete_old`` drops it (in-flight searches finish).
DELETE_GRACE_S = 5.0
CATCH_UP_ROUNDS = 3


@dataclass
class ReindexResult:
    """What a reindex (or one beat tick of it) did.

    Attributes:
        state: ``up-to-date`` (live index already of the model), ``building`` (tick: job running),
            ``swapped``, or ``incomplete`` (counts differ; nothing swapped).
        old_indices / new_indices: concrete (images, keypoints) index names.
    """

    alias: str
    model_id: str
    state: str
    build_alias: str | None = None
    source_count: int = 0
    target_count: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    old_indices: list[str] = field(default_factory=list)
    new_indices: list[str] = field(default_factory=list)
    deleted_old: bool = False
    submitted: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Reindexer:
    """Rebuild ``settings.index_alias`` for the model ``spec`` (sent to the workers with every
    image, so they extract exactly the model whose id the build is checked against)."""

    def __init__(self, settings: Settings, submitter: Submitter, spec: ModelSpec) -> None:
        if not settings.es_url:
            raise ConfigurationError("reindexing needs Elasticsearch: set DELF_ES_ES_URL")
        from delf_es.model.spec import ModelSpec

        if not isinstance(spec, ModelSpec):
            raise InvalidRequest(f"the reindex target must be a ModelSpec, not {type(spec).__name__}")
        self.settings = settings
        self.alias = settings.index_alias
        self.submitter = submitter
        self.spec = spec
        self.model_id = spec.model_id
        # scans and alias swaps on a loaded node take longer than a search: at least 60 s per request
        self.transport = Transport(settings, request_timeout=max(60.0, settings.es_timeout))
        self.es = self.transport.client
        self._state_key = f"{submitter.store.prefix}reindex:{self.alias}"

    def close(self) -> None:
        self.transport.close()

    def _call(self, action: str, function, **kwargs: Any) -> Any:
        """A client call with the transport's typed errors (IndexUnavailable, RequestRejected)."""
        return self.transport.call(action, function, **kwargs)

    # ------------------------------------------------------------------ indices

    def _meta_model(self, alias: str) -> tuple[str | None, list[str]]:
        """(model id, concrete images + keypoints indices) behind ``alias`` (None, [] if absent)."""
        found = self._call("indices.get", self.es.indices.get, index=f"{alias},{alias}{KEYPOINTS_SUFFIX}", features="mappings",
                                    ignore_unavailable=True, allow_no_indices=True)
        if not found:
            return None, []
        images = [name for name in found if not is_keypoints_index(name)]
        model = (found[images[0]]["mappings"].get("_meta") or {}).get("model_id") if images else None
        return model, sorted(found)

    def _builds(self) -> dict[str, str | None]:
        """Existing build aliases -> their model id (None before the first write)."""
        pattern = re.compile(re.escape(self.alias) + r"-g(\d+)$")
        aliases = self._call("indices.get_alias", self.es.indices.get_alias, name=f"{self.alias}-g*", ignore_unavailable=True, allow_no_indices=True)
        names = {a for body in aliases.values() for a in body.get("aliases", {}) if pattern.match(a)}
        return {name: self._meta_model(name)[0] for name in names}

    def _new_build_alias(self) -> str:
        indices = self._call("indices.get", self.es.indices.get, index=f"{self.alias}-g*", features="aliases", ignore_unavailable=True,
                                      allow_no_indices=True)
        numbers = [int(m.group(1)) for name in indices if (m := re.match(re.escape(self.alias) + r"-g(\d+)-", name))]
        return f"{self.alias}-g{max(numbers, default=0) + 1}"

    def build_alias(self, discard_other: bool = False) -> str:
        """The build alias of this model: resumed if one exists, else a new name."""
        builds = self._builds()
        mine = [name for name, model in builds.items() if model == self.model_id]
        if mine:
            return sorted(mine)[-1]
        others = [name for name, model in builds.items() if model is not None]
        if others and not discard_other:
            raise ReindexError(f"a reindex to another model is in progress ({', '.join(sorted(others))}); "
                               f"finish it or pass discard_other / --discard-other-builds")
        for name in others:
            _, indices = self._meta_model(name)
            if indices:
                self._call("indices.delete", self.es.indices.delete, index=",".join(indices))
        return self._new_build_alias()

    # ------------------------------------------------------------------ images

    def source_images(self) -> dict[str, dict[str, Any]]:
        """Every image of the live index: id -> {path, metadata}."""
        if not self._call("indices.exists_alias", self.es.indices.exists_alias, name=self.alias):
            return {}
        return {
            hit["_source"]["image_id"]: {"path": hit["_source"]["path"], "metadata": hit["_source"].get("metadata") or {}}
            for hit in self.transport.scan(self.alias, {"query": {"match_all": {}}}, ["image_id", "path", "metadata"])
        }

    def missing(self, build: str, source: Mapping[str, dict[str, Any]]) -> list[str]:
        backend = ElasticsearchBackend(self.settings.model_copy(update={"index_alias": build}), client=self.es)
        present = backend.existing(list(source)) if source else set()
        return [image_id for image_id in source if image_id not in present]

    def submit(self, build: str, source: Mapping[str, dict[str, Any]], ids: list[str]) -> str:
        items = [{"image_id": i, "path": source[i]["path"], "metadata": source[i]["metadata"]} for i in ids]
        return self.submitter.submit(items, alias=build, failures=failures_index(self.alias), model=self.spec)

    # ------------------------------------------------------------------ swap

    def swap(self, build: str, delete_old: bool) -> ReindexResult:
        """Count check, then move both live aliases to the build's indices in one ``_aliases`` call."""
        self._call("indices.refresh", self.es.indices.refresh, index=f"{build},{build}{KEYPOINTS_SUFFIX},{self.alias}",
                                ignore_unavailable=True, allow_no_indices=True)
        _, new = self._meta_model(build)
        _, old = self._meta_model(self.alias)
        new_images = [n for n in new if not is_keypoints_index(n)]
        new_keypoints = [n for n in new if n not in new_images]
        if len(new_images) != 1 or len(new_keypoints) != 1:
            raise ReindexError(f"build alias {build} points at {new}, expected one images and one keypoints index")
        keypoints_alias = self.alias + KEYPOINTS_SUFFIX
        actions: list[dict[str, Any]] = [
            {"remove": {"index": name, "alias": a}}
            for name in old for a in (self.alias, keypoints_alias)
            if a in self._call("indices.get_alias", self.es.indices.get_alias, index=name).get(name, {}).get("aliases", {})
        ]
        actions += [
            {"add": {"index": new_images[0], "alias": self.alias, "is_write_index": True}},
            {"add": {"index": new_keypoints[0], "alias": keypoints_alias, "is_write_index": True}},
            {"remove": {"index": new_images[0], "alias": build}},
            {"remove": {"index": new_keypoints[0], "alias": build + KEYPOINTS_SUFFIX}},
        ]
        self._call("indices.update_aliases", self.es.indices.update_aliases, actions=actions)
        log.info("alias %s -> %s (was %s)", self.alias, new_images[0], old)
        deleted = False
        if delete_old and old:
            time.sleep(DELETE_GRACE_S)
            self._call("indices.delete", self.es.indices.delete, index=",".join(old))
            deleted = True
        return ReindexResult(self.alias, self.model_id, "swapped", build, old_indices=old, new_indices=new,
                             deleted_old=deleted)

    def _counts(self, build: str) -> tuple[int, int]:
        self._call("indices.refresh", self.es.indices.refresh, index=f"{build},{self.alias}", ignore_unavailable=True, allow_no_indices=True)
        return (int(self._call("count", self.es.count, index=self.alias)["count"]),
                int(self._call("count", self.es.count, index=build)["count"]) if self._call("indices.exists_alias", self.es.indices.exists_alias, name=build) else 0)

    # ------------------------------------------------------------------ drivers

    def run(
        self,
        delete_old: bool = False,
        allow_missing: bool = False,
        force: bool = False,
        discard_other: bool = False,
        timeout: float | None = None,
        on_progress: Callable[[JobProgress], None] | None = None,
    ) -> ReindexResult:
        """Blocking reindex (the CLI): build, wait for the workers, catch up, check, swap."""
        live_model, _ = self._meta_model(self.alias)
        if live_model is None or (live_model == self.model_id and not force):
            return ReindexResult(self.alias, self.model_id, "up-to-date")
        build = self.build_alias(discard_other)
        failed: dict[str, str] = {}
        submitted = 0
        for _ in range(CATCH_UP_ROUNDS):
            source = self.source_images()
            todo = [i for i in self.missing(build, source) if i not in failed]
            if not todo:
                break
            job = self.submit(build, source, todo)
            submitted += len(todo)
            done = self.submitter.wait(job, timeout=timeout, on_progress=on_progress)
            failed.update(done.failed)
        source_count, target_count = self._counts(build)
        if source_count != target_count and not (allow_missing and source_count - target_count <= len(failed)):
            return ReindexResult(self.alias, self.model_id, "incomplete", build, source_count, target_count, failed,
                                 submitted=submitted)
        result = self.swap(build, delete_old)
        result.source_count, result.target_count, result.failed = source_count, target_count, failed
        result.submitted = submitted
        return result

    def tick(self, delete_old: bool = False) -> ReindexResult:
        """One non-blocking step (the beat schedule): start or resume the build, or swap when its
        job is done and the counts match.  State (build alias, job id) is kept in Redis."""
        live_model, _ = self._meta_model(self.alias)
        if live_model is None or live_model == self.model_id:
            return ReindexResult(self.alias, self.model_id, "up-to-date")
        redis = self.submitter.store.redis
        state = json.loads(redis.get(self._state_key) or b"{}")
        if state.get("model_id") == self.model_id and state.get("job"):
            progress = self.submitter.progress(state["job"])
            if not progress.finished:
                return ReindexResult(self.alias, self.model_id, "building", state["build"])
        build = self.build_alias()
        source = self.source_images()
        known_failed = set(state.get("failed", [])) if state.get("build") == build else set()
        if state.get("job"):
            known_failed |= set(self.submitter.progress(state["job"]).failed)
        todo = [i for i in self.missing(build, source) if i not in known_failed]
        if todo:
            job = self.submit(build, source, todo)
            redis.set(self._state_key, json.dumps({"model_id": self.model_id, "build": build, "job": job,
                                                   "failed": sorted(known_failed)}))
            return ReindexResult(self.alias, self.model_id, "building", build, len(source))
        source_count, target_count = self._counts(build)
        if source_count != target_count:
            return ReindexResult(self.alias, self.model_id, "incomplete", build, source_count, target_count,
                                 {i: "failed" for i in known_failed})
        result = self.swap(build, delete_old)
        redis.delete(self._state_key)
        result.source_count, result.target_count = source_count, target_count
        return result


def tick(app) -> ReindexResult:
    """The beat task's body: reindex the live alias to the model this worker is configured with."""
    ctx = app.delf
    submitter = Submitter(app)
    reindexer = Reindexer(ctx.settings, submitter, ctx.spec)
    try:
        return reindexer.tick()
    finally:
        reindexer.close()
