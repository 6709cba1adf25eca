"""``delf-es eval``: index a gt.json database (+ distractors), run every query, score.

Any set in the paris250 ``gt.json`` format runs unchanged.  Database ids are the paths as
written in gt.json (distractors: ``distractor:<file name>``), so rankings are scored
directly against the positives and junk lists.  mAP follows the Revisited Oxford/Paris
code: junk removed from the ranking; database images the search did not return count as
ranked after all returned ones.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import tempfile
import time
import uuid
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from delf_es.errors import EvaluationFailed
from delf_es.eval.feature_cache import FeatureCache, content_hash, crop_key
from delf_es.eval.gt import GroundTruth, load_ground_truth, query_pixels
from delf_es.eval.metrics import QueryScore, mean_scores, score_ranking
from delf_es.features import Extractor
from delf_es.imageio import load_image
from delf_es.sdk import DelfEs
from delf_es.settings import Settings
from delf_es.types import Features

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".webp", ".tif", ".tiff"}


def database_items(gt: GroundTruth, distractor_dirs: list[Path]) -> list[tuple[str, Path]]:
    """(image id, file) of every database image, distractors last."""
    items = [(rel, gt.resolve(rel)) for rel in gt.database]
    for folder in distractor_dirs:
        items += [(f"distractor:{p.name}", p) for p in sorted(Path(folder).rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES]
    return items


class TimedExtractor:
    """Extracts through the feature cache and records the time of real extractions (s)."""

    def __init__(self, extractor: Extractor, cache: FeatureCache, settings: Settings) -> None:
        self.extractor, self.cache, self.settings = extractor, cache, settings
        self.seconds: list[float] = []

    def features(self, key: str, image_id: str, pixels_of) -> Features:
        def extract() -> Features:
            pixels = pixels_of()
            started = time.perf_counter()
            features = self.extractor.extract(pixels, image_id)
            self.seconds.append(time.perf_counter() - started)
            return features

        return self.cache.get_or_extract(key, image_id, extract)


def evaluate(
    gt_path: Path,
    distractors: list[Path],
    settings: Settings,
    out_dir: Path,
    cache_dir: Path,
    label: str = "delf-es",
    extractor: Extractor | None = None,
    keep_index: bool = False,
    keep_hits: bool = False,
) -> dict:
    """Run the benchmark; returns (and writes to ``out_dir/<label>.json``) the result."""
    gt = load_ground_truth(gt_path)
    extractor = extractor or Extractor(settings)
    timed = TimedExtractor(extractor, FeatureCache(cache_dir, extractor.model_id, extractor.spec), settings)
    items = database_items(gt, distractors)
    loadavg_start = list(os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="delf-es-eval-") as scratch:
        index_settings = settings.model_copy(update={"data_dir": Path(scratch)}) if settings.index_backend() != "elasticsearch" else \
            settings.model_copy(update={"index_alias": f"eval-{uuid.uuid4().hex[:8]}"})
        engine = DelfEs(index_settings, extractor=extractor)
        try:
            database = []
            for image_id, path in tqdm(items, desc="database", unit="img"):
                feats = timed.features(content_hash(path), image_id, lambda p=path: load_image(p, settings).pixels)
                database.append((feats, image_id, {"set": "distractor" if image_id.startswith("distractor:") else gt.name}))
            started = time.perf_counter()
            report = engine.add_features_bulk(database)
            ingest_s = time.perf_counter() - started
            if not report.ok:
                raise EvaluationFailed(f"{len(report.failed)} database images failed to index: {report.failed[:3]}")
            scores: list[QueryScore] = []
            per_query, search_ms = [], []
            for query in tqdm(gt.queries, desc="queries", unit="q"):
                key = crop_key(content_hash(gt.resolve(query.image)), query.bbox)
                feats = timed.features(key, f"query:{query.id}", lambda q=query: query_pixels(gt, q, settings))
                started = time.perf_counter()
                hits = engine.search_features(feats)
                search_ms.append(1000 * (time.perf_counter() - started))
                ranking = [h.image_id for h in hits]
                score = score_ranking(query.id, ranking, set(query.positives), set(query.junk))
                scores.append(score)
                per_query.append({
                    **asdict(score), "kind": query.kind, "num_positives": len(query.positives),
                    "top10": [(h.image_id, h.inliers, h.votes) for h in hits[:10]],
                    # every ranked hit (keep_hits), so other final orders can be scored offline (benchmarks/rank_by.py)
                    **({"hits": [(h.image_id, h.inliers, h.votes, _finite(h.global_similarity)) for h in hits]}
                       if keep_hits else {}),
                    "query_keypoints": feats.num_keypoints, "search_ms": search_ms[-1],
                })
        finally:
            if settings.index_backend() == "elasticsearch" and not keep_index:
                _drop_es_index(index_settings)
            engine.close()
    result = {
        "label": label,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "loadavg_start": loadavg_start,
        "loadavg_end": list(os.getloadavg()),
        "gt": str(gt_path),
        "set": gt.name,
        "database_images": len(gt.database),
        "distractors": len(items) - len(gt.database),
        "queries": len(gt.queries),
        **mean_scores(scores),
        "extract_s_per_image_median": statistics.median(timed.seconds) if timed.seconds else None,
        "extracted_this_run": len(timed.seconds),
        "search_ms_median": statistics.median(search_ms),
        "search_ms_p95": float(np.percentile(search_ms, 95)),
        "ingest_s": ingest_s,
        "model_id": extractor.model_id,
        "pca": asdict(extractor.pca.provenance) if extractor.pca is not None else None,
        "settings": json.loads(settings.model_dump_json(exclude={"data_dir"})),
        "backend": settings.index_backend(),
        "per_query": per_query,
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{label}.json").write_text(dump_result(result))
    return result


def dump_result(result: dict) -> str:
    """JSON with one line per query (hit lists would otherwise take six lines per hit)."""
    head = json.dumps({k: v for k, v in result.items() if k != "per_query"}, indent=2, default=str)
    rows = ",\n".join("    " + json.dumps(row, default=str) for row in result.get("per_query", []))
    return head[:-2] + ',\n  "per_query": [\n' + rows + "\n  ]\n}\n"


def _finite(value: float) -> float | None:
    return None if value is None or not np.isfinite(value) else round(float(value), 5)


def _drop_es_index(settings: Settings) -> None:
    from delf_es.index.es.transport import Transport

    with Transport(settings, request_timeout=30) as transport:
        drop_indices(transport.client, f"{settings.index_alias}*")


def drop_indices(client, pattern: str) -> list[str]:
    """Delete the indices matching ``pattern`` by name (wildcard deletes are refused by
    Elasticsearch's default ``action.destructive_requires_name``)."""
    names = list(client.indices.get(index=pattern, expand_wildcards="all", ignore_unavailable=True,
                                    allow_no_indices=True).keys())
    if names:
        client.indices.delete(index=",".join(names))
    return names
