"""Bulk extraction in worker processes: same features as in-process, order kept, failures
reported per item, and the process/thread plan that shares the cores."""

from __future__ import annotations

import numpy as np
import pytest

from delf_es.errors import ItemFailure
from delf_es.parallel import ExtractorPool, process_plan, usable_cores
from delf_es.sdk import pool_engine
from delf_es.settings import Settings

SMALL = dict(scales=(0.5, 1.0), global_scales=(1.0,), max_feature_num=300, runtime="torch", es_url=None, redis_url=None)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    from PIL import Image
    from skimage import data

    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for name in ("coffee", "chelsea", "astronaut"):
        paths.append(folder / f"{name}.png")
        Image.fromarray(getattr(data, name)()).save(paths[-1])
    corrupt = folder / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return paths, corrupt


def test_plan_gives_each_process_its_share_of_the_cores():
    cores = usable_cores()
    assert process_plan(Settings(extract_processes=0)) == (cores, max(1, cores // cores))
    assert process_plan(Settings(extract_processes=2, torch_threads=0)) == (2, max(1, cores // 2))
    assert process_plan(Settings(extract_processes=2, torch_threads=3)) == (2, 3)
    assert process_plan(Settings(extract_processes=0, device="cuda"))[0] == 1


def test_pool_returns_in_process_features_in_input_order_and_failures_per_item(photos, tmp_path):
    from delf_es.sdk import DelfEs

    paths, corrupt = photos
    settings = Settings(data_dir=tmp_path, **SMALL)
    items = [{"path": str(paths[0])}, {"path": str(corrupt)}, {"path": str(paths[1])}, {"path": str(paths[2])}]
    with ExtractorPool(settings, processes=2, threads=1, engine=pool_engine) as pool:
        results = list(pool.extract(items))
    assert isinstance(results[1], ItemFailure) and results[1].item_id == str(corrupt)
    engine = DelfEs(settings)
    for result, path in zip([results[0], results[2], results[3]], paths):
        name, features, thumbnail = result
        assert thumbnail[:2] == b"\xff\xd8"  # the JPEG thumbnail, made in the worker process
        expected_name, image = engine.load(str(path), None, False)
        assert name == expected_name
        expected = engine.extract(image.pixels, name)
        np.testing.assert_allclose(features.keypoints, expected.keypoints, atol=1e-3)
        np.testing.assert_allclose(features.descriptors, expected.descriptors, atol=1e-4)


def test_bulk_add_in_two_processes_indexes_what_one_process_indexes(photos, tmp_path):
    from delf_es.sdk import DelfEs

    paths, corrupt = photos
    items = [str(p) for p in paths] + [str(corrupt)]
    reports = {}
    for processes in (1, 2):
        with DelfEs(Settings(data_dir=tmp_path / str(processes), extract_processes=processes, **SMALL)) as engine:
            report = engine.bulk_add(items, progress=False)
            reports[processes] = (sorted(report.succeeded), [f.item_id for f in report.failed],
                                  {i: engine.get_image(i)["num_keypoints"] for i in report.succeeded})
    assert reports[1] == reports[2]
    assert reports[2][1] == [str(corrupt)] and len(reports[2][0]) == 3
