"""Shared runner of the anchor baselines (brute-force references for ``delf-es eval``).

Every anchor is a script run as::

    python benchmarks/anchors/<name>.py --gt ../shared/data/paris250/gt.json \
        --distractors ../shared/data/distractors/wallpapers

and writes ``benchmarks/results/eval/<label>.json``.  What is shared here, so that every
row is comparable with ``delf-es eval`` (``delf_es/eval/run.py``):

* the database: ``delf_es.eval.run.database_items`` (gt.json paths as ids, distractors as
  ``distractor:<file name>``, distractors last);
* query pixels: ``delf_es.eval.gt.query_pixels`` (bbox crop of the Oxford/Paris protocol);
* scoring: ``delf_es.eval.metrics.score_ranking`` / ``mean_scores`` (Revisited
  Oxford/Paris ``compute_ap``, junk removed, unreturned images ranked after all returned);
* ranking: :func:`rank_by_score` sorts by score tuples, best first, and breaks exact ties
  by a hash of the image id, never by database order (the database is grouped by
  landmark, so database order would leak the ground truth into tied scores).

Units: times in s for extraction (per image) and ms for search (per query).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from delf_es.eval.gt import GroundTruth, Query, load_ground_truth, query_pixels
from delf_es.eval.metrics import QueryScore, mean_scores, score_ranking
from delf_es.eval.run import database_items
from delf_es.imageio import load_image
from delf_es.settings import Settings

__all__ = [
    "QueryOutcome",
    "database_items",
    "load_ground_truth",
    "load_image",
    "parse_args",
    "query_pixels",
    "rank_by_score",
    "write_result",
]

log = logging.getLogger("anchors")
RESULTS_DIR = Path("benchmarks/results/eval")
ANCHOR_CACHE = Path.home() / ".cache" / "delf-es" / "anchors"


def parse_args(description: str, argv: Sequence[str] | None = None, extra=None) -> argparse.Namespace:
    """Common command line: ``--gt``, ``--distractors`` (repeatable), ``--out``; ``extra(parser)``
    adds anchor-specific options."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--gt", type=Path, required=True, help="gt.json (paris250 format)")
    parser.add_argument("--distractors", type=Path, action="append", default=[], help="folder of distractor images")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for <label>.json")
    parser.add_argument("-v", "--verbose", action="store_true")
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return args


def _tie_key(image_id: str) -> int:
    return int(hashlib.sha1(image_id.encode()).hexdigest()[:12], 16)


def rank_by_score(scores: dict[str, tuple[float, ...]]) -> list[str]:
    """Image ids best first: by score tuple descending, exact ties by a hash of the id."""
    return sorted(scores, key=lambda image_id: (tuple(-s for s in scores[image_id]), _tie_key(image_id)))


@dataclass
class QueryOutcome:
    """One query's result.

    Attributes:
        query: the gt query.
        ranking: database ids, best first (ids left out count as ranked after all of these).
        scores: the score tuple of (at least) the top-ranked ids, for the top-10 record.
        search_ms: wall time of the search for this query, ms (features already extracted).
        extra: anchor-specific per-query fields (e.g. query keypoints).
    """

    query: Query
    ranking: list[str]
    scores: dict[str, tuple[float, ...]]
    search_ms: float
    extra: dict[str, Any] = field(default_factory=dict)


def _commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()


def chance_scores(gt: GroundTruth, ids: Sequence[str], repeats: int = 200, seed: int = 0) -> dict[str, float]:
    """mAP / R@k of uniformly random rankings of ``ids`` (mean over ``repeats``, fixed seed): the floor
    every anchor should be read against (with 50 positives per landmark, random R@10 is high)."""
    rng = np.random.default_rng(seed)
    scores = []
    for _ in range(repeats):
        for q in gt.queries:
            ranking = [ids[i] for i in rng.permutation(len(ids))]
            scores.append(score_ranking(q.id, ranking, set(q.positives), set(q.junk)))
    return mean_scores(scores)


def write_result(
    args: argparse.Namespace,
    label: str,
    description: str,
    gt: GroundTruth,
    num_items: int,
    outcomes: Sequence[QueryOutcome],
    extract_seconds: Sequence[float],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Score every outcome with ``score_ranking`` and write ``<out>/<label>.json``; returns the result."""
    scores: list[QueryScore] = []
    per_query = []
    for outcome in outcomes:
        q = outcome.query
        score = score_ranking(q.id, outcome.ranking, set(q.positives), set(q.junk))
        scores.append(score)
        per_query.append({
            **asdict(score),
            "kind": q.kind,
            "num_positives": len(q.positives),
            "top10": [(image_id, *outcome.scores.get(image_id, ())) for image_id in outcome.ranking[:10]],
            "search_ms": outcome.search_ms,
            **outcome.extra,
        })
    search_ms = [o.search_ms for o in outcomes]
    ids = [image_id for image_id, _ in database_items(gt, args.distractors)]
    result: dict[str, Any] = {
        "label": label,
        "description": description,
        "gt": str(args.gt),
        "set": gt.name,
        "database_images": len(gt.database),
        "distractors": num_items - len(gt.database),
        "queries": len(gt.queries),
        **mean_scores(scores),
        "chance": {k: round(v, 2) for k, v in chance_scores(gt, ids).items()},
        "extract_s_per_image_median": statistics.median(extract_seconds) if extract_seconds else None,
        "extract_timed_images": len(extract_seconds),
        "search_ms_median": statistics.median(search_ms) if search_ms else None,
        "search_ms_p95": float(np.percentile(search_ms, 95)) if search_ms else None,
        **(extra or {}),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average_1_5_15min_at_end": list(os.getloadavg())},
        "per_query": per_query,
        "commit": _commit(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{label}.json"
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    log.info("%s: mAP %.2f  R@1 %.1f  R@10 %.1f  extract %.3f s/img  search %.1f ms/query -> %s",
             label, result["mAP"], result.get("R@1", float("nan")), result.get("R@10", float("nan")),
             result["extract_s_per_image_median"] or float("nan"), result["search_ms_median"] or float("nan"), path)
    return result


def settings() -> Settings:
    """The default settings (the safe loader's limits, the default model)."""
    return Settings()
