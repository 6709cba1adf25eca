"""Anchor: the off-the-shelf global descriptor alone (DELG-style GeM of the same backbone, same
forward pass as delf-es's local features), cosine ranking, no verification.  Reads the features
delf-es eval cached (same cache keys), extracting any that are missing.

    python benchmarks/anchors/global_gem.py --gt ../shared/data/paris250/gt.json \
        --distractors ../shared/data/distractors/wallpapers
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

from delf_es.eval.feature_cache import FeatureCache, content_hash, crop_key
from delf_es.eval.gt import load_ground_truth, query_pixels
from delf_es.eval.metrics import mean_scores, score_ranking
from delf_es.eval.run import TimedExtractor, database_items
from delf_es.features import Extractor
from delf_es.imageio import load_image
from delf_es.search import tie_break
from delf_es.settings import Settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gt", required=True, type=Path)
    parser.add_argument("--distractors", nargs="*", type=Path, default=[])
    parser.add_argument("--out", default="benchmarks/results/eval/anchor-global-gem.json")
    args = parser.parse_args()
    settings = Settings()
    extractor = Extractor(settings)
    timed = TimedExtractor(extractor, FeatureCache(settings.data_dir / "features", extractor.model_id), settings)
    gt = load_ground_truth(args.gt)
    items = database_items(gt, args.distractors)
    ids = [i for i, _ in items]
    matrix = np.stack([timed.features(content_hash(p), i, lambda p=p: load_image(p, settings).pixels).global_desc
                       for i, p in items])
    scores, per_query, search_ms = [], [], []
    for query in gt.queries:
        key = crop_key(content_hash(gt.resolve(query.image)), query.bbox)
        feats = timed.features(key, f"query:{query.id}", lambda q=query: query_pixels(gt, q, settings))
        started = time.perf_counter()
        similarity = matrix @ feats.global_desc
        ranking = sorted(range(len(ids)), key=lambda j: (-similarity[j], tie_break(ids[j])))
        search_ms.append(1000 * (time.perf_counter() - started))
        score = score_ranking(query.id, [ids[j] for j in ranking], set(query.positives), set(query.junk))
        scores.append(score)
        per_query.append({"query_id": query.id, "ap": score.ap})
    result = {
        "label": "anchor-global-gem",
        "description": "GeM (p=3) of EfficientNet-Lite2's head (stride 32), scales 0.7071/1/1.4142, L2, cosine "
                       "ranking, no verification (the global part of delf-es's own forward pass)",
        **mean_scores(scores),
        "extract_s_per_image_median": statistics.median(timed.seconds) if timed.seconds else None,
        "search_ms_median": statistics.median(search_ms),
        "model_id": extractor.model_id,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "loadavg_end": list(os.getloadavg()),
        "per_query": per_query,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("mAP", "R@1", "R@10")}))


if __name__ == "__main__":
    main()
