"""Zero-downtime reindex to a new model through real workers, under a stream of searches.

Index photos with EfficientNet-Lite0, pre-build part of a MobileNetV2 index (an interrupted
reindex), then run `delf-es reindex --backbone mobilenetv2` while a thread searches
continuously; each search uses the query features of the model the live index holds.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest

from delf_es.cache import MemoryLocationCache
from delf_es.features import Extractor
from delf_es.imageio import load_image
from delf_es.index.es import ElasticsearchBackend
from delf_es.model.spec import ModelSpec
from delf_es.search import Searcher
from test_workers import photos
from delf_es.workers.app import make_submitter
from delf_es.workers.reindex import Reindexer
from workers_fleet import REPO_ROOT, Fleet, whole_images

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N = 8
NEW = {"backbone": "mobilenetv2"}


@pytest.fixture()
def fleet(services, tmp_path):
    fleet = Fleet(services, tmp_path, "reindex")
    yield fleet
    fleet.close()


def live_model(fleet) -> str:
    mapping = fleet.es.indices.get_mapping(index=fleet.alias)
    (body,) = mapping.values()
    return body["mappings"]["_meta"]["model_id"]


def test_reindex_to_a_new_model_swaps_the_alias_with_zero_failed_searches_and_equal_counts(fleet):
    paths = photos(N, offset=45)
    fleet.start_worker(concurrency=2)
    old_extractor = Extractor(fleet.settings)
    new_extractor = Extractor(fleet.settings.model_copy(update=NEW))
    with make_submitter(fleet.settings) as submitter:
        done = submitter.wait(submitter.submit(paths), timeout=600)
        assert done.done == N, fleet.log(0)[-3000:]
        old_indices = sorted(fleet.es.indices.get_alias(name=fleet.alias))

        # An interrupted earlier run: 3 images already in the build.
        reindexer = Reindexer(fleet.settings, submitter, new_extractor.spec)
        build = reindexer.build_alias()
        source = reindexer.source_images()
        submitter.wait(reindexer.submit(build, source, paths[:3]), timeout=300)
        reindexer.close()

    queries = {}
    for path in paths[:2]:
        pixels = load_image(path, fleet.settings).pixels
        for extractor in (old_extractor, new_extractor):
            queries[(extractor.model_id, path)] = extractor.extract(pixels, image_id="<query>")

    stop = threading.Event()
    outcomes = {"ok": [], "failed": [], "straddled": 0}
    backend = ElasticsearchBackend(fleet.settings)

    def search_stream() -> None:
        i = 0
        while not stop.is_set():
            path = paths[i % 2]
            i += 1
            try:
                model = live_model(fleet)
                searcher = Searcher(backend, MemoryLocationCache(), fleet.settings, model)
                hits = searcher.search(queries[(model, path)], limit=3)
                if live_model(fleet) != model:  # the alias moved during this search: its model no longer matches
                    outcomes["straddled"] += 1
                elif hits and hits[0].image_id == path and hits[0].inliers >= fleet.settings.min_inliers:
                    outcomes["ok"].append(model)
                else:
                    outcomes["failed"].append((model, path, [(h.image_id, h.inliers) for h in hits[:3]]))
            except Exception as exc:  # noqa: BLE001 - every error is a failed search
                outcomes["failed"].append((path, repr(exc)))

    thread = threading.Thread(target=search_stream, daemon=True)
    thread.start()
    proc = subprocess.run(
        [sys.executable, "-m", "delf_es.cli", "reindex", "--backbone", "mobilenetv2", "--timeout", "600"],
        cwd=REPO_ROOT, env=fleet.env, capture_output=True, text=True, timeout=900,
    )
    # keep searching until the new index has served a few searches (a loaded machine searches slowly)
    deadline = time.monotonic() + 180
    while outcomes["ok"].count(new_extractor.model_id) < 2 and not outcomes["failed"] and time.monotonic() < deadline:
        time.sleep(0.5)
    stop.set()
    thread.join(timeout=60)
    backend.close()

    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["state"] == "swapped" and result["build_alias"] == build
    assert result["submitted"] == N - 3  # resumed: the 3 already built were skipped
    assert result["source_count"] == result["target_count"] == N

    print(f"searches: {len(outcomes['ok'])} ok ({outcomes['ok'].count(old_extractor.model_id)} before the swap), "
          f"{outcomes['straddled']} straddled the swap, {len(outcomes['failed'])} failed")
    assert outcomes["failed"] == []
    assert outcomes["straddled"] <= 2
    served = set(outcomes["ok"])
    assert served == {old_extractor.model_id, new_extractor.model_id}  # searched before and after the swap

    assert live_model(fleet) == new_extractor.model_id
    new_indices = sorted(fleet.es.indices.get_alias(name=fleet.alias))
    assert new_indices != old_indices and all(name.startswith(build + "-") for name in new_indices)
    assert all(fleet.es.indices.exists(index=name) for name in old_indices)  # kept (no --delete-old)
    images = whole_images(fleet.es, fleet.alias)
    assert sorted(images) == sorted(paths) and all(n == live and n > 0 for n, live in images.values())

    # The beat schedule's path: the workers are configured for Lite0, the live index is now
    # MobileNetV2, so a tick starts a rebuild; once its job is done the next tick swaps back.
    with make_submitter(fleet.settings) as submitter:
        back = Reindexer(fleet.settings, submitter, ModelSpec.from_settings(fleet.settings))
        assert back.model_id == old_extractor.model_id  # the workers' own model
        first = back.tick(delete_old=True)
        assert first.state == "building" and first.source_count == N
        state = json.loads(submitter.store.redis.get(back._state_key))
        submitter.wait(state["job"], timeout=600)
        second = back.tick(delete_old=True)
        third = back.tick()
        back.close()
    assert third.state == "up-to-date"
    assert second.state == "swapped" and second.source_count == second.target_count == N
    assert second.deleted_old and not any(fleet.es.indices.exists(index=name) for name in second.old_indices)
    assert live_model(fleet) == old_extractor.model_id
