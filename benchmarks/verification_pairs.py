"""Geometric verification on real pairs with ground-truth homographies.

HPatches 'v_dogman' (image 1 vs 2..6, H_1_k maps 1 -> k) and the 15 EVD extreme-viewpoint
pairs (evd/h/NAME.txt maps image 1 -> image 2; checked on one pair).  True pairs should get
many inliers with a small reprojection error under the given homography; false pairs
(every EVD image 1 against the next scene's image 2, and dogman 1 against EVD images) few.
For each verifier of ``delf_es.verify.estimate_model``: pydegensac homography / fundamental,
OpenCV affine, OpenCV USAC_MAGSAC homography (``homography-magsac``).

    python benchmarks/verification_pairs.py  ->  benchmarks/results/verification_pairs.json (+ .png)
"""

from __future__ import annotations

import argparse
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
from delf_es.verify import estimate_model, match_descriptors, reprojection_errors

PAIRS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "pairs"


VERIFIERS = {
    "pydegensac-homography": lambda a, b, px: estimate_model(a, b, "homography", px, 0.999, 2000, 0),
    "pydegensac-fundamental": lambda a, b, px: estimate_model(a, b, "fundamental", px, 0.999, 2000, 0),
    "opencv-affine": lambda a, b, px: estimate_model(a, b, "affine", px, 0.999, 2000, 0),
    "opencv-magsac-homography": lambda a, b, px: estimate_model(a, b, "homography-magsac", px, 0.999, 2000, 0),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--px", type=float, default=12.0)
    parser.add_argument("--out", default="benchmarks/results/verification_pairs.json")
    args = parser.parse_args()
    settings = Settings()
    extractor = Extractor(settings)
    cache: dict[Path, object] = {}

    def feats(path: Path):
        if path not in cache:
            cache[path] = extractor.extract(load_image(path, settings).pixels, str(path))
        return cache[path]

    evd_names = sorted(p.stem for p in (PAIRS / "evd" / "1").glob("*.png"))
    true_pairs = [(PAIRS / "hpatches_v_dogman" / "1.ppm", PAIRS / "hpatches_v_dogman" / f"{k}.ppm",
                   np.loadtxt(PAIRS / "hpatches_v_dogman" / f"H_1_{k}"), f"dogman 1-{k}") for k in range(2, 7)]
    true_pairs += [(PAIRS / "evd" / "1" / f"{n}.png", PAIRS / "evd" / "2" / f"{n}.png",
                    np.loadtxt(PAIRS / "evd" / "h" / f"{n}.txt"), f"evd {n}") for n in evd_names]
    false_pairs = [(PAIRS / "evd" / "1" / f"{n}.png", PAIRS / "evd" / "2" / f"{evd_names[(i + 1) % len(evd_names)]}.png",
                    None, f"evd {n} x {evd_names[(i + 1) % len(evd_names)]}") for i, n in enumerate(evd_names)]
    false_pairs += [(PAIRS / "hpatches_v_dogman" / "1.ppm", PAIRS / "evd" / "2" / f"{n}.png", None, f"dogman x evd {n}")
                    for n in evd_names[:5]]
    # EVD's files: check once which direction maps image 1 -> image 2 (the README says to)
    a, b = feats(true_pairs[5][0]), feats(true_pairs[5][1])
    m = match_descriptors(a.descriptors, b.descriptors, settings.match_max_distance, settings.match_mutual)
    _, mask = estimate_model(a.keypoints[m[:, 0]], b.keypoints[m[:, 1]], "homography", args.px, 0.999, 2000, 0)
    h = true_pairs[5][2]
    forward = np.median(reprojection_errors(h, a.keypoints[m[mask, 0]], b.keypoints[m[mask, 1]]))
    backward = np.median(reprojection_errors(np.linalg.inv(h), a.keypoints[m[mask, 0]], b.keypoints[m[mask, 1]]))
    evd_direction = "1->2" if forward <= backward else "2->1 (inverted)"
    if forward > backward:
        true_pairs = [(pa, pb, np.linalg.inv(h) if name.startswith("evd") else h, name) for pa, pb, h, name in true_pairs]
    print(f"EVD homography direction: {evd_direction} (median error {forward:.1f} vs {backward:.1f} px on {true_pairs[5][3]})")
    rows = []
    for kind, pairs in (("true", true_pairs), ("false", false_pairs)):
        for path_a, path_b, homography, name in pairs:
            a, b = feats(path_a), feats(path_b)
            matches = match_descriptors(a.descriptors, b.descriptors, settings.match_max_distance, settings.match_mutual)
            pa, pb = a.keypoints[matches[:, 0]], b.keypoints[matches[:, 1]]
            for verifier, run in VERIFIERS.items():
                started = time.perf_counter()
                _, mask = run(pa, pb, args.px)
                elapsed = time.perf_counter() - started
                row = {"pair": name, "kind": kind, "verifier": verifier, "matches": int(len(matches)),
                       "inliers": int(mask.sum()), "ms": 1000 * elapsed}
                if homography is not None and mask.any():
                    errors = reprojection_errors(homography, pa[mask], pb[mask])
                    row["median_reprojection_px"] = float(np.median(errors))
                    row["inliers_within_16px"] = int((errors < 16).sum())
                rows.append(row)
    summary = {}
    for verifier in VERIFIERS:
        def pick(kind, prefix, field="inliers"):
            return [r[field] for r in rows if r["verifier"] == verifier and r["kind"] == kind and r["pair"].startswith(prefix) and field in r]
        summary[verifier] = {
            "hpatches_inliers_median": statistics.median(pick("true", "dogman")),
            "hpatches_reprojection_px_median": statistics.median(pick("true", "dogman", "median_reprojection_px") or [float("nan")]),
            "evd_inliers_median": statistics.median(pick("true", "evd")),
            "evd_pairs_with_20_correct_inliers": sum(1 for v in pick("true", "evd", "inliers_within_16px") if v >= 20),
            "false_inliers_median": statistics.median(pick("false", "")),
            "false_inliers_max": max(pick("false", "")),
            "ms_median": statistics.median([r["ms"] for r in rows if r["verifier"] == verifier]),
        }
        print(verifier, json.dumps(summary[verifier]))
    out = {"benchmark": "verification_pairs", "model_id": extractor.model_id, "ransac_px": args.px,
           "evd_homography_direction": evd_direction,
           "matching": f"mutual NN, L2 < {settings.match_max_distance}", "summary": summary, "rows": rows,
           "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "loadavg": list(os.getloadavg()),
           "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    plot(out, Path(args.out).with_suffix(".png"))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    verifiers = list(result["summary"])
    fig, axes = plt.subplots(1, len(verifiers), figsize=(4 * len(verifiers), 3.5), sharey=True)
    for ax, verifier in zip(axes, verifiers):
        rows = [r for r in result["rows"] if r["verifier"] == verifier]
        for kind, colour in (("true", "#228833"), ("false", "#cc3311")):
            values = [r["inliers"] for r in rows if r["kind"] == kind]
            ax.scatter([kind] * len(values), values, color=colour, alpha=0.6)
        ax.set_yscale("symlog")
        ax.set_title(verifier, fontsize=9)
    axes[0].set_ylabel("inliers")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
