"""Choose ``rank_global_weight`` on the pairs, not on paris250.

    python benchmarks/rank_weight_pairs.py [--pairs benchmarks/results/chance_inliers.json]

The final order ranks a hit by ``inliers + w x global cosine`` (``rank_by=inliers+global``).  A
ranking is right when every true match scores above every wrong image, so for each weight ``w`` this
measures, over the pairs check's true pairs (HPatches dogman, EVD, training-photo warps) and its
different-scene pairs (cross-source training photos and pairs images), the share of (true, false)
combinations the score orders correctly (ties count half: the ROC AUC of the score).  The weight with
the highest AUC is the choice; paris250 is never read.  The inliers and cosines are the ones
``benchmarks/chance_inliers.py`` measured with the default model and verification.

Writes benchmarks/results/rank_weight_pairs.json (+ .png).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
WEIGHTS = [float(w) for w in range(0, 301, 5)]


def pair_scores(pairs: dict) -> tuple[np.ndarray, list[str], np.ndarray]:
    """((T, 2) [inliers, cosine] of the true pairs, their sets, (F, 2) of the false pairs)."""
    true = np.array([[row["inliers"], row["global_cosine"]] for row in pairs["true_rows"]], float)
    fields = pairs["false_compact_fields"]
    columns = [fields.index("inliers"), fields.index("global_cosine")]
    false = np.array([[row[c] for c in columns] for row in pairs["false_compact"]], float)
    return true, [row["set"] for row in pairs["true_rows"]], false


def auc(true_scores: np.ndarray, false_scores: np.ndarray) -> float:
    """Share of (true, false) combinations with the true one above (ties: half)."""
    above = (true_scores[:, None] > false_scores[None, :]).mean()
    tied = (true_scores[:, None] == false_scores[None, :]).mean()
    return float(above + 0.5 * tied)


def sweep(true: np.ndarray, sets: list[str], false: np.ndarray, weights: list[float]) -> list[dict]:
    rows = []
    for w in weights:
        t, f = true[:, 0] + w * true[:, 1], false[:, 0] + w * false[:, 1]
        row = {"weight": w, "auc": round(auc(t, f), 5)}
        for name in sorted(set(sets)):
            chosen = np.array([s == name for s in sets])
            row[f"auc_{name}"] = round(auc(t[chosen], f), 5)
        rows.append(row)
    return rows


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in [k for k in rows[0] if k.startswith("auc")]:
        ax.plot([r["weight"] for r in rows], [r[key] for r in rows], label=key.replace("auc_", "true: "))
    ax.axvline(result["chosen_weight"], color="k", linestyle=":", label=f"chosen {result['chosen_weight']:g}")
    ax.set_xlabel("rank_global_weight (inliers + w x global cosine)")
    ax.set_ylabel("true pair above false pair (AUC)")
    ax.set_title(f"{result['true_pairs']} true vs {result['false_pairs']} different-scene pairs")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=Path, default=RESULTS / "chance_inliers.json")
    parser.add_argument("--out", type=Path, default=RESULTS / "rank_weight_pairs.json")
    args = parser.parse_args()
    pairs = json.loads(args.pairs.read_text())
    true, sets, false = pair_scores(pairs)
    rows = sweep(true, sets, false, WEIGHTS)
    best = max(rows, key=lambda r: (r["auc"], -r["weight"]))  # the smallest of equal maxima
    result = {
        "benchmark": "rank_weight_pairs.py", "pairs_file": str(args.pairs.name), "pairs_commit": pairs.get("commit"),
        "pairs_timestamp": pairs.get("timestamp"), "model_id": pairs.get("model_id"),
        "true_pairs": len(true), "false_pairs": len(false), "chosen_weight": best["weight"], "chosen_auc": best["auc"],
        "rows": rows,
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out.with_suffix(".png"))
    print(f"rank_global_weight {best['weight']:g}: AUC {best['auc']} over {len(true)} true x {len(false)} false pairs")


if __name__ == "__main__":
    main()
