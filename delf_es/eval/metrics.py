"""Average precision exactly as the Revisited Oxford/Paris ``compute_ap`` (Radenovic et al. 2018).

Conventions: ranks are 0-based positions in the ranking after junk images are
removed; precision at a positive ranked first counts as 1; a query without any
positive in the database is excluded from the mean (cirtorch's convention).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from delf_es.errors import InvalidGroundTruth


def compute_ap(positive_ranks: Sequence[int], num_positives: int) -> float:
    """AP from the 0-based ranks of the retrieved positives (junk already removed).

    Positives missing from the ranking simply contribute nothing (precision 0),
    so ``num_positives`` counts every positive in the database.
    """
    if num_positives <= 0:
        raise InvalidGroundTruth("a query needs at least one positive")
    ranks = np.sort(np.asarray(positive_ranks, dtype=np.float64))
    ap = 0.0
    recall_step = 1.0 / num_positives
    for j, rank in enumerate(ranks):
        precision_before = 1.0 if rank == 0 else j / rank
        precision_after = (j + 1) / (rank + 1)
        ap += (precision_before + precision_after) * recall_step / 2.0
    return float(ap)


@dataclass(frozen=True)
class QueryScore:
    """Scores of one query: AP and recall@k (fraction of queries with a positive in the top k)."""

    query_id: str
    ap: float
    hit_at: dict[int, bool]
    first_positive_rank: int | None


def score_ranking(
    query_id: str, ranking: Sequence[str], positives: set[str], junk: set[str], ks: Sequence[int] = (1, 5, 10)
) -> QueryScore:
    """Score one ranked list of database ids; junk ids are dropped before ranks are counted.
    Ids missing from the ranking are treated as ranked after everything."""
    ranks, rank = [], 0
    for image_id in ranking:
        if image_id in junk:
            continue
        if image_id in positives:
            ranks.append(rank)
        rank += 1
    first = ranks[0] if ranks else None
    return QueryScore(
        query_id=query_id,
        ap=compute_ap(ranks, len(positives)),
        hit_at={k: first is not None and first < k for k in ks},
        first_positive_rank=first,
    )


def mean_scores(scores: Sequence[QueryScore]) -> dict[str, float]:
    """mAP (in %) and recall@k (in %) over queries."""
    if not scores:
        return {"mAP": float("nan")}
    out = {"mAP": 100.0 * float(np.mean([s.ap for s in scores]))}
    for k in scores[0].hit_at:
        out[f"R@{k}"] = 100.0 * float(np.mean([s.hit_at[k] for s in scores]))
    return out
