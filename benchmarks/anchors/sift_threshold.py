"""Choose the MAGSAC threshold of ``sift_magsac.py`` on ../shared/data/pairs (never on paris250).

Pairs (all images in the anchor's frame: longer side resized to 1024 px, ground-truth
homographies mapped into that frame, ``H' = S_b H S_a^-1``):

* true pairs: the 15 EVD extreme-viewpoint pairs (``evd/1/X`` vs ``evd/2/X``) and the
  HPatches ``v_dogman`` pairs 1-k (k = 2..6, ``H_1_k`` maps image 1 to k);
* different-scene pairs: ``evd/1/X_i`` vs ``evd/2/X_{i+1}`` (15) and ``dogman/1`` vs
  ``evd/2/X`` for the first 5 EVD names (5).

The EVD homography direction is checked, not assumed: for each true EVD pair the inliers
at 8 px are scored against H and H^-1 and the direction with the lower median error over
all pairs is used, if that error is below 20 px (otherwise "undetermined"; recorded in the JSON).

For each candidate threshold (px): inliers of every pair (same RootSIFT ratio + mutual
matches as the anchor), the largest inlier count among the different-scene pairs (what
MAGSAC finds in pure outliers), the inlier precision of true pairs (share of inliers within
5 px of the ground truth) and, for information, the ROC AUC of inlier count.

Measured (2026-11, OpenCV 5.0): plain DoG/SIFT verifies none of the 15 EVD pairs at any
threshold (4-14 inliers, ground-truth precision 0; EVD needs view synthesis such as ASIFT/MODS),
so EVD pairs are uninformative here and the AUC is noise.  The rule therefore uses the
*verifiable* true pairs (ground-truth precision >= 0.5 at the 8 px reference threshold:
the 5 HPatches pairs):

Rule: maximise the geometric mean over verifiable true pairs of
``inliers / max(1, largest different-scene inlier count)`` (how far a true pair stands above
the best wrong pair); ties by the smaller threshold.  Loose thresholds add inliers to true
pairs but also lift the wrong pairs' count (6 -> 8 at 12 px), tight ones lose true inliers.

    python benchmarks/anchors/sift_threshold.py [--pairs ../shared/data/pairs]
Writes benchmarks/results/eval/anchor-sift-magsac-threshold.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np

from common import RESULTS_DIR, load_image
from delf_es.settings import Settings
from sift_magsac import THRESHOLD_PX, frame_scale, magsac_inliers, ratio_mutual_matches, rootsift

CANDIDATES = (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 16.0, 20.0)
GT_TOLERANCE_PX = 5.0


def _features(path: Path, settings: Settings):
    pixels = load_image(path, settings).pixels
    s = frame_scale(pixels.shape[1], pixels.shape[0])
    kp, desc = rootsift(pixels, s)
    return kp, desc, s


def _to_frame(h: np.ndarray, sa: float, sb: float) -> np.ndarray:
    return np.diag([sb, sb, 1.0]) @ h @ np.linalg.inv(np.diag([sa, sa, 1.0]))


def _errors(h: np.ndarray, pa: np.ndarray, pb: np.ndarray) -> np.ndarray:
    x = np.c_[pa, np.ones(len(pa))] @ h.T
    return np.linalg.norm(x[:, :2] / x[:, 2:3] - pb, axis=1)


def _auc(pos: list[int], neg: list[int]) -> float:
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=Path, default=Path("../shared/data/pairs"))
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args()
    settings = Settings()
    feats: dict[Path, tuple] = {}

    def get(path: Path):
        if path not in feats:
            feats[path] = _features(path, settings)
        return feats[path]

    evd = args.pairs / "evd"
    names = sorted(p.stem for p in (evd / "1").glob("*.png"))
    dogman = args.pairs / "hpatches_v_dogman"
    true_pairs = [(f"evd/{n}", evd / "1" / f"{n}.png", evd / "2" / f"{n}.png", np.loadtxt(evd / "h" / f"{n}.txt"))
                  for n in names]
    true_pairs += [(f"dogman/1-{k}", dogman / "1.ppm", dogman / f"{k}.ppm", np.loadtxt(dogman / f"H_1_{k}"))
                   for k in range(2, 7)]
    false_pairs = [(f"evd/{a}-{b}", evd / "1" / f"{a}.png", evd / "2" / f"{b}.png")
                   for a, b in zip(names, names[1:] + names[:1])]
    false_pairs += [(f"dogman/1-evd/{n}", dogman / "1.ppm", evd / "2" / f"{n}.png") for n in names[:5]]

    # matches once per pair (threshold-independent)
    def matched(pa_path, pb_path):
        ka, da, sa = get(pa_path)
        kb, db, sb = get(pb_path)
        m = ratio_mutual_matches(da, db)
        return ka[m[:, 0]].astype(np.float64), kb[m[:, 1]].astype(np.float64), sa, sb

    true_m = [(name, *matched(a, b), h) for name, a, b, h in true_pairs]
    false_m = [(name, *matched(a, b)) for name, a, b in false_pairs]

    # EVD direction check at 8 px
    err_fwd, err_inv = [], []
    for name, pa, pb, sa, sb, h in true_m:
        if not name.startswith("evd/"):
            continue
        _, model = magsac_inliers(pa, pb, 8.0)
        if model is None:
            continue
        hf = _to_frame(h, sa, sb)
        hi = _to_frame(np.linalg.inv(h), sa, sb)
        x = np.c_[pa, np.ones(len(pa))] @ model.T
        inl = np.linalg.norm(x[:, :2] / x[:, 2:3] - pb, axis=1) < 8.0
        if inl.sum() >= 8:
            err_fwd.append(float(np.median(_errors(hf, pa[inl], pb[inl]))))
            err_inv.append(float(np.median(_errors(hi, pa[inl], pb[inl]))))
    # decided only if SIFT verified EVD pairs well enough to tell (median error < 20 px one way)
    decided = bool(err_fwd) and min(statistics.median(err_fwd), statistics.median(err_inv)) < 20.0
    evd_inverse = decided and statistics.median(err_inv) < statistics.median(err_fwd)

    rows = []
    for t in CANDIDATES:
        pos, neg, precision, per_pair = [], [], [], {}
        for name, pa, pb, sa, sb, h in true_m:
            h = np.linalg.inv(h) if (evd_inverse and name.startswith("evd/")) else h
            hf = _to_frame(h, sa, sb)
            n_inl, model = magsac_inliers(pa, pb, t)
            pos.append(n_inl)
            prec = None
            if model is not None and n_inl:
                x = np.c_[pa, np.ones(len(pa))] @ model.T
                # MAGSAC's mask is its own; re-derive the inlier set by reprojection with the returned model
                inl = np.linalg.norm(x[:, :2] / x[:, 2:3] - pb, axis=1) < t
                if inl.any():
                    prec = float(np.mean(_errors(hf, pa[inl], pb[inl]) < GT_TOLERANCE_PX))
                    precision.append(prec)
            per_pair[name] = {"matches": int(len(pa)), "inliers": n_inl, "gt_precision": prec}
        for name, pa, pb, sa, sb in false_m:
            n_inl, _ = magsac_inliers(pa, pb, t)
            neg.append(n_inl)
            per_pair[name] = {"matches": int(len(pa)), "inliers": n_inl}
        rows.append({
            "threshold_px": t,
            "auc": _auc(pos, neg),
            "true_pairs_above_all_false": int(sum(p > max(neg) for p in pos)),
            "max_false_inliers": int(max(neg)),
            "median_true_inliers": float(statistics.median(pos)),
            "median_gt_precision": float(statistics.median(precision)) if precision else None,
            "pairs": per_pair,
        })
    reference = next(r for r in rows if r["threshold_px"] == 8.0)
    verifiable = [name for name, *_ in true_m if (reference["pairs"][name]["gt_precision"] or 0.0) >= 0.5]
    for r in rows:
        floor = max(1, r["max_false_inliers"])
        r["separation_geomean"] = float(np.exp(np.mean([np.log(max(r["pairs"][n]["inliers"], 0.5) / floor)
                                                        for n in verifiable]))) if verifiable else 0.0
    best = max(rows, key=lambda r: (round(r["separation_geomean"], 6), -r["threshold_px"]))
    result = {
        "label": "anchor-sift-magsac-threshold",
        "description": __doc__.split("\n\n")[0] + " Rule: maximise the geometric mean over verifiable true pairs "
                       "(GT precision >= 0.5 at 8 px) of inliers / max(1, largest different-scene inlier count); "
                       "ties by the smaller threshold.",
        "verifiable_true_pairs": verifiable,
        "chosen_threshold_px": best["threshold_px"],
        "threshold_in_sift_magsac_py": THRESHOLD_PX,
        "evd_homography_maps": ("undetermined: SIFT verified no EVD pair (used as given; EVD GT precision is 0 "
                                "either way)" if not decided else
                                "image 2 -> image 1 (inverted before use)" if evd_inverse else "image 1 -> image 2"),
        "evd_direction_median_err_px": {"as_given": statistics.median(err_fwd) if err_fwd else None,
                                        "inverted": statistics.median(err_inv) if err_inv else None},
        "true_pairs": len(true_m),
        "false_pairs": len(false_m),
        "gt_tolerance_px": GT_TOLERANCE_PX,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "anchor-sift-magsac-threshold.json").write_text(json.dumps(result, indent=2) + "\n")
    for r in rows:
        print(f"t={r['threshold_px']:5.1f}  AUC {r['auc']:.3f}  true>all-false {r['true_pairs_above_all_false']:2d}/"
              f"{len(true_m)}  max false {r['max_false_inliers']:3d}  median true {r['median_true_inliers']:6.1f}  "
              f"GT precision {r['median_gt_precision']}  separation {r['separation_geomean']:.1f}")
    print("EVD direction:", result["evd_homography_maps"], result["evd_direction_median_err_px"])
    print("chosen:", best["threshold_px"], "px")


if __name__ == "__main__":
    main()
