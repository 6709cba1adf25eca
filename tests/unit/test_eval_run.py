"""``delf_es.eval.run.evaluate`` end to end on a tiny set built from scikit-image's photos
(real model, two pyramid scales): scores, recorded fields, and the feature cache."""

from __future__ import annotations

import json

import pytest

from delf_es.eval.run import evaluate
from delf_es.samples import database_photos, sample_pair
from delf_es.settings import Settings

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-set")
    left, right = sample_pair()
    photos = [left] + [p for p in database_photos()[:3]]
    for photo in photos + [right]:
        (root / photo.name).symlink_to(photo)
    gt = {"name": "tiny", "database": [p.name for p in photos],
          "queries": [{"id": "moto", "image": right.name, "positives": [left.name], "junk": []}]}
    (root / "gt.json").write_text(json.dumps(gt))
    return root / "gt.json"


def test_evaluate_scores_records_and_reuses_the_feature_cache(tiny_set, tmp_path):
    settings = Settings(scales=(0.5, 1.0), global_scales=(1.0,), shortlist_size=10)
    cache = tmp_path / "features"
    first = evaluate(tiny_set, [], settings, tmp_path / "out", cache, label="first", keep_hits=True)
    assert first["mAP"] == pytest.approx(100.0) and first["R@1"] == 100.0
    assert first["extracted_this_run"] == 5  # 4 database images + 1 query
    assert first["timestamp"] and len(first["loadavg_end"]) == 3
    hits = first["per_query"][0]["hits"]
    assert hits[0][0] == "motorcycle_left.png" and hits[0][1] >= 12  # id, inliers, votes, global cosine
    assert json.loads((tmp_path / "out" / "first.json").read_text())["mAP"] == first["mAP"]

    # another search setting, and fewer keypoints (a prefix of the cached ones): nothing re-extracted
    for change in ({"rank_by": "inliers"}, {"max_feature_num": 200}):
        again = evaluate(tiny_set, [], settings.model_copy(update=change), tmp_path / "out", cache, label="again")
        assert again["extracted_this_run"] == 0
        assert again["mAP"] == pytest.approx(100.0)
        assert "hits" not in again["per_query"][0]
    # another pyramid is another cache
    other = evaluate(tiny_set, [], settings.model_copy(update={"scales": (1.0,)}), tmp_path / "out", cache, label="other")
    assert other["extracted_this_run"] == 5
