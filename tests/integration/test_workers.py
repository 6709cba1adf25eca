"""The worker fleet end to end: real Redis broker, real Elasticsearch, real `celery worker` processes.

Fast model (EfficientNet-Lite0, 3 scales); photos from ../shared/data/paris250 (skipped without it).
"""

from __future__ import annotations

import glob

import pytest

from conftest import shared
from delf_es.sdk import DelfEs
from delf_es.workers.app import make_submitter
from workers_fleet import Fleet, wait_for, whole_images

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: Photos per test, as the issue asks (~0.4 s each to extract on a quiet machine with these settings).
N_PHOTOS = 50


def photos(n: int, offset: int = 0) -> list[str]:
    """``n`` paris250 database photos, spread over the landmarks."""
    folder = shared("paris250/db")
    by_landmark = [sorted(glob.glob(f"{folder}/{name}/*.jpg")) for name in sorted(p.name for p in folder.iterdir())]
    spread = [path for group in zip(*by_landmark) for path in group]
    return spread[offset : offset + n]


@pytest.fixture()
def fleet(services, tmp_path, request):
    fleet = Fleet(services, tmp_path, request.node.name[5:25].replace("_", "-"))
    yield fleet
    fleet.close()


def test_enqueued_photos_are_indexed_exactly_once_searchable_and_the_undecodable_one_recorded(fleet, tmp_path):
    bad = tmp_path / "not-a-photo.jpg"
    bad.write_bytes(b"this is not a JPEG")
    paths = photos(N_PHOTOS)
    fleet.start_worker(concurrency=2)
    with make_submitter(fleet.settings) as submitter:
        items = [(p, {"landmark": p.split("/")[-2]}) for p in paths]
        job = submitter.submit(items + [str(bad)])
        again = submitter.submit(items[:3])  # duplicate messages for the same images
        done = submitter.wait(job, timeout=600)
        submitter.wait(again, timeout=300)
    assert done.total == N_PHOTOS + 1 and done.done == N_PHOTOS, fleet.log(0)[-3000:]
    assert list(done.failed) == [str(bad)] and "InvalidImage" in done.failed[str(bad)]

    images = whole_images(fleet.es, fleet.alias)
    assert sorted(images) == sorted(paths)  # each photo once, nothing else
    assert all(n == live and n > 0 for n, live in images.values()), images

    with DelfEs(fleet.settings) as sdk:
        assert sdk.count() == N_PHOTOS
        for query in (paths[0], paths[7]):
            hits = sdk.search_image(query, limit=3)
            assert hits and hits[0]["id"] == query and hits[0]["metadata"]["landmark"] == query.split("/")[-2]
        failures = sdk.failures()
    assert [(f["image_id"], f["stage"], f["error_type"]) for f in failures] == [(str(bad), "decode", "InvalidImage")]


def test_a_worker_killed_mid_batch_leaves_no_partial_image_and_another_finishes_the_job(fleet):
    paths = photos(N_PHOTOS // 2 + 2, offset=N_PHOTOS)
    first = fleet.start_worker(concurrency=1)
    with make_submitter(fleet.settings) as submitter:
        job = submitter.submit(paths)
        wait_for(lambda: submitter.progress(job).done >= 2, 300, "the first images to be indexed")
        fleet.kill(first)  # SIGKILL worker + pool process, mid-job: tasks unacknowledged, lock held
        before = submitter.progress(job)
        assert before.done < len(paths), "the job finished before the kill; nothing was tested"
        images = whole_images(fleet.es, fleet.alias)
        assert all(n == live for n, live in images.values()), images  # what was written is whole

        fleet.start_worker(concurrency=2)
        done = submitter.wait(job, timeout=600)
    assert done.done == len(paths) and not done.failed, fleet.log(1)[-3000:]
    images = whole_images(fleet.es, fleet.alias)
    assert sorted(images) == sorted(paths)
    assert all(n == live and n > 0 for n, live in images.values()), images
    with DelfEs(fleet.settings) as sdk:
        assert sdk.count() == len(paths)


def test_add_image_wait_false_returns_a_task_id_that_ends_indexed(fleet):
    path = photos(1, offset=2 * N_PHOTOS)[0]
    fleet.start_worker(concurrency=1)
    with DelfEs(fleet.settings) as sdk:
        task_id = sdk.add_image(path, metadata={"source": "async"}, wait=False)
        assert isinstance(task_id, str) and sdk.task_status(task_id)["state"] in ("pending", "indexed")
        wait_for(lambda: sdk.task_status(task_id)["state"] == "indexed", 300, "the task to be indexed")
        assert sdk.get_image(path)["metadata"] == {"source": "async"}


def test_batched_submission_extracts_several_images_per_task_and_still_indexes_each_once(fleet, tmp_path):
    """worker_extract_batch (the submitter) + extract_batch (the worker): what a GPU fleet runs."""
    bad = tmp_path / "truncated.jpg"
    paths = photos(9, offset=2 * N_PHOTOS + 1)
    bad.write_bytes(open(paths[0], "rb").read()[:3000])
    fleet.start_worker(concurrency=1, env={"DELF_ES_EXTRACT_BATCH": "4"})
    settings = fleet.settings.model_copy(update={"worker_extract_batch": 4})
    with make_submitter(settings) as submitter:
        job = submitter.submit(paths[:5] + [str(bad)] + paths[5:])
        done = submitter.wait(job, timeout=600)
    assert done.total == 10 and done.done == 9, fleet.log(0)[-3000:]
    assert list(done.failed) == [str(bad)] and "InvalidImage" in done.failed[str(bad)]
    log = fleet.log(0)
    assert log.count("Task delf.extract_batch[") >= 3 and "Task delf.extract[" not in log  # 3 tasks of <= 4 images
    images = whole_images(fleet.es, fleet.alias)
    assert sorted(images) == sorted(paths) and all(n == live and n > 0 for n, live in images.values())
    with DelfEs(fleet.settings) as sdk:
        hits = sdk.search_image(paths[3], limit=1)
        assert hits[0]["id"] == paths[3]
