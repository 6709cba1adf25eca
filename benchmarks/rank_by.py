"""Final ranking rule (``rank_by``): scored offline on the hits of one eval run, without tuning on the test queries.

The final sort only reorders the verified shortlist, so every rule can be scored on the hits a
``delf-es eval`` run stored per query (image id, inliers, votes, global cosine), through the
same :func:`delf_es.search.rank_hits` the search uses.  Protocol:

- ``inliers`` (the rule so far) and ``verified-then-global`` (DELG's rule, no free parameter:
  ``min_inliers`` = 12 comes from the pairs set) are chosen a priori and scored on all queries;
- ``inliers+global`` has a weight: it is tuned on one half of the queries (alternate queries in
  id order) and reported on the other half, both ways (2-fold); its all-query number is the
  mean of the two held-out halves' APs, never a number tuned on the queries it reports.

    delf-es eval GT --distractors DIR --config benchmarks/configs/rank-inliers.json --label delf-es-rank-inliers --hits
    python benchmarks/rank_by.py benchmarks/results/eval/delf-es-rank-inliers.json
Writes benchmarks/results/rank_by.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from delf_es.eval.gt import load_ground_truth
from delf_es.eval.metrics import score_ranking
from delf_es.search import rank_hits
from delf_es.settings import Settings
from delf_es.types import SearchHit

WEIGHTS = (0.0, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0)


def query_aps(result: dict, gt, settings: Settings) -> dict[str, float]:
    """AP of every query when its stored hits are re-sorted by ``settings.rank_by``."""
    queries = {q.id: q for q in gt.queries}
    out = {}
    for row in result["per_query"]:
        hits = [SearchHit(i, float(n), n, v, float("nan") if g is None else g) for i, n, v, g in row["hits"]]
        ranking = [h.image_id for h in rank_hits(hits, settings)]
        q = queries[row["query_id"]]
        out[q.id] = score_ranking(q.id, ranking, set(q.positives), set(q.junk)).ap
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("result", help="eval JSON written with --hits")
    parser.add_argument("--out", default="benchmarks/results/rank_by.json")
    args = parser.parse_args()
    result = json.loads(Path(args.result).read_text())
    gt = load_ground_truth(Path(result["gt"]))
    base = Settings(**{k: v for k, v in result["settings"].items() if k in ("min_inliers",)})
    ids = sorted(row["query_id"] for row in result["per_query"])
    halves = {"A": ids[0::2], "B": ids[1::2]}

    def mean(aps: dict[str, float], subset) -> float:
        return 100.0 * float(np.mean([aps[i] for i in subset]))

    rules = {}
    for rule in ("inliers", "verified-then-global"):
        aps = query_aps(result, gt, base.model_copy(update={"rank_by": rule}))
        rules[rule] = {"mAP_all": mean(aps, ids), "mAP_A": mean(aps, halves["A"]), "mAP_B": mean(aps, halves["B"]),
                       "chosen": "a priori"}
    sweep = {w: query_aps(result, gt, base.model_copy(update={"rank_by": "inliers+global", "rank_global_weight": w}))
             for w in WEIGHTS}
    folds, held_out = {}, {}
    for tune, test in (("A", "B"), ("B", "A")):
        best = max(WEIGHTS, key=lambda w: (mean(sweep[w], halves[tune]), -w))
        folds[f"tune_{tune}_test_{test}"] = {"weight": best, "mAP_tune": mean(sweep[best], halves[tune]),
                                              "mAP_test": mean(sweep[best], halves[test])}
        held_out.update({i: sweep[best][i] for i in halves[test]})
    rules["inliers+global"] = {"mAP_all": mean(held_out, ids), "folds": folds,
                               "chosen": "weight tuned on one half, reported on the other (2-fold)",
                               "sweep_mAP_all_for_reference_only": {str(w): mean(sweep[w], ids) for w in WEIGHTS}}
    out = {
        "benchmark": "rank_by",
        "source": args.result,
        "source_label": result["label"],
        "source_timestamp": result.get("timestamp"),
        "queries": len(ids),
        "halves": halves,
        "min_inliers": base.min_inliers,
        "rules": rules,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "loadavg": list(os.getloadavg()),
    }
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({r: v["mAP_all"] for r, v in rules.items()}, indent=2))
    print(json.dumps(folds, indent=2))


if __name__ == "__main__":
    main()
